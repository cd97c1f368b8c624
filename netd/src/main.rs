//! netd: the daemon (`netd serve --config FILE`) and its CLI client.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use fabric_api::netd::{Forward, PortConfig, PortKind, Proto, Request, VxlanKeys};
use fabric_api::Client;
use netd::cli;
use netd::config::Config;

const DEFAULT_CONTROL: &str = "/run/netd/control.sock";

#[derive(Parser)]
#[command(
    name = "netd",
    about = "Virtual L2 networks for VMs, containers and test hosts"
)]
struct Cli {
    /// Control socket of the running daemon.
    #[arg(long, global = true, default_value = DEFAULT_CONTROL)]
    control: PathBuf,
    /// Print the daemon's JSON answer instead of a table or a confirmation line.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon in the foreground.
    Serve(fabric_util::cli::ServeArgs),
    /// Networks.
    Net {
        #[command(subcommand)]
        cmd: NetCmd,
    },
    /// Ports.
    Port {
        #[command(subcommand)]
        cmd: PortCmd,
    },
    /// The learned MAC table of a network.
    Mac {
        /// Network.
        net: String,
    },
    /// The DHCP leases of a network (and, with --stats, the server's counters).
    Leases {
        /// Network.
        net: String,
        /// Show the DHCP server's counters instead: leases, refused_full
        /// (tables at their bound), malformed (datagrams dropped).
        #[arg(long)]
        stats: bool,
    },
    /// The names a network's DNS answers itself (static `[[network.host]]` entries
    /// and guests' DHCP hostnames, under the network's `domain`), or with --stats
    /// its counters: queries, answered, nxdomain, forwarded, malformed (dropped),
    /// hostname_refused (guest hostnames not published), forward_dropped.
    Dns {
        /// Network.
        net: String,
        /// Show the counters instead.
        #[arg(long)]
        stats: bool,
    },
    /// Port forwards of a NAT network.
    Forward {
        #[command(subcommand)]
        cmd: ForwardCmd,
    },
    /// The control server's counters: connections open and their bound,
    /// refused_full (over the bound), closed_idle (closed after the idle timeout).
    Control,
    /// The NAT flows of a network (and, with --stats, the router's counters).
    Flows {
        /// Network.
        net: String,
        /// Show the router's counters instead.
        #[arg(long)]
        stats: bool,
    },
    /// The outbound policy of a NAT network: `netd outbound NET list`,
    /// `netd outbound NET deny add 198.51.100.0/24`, `netd outbound NET allow del CIDR`.
    /// Changes last until netd restarts (the config's `outbound_allow` and
    /// `outbound_deny` set them at start).
    Outbound {
        /// Network.
        net: String,
        #[command(subcommand)]
        cmd: OutboundCmd,
    },
    /// DHCP reservations: `netd reservation add NET MAC IP [--hostname H]`,
    /// `netd reservation del NET MAC`, `netd reservation list NET`. Kept across
    /// restarts (in `state_dir`).
    Reservation {
        #[command(subcommand)]
        cmd: cli::net::ReservationCmd,
    },
    /// VXLAN ports: `netd vxlan remote add|del NET PORT IP` changes a port's flood
    /// list at runtime (until restart); `netd vxlan show NET PORT` shows it and the
    /// tunnel's counters.
    Vxlan {
        #[command(subcommand)]
        cmd: VxlanCmd,
    },
    /// Capture a network's frames as pcapng, live, taken inside the switch (every
    /// port kind, the router's and DHCP's frames, frames the switch dropped,
    /// marked "dropped: REASON"): `netd capture lab -w - | tshark -r -`.
    /// Ctrl-C ends it; the frames a slow reader lost are counted and reported.
    Capture {
        /// Network.
        net: String,
        /// Capture this port only, both directions (repeat for more; default:
        /// every port, each frame once, as it entered the switch).
        #[arg(long = "port")]
        ports: Vec<String>,
        /// Write to FILE, or to stdout with "-" (the default; never a terminal).
        #[arg(short = 'w', value_name = "FILE")]
        write: Option<PathBuf>,
        /// End after N frames.
        #[arg(long, short = 'c', value_name = "N")]
        count: Option<u64>,
        /// Keep at most N bytes of each frame (1 to 262144, the default).
        #[arg(long, short = 's', value_name = "N",
              value_parser = clap::value_parser!(u32).range(1..=262_144))]
        snaplen: Option<u32>,
    },
}

