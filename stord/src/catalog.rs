//! The disk catalog: which disks exist, their size and allocation policy.
//!
//! Theory of operation: the catalog lives in `<state_dir>/catalog.json`, disk
//! files in `<state_dir>/disks/<name>.img`. Every change is written atomically:
//! the new catalog goes to a temporary file which is fsynced, renamed over the
//! old one, and the directory is fsynced, so after a crash the catalog is either
//! the old or the new one, never a torn mix. A disk file is created before the
//! catalog names it and removed after the catalog stops naming it, so the worst
//! a crash leaves is an orphan file, which is adopted when a config or a create
//! names it again.
//!
//! Creating or removing a disk file fsyncs the `disks/` directory, so after a
//! power cut a catalog entry never names a file whose directory entry was
//! lost. A disk whose file cannot be opened (removed by hand, a bad disk) is
//! kept in the catalog and listed as `missing`; the other disks still serve.
//! The state directory and `disks/` are created 0700, catalog and disk files
//! are 0600: nobody but the daemon's user reads a guest's disk.
//!
//! Two locks. The map lock guards the map and is held only for lookups and
//! single inserts / removals; attaching a connection and deleting a disk both
//! take it, so a disk cannot be deleted between a client's lookup and its
//! attach. The change lock serializes catalog changes (create, delete, resize)
//! and is held across their file work (fallocate, fsync), so a large
//! fixed-disk create stalls neither handshakes nor the control socket nor
//! shutdown: only other catalog changes wait. A change builds the new catalog
//! from the map, writes it, and only then applies itself to the map, so a
//! client never attaches to a disk the catalog on disk does not name.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::config::{check_disk_name, check_disk_size, Alloc, DiskConfig, Format};
use crate::disk::{Attachment, Disk, DiskError};

/// Errors of catalog operations (also what the control API reports).
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// cannot prepare the state directory {path}
    #[error("cannot prepare the state directory {path}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// cannot read the catalog {path}
    #[error("cannot read the catalog {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// the catalog {path} is malformed
    #[error("the catalog {path} is malformed")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// cannot write the catalog {path}
    #[error("cannot write the catalog {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// invalid disk name: expected {0}
    #[error("invalid disk name: expected {0}")]
    BadName(String),
    /// invalid size: expected {0}
    #[error("invalid size: expected {0}")]
    BadSize(String),
    /// disk `{0}` already exists
    #[error("disk `{0}` already exists")]
    Exists(String),
    /// no disk named `{0}`
    #[error("no disk named `{0}`")]
    NotFound(String),
    /// disk `{name}` has {connections} open connection(s)
    #[error("disk `{name}` has {connections} open connection(s); disconnect its clients first")]
    Busy {
        /// The disk.
        name: String,
        /// How many.
        connections: usize,
    },
    /// disk `{name}` is the base of {users}
    #[error("disk `{name}` is the base of {users}; delete or flatten those first")]
    InUse {
        /// The disk.
        name: String,
        /// The disks on it, comma-separated.
        users: String,
    },
    /// a layered-disk operation was refused
    #[error("{0}")]
    Refused(String),
    /// disk operation failed
    #[error(transparent)]
    Disk(#[from] DiskError),
}

impl CatalogError {
    /// Disk `name` has `connections` clients, which the change would pull the disk
    /// from under.
    fn busy(name: &str, connections: usize) -> CatalogError {
        CatalogError::Busy {
            name: name.to_string(),
            connections,
        }
    }
}

/// One catalog entry as stored on disk and reported by `list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Export name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Allocation policy.
    pub alloc: Alloc,
    /// Served read-only.
    #[serde(default)]
    pub read_only: bool,
    /// The file's format.
    #[serde(default)]
    pub format: Format,
    /// The disk under this one (a qcow2 overlay's backing file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// The disk this one is a snapshot of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_of: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    version: u32,
    disks: Vec<Entry>,
}

pub use fabric_api::stord::DiskInfo;

/// Mode of the state directory and `disks/`.
pub const DIR_MODE: u32 = 0o700;

