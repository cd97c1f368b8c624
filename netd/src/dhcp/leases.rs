//! The lease database of one network: live leases by MAC (a lease keeps its MAC
//! once expired, so a returning VM gets its address back), outstanding offers and
//! declined addresses, and the lease file.
//!
//! Persistence: the leases (not the offers or declines, which are short holds) are
//! written to `leases-<network>.json` atomically: to a temporary file, fsync, rename,
//! fsync the directory, so that a crash leaves either the old file or the new one.
//! The server's writer thread calls [`save_leases`] before an ACK leaves.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::parse_mac;

/// One lease, as stored and as the control API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    /// Client MAC.
    pub mac: String,
    /// Address.
    pub ip: Ipv4Addr,
    /// Unix time the lease ends.
    pub expires: u64,
    /// Host name the client sent, if any.
    #[serde(default)]
    pub hostname: Option<String>,
}

/// Lease file errors.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// cannot read lease file {path}
    #[error("cannot read lease file {path}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// lease file {path} is not valid JSON lease list
    #[error("lease file {path} is not a valid JSON lease list")]
    Parse {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// cannot write lease file {path}
    #[error("cannot write lease file {path}")]
    Write {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// The leases of one network, by MAC.
#[derive(Debug, Default)]
pub struct LeaseDb {
    pub(super) by_mac: HashMap<[u8; 6], Lease>,
    pub(super) offers: HashMap<[u8; 6], (Ipv4Addr, u64)>,
    pub(super) declined: HashMap<Ipv4Addr, u64>,
    path: Option<PathBuf>,
}

impl LeaseDb {
    /// Loads `path` (a missing file is an empty db).
    pub fn load(path: Option<PathBuf>) -> Result<Self, LeaseError> {
        let mut db = LeaseDb {
            path: path.clone(),
            ..Default::default()
        };
        if let Some(p) = &path {
            match std::fs::read(p) {
                Ok(bytes) => {
                    let leases: Vec<Lease> =
                        serde_json::from_slice(&bytes).map_err(|source| LeaseError::Parse {
                            path: p.clone(),
                            source,
                        })?;
                    for l in leases {
                        if let Some(mac) = parse_mac(&l.mac) {
                            db.by_mac.insert(mac, l);
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(LeaseError::Read {
                        path: p.clone(),
                        source,
                    })
                }
            }
        }
        Ok(db)
    }

    /// Every lease, sorted by address.
    pub fn leases(&self) -> Vec<Lease> {
        let mut v: Vec<_> = self.by_mac.values().cloned().collect();
        v.sort_by_key(|l| l.ip);
        v
    }

    /// The lease file, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    #[cfg(test)]
    pub(super) fn save(&self) -> Result<(), LeaseError> {
        match &self.path {
            Some(p) => save_leases(p, &self.leases()),
            None => Ok(()),
        }
    }

    /// Every address held at `now` by somebody other than `mac` (see
    /// [`taken_by_other`](Self::taken_by_other)).
    pub(super) fn taken_by_others(&self, mac: &[u8; 6], now: u64) -> HashSet<Ipv4Addr> {
        let leases = self
            .by_mac
            .iter()
            .filter(|(m, l)| *m != mac && l.expires > now)
            .map(|(_, l)| l.ip);
        let offers = self
            .offers
            .iter()
            .filter(|(m, (_, until))| *m != mac && *until > now)
            .map(|(_, (ip, _))| *ip);
        let declined = self
            .declined
            .iter()
            .filter(|(_, until)| **until > now)
            .map(|(ip, _)| *ip);
        leases.chain(offers).chain(declined).collect()
    }

    /// Who holds `ip` at `now` (an unexpired lease or offer), other than `mac`.
    pub(super) fn taken_by_other(&self, ip: Ipv4Addr, mac: &[u8; 6], now: u64) -> bool {
        self.by_mac
            .iter()
            .any(|(m, l)| m != mac && l.ip == ip && l.expires > now)
            || self
                .offers
                .iter()
                .any(|(m, (o, until))| m != mac && *o == ip && *until > now)
            || self.declined.get(&ip).is_some_and(|until| *until > now)
    }
}

/// Writes `leases` to `path` atomically and durably: a temporary file, fsync,
/// rename, fsync of the directory.
pub(super) fn save_leases(path: &Path, leases: &[Lease]) -> Result<(), LeaseError> {
    let werr = |source| LeaseError::Write {
        path: path.to_path_buf(),
        source,
    };
    let data = serde_json::to_vec_pretty(leases).map_err(|e| werr(std::io::Error::other(e)))?;
    fabric_util::fs::write_durable(path, &data, 0o644).map_err(werr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(mac: &str, ip: [u8; 4], expires: u64) -> Lease {
        Lease {
            mac: mac.into(),
            ip: Ipv4Addr::from(ip),
            expires,
            hostname: None,
        }
    }

    #[test]
    fn a_missing_file_is_an_empty_db_and_saves_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.json");
        let mut db = LeaseDb::load(Some(path.clone())).unwrap();
        assert!(db.leases().is_empty());
        db.by_mac.insert(
            [2, 0, 0, 0, 0, 2],
            lease("02:00:00:00:00:02", [10, 0, 0, 9], 50),
        );
        db.by_mac.insert(
            [2, 0, 0, 0, 0, 1],
            lease("02:00:00:00:00:01", [10, 0, 0, 5], 60),
        );
        db.save().unwrap();
        assert!(
            !path.with_extension("json.tmp").exists(),
            "temporary renamed"
        );
        let again = LeaseDb::load(Some(path)).unwrap();
        let ips: Vec<_> = again.leases().iter().map(|l| l.ip.octets()[3]).collect();
        assert_eq!(ips, [5, 9], "sorted by address");
        assert_eq!(again.by_mac.len(), 2);
    }

    #[test]
    fn a_bad_file_is_an_error_naming_it_and_bad_macs_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.json");
        std::fs::write(&path, b"{not json").unwrap();
        match LeaseDb::load(Some(path.clone())) {
            Err(LeaseError::Parse { path: p, .. }) => assert_eq!(p, path),
            other => panic!("unexpected {other:?}"),
        }
        let text = r#"[{"mac":"nonsense","ip":"10.0.0.1","expires":1},
                       {"mac":"02:00:00:00:00:01","ip":"10.0.0.2","expires":1}]"#;
        std::fs::write(&path, text).unwrap();
        assert_eq!(LeaseDb::load(Some(path)).unwrap().leases().len(), 1);
    }

    #[test]
    fn holds_count_until_they_expire_and_never_for_their_owner() {
        let mut db = LeaseDb::load(None).unwrap();
        let (a, b) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let ip = |n| Ipv4Addr::new(10, 0, 0, n);
        db.by_mac
            .insert(a, lease("02:00:00:00:00:01", [10, 0, 0, 5], 100));
        db.offers.insert(a, (ip(6), 100));
        db.declined.insert(ip(7), 100);
        assert!(db.taken_by_other(ip(5), &b, 99));
        assert!(db.taken_by_other(ip(6), &b, 99));
        assert!(
            db.taken_by_other(ip(7), &a, 99),
            "a decline holds for everybody"
        );
        assert!(!db.taken_by_other(ip(5), &a, 99));
        assert!(!db.taken_by_other(ip(5), &b, 100), "expired");
        let set = db.taken_by_others(&b, 99);
        assert_eq!(set, [ip(5), ip(6), ip(7)].into_iter().collect());
        assert_eq!(db.taken_by_others(&a, 99), [ip(7)].into_iter().collect());
        assert!(db.save().is_ok(), "no path: nothing to write");
    }
}