#[derive(Subcommand)]
enum VxlanCmd {
    /// The flood list: `add NET PORT IP` or `del NET PORT IP`.
    Remote {
        /// add or del.
        action: String,
        /// Network.
        net: String,
        /// The vxlan port.
        port: String,
        /// The remote VTEP's underlay address.
        ip: std::net::Ipv4Addr,
    },
    /// Settings, flood list and counters of a vxlan port.
    Show {
        /// Network.
        net: String,
        /// The vxlan port.
        port: String,
    },
}

fn vxlan_cmd(out: &Out, cmd: VxlanCmd) -> Result<()> {
    match cmd {
        VxlanCmd::Show { net, port } => out.show(Request::VxlanShow { net, port }, cli::vxlan),
        VxlanCmd::Remote {
            action,
            net,
            port,
            ip,
        } => match action.as_str() {
            "add" => {
                let done = format!("added remote {ip} to vxlan port {port} of {net}");
                out.change(
                    Request::VxlanRemoteAdd {
                        net,
                        port,
                        remote: ip,
                    },
                    &done,
                )
            }
            "del" => {
                let done = format!("removed remote {ip} from vxlan port {port} of {net}");
                out.change(
                    Request::VxlanRemoteDel {
                        net,
                        port,
                        remote: ip,
                    },
                    &done,
                )
            }
            other => Err(anyhow::anyhow!(
                "ACTION: expected \"add\" or \"del\", got {other:?}"
            )),
        },
    }
}

#[derive(Subcommand)]
enum OutboundCmd {
    /// Show host_loopback and the allow and deny lists.
    List,
    /// Change the allow list: `add CIDR` or `del CIDR`.
    Allow {
        /// add or del.
        action: String,
        /// "A.B.C.D/LEN" (an address alone is /32).
        cidr: String,
    },
    /// Change the deny list: `add CIDR` or `del CIDR`.
    Deny {
        /// add or del.
        action: String,
        /// "A.B.C.D/LEN" (an address alone is /32).
        cidr: String,
    },
}

fn outbound_cmd(out: &Out, net: String, cmd: OutboundCmd) -> Result<()> {
    use fabric_api::netd::PolicyList;
    let (list, action, cidr) = match cmd {
        OutboundCmd::List => return out.show(Request::OutboundList { net }, cli::outbound),
        OutboundCmd::Allow { action, cidr } => (PolicyList::Allow, action, cidr),
        OutboundCmd::Deny { action, cidr } => (PolicyList::Deny, action, cidr),
    };
    let name = match list {
        PolicyList::Allow => "allow",
        PolicyList::Deny => "deny",
    };
    match action.as_str() {
        "add" => {
            let done = format!("added {cidr} to the {name} list of {net}");
            out.change(Request::OutboundAdd { net, list, cidr }, &done)
        }
        "del" => {
            let done = format!("removed {cidr} from the {name} list of {net}");
            out.change(Request::OutboundDel { net, list, cidr }, &done)
        }
        other => Err(anyhow::anyhow!(
            "ACTION: expected \"add\" or \"del\", got {other:?}"
        )),
    }
}

#[derive(Subcommand)]
enum ForwardCmd {
    /// Add a forward: `netd forward add NET tcp 127.0.0.1:2222 10.0.2.15:22`
    /// (IPv6: `netd forward add NET tcp [::1]:2222 [fd00::15]:22`).
    Add {
        /// Network.
        net: String,
        /// tcp or udp.
        proto: String,
        /// Host address, "ADDR:PORT" or "[ADDR6]:PORT" (or "PORT" for 127.0.0.1).
        host: String,
        /// Guest address, "ADDR:PORT" or "[ADDR6]:PORT" (IPv6 networks).
        guest: String,
    },
    /// List forwards.
    List {
        /// Network.
        net: String,
    },
    /// Remove a forward: `netd forward del NET tcp 127.0.0.1:2222`.
    Del {
        /// Network.
        net: String,
        /// tcp or udp.
        proto: String,
        /// Host address.
        host: String,
    },
}

