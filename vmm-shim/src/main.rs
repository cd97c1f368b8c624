//! `vmm-shim`: boots a VM from flags or a TOML file; see the crate docs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vmm_shim::config::RawConfig;

/// A thin KVM VMM: Linux kernel, serial console, virtio-net on TAP, virtio-blk on NBD.
#[derive(Parser, Debug)]
#[command(name = "vmm-shim", version)]
struct Cli {
    /// TOML file with the same keys as the flags (kernel, initrd, cmdline, mem, cpus,
    /// net = [...], disk = [...], console, netd_control, metrics); flags override it.
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
}

fn main() -> ExitCode {
    fabric_util::init_logging("VMM_LOG", "warn");
    let cli = Cli::parse();
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
