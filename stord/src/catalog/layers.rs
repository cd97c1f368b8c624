//! Layered disks in the catalog: import, linked clones, snapshots, revert,
//! flatten, and opening a catalog entry by its format.
//!
//! Every disk file is `disks/NAME.img`; a qcow2 overlay names its backing
//! file `BASE.img` (with the base's format in the header), so a chain never
//! leaves `disks/` (`qcow2::Root`). A base must be read-only: a write to it
//! would change every clone. The entry of a layered disk records its `base`
//! (and a snapshot its `snapshot_of`): `delete` refuses a disk that is the
//! base of another and names them.
//!
//! - `snapshot NAME SNAP` renames `NAME.img` to `SNAP.img` (read-only from
//!   now) and creates a new `NAME.img` overlay on it;
//! - `revert NAME SNAP` (and `flatten` of a read-only disk) write the new
//!   file as `NAME.img.new` and rename it over `NAME.img`, so the disk's
//!   file is always either the old or the new one;
//! - these are refused while clients are attached (and no client
//!   attaches while they run);
//! - `flatten NAME` of a writable disk runs while its clients go on: the
//!   chain is copied into the disk's own image, whose header then drops
//!   the backing file (`qcow2::online`);
//! - all run under the change lock like every catalog change; the catalog
//!   is written once the files are in place, and `change.json` covers the
//!   window between (`journal.rs`).

use std::path::Path;

use super::journal::{crash_point, new_path, Step};
use super::{Catalog, CatalogError, Change, Disks, Entry};
use crate::config::{check_disk_name, check_disk_size, Alloc, Format};
use crate::disk::{Disk, DiskError, FILE_MODE};
use crate::qcow2::{create, Layer, Qcow2Error, Root};

impl From<Qcow2Error> for CatalogError {
    fn from(e: Qcow2Error) -> Self {
        CatalogError::Disk(DiskError::Qcow2(e))
    }
}

