//! The host resolvers, as the DNS forwarders see them (the NAT router's and the
//! hostonly / internal responder's).
//!
//! # Theory of operation
//!
//! What netd does not answer itself (see [`super`]) goes to the host's first IPv4
//! resolver from `resolv.conf` (port 53): the NAT router rewrites the destination of
//! the guest's flow to it, the responder of [`crate::modes::dns`] relays the query
//! from a host socket. A resolver written as a loopback address (a local stub such
//! as systemd-resolved or dnsmasq) works as is, because both use host sockets.
//!
//! `resolv.conf` is re-read when its modification time, size or inode change, checked
//! at most once a second, so a host that changes networks is followed without a
//! restart. The path is configurable (tests point it at their own file).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

/// The host resolvers, re-read from a `resolv.conf` when it changes.
#[derive(Debug)]
pub struct Resolvers {
    path: PathBuf,
    stamp: Option<(SystemTime, u64, u64)>,
    checked: Option<Instant>,
    servers: Vec<Ipv4Addr>,
}

/// Parses the IPv4 `nameserver` lines of a resolv.conf. IPv6 servers are skipped (the
/// router's host sockets for DNS are IPv4), as are malformed lines.
pub fn parse_resolv_conf(text: &str) -> Vec<Ipv4Addr> {
    text.lines()
        .filter_map(|line| {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut words = line.split_whitespace();
            if words.next()? != "nameserver" {
                return None;
            }
            match words.next()?.parse::<IpAddr>().ok()? {
                IpAddr::V4(a) => Some(a),
                IpAddr::V6(_) => None,
            }
        })
        .collect()
}

impl Resolvers {
    /// Resolvers read from `path` (read lazily, on first use).
    pub fn new(path: PathBuf) -> Self {
        Resolvers {
            path,
            stamp: None,
            checked: None,
            servers: Vec::new(),
        }
    }

    fn refresh(&mut self) {
        let now = Instant::now();
        if let Some(t) = self.checked {
            if now.duration_since(t) < Duration::from_secs(1) {
                return;
            }
        }
        self.checked = Some(now);
        let stamp = std::fs::metadata(&self.path).ok().map(|m| {
            use std::os::unix::fs::MetadataExt;
            (
                m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                m.len(),
                m.ino(),
            )
        });
        if stamp == self.stamp {
            return;
        }
        self.stamp = stamp;
        match std::fs::read_to_string(&self.path) {
            Ok(text) => {
                self.servers = parse_resolv_conf(&text);
                tracing::info!(path = %self.path.display(), servers = ?self.servers, "read resolvers");
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot read resolv.conf; DNS forwarding off");
                self.servers.clear();
            }
        }
    }

    /// The address DNS flows go to now, if the host has an IPv4 resolver.
    pub fn current(&mut self) -> Option<SocketAddr> {
        self.refresh();
        self.servers
            .first()
            .map(|a| SocketAddr::new(IpAddr::V4(*a), 53))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nameservers_and_skips_junk() {
        let text = "# comment\nsearch lab\nnameserver 198.18.0.2 # inline\nnameserver ::1\nnameserver bogus\nnameserver\n nameserver 127.0.0.53\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec![Ipv4Addr::new(198, 18, 0, 2), Ipv4Addr::new(127, 0, 0, 53)]
        );
    }

    #[test]
    fn follows_changes() {
        let dir = std::env::temp_dir().join(format!("netd-resolv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("resolv.conf");
        std::fs::write(&path, "nameserver 198.18.0.2\n").unwrap();
        let mut r = Resolvers::new(path.clone());
        assert_eq!(r.current(), Some("198.18.0.2:53".parse().unwrap()));
        std::fs::write(&path, "nameserver 198.18.0.77\nnameserver 198.18.0.78\n").unwrap();
        r.checked = None; // skip the once-a-second throttle
        assert_eq!(r.current(), Some("198.18.0.77:53".parse().unwrap()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