fn forward_cmd(out: &Out, cmd: ForwardCmd) -> Result<()> {
    use fabric_api::netd::parse_host_addr;
    let proto = |p: &str| {
        p.parse::<Proto>()
            .map_err(|e| anyhow::anyhow!("PROTO: {e}"))
    };
    match cmd {
        ForwardCmd::Add {
            net,
            proto: p,
            host,
            guest,
        } => {
            let forward = Forward {
                proto: proto(&p)?,
                host: parse_host_addr(&host).map_err(|e| anyhow::anyhow!("HOST: {e}"))?,
                guest: guest.parse().map_err(|_| {
                    anyhow::anyhow!(
                        "GUEST: expected \"ADDR:PORT\" or \"[ADDR6]:PORT\", got {guest:?}"
                    )
                })?,
            };
            let done = format!(
                "added {} forward {} -> {} on {net}",
                forward.proto, forward.host, forward.guest
            );
            out.change(Request::ForwardAdd { net, forward }, &done)
        }
        ForwardCmd::List { net } => out.show(Request::ForwardList { net }, cli::forwards),
        ForwardCmd::Del {
            net,
            proto: p,
            host,
        } => {
            let proto = proto(&p)?;
            let done = format!("removed {proto} forward {host} on {net}");
            out.change(Request::ForwardDel { net, proto, host }, &done)
        }
    }
}

#[derive(Subcommand)]
enum NetCmd {
    /// List networks (SOURCE: config file or API; `!` marks a conflict between
    /// the two, explained under the table).
    List,
    /// Add a network at runtime (kept across restarts, in `state_dir`): a flag per
    /// `[[network]]` key, or `--from FILE` with a whole table in TOML.
    Add(Box<cli::net::NetAddArgs>),
    /// Remove a network added at runtime; refused while guest ports are attached,
    /// unless --force.
    Del {
        /// Network.
        name: String,
        /// Remove it with its ports.
        #[arg(long)]
        force: bool,
    },
}

fn net_cmd(out: &Out, cmd: NetCmd) -> Result<()> {
    match cmd {
        NetCmd::List => out.show(Request::NetList, cli::net_list),
        NetCmd::Add(args) => {
            let network = args.to_table()?;
            let done = format!("added network {}", args.name);
            out.change(Request::NetAdd { network }, &done)
        }
        NetCmd::Del { name, force } => {
            let v = out.control.call(&Request::NetDel { name, force })?;
            if out.json {
                print_json(&v)
            } else {
                println!("{}", v.as_str().unwrap_or("removed"));
                Ok(())
            }
        }
    }
}

fn reservation_cmd(out: &Out, cmd: cli::net::ReservationCmd) -> Result<()> {
    use cli::net::ReservationCmd;
    match cmd {
        ReservationCmd::Add {
            net,
            mac,
            ip,
            hostname,
        } => {
            let done = format!("reserved {ip} for {mac} on {net}");
            let reservation = fabric_api::netd::Reservation { mac, ip, hostname };
            out.change(Request::ReservationAdd { net, reservation }, &done)
        }
        ReservationCmd::Del { net, mac } => {
            let done = format!("removed the reservation of {mac} on {net}");
            out.change(Request::ReservationDel { net, mac }, &done)
        }
        ReservationCmd::List { net } => {
            out.show(Request::ReservationList { net }, cli::reservations)
        }
    }
}