/// What the map lock guards.
#[derive(Debug, Default)]
struct Disks {
    /// Disks being served.
    open: BTreeMap<String, Arc<Disk>>,
    /// Disks the catalog names whose file could not be opened.
    missing: BTreeMap<String, Entry>,
    /// Names a create is working on (not yet in the catalog).
    creating: std::collections::BTreeSet<String>,
    /// The layering of the disks served: (base, snapshot_of).
    layers: BTreeMap<String, (Option<String>, Option<String>)>,
}

impl Disks {
    /// The disk `name` being served, or NotFound.
    fn open_disk(&self, name: &str) -> Result<Arc<Disk>, CatalogError> {
        self.open
            .get(name)
            .cloned()
            .ok_or_else(|| CatalogError::NotFound(name.to_string()))
    }

    fn taken(&self, name: &str) -> bool {
        self.open.contains_key(name)
            || self.missing.contains_key(name)
            || self.creating.contains(name)
    }

    /// The catalog as it stands, with `change` applied.
    fn entries(&self, change: Change<'_>) -> Vec<Entry> {
        let mut all: BTreeMap<&str, Entry> = self
            .open
            .values()
            .map(|d| (d.name(), self.entry_of(d)))
            .chain(self.missing.iter().map(|(n, e)| (n.as_str(), e.clone())))
            .collect();
        match change {
            Change::None => {}
            Change::Add(e) => {
                all.insert(&e.name, e.clone());
            }
            Change::Remove(n) => {
                all.remove(n);
            }
        }
        all.into_values().collect()
    }
}

/// What [`Catalog::open_or_create`] does with a disk file that is there already.
#[derive(Clone, Copy)]
enum Leftover {
    /// Keeps it: a configured disk whose file is there but not in the catalog.
    Adopt,
    /// Removes it and starts afresh: an orphan from a crash between file creation
    /// and catalog write, or from a delete that could not remove the file.
    Replace,
}

