//! `stord`: the daemon (`stord serve`) and its control CLI (`stord disk ...`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fabric_api::stord::{Alloc, DiskInfo, Format, Request};
use fabric_api::Client;
use fabric_util::Size;
use stord::config::Config;

/// Default control socket, as the packaged unit uses it.
const DEFAULT_CONTROL: &str = "/run/stord/control.sock";

#[derive(Parser)]
#[command(
    name = "stord",
    version,
    about = "NBD block service: a catalog of disks served over NBD"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon in the foreground.
    Serve {
        #[command(flatten)]
        serve: fabric_util::cli::ServeArgs,
        /// Serve one NBD connection on stdin/stdout, then exit.
        #[arg(long)]
        stdin: bool,
    },
    /// Manage disks through a running daemon's control socket.
    Disk {
        #[command(subcommand)]
        cmd: DiskCmd,
        /// The daemon's control socket.
        #[arg(long, global = true, default_value = DEFAULT_CONTROL)]
        control: PathBuf,
    },
    /// Show the daemon's counters.
    Status {
        /// The daemon's control socket.
        #[arg(long, default_value = DEFAULT_CONTROL)]
        control: PathBuf,
    },
}

#[derive(Subcommand)]
enum DiskCmd {
    /// Create a disk.
    Create {
        /// Disk (export) name.
        name: String,
        /// Size: bytes, or like 64MiB / 10GiB.
        #[arg(long)]
        size: Size,
        /// fixed (preallocated) or dynamic (sparse).
        #[arg(long, default_value = "dynamic")]
        alloc: Alloc,
        /// Serve it read-only.
        #[arg(long)]
        read_only: bool,
    },
    /// List disks.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Change a disk's size.
    Resize {
        /// Disk name.
        name: String,
        /// New size.
        #[arg(long)]
        size: Size,
    },
    /// Delete a disk and its file (refused while clients are connected, and
    /// for a disk other disks are clones or snapshots of).
    Delete {
        /// Disk name.
        name: String,
    },
    /// Copy a file into the state directory as a read-only base disk.
    Import {
        /// Name of the new disk.
        name: String,
        /// The file (read by the daemon); a qcow2's backing chain is flattened.
        #[arg(long)]
        from: PathBuf,
        /// raw or qcow2 (default: by the file's magic).
        #[arg(long)]
        format: Option<Format>,
    },
    /// Make a linked clone (a qcow2 overlay) of a read-only disk.
    Clone {
        /// The read-only base.
        base: String,
        /// Name of the new disk.
        name: String,
    },
    /// Freeze a disk as a read-only snapshot; it continues in a new overlay.
    Snapshot(DiskSnap),
    /// List a disk's snapshots, nearest first.
    Snapshots {
        /// Disk name.
        name: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Throw away what a disk got since a snapshot (refused while attached).
    Revert(DiskSnap),
    /// Copy a disk's chain into one self-contained disk (refused while attached).
    Flatten {
        /// Disk name.
        name: String,
    },
}

/// A disk and one of its snapshots.
#[derive(clap::Args)]
struct DiskSnap {
    /// Disk name.
    name: String,
    /// Snapshot name.
    snap: String,
}

/// Prints disks as a table, or as JSON.
fn print_disks(disks: &[DiskInfo], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(disks)?);
        return Ok(());
    }
    // The columns of earlier releases in their places, STATE still last;
    // FORMAT and CHAIN (comma-separated, nearest first) before it.
    println!(
        "{:<24} {:>14} {:<8} {:>14} {:>5} {:<4} {:<6} {:<24} STATE",
        "NAME", "SIZE", "ALLOC", "ALLOCATED", "CONNS", "MODE", "FORMAT", "CHAIN"
    );
    for d in disks {
        // `failed`: a flush failed, data may be lost (FLUSH and FUA fail
        // until restart); `missing`: not served.
        let state = match (d.missing, d.failed) {
            (true, _) => "missing",
            (_, true) => "failed",
            _ => "ok",
        };
        let chain = if d.chain.is_empty() {
            "-".to_string()
        } else {
            d.chain.join(",")
        };
        println!(
            "{:<24} {:>14} {:<8} {:>14} {:>5} {:<4} {:<6} {:<24} {}",
            d.name,
            d.size,
            d.alloc,
            d.allocated,
            d.connections,
            if d.read_only { "ro" } else { "rw" },
            d.format,
            chain,
            state
        );
    }
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(64)
        .build()
        .context("cannot start the async runtime")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    fabric_util::cli::exit_status("stord", real_main(cli))
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Serve {
            serve: fabric_util::cli::ServeArgs { config },
            stdin,
        } => {
            // Logs go to stderr: stdout carries NBD in --stdin mode and data for
            // the CLI.
            fabric_util::init_logging("STORD_LOG", "info");
            let cfg = Config::load(&config)?;
            let rt = runtime()?;
            let r = rt.block_on(stord::server::run(cfg, stord::server::Options { stdin }));
            // tokio's stdin reader is a blocking thread that may sit in read(2)
            // forever: do not wait for it.
            rt.shutdown_timeout(std::time::Duration::from_millis(200));
            r?;
            Ok(())
        }
        Cmd::Status { control } => {
            let r = Client::new(control).call(&Request::Status {})?;
            println!("{}", serde_json::to_string_pretty(&r.status)?);
            Ok(())
        }
        Cmd::Disk { cmd, control } => {
            let req = match &cmd {
                DiskCmd::Create {
                    name,
                    size,
                    alloc,
                    read_only,
                } => Request::Create {
                    name: name.clone(),
                    size: *size,
                    alloc: *alloc,
                    read_only: *read_only,
                },
                DiskCmd::List { .. } => Request::List {},
                DiskCmd::Resize { name, size } => Request::Resize {
                    name: name.clone(),
                    size: *size,
                },
                DiskCmd::Delete { name } => Request::Delete { name: name.clone() },
                DiskCmd::Import { name, from, format } => Request::Import {
                    name: name.clone(),
                    // The daemon resolves it: send it absolute.
                    from: std::path::absolute(from)
                        .unwrap_or_else(|_| from.clone())
                        .to_string_lossy()
                        .into_owned(),
                    format: *format,
                },
                DiskCmd::Clone { base, name } => Request::Clone {
                    base: base.clone(),
                    name: name.clone(),
                },
                DiskCmd::Snapshot(DiskSnap { name, snap }) => Request::Snapshot {
                    name: name.clone(),
                    snap: snap.clone(),
                },
                DiskCmd::Snapshots { name, .. } => Request::Snapshots { name: name.clone() },
                DiskCmd::Revert(DiskSnap { name, snap }) => Request::Revert {
                    name: name.clone(),
                    snap: snap.clone(),
                },
                DiskCmd::Flatten { name } => Request::Flatten { name: name.clone() },
            };
            let r = Client::new(control).call(&req)?;
            match cmd {
                DiskCmd::List { json } | DiskCmd::Snapshots { json, .. } => {
                    print_disks(&r.disks.unwrap_or_default(), json)?
                }
                _ => {}
            }
            Ok(())
        }
    }
}
