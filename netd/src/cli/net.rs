//! The arguments of `netd net add` and `netd reservation`, and how they become the
//! control API's tables.
//!
//! `net add` has a flag for every key of a `[[network]]` table (repeatable for
//! lists; `--reservation` and `--forward` for the nested tables that fit a flag),
//! and `--from FILE` for a whole table in TOML (ports included). The flags go on
//! top of the file. The table is checked here by the same code as the config
//! file ([`NetworkConfig::validate_at`]), so a mistake is reported with the file
//! (or `<command line>`) and the key before anything is sent; the daemon checks
//! it again against the networks it runs.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use fabric_api::netd::{NetworkTable, Reservation};
use fabric_util::toml_file::{read_table_with, ConfigError, TomlFileError};
use serde_json::{json, Value};

use crate::config::NetworkConfig;

/// What names the command line in errors.
const COMMAND_LINE: &str = "<command line>";

/// `netd net add NAME ...`.
#[derive(Debug, Clone, clap::Args)]
pub struct NetAddArgs {
    /// Network name.
    pub name: String,
    /// Mode: internal, hostonly, nat or bridged (required unless the --from file has it).
    #[arg(long)]
    pub mode: Option<String>,
    /// A `[[network]]` table in TOML (its keys at the top level, `[[port]]`,
    /// `[[forward]]`, `[[reservation]]` for the nested tables); flags override it.
    #[arg(long, value_name = "FILE")]
    pub from: Option<PathBuf>,
    /// IPv4 subnet, CIDR.
    #[arg(long)]
    pub subnet: Option<String>,
    /// The fabric's own address.
    #[arg(long)]
    pub gateway: Option<Ipv4Addr>,
    /// Serve DHCP.
    #[arg(long, conflicts_with = "no_dhcp")]
    pub dhcp: bool,
    /// Do not serve DHCP.
    #[arg(long)]
    pub no_dhcp: bool,
    /// DHCP range, "A-B".
    #[arg(long)]
    pub dhcp_range: Option<String>,
    /// The DHCP server's own address.
    #[arg(long)]
    pub dhcp_server: Option<Ipv4Addr>,
    /// Lease time, seconds.
    #[arg(long)]
    pub lease_time: Option<u32>,
    /// A DNS server announced by DHCP (repeat for more).
    #[arg(long = "dhcp-dns", value_name = "IP")]
    pub dhcp_dns: Vec<Ipv4Addr>,
    /// A reservation, "MAC,IP" or "MAC,IP,HOSTNAME" (repeat for more).
    #[arg(long = "reservation", value_name = "MAC,IP[,HOSTNAME]")]
    pub reservations: Vec<String>,
    /// MTU.
    #[arg(long)]
    pub mtu: Option<u32>,
    /// Bound on learned MACs.
    #[arg(long)]
    pub max_macs: Option<usize>,
    /// Seconds after which an unused MAC is forgotten.
    #[arg(long)]
    pub mac_ageing: Option<u64>,
    /// Port guard of guest ports: clean or off.
    #[arg(long)]
    pub guard: Option<String>,
    /// Most MACs learned on one unguarded port.
    #[arg(long)]
    pub max_macs_per_port: Option<usize>,
    /// hostonly: the host TAP's name.
    #[arg(long)]
    pub host_ifname: Option<String>,
    /// nat: a port forward, "PROTO,HOST,GUEST" such as "tcp,2222,10.0.2.15:22"
    /// (repeat for more).
    #[arg(long = "forward", value_name = "PROTO,HOST,GUEST")]
    pub forwards: Vec<String>,
    /// nat: every port its own segment.
    #[arg(long)]
    pub isolated: bool,
    /// bridged: the host NIC.
    #[arg(long)]
    pub uplink: Option<String>,
    /// A pure switch here: another host serves DHCP, NAT and DNS.
    #[arg(long)]
    pub no_services: bool,
    /// nat: the DNS forwarder's address.
    #[arg(long)]
    pub dns: Option<Ipv4Addr>,
    /// nat: the host resolvers' file.
    #[arg(long)]
    pub resolv_conf: Option<PathBuf>,
    /// IPv6: the network's /64 ("fd42::/64"; hostonly and internal).
    #[arg(long)]
    pub subnet6: Option<String>,
    /// IPv6: the gateway address (default: the prefix's ::1).
    #[arg(long)]
    pub gateway6: Option<std::net::Ipv6Addr>,
    /// IPv6: the DNS server announced (RDNSS, DHCPv6).
    #[arg(long)]
    pub dns6: Option<std::net::Ipv6Addr>,
    /// IPv6: stateful DHCPv6 range, "A-B" inside subnet6.
    #[arg(long)]
    pub dhcp6_range: Option<String>,
    /// With DNS: the domain of the guests' names (default NAME.lab).
    #[arg(long)]
    pub domain: Option<String>,
    /// With DNS: a static name, "NAME,IP" such as "files,10.0.2.9" (repeat for more).
    #[arg(long = "host", value_name = "NAME,IP")]
    pub hosts: Vec<String>,
    /// nat: most flows at once.
    #[arg(long)]
    pub max_flows: Option<usize>,
    /// nat: most bytes of flow buffers.
    #[arg(long)]
    pub max_flow_memory: Option<usize>,
    /// nat: most flows per guest address.
    #[arg(long)]
    pub max_flows_per_guest: Option<usize>,
    /// nat: most TCP connects in progress per guest address.
    #[arg(long)]
    pub max_pending_per_guest: Option<usize>,
    /// nat: the gateway stands for the host's loopback.
    #[arg(long)]
    pub host_loopback: bool,
    /// nat: a CIDR flows may go to (repeat for more).
    #[arg(long = "outbound-allow", value_name = "CIDR")]
    pub outbound_allow: Vec<String>,
    /// nat: a CIDR flows may not go to (repeat for more).
    #[arg(long = "outbound-deny", value_name = "CIDR")]
    pub outbound_deny: Vec<String>,
}

