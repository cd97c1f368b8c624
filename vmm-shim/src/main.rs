//! `vmm-shim`: boots a VM from flags or a TOML file; see the crate docs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmm_shim::api::client::{self, Action};
use vmm_shim::api::Migration;
use vmm_shim::config::RawConfig;

/// A thin KVM VMM: Linux kernel, serial console, virtio-net on TAP, virtio-blk on NBD.
#[derive(Parser, Debug)]
#[command(name = "vmm-shim", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML file with the same keys as the flags (kernel, initrd, cmdline, mem, cpus,
    /// net = [...], disk = [...], console, netd_control, metrics, api_sock, restore,
    /// incoming); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Kernel: ELF vmlinux or bzImage.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line (devices are appended).
    #[arg(long)]
    cmdline: Option<String>,
    /// Guest memory, e.g. 256M.
    #[arg(long)]
    mem: Option<String>,
    /// vCPUs.
    #[arg(long)]
    cpus: Option<u8>,
    /// NIC: tap=IFNAME[,mac=MAC] or netd=NETWORK[,mac=MAC]; repeatable.
    #[arg(long)]
    net: Vec<String>,
    /// Disk: nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH, or with TLS
    /// nbds://[ID@]HOST:PORT/EXPORT, then options: ,ro ,reconnect_delay=SECONDS
    /// ,tls-psk-file=PATH ,tls-username=ID ,tls-certificates=DIR; repeatable.
    #[arg(long)]
    disk: Vec<String>,
    /// Console: stdio or a file path.
    #[arg(long)]
    console: Option<String>,
    /// netd control socket (for netd= NICs).
    #[arg(long)]
    netd_control: Option<PathBuf>,
    /// Serve Prometheus metrics (vCPU exits, device counters) on ADDR:PORT, `GET /metrics`.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Serve the control API (HTTP/1.1 + JSON: GET/PATCH /vm) on this unix socket.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Go on from a snapshot (`PUT /snapshot`'s DIR) instead of booting; --mem, --cpus
    /// and the --disk/--net list must be the snapshot's (the disks and TAPs may be
    /// other ones).
    #[arg(long, value_name = "DIR")]
    restore: Option<PathBuf>,
    /// Wait for a live migration on tcp:ADDR:PORT instead of booting (same shape as
    /// the source; the disks are opened here, to the same exports).
    #[arg(long, value_name = "tcp:ADDR:PORT")]
    incoming: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Talk to a running vmm-shim's control API; prints its JSON answer.
    Ctl {
        /// The VM's --api-sock.
        #[arg(long, value_name = "PATH")]
        api_sock: PathBuf,
        #[command(subcommand)]
        verb: Verb,
    },
}

#[derive(Subcommand, Debug)]
enum Verb {
    /// The VM's state, vCPUs, memory and device counters (GET /vm).
    Status,
    /// Pause the vCPUs (PATCH /vm {"state": "paused"}).
    Pause,
    /// Let them run again (PATCH /vm {"state": "running"}).
    Resume,
    /// Write a snapshot to DIR; the VM stays paused (PUT /snapshot {"dir": DIR}).
    Snapshot {
        /// Directory for `memory` and `state`.
        dir: PathBuf,
        /// Resume the VM once the snapshot is written.
        #[arg(long)]
        resume: bool,
    },
    /// Live-migrate the VM to a `vmm-shim --incoming` (PUT /migrate {"to": ...}).
    Migrate {
        /// The destination, tcp:HOST:PORT.
        to: String,
        /// Longest pause the pre-copy aims for, in milliseconds.
        #[arg(long, default_value_t = 50)]
        max_downtime_ms: u64,
        /// Never throttle the vCPUs (auto-converge is on otherwise).
        #[arg(long)]
        no_auto_converge: bool,
        /// Most MiB/s pre-copy sends while the VM runs (0: no limit).
        #[arg(long, default_value_t = 0)]
        max_bandwidth_mib: u64,
    },
}

/// `vmm-shim ctl`: 0 when the API did it, 1 otherwise (its error on stderr).
fn ctl(sock: &std::path::Path, verb: Verb) -> ExitCode {
    let action = match verb {
        Verb::Status => Action::Status,
        Verb::Pause => Action::Pause,
        Verb::Resume => Action::Resume,
        // The API takes an absolute path (its process may run elsewhere).
        Verb::Snapshot { dir, resume } => match std::path::absolute(&dir) {
            Ok(dir) => Action::Snapshot { dir, resume },
            Err(e) => {
                eprintln!("vmm-shim: {}: {e}", dir.display());
                return ExitCode::from(2);
            }
        },
        Verb::Migrate {
            to,
            max_downtime_ms,
            no_auto_converge,
            max_bandwidth_mib,
        } => Action::Migrate(Migration {
            to,
            max_downtime_ms,
            auto_converge: !no_auto_converge,
            max_bandwidth_mib,
        }),
    };
    match client::run(sock, &action) {
        Ok(v) => {
            println!("{v:#}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e, 1),
    }
}

fn main() -> ExitCode {
    fabric_util::init_logging("VMM_LOG", "warn");
    let cli = Cli::parse();
    if let Some(Command::Ctl { api_sock, verb }) = cli.command {
        return ctl(&api_sock, verb);
    }
    let from_cli = RawConfig {
        kernel: cli.kernel,
        initrd: cli.initrd,
        cmdline: cli.cmdline,
        mem: cli.mem,
        cpus: cli.cpus,
        net: cli.net,
        disk: cli.disk,
        console: cli.console,
        netd_control: cli.netd_control,
        metrics: cli.metrics,
        api_sock: cli.api_sock,
        restore: cli.restore,
        incoming: cli.incoming,
    };
    let raw = match &cli.config {
        Some(p) => match RawConfig::from_file(p) {
            Ok(r) => r.merge(from_cli),
            Err(e) => return fail(&e, 2),
        },
        None => from_cli,
    };
    let cfg = match raw.validate() {
        Ok(c) => c,
        Err(e) => return fail(&e, 2),
    };
    match vmm_shim::vmm::run(cfg) {
        Ok(reason) => {
            let code = reason.exit_code();
            if let vmm_shim::vmm::ExitReason::Crash(msg) = &reason {
                eprintln!("vmm-shim: guest crashed: {msg}");
            }
            ExitCode::from(code as u8)
        }
        Err(e) => fail(&e, 1),
    }
}

fn fail(e: &dyn std::error::Error, code: u8) -> ExitCode {
    eprintln!("vmm-shim: {}", vmm_shim::error_chain(e));
    ExitCode::from(code)
}