/// How a catalog change alters the entries written.
#[derive(Clone, Copy)]
enum Change<'a> {
    None,
    Add(&'a Entry),
    Remove(&'a str),
}

impl Disks {
    /// The catalog entry of a disk served.
    fn entry_of(&self, d: &Disk) -> Entry {
        let (base, snapshot_of) = self.layers.get(d.name()).cloned().unwrap_or_default();
        Entry {
            name: d.name().to_string(),
            size: d.size(),
            alloc: d.alloc(),
            read_only: d.read_only(),
            format: d.format(),
            base,
            snapshot_of,
        }
    }

    /// The disks whose base is `name`.
    fn users_of(&self, name: &str) -> Vec<String> {
        self.layers
            .iter()
            .filter(|(_, (b, _))| b.as_deref() == Some(name))
            .map(|(n, _)| n.clone())
            .chain(
                self.missing
                    .values()
                    .filter(|e| e.base.as_deref() == Some(name))
                    .map(|e| e.name.clone()),
            )
            .collect()
    }

    /// Serves `disk` with the layering of `e`.
    fn insert(&mut self, disk: Disk, e: &Entry) {
        self.layers
            .insert(e.name.clone(), (e.base.clone(), e.snapshot_of.clone()));
        self.open.insert(e.name.clone(), Arc::new(disk));
    }
}

/// fsyncs a directory (makes the entries created or removed in it durable).
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// The catalog.
#[derive(Debug)]
pub struct Catalog {
    state_dir: PathBuf,
    disks: Mutex<Disks>,
    /// Serializes catalog changes (see the module docs).
    change: Mutex<()>,
}

impl Catalog {
    /// Opens (or starts) the catalog in `state_dir` and creates the configured
    /// disks that are missing; disks already present are kept as they are.
    pub fn open(state_dir: &Path, configured: &[DiskConfig]) -> Result<Catalog, CatalogError> {
        let disks_dir = state_dir.join("disks");
        let sd = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CatalogError::StateDir { path, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(state_dir)
            .map_err(sd(state_dir))?;
        // disks/ is stord's own: tightened even if an older release made it
        // 0755. The state directory may be shared (systemd's StateDirectory
        // sets its mode), so it is only created with the mode.
        std::fs::DirBuilder::new()
            .mode(DIR_MODE)
            .create(&disks_dir)
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => Ok(()),
                _ => Err(e),
            })
            .and_then(|()| {
                std::fs::set_permissions(
                    &disks_dir,
                    std::os::unix::fs::PermissionsExt::from_mode(DIR_MODE),
                )
            })
            .map_err(sd(&disks_dir))?;
        let cat = Catalog {
            state_dir: state_dir.to_path_buf(),
            disks: Mutex::new(Disks::default()),
            change: Mutex::new(()),
        };
        // A change a crash interrupted is finished or undone first.
        cat.recover()?;
        let path = cat.catalog_path();
        let entries = match std::fs::read(&path) {
            Ok(bytes) => {
                let f: CatalogFile =
                    serde_json::from_slice(&bytes).map_err(|source| CatalogError::Malformed {
                        path: path.clone(),
                        source,
                    })?;
                f.disks
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(CatalogError::Read { path, source }),
        };
        let mut changed = false;
        {
            let mut map = cat.lock();
            for e in entries {
                if map.taken(&e.name) {
                    continue; // a hand-edited catalog naming a disk twice
                }
                match cat.open_entry(&e) {
                    Ok(disk) => {
                        // A resize a crash cut before its catalog update.
                        changed |= disk.size() != e.size;
                        map.insert(disk, &e)
                    }
                    Err(err) => {
                        tracing::error!(
                            disk = %e.name,
                            error = %crate::error_chain(&err),
                            "disk file cannot be opened; the disk is listed missing and not served"
                        );
                        map.missing.insert(e.name.clone(), e);
                    }
                }
            }
            // Clones after the disks they may be clones of.
            let ordered = configured
                .iter()
                .filter(|d| d.base.is_none())
                .chain(configured.iter().filter(|d| d.base.is_some()));
            for d in ordered {
                // A configured disk listed missing stays missing: recreating
                // it empty would hide the loss.
                if map.taken(&d.name) {
                    continue;
                }
                if let Some(base) = &d.base {
                    // A clone of a disk opened above (the map lock is held:
                    // the clone is made here, as the file work of a create).
                    let e = cat.clone_file(&map, base, &d.name, d.read_only)?;
                    cat.sync_disks_dir()?;
                    let disk = cat.open_entry(&e)?;
                    map.insert(disk, &e);
                    changed = true;
                    continue;
                }
                let disk = cat.create_or_adopt(d)?;
                map.open.insert(d.name.clone(), Arc::new(disk));
                changed = true;
            }
            if changed {
                cat.save(&map.entries(Change::None))?;
            }
        }
        Ok(cat)
    }

    fn lock(&self) -> MutexGuard<'_, Disks> {
        // A panic while holding the lock cannot leave the map inconsistent (each
        // mutation is a single insert/remove), so poisoning is ignored.
        self.disks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn catalog_path(&self) -> PathBuf {
        self.state_dir.join("catalog.json")
    }

    /// Where a disk's file lives.
    pub fn disk_path(&self, name: &str) -> PathBuf {
        self.state_dir.join("disks").join(format!("{name}.img"))
    }

    /// A configured disk not in the catalog: its file, adopted where it is there.
    fn create_or_adopt(&self, d: &DiskConfig) -> Result<Disk, CatalogError> {
        let (disk, created) = self.open_or_create(d, Leftover::Adopt)?;
        if created {
            self.sync_disks_dir()?;
        }
        Ok(disk)
    }

    /// Creates the file of disk `d`; a file of that name already there is handled as
    /// `leftover` says. The bool says whether a file was created (the disks
    /// directory then wants a sync).
    fn open_or_create(
        &self,
        d: &DiskConfig,
        leftover: Leftover,
    ) -> Result<(Disk, bool), CatalogError> {
        let p = self.disk_path(&d.name);
        if p.exists() {
            match leftover {
                Leftover::Adopt => {
                    tracing::warn!(disk = d.name, path = %p.display(), "adopting an existing disk file not in the catalog");
                    return Ok((Disk::open(&d.name, &p, d.alloc, d.read_only)?, false));
                }
                Leftover::Replace => {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
        let disk = Disk::create(&d.name, &p, d.size.0, d.alloc, d.read_only)?;
        Ok((disk, true))
    }

    fn sync_disks_dir(&self) -> Result<(), CatalogError> {
        let dir = self.state_dir.join("disks");
        sync_dir(&dir).map_err(|source| CatalogError::Write { path: dir, source })
    }

    /// Writes `disks` as the catalog, atomically.
    fn save(&self, disks: &[Entry]) -> Result<(), CatalogError> {
        let file = CatalogFile {
            version: 1,
            disks: disks.to_vec(),
        };
        self.write_json("catalog.json", &file)
    }

    /// Writes `value` as the state directory's file `name`, atomically (a
    /// temporary file, fsynced, renamed over, the directory fsynced).
    fn write_json(&self, name: &str, value: &impl Serialize) -> Result<(), CatalogError> {
        let path = self.state_dir.join(name);
        let werr = |source| CatalogError::Write {
            path: path.clone(),
            source,
        };
        let tmp = self.state_dir.join(format!("{name}.tmp"));
        let mut json =
            serde_json::to_vec_pretty(value).map_err(|e| werr(std::io::Error::other(e)))?;
        json.push(b'\n');
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(werr)?;
        f.write_all(&json).map_err(werr)?;
        f.sync_all().map_err(werr)?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(werr)?;
        sync_dir(&self.state_dir).map_err(werr)?;
        Ok(())
    }

    /// Looks a disk up and counts a connection on it, atomically with respect to
    /// `delete`.
    /// `delete`, and refused while the disk is being shrunk.
    pub fn attach(&self, name: &str) -> Option<Attachment> {
        self.lock()
            .open
            .get(name)
            .filter(|d| !d.exclusive.load(Ordering::Acquire))
            .map(|d| d.attach())
    }

    /// Looks a disk up.
    pub fn get(&self, name: &str) -> Option<Arc<Disk>> {
        self.lock().open.get(name).cloned()
    }

    /// All disks served, in name order.
    pub fn disks(&self) -> Vec<Arc<Disk>> {
        self.lock().open.values().cloned().collect()
    }

    /// What `disk list` shows: the disks served and those missing.
    pub fn list(&self) -> Vec<DiskInfo> {
        let (open, missing) = {
            let map = self.lock();
            let open: Vec<_> = map
                .open
                .values()
                .map(|d| (d.clone(), map.entry_of(d)))
                .collect();
            let missing: Vec<_> = map.missing.values().cloned().collect();
            (open, missing)
        };
        let mut out: Vec<DiskInfo> = open
            .iter()
            .map(|(d, e)| DiskInfo {
                name: d.name().to_string(),
                size: d.size(),
                alloc: d.alloc(),
                read_only: d.read_only(),
                allocated: d.allocated_bytes(),
                connections: d.connections(),
                failed: d.failed(),
                missing: false,
                format: d.format(),
                base: e.base.clone(),
                chain: d.chain().iter().map(|p| disk_name_of(p)).collect(),
                snapshot_of: e.snapshot_of.clone(),
            })
            .chain(missing.into_iter().map(|e| DiskInfo {
                name: e.name,
                size: e.size,
                alloc: e.alloc,
                read_only: e.read_only,
                allocated: 0,
                connections: 0,
                failed: false,
                missing: true,
                format: e.format,
                base: e.base,
                chain: Vec::new(),
                snapshot_of: e.snapshot_of,
            }))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Creates a disk and records it.
    pub fn create(
        &self,
        name: &str,
        size: u64,
        alloc: Alloc,
        read_only: bool,
    ) -> Result<(), CatalogError> {
        check_disk_name(name).map_err(CatalogError::BadName)?;
        check_disk_size(size).map_err(CatalogError::BadSize)?;
        self.reserving(name, || {
            // File work without the map lock (fallocate of a large fixed disk).
            let disk = self.create_file(&DiskConfig {
                name: name.to_string(),
                size: crate::config::Size(size),
                alloc,
                read_only,
                allow: None,
                base: None,
            })?;
            self.lock().open.insert(name.to_string(), Arc::new(disk));
            Ok(())
        })
    }

    /// Creates the file of a new disk and writes the catalog naming it (the
    /// caller holds the change lock).
    fn create_file(&self, d: &DiskConfig) -> Result<Disk, CatalogError> {
        let (disk, _) = self.open_or_create(d, Leftover::Replace)?;
        let p = self.disk_path(&d.name);
        let entry = self.lock().entry_of(&disk);
        let saved = self.sync_disks_dir().and_then(|()| {
            let entries = self.lock().entries(Change::Add(&entry));
            self.save(&entries)
        });
        if let Err(e) = saved {
            drop(disk);
            let _ = std::fs::remove_file(&p);
            return Err(e);
        }
        Ok(disk)
    }

    /// Deletes a disk and its file; refused while clients are connected.
    /// A missing disk can be deleted too (its entry goes).
    pub fn delete(&self, name: &str) -> Result<(), CatalogError> {
        let _change = self.change.lock().unwrap_or_else(|p| p.into_inner());
        let (disk, entries) = {
            let mut map = self.lock();
            if map.missing.contains_key(name) {
                let users = map.users_of(name);
                if !users.is_empty() {
                    return Err(CatalogError::InUse {
                        name: name.to_string(),
                        users: users.join(", "),
                    });
                }
                let entries = map.entries(Change::Remove(name));
                drop(map);
                self.save(&entries)?;
                self.lock().missing.remove(name);
                return Ok(());
            }
            let users = map.users_of(name);
            if !users.is_empty() {
                return Err(CatalogError::InUse {
                    name: name.to_string(),
                    users: users.join(", "),
                });
            }
            let disk = map.open_disk(name)?;
            let connections = disk.connections();
            if connections > 0 {
                return Err(CatalogError::busy(name, connections));
            }
            // Out of the map first: no client attaches while it goes.
            map.open.remove(name);
            (disk, map.entries(Change::None))
        };
        if let Err(e) = self.save(&entries) {
            self.lock().open.insert(name.to_string(), disk);
            return Err(e);
        }
        self.lock().layers.remove(name);
        if let Err(e) = std::fs::remove_file(disk.path()) {
            tracing::warn!(disk = name, error = %e, "disk removed from the catalog but its file stays");
        } else if let Err(e) = self.sync_disks_dir() {
            tracing::warn!(disk = name, error = %crate::error_chain(&e), "cannot sync the disks directory after removing a file");
        }
        Ok(())
    }

    /// Resizes a disk; shrinking is refused while clients are connected (they
    /// negotiated the old size and may write up to it).
    pub fn resize(&self, name: &str, size: u64) -> Result<(), CatalogError> {
        check_disk_size(size).map_err(CatalogError::BadSize)?;
        let _change = self.change.lock().unwrap_or_else(|p| p.into_inner());
        let disk = {
            let map = self.lock();
            let disk = map.open_disk(name)?;
            let connections = disk.connections();
            let shrink = size < disk.size();
            if shrink && connections > 0 {
                return Err(CatalogError::busy(name, connections));
            }
            // While shrinking, no client may attach (it would negotiate the
            // old size); set under the map lock, which attach takes.
            disk.exclusive.store(shrink, Ordering::Release);
            disk
        };
        let res = disk
            .resize(size)
            .map_err(CatalogError::from)
            .and_then(|()| {
                journal::crash_point("resize");
                let entries = self.lock().entries(Change::None);
                self.save(&entries)
            });
        disk.exclusive.store(false, Ordering::Release);
        res
    }
}

/// The disk name of a file in `disks/` (`NAME.img`).
fn disk_name_of(p: &Path) -> String {
    let f = p
        .file_name()
        .map(|f| f.to_string_lossy())
        .unwrap_or_default();
    f.strip_suffix(".img").unwrap_or(&f).to_string()
}

mod journal;
mod layers;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Size;

    /// A config with one dynamic 1 MiB disk `name`, writable.
    fn one_disk(name: &str) -> Vec<DiskConfig> {
        vec![DiskConfig {
            name: name.into(),
            size: Size(1 << 20),
            alloc: Alloc::Dynamic,
            read_only: false,
            allow: None,
            base: None,
        }]
    }

    /// A catalog in a new directory with the one configured disk `name` (see
    /// [`one_disk`]): the directory, the configuration and the catalog.
    fn open_with(name: &str) -> (tempfile::TempDir, Vec<DiskConfig>, Catalog) {
        let dir = tempfile::tempdir().unwrap();
        let conf = one_disk(name);
        let c = Catalog::open(dir.path(), &conf).unwrap();
        (dir, conf, c)
    }

    #[test]
    fn catalog_survives_reopen_and_refuses_busy_delete() {
        let (dir, conf, c) = open_with("boot");
        c.create("data", 2 << 20, Alloc::Fixed, false).unwrap();
        assert!(matches!(
            c.create("data", 1, Alloc::Fixed, false),
            Err(CatalogError::Exists(_))
        ));
        assert!(matches!(
            c.create("../x", 1, Alloc::Fixed, false),
            Err(CatalogError::BadName(_))
        ));
        c.resize("boot", 4 << 20).unwrap();
        let att = c.attach("data").unwrap();
        assert!(matches!(c.delete("data"), Err(CatalogError::Busy { .. })));
        drop(att);
        drop(c);

        let c = Catalog::open(dir.path(), &conf).unwrap();
        let l = c.list();
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].name, "boot");
        assert_eq!(l[0].size, 4 << 20);
        assert_eq!(l[1].alloc, Alloc::Fixed);
        c.delete("data").unwrap();
        assert!(!c.disk_path("data").exists());
        drop(c);
        let c = Catalog::open(dir.path(), &[]).unwrap();
        assert_eq!(c.list().len(), 1);
    }

    /// A catalog change in progress (its file work runs under the change
    /// lock, which is held here) stalls neither lookups, attaches nor lists.
    #[test]
    fn a_change_in_progress_blocks_no_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let c = Arc::new(Catalog::open(dir.path(), &[]).unwrap());
        c.create("a", 1 << 20, Alloc::Dynamic, false).unwrap();
        let change = c.change.lock().unwrap();
        let c2 = c.clone();
        let t = std::thread::spawn(move || {
            let att = c2.attach("a").is_some();
            (att, c2.list().len(), c2.get("a").is_some())
        });
        let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !t.is_finished() && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(t.is_finished(), "a lookup waited for a catalog change");
        assert_eq!(t.join().unwrap(), (true, 1, true));
        drop(change);
    }

    /// A disk whose file is gone is listed missing (not served, not
    /// recreated), the others open, and deleting it drops its entry.
    #[test]
    fn missing_disk_file_is_listed_and_does_not_stop_the_catalog() {
        let (dir, conf, c) = open_with("gone");
        c.create("kept", 1 << 20, Alloc::Fixed, false).unwrap();
        let gone = c.disk_path("gone");
        drop(c);
        std::fs::remove_file(&gone).unwrap();
        let c = Catalog::open(dir.path(), &conf).unwrap();
        assert!(!gone.exists(), "a configured disk was recreated empty");
        let l = c.list();
        assert_eq!(l.len(), 2);
        assert!(l[0].missing && l[0].name == "gone");
        assert!(!l[1].missing);
        assert!(c.attach("gone").is_none());
        assert!(c.attach("kept").is_some());
        assert!(matches!(
            c.create("gone", 1, Alloc::Fixed, false),
            Err(CatalogError::Exists(_))
        ));
        c.delete("gone").unwrap();
        drop(c);
        let c = Catalog::open(dir.path(), &[]).unwrap();
        assert_eq!(c.list().len(), 1);
    }
}