/// `netd reservation ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ReservationCmd {
    /// Reserve IP for MAC on NET (replaces the MAC's reservation, if any).
    Add {
        /// Network.
        net: String,
        /// Client MAC.
        mac: String,
        /// Address.
        ip: Ipv4Addr,
        /// The client's host name.
        #[arg(long)]
        hostname: Option<String>,
    },
    /// Remove the reservation of MAC.
    Del {
        /// Network.
        net: String,
        /// Client MAC.
        mac: String,
    },
    /// List the reservations of NET, with where each comes from.
    List {
        /// Network.
        net: String,
    },
}

fn cli_err(key: &str, expected: impl Into<String>) -> ConfigError {
    ConfigError::invalid(COMMAND_LINE, key, expected)
}

/// A `--reservation MAC,IP[,HOSTNAME]`.
fn reservation(s: &str) -> Result<Reservation, ConfigError> {
    let bad = || {
        cli_err(
            "--reservation",
            format!("\"MAC,IP\" or \"MAC,IP,HOSTNAME\", got {s:?}"),
        )
    };
    let mut it = s.split(',');
    let (Some(mac), Some(ip)) = (it.next(), it.next()) else {
        return Err(bad());
    };
    let hostname = it.next().map(str::to_string);
    if it.next().is_some() {
        return Err(bad());
    }
    Ok(Reservation {
        mac: mac.trim().to_string(),
        ip: ip.trim().parse().map_err(|_| bad())?,
        hostname,
    })
}

/// A `--forward PROTO,HOST,GUEST` as the JSON of a `[[network.forward]]`.
fn forward(s: &str) -> Result<Value, ConfigError> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    let [proto, host, guest] = parts[..] else {
        return Err(cli_err(
            "--forward",
            format!("\"PROTO,HOST,GUEST\" such as \"tcp,2222,10.0.2.15:22\", got {s:?}"),
        ));
    };
    Ok(json!({"proto": proto, "host": host, "guest": guest}))
}