#[derive(Subcommand)]
enum PortCmd {
    /// List the ports of a network, with counters.
    List {
        /// Network.
        net: String,
        /// One column per drop reason instead of the total.
        #[arg(long)]
        drops: bool,
    },
    /// Add a port.
    Add {
        /// Network.
        net: String,
        /// Port kind: tap, vm, stream or vxlan.
        #[arg(long)]
        kind: String,
        /// TAP name (tap, vm).
        #[arg(long)]
        ifname: Option<String>,
        /// MAC.
        #[arg(long)]
        mac: Option<String>,
        /// Port name (default: the ifname or path).
        #[arg(long)]
        name: Option<String>,
        /// Namespace of a tap port's kernel side.
        #[arg(long)]
        netns: Option<String>,
        /// Socket path of a stream port.
        #[arg(long)]
        path: Option<PathBuf>,
        /// Keep the TAP when netd exits.
        #[arg(long)]
        persistent: bool,
        /// Port guard: clean or off (default: the network's).
        #[arg(long)]
        guard: Option<String>,
        /// vxlan: the VNI (1..16777215).
        #[arg(long)]
        vni: Option<u32>,
        /// vxlan: a remote VTEP (repeat for more).
        #[arg(long = "remote")]
        remotes: Vec<std::net::Ipv4Addr>,
        /// vxlan: the underlay address to send from.
        #[arg(long)]
        local: Option<std::net::Ipv4Addr>,
        /// vxlan: an IPv4 multicast group.
        #[arg(long)]
        group: Option<std::net::Ipv4Addr>,
        /// vxlan: the UDP port (default 4789).
        #[arg(long)]
        port: Option<u16>,
        /// vxlan: the outer TTL.
        #[arg(long)]
        ttl: Option<u8>,
        /// vxlan: do not learn which remote a MAC lives behind (flood instead).
        #[arg(long)]
        no_learning: bool,
        /// vxlan: accept datagrams from any sender.
        #[arg(long)]
        accept_any: bool,
    },
    /// Remove a port.
    Del {
        /// Network.
        net: String,
        /// Port name.
        name: String,
    },
}

/// Raises the soft limit on open files to the hard limit: every NAT flow holds a
/// host socket, and the soft default (1024 under systemd) is used up by about a
/// thousand flows, long before `max_flows`. Returns the limit now in force.
fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for getrlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `want` is a valid rlimit; setrlimit only reads it.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim = want;
    }
    Ok(lim.rlim_cur)
}

