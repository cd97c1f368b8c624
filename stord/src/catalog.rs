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
//! One mutex guards the map; attaching a connection and deleting a disk both
//! take it, so a disk cannot be deleted between a client's lookup and its attach.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::config::{check_disk_name, check_disk_size, Alloc, DiskConfig};
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
    /// disk operation failed
    #[error(transparent)]
    Disk(#[from] DiskError),
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
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    version: u32,
    disks: Vec<Entry>,
}

pub use fabric_api::stord::DiskInfo;

/// The catalog.
#[derive(Debug)]
pub struct Catalog {
    state_dir: PathBuf,
    disks: Mutex<BTreeMap<String, Arc<Disk>>>,
}

impl Catalog {
    /// Opens (or starts) the catalog in `state_dir` and creates the configured
    /// disks that are missing; disks already present are kept as they are.
    pub fn open(state_dir: &Path, configured: &[DiskConfig]) -> Result<Catalog, CatalogError> {
        let disks_dir = state_dir.join("disks");
        std::fs::create_dir_all(&disks_dir).map_err(|source| CatalogError::StateDir {
            path: disks_dir.clone(),
            source,
        })?;
        let cat = Catalog {
            state_dir: state_dir.to_path_buf(),
            disks: Mutex::new(BTreeMap::new()),
        };
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
                let disk = Disk::open(&e.name, &cat.disk_path(&e.name), e.alloc, e.read_only)?;
                map.insert(e.name.clone(), Arc::new(disk));
            }
            for d in configured {
                if map.contains_key(&d.name) {
                    continue;
                }
                let disk = cat.create_or_adopt(&d.name, d.size.0, d.alloc, d.read_only)?;
                map.insert(d.name.clone(), Arc::new(disk));
                changed = true;
            }
            if changed {
                cat.save(&map)?;
            }
        }
        Ok(cat)
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Disk>>> {
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

    fn create_or_adopt(
        &self,
        name: &str,
        size: u64,
        alloc: Alloc,
        ro: bool,
    ) -> Result<Disk, CatalogError> {
        let p = self.disk_path(name);
        if p.exists() {
            tracing::warn!(disk = name, path = %p.display(), "adopting an existing disk file not in the catalog");
            return Ok(Disk::open(name, &p, alloc, ro)?);
        }
        Ok(Disk::create(name, &p, size, alloc, ro)?)
    }

    fn save(&self, map: &BTreeMap<String, Arc<Disk>>) -> Result<(), CatalogError> {
        let file = CatalogFile {
            version: 1,
            disks: map
                .values()
                .map(|d| Entry {
                    name: d.name().to_string(),
                    size: d.size(),
                    alloc: d.alloc(),
                    read_only: d.read_only(),
                })
                .collect(),
        };
        let path = self.catalog_path();
        let werr = |source| CatalogError::Write {
            path: path.clone(),
            source,
        };
        let tmp = self.state_dir.join("catalog.json.tmp");
        let mut json =
            serde_json::to_vec_pretty(&file).map_err(|e| werr(std::io::Error::other(e)))?;
        json.push(b'\n');
        let mut f = std::fs::File::create(&tmp).map_err(werr)?;
        f.write_all(&json).map_err(werr)?;
        f.sync_all().map_err(werr)?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(werr)?;
        std::fs::File::open(&self.state_dir)
            .and_then(|d| d.sync_all())
            .map_err(werr)?;
        Ok(())
    }

    /// Looks a disk up and counts a connection on it, atomically with respect to
    /// `delete`.
    pub fn attach(&self, name: &str) -> Option<Attachment> {
        self.lock().get(name).map(|d| d.attach())
    }

    /// Looks a disk up.
    pub fn get(&self, name: &str) -> Option<Arc<Disk>> {
        self.lock().get(name).cloned()
    }

    /// All disks, in name order.
    pub fn disks(&self) -> Vec<Arc<Disk>> {
        self.lock().values().cloned().collect()
    }

    /// What `disk list` shows.
    pub fn list(&self) -> Vec<DiskInfo> {
        self.disks()
            .iter()
            .map(|d| DiskInfo {
                name: d.name().to_string(),
                size: d.size(),
                alloc: d.alloc(),
                read_only: d.read_only(),
                allocated: d.allocated_bytes(),
                connections: d.connections(),
            })
            .collect()
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
        let mut map = self.lock();
        if map.contains_key(name) {
            return Err(CatalogError::Exists(name.to_string()));
        }
        let p = self.disk_path(name);
        if p.exists() {
            // An orphan from a crash between file creation and catalog write, or
            // from a delete that could not remove the file: start afresh.
            let _ = std::fs::remove_file(&p);
        }
        let disk = Disk::create(name, &p, size, alloc, read_only)?;
        map.insert(name.to_string(), Arc::new(disk));
        if let Err(e) = self.save(&map) {
            map.remove(name);
            let _ = std::fs::remove_file(&p);
            return Err(e);
        }
        Ok(())
    }

    /// Deletes a disk and its file; refused while clients are connected.
    pub fn delete(&self, name: &str) -> Result<(), CatalogError> {
        let mut map = self.lock();
        let disk = map
            .get(name)
            .cloned()
            .ok_or_else(|| CatalogError::NotFound(name.to_string()))?;
        let connections = disk.connections();
        if connections > 0 {
            return Err(CatalogError::Busy {
                name: name.to_string(),
                connections,
            });
        }
        map.remove(name);
        if let Err(e) = self.save(&map) {
            map.insert(name.to_string(), disk);
            return Err(e);
        }
        if let Err(e) = std::fs::remove_file(disk.path()) {
            tracing::warn!(disk = name, error = %e, "disk removed from the catalog but its file stays");
        }
        Ok(())
    }

    /// Resizes a disk; shrinking is refused while clients are connected (they
    /// negotiated the old size and may write up to it).
    pub fn resize(&self, name: &str, size: u64) -> Result<(), CatalogError> {
        check_disk_size(size).map_err(CatalogError::BadSize)?;
        let map = self.lock();
        let disk = map
            .get(name)
            .cloned()
            .ok_or_else(|| CatalogError::NotFound(name.to_string()))?;
        let connections = disk.connections();
        if size < disk.size() && connections > 0 {
            return Err(CatalogError::Busy {
                name: name.to_string(),
                connections,
            });
        }
        disk.resize(size)?;
        self.save(&map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Size;

    #[test]
    fn catalog_survives_reopen_and_refuses_busy_delete() {
        let dir = tempfile::tempdir().unwrap();
        let conf = vec![DiskConfig {
            name: "boot".into(),
            size: Size(1 << 20),
            alloc: Alloc::Dynamic,
            read_only: false,
            allow: None,
        }];
        let c = Catalog::open(dir.path(), &conf).unwrap();
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
}