/// A `--host NAME,IP` as the JSON of a `[[network.host]]`.
fn host(s: &str) -> Result<Value, ConfigError> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    let [name, ip] = parts[..] else {
        return Err(cli_err(
            "--host",
            format!("\"NAME,IP\" such as \"files,10.0.2.9\", got {s:?}"),
        ));
    };
    let ip: Ipv4Addr = ip.parse().map_err(|_| {
        cli_err(
            "--host",
            format!("an IPv4 address after the name, got {s:?}"),
        )
    })?;
    Ok(json!({"name": name, "ip": ip}))
}

impl NetAddArgs {
    /// The table to send: the `--from` file's, the flags on top, checked as the
    /// config file's tables are.
    pub fn to_table(&self) -> Result<NetworkTable, ConfigError> {
        let mut t = match &self.from {
            Some(file) => {
                let mut set = vec![("name", self.name.as_str())];
                if let Some(m) = &self.mode {
                    set.push(("mode", m.as_str()));
                }
                let n: NetworkConfig = read_table_with(file, &set)?;
                match serde_json::to_value(n) {
                    Ok(Value::Object(m)) => m,
                    _ => return Err(cli_err("--from", "a table")),
                }
            }
            None => {
                let mode = self
                    .mode
                    .as_ref()
                    .ok_or_else(|| cli_err("--mode", "a mode (or --from FILE with `mode`)"))?;
                let mut m = serde_json::Map::new();
                m.insert("name".into(), json!(self.name));
                m.insert("mode".into(), json!(mode));
                m
            }
        };
        let mut set = |k: &str, v: Value| {
            t.insert(k.to_string(), v);
        };
        macro_rules! opt {
            ($($field:ident),*) => {$(
                if let Some(v) = &self.$field {
                    set(stringify!($field), json!(v));
                }
            )*};
        }
        opt!(
            subnet,
            gateway,
            dhcp_range,
            dhcp_server,
            lease_time,
            mtu,
            max_macs,
            mac_ageing,
            guard,
            max_macs_per_port,
            host_ifname,
            uplink,
            dns,
            resolv_conf,
            domain,
            subnet6,
            gateway6,
            dns6,
            dhcp6_range,
            max_flows,
            max_flow_memory,
            max_flows_per_guest,
            max_pending_per_guest
        );
        if self.dhcp || self.no_dhcp {
            set("dhcp", json!(self.dhcp));
        }
        for (flag, k) in [
            (self.isolated, "isolated"),
            (self.host_loopback, "host_loopback"),
        ] {
            if flag {
                set(k, json!(true));
            }
        }
        if self.no_services {
            set("services", json!(false));
        }
        if !self.dhcp_dns.is_empty() {
            set("dhcp_dns", json!(self.dhcp_dns));
        }
        if !self.outbound_allow.is_empty() {
            set("outbound_allow", json!(self.outbound_allow));
        }
        if !self.outbound_deny.is_empty() {
            set("outbound_deny", json!(self.outbound_deny));
        }
        // The flags of nested tables, each value parsed into its table's JSON.
        type Parse = fn(&str) -> Result<Value, ConfigError>;
        let flags: [(&str, &[String], Parse); 3] = [
            ("reservation", &self.reservations, |s| {
                reservation(s).map(|r| json!(r))
            }),
            ("forward", &self.forwards, forward),
            ("host", &self.hosts, host),
        ];
        for (k, values, parse) in flags {
            let items = values.iter().map(|v| parse(v));
            let items = items.collect::<Result<Vec<_>, _>>()?;
            if items.is_empty() {
                continue;
            }
            // Nested tables from flags come after those of the file.
            let all = t.entry(k).or_insert_with(|| Value::Array(Vec::new()));
            if let Value::Array(a) = all {
                a.extend(items);
            }
        }
        let source = self
            .from
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| COMMAND_LINE.to_string());
        let n: NetworkConfig = serde_json::from_value(Value::Object(t.clone())).map_err(|e| {
            ConfigError::File(TomlFileError::Parse {
                path: source.clone().into(),
                message: e.to_string(),
            })
        })?;
        n.validate_at(&source, "")?;
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        add: NetAddArgs,
    }

    fn args(argv: &[&str]) -> NetAddArgs {
        Cli::try_parse_from(std::iter::once("net-add").chain(argv.iter().copied()))
            .unwrap()
            .add
    }

    #[test]
    fn flags_become_the_keys_of_a_table() {
        let t = args(&[
            "lab",
            "--mode",
            "nat",
            "--subnet",
            "10.9.0.0/24",
            "--mtu",
            "1400",
            "--isolated",
            "--no-dhcp",
            "--dhcp-dns",
            "10.9.0.3",
            "--forward",
            "tcp,2222,10.9.0.15:22",
            "--outbound-deny",
            "198.51.100.0/24",
            "--domain",
            "lab.test",
            "--host",
            "files,10.9.0.9",
        ])
        .to_table()
        .unwrap();
        assert_eq!(t["domain"], "lab.test");
        assert_eq!(t["host"][0]["name"], "files");
        assert_eq!(t["host"][0]["ip"], "10.9.0.9");
        assert_eq!(t["name"], "lab");
        assert_eq!(t["mode"], "nat");
        assert_eq!(t["mtu"], 1400);
        assert_eq!(t["isolated"], true);
        assert_eq!(t["dhcp"], false);
        assert_eq!(t["forward"][0]["guest"], "10.9.0.15:22");
        assert_eq!(t["outbound_deny"][0], "198.51.100.0/24");
    }

    #[test]
    fn ipv6_flags_become_the_ipv6_keys() {
        let t = args(&[
            "lab6",
            "--mode",
            "internal",
            "--subnet",
            "10.9.0.0/24",
            "--subnet6",
            "fd42::/64",
            "--dns6",
            "fd42::3",
        ])
        .to_table()
        .unwrap();
        assert_eq!(t["subnet6"], "fd42::/64");
        assert_eq!(t["dns6"], "fd42::3");
        let e = args(&["lab6", "--mode", "internal", "--dns6", "fd42::3"])
            .to_table()
            .unwrap_err()
            .to_string();
        assert!(e.contains("dns6"), "{e}");
    }

    #[test]
    fn bad_flags_are_refused_naming_the_key() {
        let e = args(&["lab"]).to_table().unwrap_err().to_string();
        assert!(e.contains("--mode"), "{e}");
        let e = args(&[
            "lab",
            "--mode",
            "internal",
            "--subnet",
            "10.9.0.0/24",
            "--dhcp",
            "--dhcp-range",
            "10.9.0.200-10.9.0.100",
        ])
        .to_table()
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("<command line>") && e.contains("`dhcp_range`"),
            "{e}"
        );
        let e = args(&["lab", "--mode", "nat", "--reservation", "52:54:00:00:00:01"])
            .to_table()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--reservation"), "{e}");
        for bad in ["files", "files,10.9.0", "files,10.9.0.9,x"] {
            let e = args(&["lab", "--mode", "nat", "--host", bad])
                .to_table()
                .unwrap_err()
                .to_string();
            assert!(e.contains("--host"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_from_file_is_checked_naming_the_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("lab.toml");
        std::fs::write(
            &f,
            "mode = \"nat\"\nsubnet = \"10.9.0.0/24\"\n[[reservation]]\nmac = \"52:54:00:00:00:01\"\nip = \"10.9.0.50\"\n",
        )
        .unwrap();
        let from = f.to_str().unwrap();
        let t = args(&["lab", "--from", from, "--mtu", "1400"])
            .to_table()
            .unwrap();
        assert_eq!(t["name"], "lab");
        assert_eq!(t["mtu"], 1400);
        assert_eq!(t["reservation"][0]["ip"], "10.9.0.50");
        // A bad value and an unknown key name the file and the key.
        for (table, key) in [
            ("mode = \"nat\"\nmtu = 10\n", "`mtu`"),
            ("mode = \"nat\"\nmtuu = 1400\n", "mtuu"),
        ] {
            std::fs::write(&f, table).unwrap();
            let e = args(&["lab", "--from", from])
                .to_table()
                .unwrap_err()
                .to_string();
            assert!(e.contains(from) && e.contains(key), "{e}");
        }
    }
}