/// `entries` with each of `set` put in place of the entry of its name (or
/// added).
fn with(mut entries: Vec<Entry>, set: &[Entry]) -> Vec<Entry> {
    for e in set {
        entries.retain(|x| x.name != e.name);
        entries.push(e.clone());
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    entries
}

/// A disk taken for a change of its file; attaching is allowed again on drop.
struct Taken(std::sync::Arc<Disk>);

impl Drop for Taken {
    fn drop(&mut self) {
        self.0
            .exclusive
            .store(false, std::sync::atomic::Ordering::Release);
    }
}

impl Catalog {
    /// Backing names of the disks' images resolve in `disks/`.
    fn root(&self) -> Result<Root, CatalogError> {
        Ok(Root::disks(&self.state_dir.join("disks"))?)
    }

    /// Opens the file of a catalog entry by its format.
    pub(super) fn open_entry(&self, e: &Entry) -> Result<Disk, CatalogError> {
        let p = self.disk_path(&e.name);
        Ok(match e.format {
            Format::Raw => Disk::open(&e.name, &p, e.alloc, e.read_only)?,
            Format::Qcow2 => Disk::open_qcow2(&e.name, &p, e.read_only, &self.root()?)?,
        })
    }

    /// Creates the overlay file of a linked clone `name` of `base` (the map
    /// as given); its entry.
    pub(super) fn clone_file(
        &self,
        map: &Disks,
        base: &str,
        name: &str,
        read_only: bool,
    ) -> Result<Entry, CatalogError> {
        let b = map.open_disk(base)?;
        if !b.read_only() {
            return Err(CatalogError::Refused(format!(
                "disk `{base}` is writable: a base must be read-only (import one, or snapshot the disk and clone the snapshot)"
            )));
        }
        let p = self.disk_path(name);
        let _ = std::fs::remove_file(&p); // an orphan: the name is in no entry
        let backing = format!("{base}.img");
        create::create(
            &p,
            b.size(),
            Some((&backing, b.format().as_str())),
            FILE_MODE,
        )?;
        Ok(Entry {
            name: name.to_string(),
            size: b.size(),
            alloc: Alloc::Dynamic,
            read_only,
            format: Format::Qcow2,
            base: Some(base.to_string()),
            snapshot_of: None,
        })
    }

    /// Opens a new disk's file, writes the catalog naming it and serves it;
    /// the file goes again if that fails.
    fn commit_new(&self, e: &Entry) -> Result<(), CatalogError> {
        let res = self.sync_disks_dir().and_then(|()| {
            let disk = self.open_entry(e)?;
            let entries = self.lock().entries(Change::Add(e));
            self.save(&entries)?;
            Ok(disk)
        });
        match res {
            Ok(disk) => {
                self.lock().insert(disk, e);
                Ok(())
            }
            Err(err) => {
                let _ = std::fs::remove_file(self.disk_path(&e.name));
                Err(err)
            }
        }
    }

    /// Runs `work` under the change lock with `name`, the name of a new disk,
    /// reserved meanwhile: refused if a disk has it or is being made with it.
    /// `work` adds the disk to the map, or fails and leaves the name free.
    pub(super) fn reserving(
        &self,
        name: &str,
        work: impl FnOnce() -> Result<(), CatalogError>,
    ) -> Result<(), CatalogError> {
        let _change = self.change.lock().unwrap_or_else(|p| p.into_inner());
        {
            let mut map = self.lock();
            if map.taken(name) {
                return Err(CatalogError::Exists(name.to_string()));
            }
            map.creating.insert(name.to_string());
        }
        let res = work();
        self.lock().creating.remove(name);
        res
    }

    /// Runs `work` for a new disk `name` under the change lock, with the
    /// name reserved.
    fn new_disk(
        &self,
        name: &str,
        work: impl FnOnce() -> Result<Entry, CatalogError>,
    ) -> Result<(), CatalogError> {
        check_disk_name(name).map_err(CatalogError::BadName)?;
        self.reserving(name, || work().and_then(|e| self.commit_new(&e)))
    }

    /// Copies `from` into the state directory as the read-only disk `name`:
    /// raw stays raw; a qcow2 (with its chain, inside its own directory) is
    /// flattened into a new qcow2. `format` `None`: by the file's magic.
    pub fn import(
        &self,
        name: &str,
        from: &Path,
        format: Option<Format>,
    ) -> Result<(), CatalogError> {
        self.new_disk(name, || {
            let dir = from.parent().filter(|d| !d.as_os_str().is_empty());
            let root = Root::import_dir(dir.unwrap_or(Path::new(".")))?;
            let src = Layer::open(from, format.map(|f| f.as_str()), &root, &mut Vec::new())?;
            check_disk_size(src.size()).map_err(CatalogError::BadSize)?;
            let p = self.disk_path(name);
            let _ = std::fs::remove_file(&p);
            let format = match &src {
                Layer::Raw { .. } => {
                    create::copy_to_raw(&src, &p, FILE_MODE)?;
                    Format::Raw
                }
                Layer::Qcow2(_) => {
                    create::copy_to_qcow2(&src, &p, FILE_MODE)?;
                    Format::Qcow2
                }
            };
            Ok(Entry {
                name: name.to_string(),
                size: src.size(),
                alloc: Alloc::Dynamic,
                read_only: true,
                format,
                base: None,
                snapshot_of: None,
            })
        })
    }

    /// Makes the linked clone `name` of the read-only disk `base`.
    pub fn clone_disk(&self, base: &str, name: &str) -> Result<(), CatalogError> {
        self.new_disk(name, || {
            let map = self.lock();
            self.clone_file(&map, base, name, false)
        })
    }

    /// Takes disk `name` for a change of its file: no connections, none
    /// while the change runs (the returned guard lets go), flushed.
    fn take(&self, name: &str) -> Result<(std::sync::Arc<Disk>, Entry, Taken), CatalogError> {
        let map = self.lock();
        let disk = map.open_disk(name)?;
        let connections = disk.connections();
        if connections > 0 {
            return Err(CatalogError::busy(name, connections));
        }
        disk.exclusive
            .store(true, std::sync::atomic::Ordering::Release);
        let entry = map.entry_of(&disk);
        drop(map);
        let taken = Taken(disk.clone());
        disk.flush()?;
        Ok((disk, entry, taken))
    }

    /// Freezes disk `name` as the read-only snapshot `snap` and continues
    /// it in a new overlay on it.
    pub fn snapshot(&self, name: &str, snap: &str) -> Result<(), CatalogError> {
        check_disk_name(snap).map_err(CatalogError::BadName)?;
        let _change = self.change.lock().unwrap_or_else(|p| p.into_inner());
        if self.lock().taken(snap) {
            return Err(CatalogError::Exists(snap.to_string()));
        }
        let (disk, old, _taken) = self.take(name)?;
        if disk.read_only() {
            return Err(CatalogError::Refused(format!(
                "disk `{name}` is read-only already: clone it instead"
            )));
        }
        let (p, sp) = (self.disk_path(name), self.disk_path(snap));
        let new = new_path(&p);
        let _ = std::fs::remove_file(&sp);
        let _ = std::fs::remove_file(&new);
        let frozen = Entry {
            name: snap.to_string(),
            read_only: true,
            snapshot_of: Some(name.to_string()),
            ..old.clone()
        };
        let top = Entry {
            format: Format::Qcow2,
            alloc: Alloc::Dynamic,
            base: Some(snap.to_string()),
            snapshot_of: None,
            ..old
        };
        let backing = format!("{snap}.img");
        create::create(
            &new,
            frozen.size,
            Some((&backing, frozen.format.as_str())),
            FILE_MODE,
        )?;
        let entries = with(
            self.lock().entries(Change::None),
            &[frozen.clone(), top.clone()],
        );
        let step = Step::Snapshot {
            disk: name.to_string(),
            snap: snap.to_string(),
        };
        let io = |e| CatalogError::Disk(DiskError::Io(e));
        let res = self
            .sync_disks_dir()
            .and_then(|()| self.begin(step, &entries))
            .and_then(|()| {
                crash_point("snapshot-begun");
                std::fs::rename(&p, &sp).map_err(io)
            })
            .and_then(|()| {
                crash_point("snapshot-renamed");
                std::fs::rename(&new, &p).map_err(io)
            })
            .and_then(|()| self.sync_disks_dir())
            .and_then(|()| {
                crash_point("snapshot");
                Ok((self.open_entry(&frozen)?, self.open_entry(&top)?))
            })
            .and_then(|disks| {
                self.save(&entries)?;
                Ok(disks)
            });
        match res {
            Ok((f, t)) => {
                {
                    let mut map = self.lock();
                    map.insert(f, &frozen);
                    map.insert(t, &top);
                }
                self.end()
            }
            Err(e) => {
                // Back to the old file under the old name; the record
                // then says undone (or, if that failed, what to finish).
                if sp.exists() {
                    if !new.exists() {
                        let _ = std::fs::remove_file(&p);
                    }
                    let _ = std::fs::rename(&sp, &p);
                }
                self.settle();
                Err(e)
            }
        }
    }

    /// After a failed change: finishes or undoes it by its record, as a
    /// restart would.
    fn settle(&self) {
        if let Err(e) = self.recover() {
            tracing::error!(error = %crate::error_chain(&e), "a failed catalog change could not be settled; it is at the next start");
        }
    }

    /// The snapshots of disk `name`, nearest first.
    pub fn snapshots(&self, name: &str) -> Result<Vec<super::DiskInfo>, CatalogError> {
        let all = self.list();
        let me = all
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| CatalogError::NotFound(name.to_string()))?;
        let mut snaps: Vec<_> = all
            .iter()
            .filter(|d| d.snapshot_of.as_deref() == Some(name))
            .cloned()
            .collect();
        let pos = |n: &str| me.chain.iter().position(|c| c == n).unwrap_or(usize::MAX);
        snaps.sort_by_key(|d| pos(&d.name));
        Ok(snaps)
    }

    /// Throws away what disk `name` got since its snapshot `snap`.
    pub fn revert(&self, name: &str, snap: &str) -> Result<(), CatalogError> {
        let _change = self.change.lock().unwrap_or_else(|p| p.into_inner());
        let s = self.lock().open_disk(snap)?;
        let (disk, old, _taken) = self.take(name)?;
        let is_snap = self.lock().layers.get(snap).and_then(|l| l.1.clone());
        let in_chain = disk.chain().iter().any(|p| super::disk_name_of(p) == snap);
        if is_snap.as_deref() != Some(name) || !in_chain {
            return Err(CatalogError::Refused(format!(
                "`{snap}` is not a snapshot of `{name}`"
            )));
        }
        let backing = format!("{snap}.img");
        let format = s.format();
        let top = Entry {
            base: Some(snap.to_string()),
            ..old
        };
        self.replace_file(&top, |tmp| {
            create::create(tmp, s.size(), Some((&backing, format.as_str())), FILE_MODE)
        })
    }

    /// Copies disk `name`'s chain into one self-contained qcow2: a
    /// writable disk online (its clients go on: `qcow2::online`), a
    /// read-only one into a new file (refused while attached).
    pub fn flatten(&self, name: &str) -> Result<(), CatalogError> {
        let _change = self.change.lock().unwrap_or_else(|p| p.into_inner());
        let (disk, old) = {
            let map = self.lock();
            let disk = map.open_disk(name)?;
            let e = map.entry_of(&disk);
            (disk, e)
        };
        if old.base.is_none() {
            return Err(CatalogError::Refused(format!(
                "disk `{name}` has no base: it is self-contained already"
            )));
        }
        let top = Entry { base: None, ..old };
        if disk.read_only() {
            let (disk, _, _taken) = self.take(name)?;
            let p = disk.path().to_path_buf();
            let src = Layer::open(&p, Some("qcow2"), &self.root()?, &mut Vec::new())?;
            return self.replace_file(&top, |tmp| create::copy_to_qcow2(&src, tmp, FILE_MODE));
        }
        disk.stream()?;
        let entries = with(
            self.lock().entries(Change::None),
            std::slice::from_ref(&top),
        );
        self.begin(
            Step::Detach {
                disk: name.to_string(),
            },
            &entries,
        )?;
        let res = disk.detach().map_err(CatalogError::from).and_then(|()| {
            crash_point("flatten");
            self.save(&entries)
        });
        match res {
            Ok(()) => {
                self.lock()
                    .layers
                    .insert(name.to_string(), (None, top.snapshot_of.clone()));
                self.end()
            }
            Err(e) => {
                self.settle();
                Err(e)
            }
        }
    }

    /// Makes the new file of disk `e` with `make` beside the old one,
    /// renames it over, opens it, writes the catalog and serves it.
    fn replace_file(
        &self,
        e: &Entry,
        make: impl FnOnce(&Path) -> Result<(), Qcow2Error>,
    ) -> Result<(), CatalogError> {
        let p = self.disk_path(&e.name);
        let tmp = new_path(&p);
        let _ = std::fs::remove_file(&tmp);
        make(&tmp)?;
        let entries = with(self.lock().entries(Change::None), std::slice::from_ref(e));
        let step = Step::Replace {
            disk: e.name.clone(),
        };
        if let Err(err) = self
            .sync_disks_dir()
            .and_then(|()| self.begin(step, &entries))
        {
            let _ = std::fs::remove_file(&tmp);
            self.settle();
            return Err(err);
        }
        let res = std::fs::rename(&tmp, &p)
            .map_err(|e| CatalogError::Disk(DiskError::Io(e)))
            .and_then(|()| self.sync_disks_dir())
            .and_then(|()| {
                crash_point("replace");
                let disk = self.open_entry(e)?;
                self.save(&entries)?;
                Ok(disk)
            });
        match res {
            Ok(disk) => {
                self.lock().insert(disk, e);
                self.end()
            }
            Err(err) => {
                self.settle();
                Err(err)
            }
        }
    }
}

#[cfg(test)]
mod tests;