fn serve(config: PathBuf) -> Result<()> {
    let cfg = Config::load(&config)?;
    let specs = cfg.validate(&config)?;
    match raise_nofile_limit() {
        Ok(n) => {
            // Each NAT flow is one descriptor; say so when the limit cannot hold
            // every network's flow table (flows then fail cleanly, counted no_fds).
            let flows: u64 = specs
                .iter()
                .filter_map(|s| s.nat.as_ref())
                .map(|n| n.limits.max_flows as u64)
                .sum();
            if flows + 256 > n {
                tracing::warn!(
                    limit = n,
                    max_flows = flows,
                    "RLIMIT_NOFILE is below the NAT flow tables' bound; raise LimitNOFILE="
                );
            } else {
                tracing::info!(limit = n, "open file limit");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot raise RLIMIT_NOFILE"),
    }
    let control_spec = cfg.control_spec(&config)?;
    let metrics = cfg.metrics_addr(&config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(async move {
        let daemon = netd::daemon::Daemon::start_persistent(&cfg, &config)?;
        if let Some(addr) = metrics {
            let src = std::sync::Arc::new(netd::daemon::Metrics(daemon.clone()));
            let srv = fabric_util::metrics::serve(addr, "netd", src)
                .with_context(|| format!("cannot serve metrics on {addr} (key `metrics`)"))?;
            tracing::info!(metrics = %srv.local_addr(), "serving /metrics");
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot install the SIGTERM handler")?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = tokio::signal::ctrl_c() => {},
            }
        };
        let d2 = daemon.clone();
        let server = tokio::spawn(netd::daemon::serve_control(d2, control_spec, shutdown));
        // Give the listener a moment to bind before announcing readiness.
        tokio::task::yield_now().await;
        let mut waited = 0;
        while !cfg.control.exists() && waited < 200 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            waited += 1;
        }
        fabric_util::sd_notify_ready();
        tracing::info!(control = %cfg.control.display(), "netd ready");
        let r = server.await.context("control server task failed")?;
        tracing::info!("shutting down");
        let d3 = daemon.clone();
        tokio::task::spawn_blocking(move || d3.shutdown())
            .await
            .ok();
        r.map_err(anyhow::Error::from)
    })?;
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
}

/// How the client prints the daemon's answers: its JSON as-is (`--json`, which
/// scripts parse) or a table / a confirmation line for people.
struct Out {
    control: Client,
    json: bool,
}

impl Out {
    /// A query: the JSON, or `table` rendering it.
    fn show(&self, req: Request, table: impl FnOnce(&serde_json::Value) -> String) -> Result<()> {
        let v = self.control.call(&req)?;
        if self.json {
            print_json(&v)
        } else {
            print!("{}", table(&v));
            Ok(())
        }
    }

    /// A change: the JSON answer (if any), or the line `done`.
    fn change(&self, req: Request, done: &str) -> Result<()> {
        let v = self.control.call(&req)?;
        if self.json {
            print_json(&v)
        } else {
            println!("{done}");
            Ok(())
        }
    }
}

fn print_json(v: &serde_json::Value) -> Result<()> {
    if !v.is_null() {
        println!("{}", serde_json::to_string_pretty(v)?);
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let out = Out {
        control: Client::new(cli.control),
        json: cli.json,
    };
    let r = match cli.cmd {
        Cmd::Serve(fabric_util::cli::ServeArgs { config }) => {
            // RUST_LOG, the variable tracing_subscriber reads by default.
            fabric_util::init_logging("RUST_LOG", "info");
            serve(config)
        }
        Cmd::Net { cmd } => net_cmd(&out, cmd),
        Cmd::Port { cmd } => match cmd {
            PortCmd::List { net, drops } => {
                out.show(Request::PortList { net }, |v| cli::port_list(v, drops))
            }
            PortCmd::Del { net, name } => {
                let done = format!("removed port {name} from {net}");
                out.change(Request::PortDel { net, name }, &done)
            }
            PortCmd::Add {
                net,
                kind,
                ifname,
                mac,
                name,
                netns,
                path,
                persistent,
                guard,
                vni,
                remotes,
                local,
                group,
                port,
                ttl,
                no_learning,
                accept_any,
            } => {
                let kind = match kind.parse::<PortKind>() {
                    Ok(k) => k,
                    Err(e) => return finish(Err(anyhow::anyhow!("--kind: {e}"))),
                };
                let guard = match guard.map(|g| g.parse::<fabric_api::netd::Guard>()) {
                    None => None,
                    Some(Ok(g)) => Some(g),
                    Some(Err(e)) => return finish(Err(anyhow::anyhow!("--guard: {e}"))),
                };
                let port = PortConfig {
                    name,
                    kind,
                    ifname,
                    mac,
                    netns,
                    path,
                    persistent,
                    guard,
                    vxlan: VxlanKeys {
                        vni,
                        local,
                        remotes,
                        group,
                        port,
                        ttl,
                        learning: no_learning.then_some(false),
                        accept_any: accept_any.then_some(true),
                    },
                };
                // The daemon names an unnamed port after its ifname or path.
                let done = format!("added {kind} port {} to {net}", port.shown_name());
                out.change(Request::PortAdd { net, port }, &done)
            }
        },
        Cmd::Mac { net } => out.show(Request::Mac { net }, cli::mac_table),
        Cmd::Leases { net, stats: false } => out.show(Request::Leases { net }, |v| {
            cli::leases(v, netd::dhcp::unix_now())
        }),
        Cmd::Leases { net, stats: true } => out.show(Request::DhcpStats { net }, cli::counters),
        Cmd::Dns { net, stats: false } => out.show(Request::DnsNames { net }, cli::dns_names),
        Cmd::Dns { net, stats: true } => out.show(Request::DnsStats { net }, cli::counters),
        Cmd::Forward { cmd } => forward_cmd(&out, cmd),
        Cmd::Flows { net, stats: false } => out.show(Request::Flows { net }, cli::flows),
        Cmd::Flows { net, stats: true } => out.show(Request::NatStats { net }, cli::counters),
        Cmd::Outbound { net, cmd } => outbound_cmd(&out, net, cmd),
        Cmd::Control => out.show(Request::ControlStats, cli::counters),
        Cmd::Vxlan { cmd } => vxlan_cmd(&out, cmd),
        Cmd::Reservation { cmd } => reservation_cmd(&out, cmd),
        Cmd::Capture {
            net,
            ports,
            write,
            count,
            snaplen,
        } => {
            let req = Request::Capture {
                net: net.clone(),
                ports,
                count,
                snaplen,
                pass_fd: true,
            };
            netd::capture::run(&out.control, &req, write.as_ref())
                .map(|sum| eprint!("{}", sum.report(&net)))
                .map_err(anyhow::Error::from)
        }
    };
    finish(r)
}

/// The exit status of a command, its error printed with its causes.
fn finish(r: Result<()>) -> ExitCode {
    fabric_util::cli::exit_status("netd", r)
}
