//! The crash window of layered-disk changes: between the change of a
//! disk's files and the catalog naming the result.
//!
//! A snapshot, a revert, a flatten change files first and the catalog
//! after. A crash in between would leave a catalog that names the old
//! layering over the new files (a snapshot file no entry names, a disk
//! whose catalog base is not its file's). So before its first step that
//! the catalog must follow, such a change writes `change.json` in the state
//! directory (atomically, like the catalog): the step under way and the
//! catalog it leads to; it removes the file once that catalog is written.
//! When the catalog is opened with a `change.json` left, the files say how
//! far the change got, and it is finished (the catalog it names is
//! written) or undone:
//!
//! - `snapshot NAME SNAP`: the new overlay is made as `NAME.img.new`
//!   before the record, then `NAME.img` is renamed to `SNAP.img` and
//!   `NAME.img.new` to `NAME.img`. `SNAP.img` there: finished (the second
//!   rename is done now if it was not); not there: undone
//!   (`NAME.img.new` removed).
//! - `revert`, offline `flatten`: `NAME.img.new` is complete before the
//!   record; it is renamed over `NAME.img`. Still there: undone (removed);
//!   gone: finished.
//! - online `flatten`: the image's header drops its backing file. The
//!   header names none: finished; else undone.
//!
//! A test hook: with `STORD_CRASH_AT=POINT` in its environment the daemon
//! kills itself with SIGKILL at that point of a change (see
//! [`crash_point`]), so tests prove each window.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Catalog, CatalogError, Entry};
use crate::disk::DiskError;

/// The change under way.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub(super) enum Step {
    /// `NAME.img` becomes `SNAP.img`, then `NAME.img.new` becomes `NAME.img`.
    Snapshot {
        /// The disk.
        disk: String,
        /// The snapshot.
        snap: String,
    },
    /// `NAME.img.new` is renamed over `NAME.img`.
    Replace {
        /// The disk.
        disk: String,
    },
    /// `NAME.img`'s header drops its backing file.
    Detach {
        /// The disk.
        disk: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangeFile {
    step: Step,
    /// The catalog once the step is done.
    disks: Vec<Entry>,
}

const CHANGE_FILE: &str = "change.json";

/// Where a change's new file of disk file `p` is made.
pub(super) fn new_path(p: &std::path::Path) -> PathBuf {
    p.with_extension("img.new")
}

/// The crash test hook: with `STORD_CRASH_AT` set to `point`, the daemon
/// SIGKILLs itself here (as `kill -9` at this moment would).
pub(super) fn crash_point(point: &str) {
    if std::env::var_os("STORD_CRASH_AT").is_some_and(|v| v == point) {
        tracing::warn!(point, "STORD_CRASH_AT: the daemon kills itself here");
        crate::sys::kill_self();
    }
}

impl Catalog {
    fn change_path(&self) -> PathBuf {
        self.state_dir.join(CHANGE_FILE)
    }

    /// Records that `step` is about to change files, and the catalog it
    /// leads to.
    pub(super) fn begin(&self, step: Step, disks: &[Entry]) -> Result<(), CatalogError> {
        let f = ChangeFile {
            step,
            disks: disks.to_vec(),
        };
        self.write_json(CHANGE_FILE, &f)
    }

    /// The change is in the catalog: its record goes.
    pub(super) fn end(&self) -> Result<(), CatalogError> {
        let path = self.change_path();
        let werr = |source| CatalogError::Write {
            path: path.clone(),
            source,
        };
        match std::fs::remove_file(&path) {
            Ok(()) => super::sync_dir(&self.state_dir).map_err(werr),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(werr(e)),
        }
    }

    /// Finishes or undoes the change a crash (or a failed step) left
    /// recorded (see the module docs); nothing without a record.
    pub(super) fn recover(&self) -> Result<(), CatalogError> {
        let path = self.change_path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(CatalogError::Read { path, source }),
        };
        let f: ChangeFile =
            serde_json::from_slice(&bytes).map_err(|source| CatalogError::Malformed {
                path: path.clone(),
                source,
            })?;
        let io = |e| CatalogError::Disk(DiskError::Io(e));
        let finished = match &f.step {
            Step::Snapshot { disk, snap } => {
                let (p, sp) = (self.disk_path(disk), self.disk_path(snap));
                let new = new_path(&p);
                if sp.exists() {
                    if new.exists() {
                        std::fs::rename(&new, &p).map_err(io)?;
                    }
                    true
                } else {
                    remove_if_there(&new).map_err(io)?;
                    false
                }
            }
            Step::Replace { disk } => {
                let new = new_path(&self.disk_path(disk));
                let there = new.exists();
                remove_if_there(&new).map_err(io)?;
                !there
            }
            Step::Detach { disk } => {
                let p = self.disk_path(disk);
                let hdr = std::fs::File::open(&p)
                    .map_err(crate::qcow2::Qcow2Error::from)
                    .and_then(|file| crate::qcow2::header::Header::read_from(&file));
                matches!(hdr, Ok((h, _)) if h.backing.is_none())
            }
        };
        self.sync_disks_dir()?;
        if finished {
            self.save(&f.disks)?;
        }
        tracing::warn!(
            step = ?f.step,
            finished,
            "a catalog change was interrupted; it is {}",
            if finished { "finished" } else { "undone" }
        );
        self.end()
    }
}

fn remove_if_there(p: &std::path::Path) -> std::io::Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
