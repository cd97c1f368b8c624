//! netd: the daemon (`netd serve --config FILE`) and its CLI client.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use netd::config::{Config, PortConfig, PortKind};
use netd::control::{call, Request};

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
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon in the foreground.
    Serve {
        /// TOML config file.
        #[arg(long)]
        config: PathBuf,
    },
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
    /// The DHCP leases of a network.
    Leases {
        /// Network.
        net: String,
    },
}

#[derive(Subcommand)]
enum NetCmd {
    /// List networks.
    List,
}

#[derive(Subcommand)]
enum PortCmd {
    /// List the ports of a network, with counters.
    List {
        /// Network.
        net: String,
    },
    /// Add a port.
    Add {
        /// Network.
        net: String,
        /// Port kind: tap, vm or stream.
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
    },
    /// Remove a port.
    Del {
        /// Network.
        net: String,
        /// Port name.
        name: String,
    },
}

fn serve(config: PathBuf) -> Result<()> {
    let cfg = Config::load(&config)?;
    let specs = cfg.validate(&config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(async move {
        let daemon = netd::daemon::Daemon::start(specs, &cfg.state_dir)?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot install the SIGTERM handler")?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = tokio::signal::ctrl_c() => {},
            }
        };
        let control = cfg.control.clone();
        let d2 = daemon.clone();
        let server = tokio::spawn(netd::daemon::serve_control(d2, control, shutdown));
        // Give the listener a moment to bind before announcing readiness.
        tokio::task::yield_now().await;
        let mut waited = 0;
        while !cfg.control.exists() && waited < 200 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            waited += 1;
        }
        netd::daemon::sd_notify_ready();
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

fn client(control: &std::path::Path, req: Request) -> Result<()> {
    let v = call(control, &req)?;
    if !v.is_null() {
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Serve { config } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .with_writer(std::io::stderr)
                .init();
            serve(config)
        }
        Cmd::Net { cmd: NetCmd::List } => client(&cli.control, Request::NetList),
        Cmd::Port { cmd } => match cmd {
            PortCmd::List { net } => client(&cli.control, Request::PortList { net }),
            PortCmd::Del { net, name } => client(&cli.control, Request::PortDel { net, name }),
            PortCmd::Add {
                net,
                kind,
                ifname,
                mac,
                name,
                netns,
                path,
                persistent,
            } => {
                let kind = match kind.as_str() {
                    "tap" => Ok(PortKind::Tap),
                    "vm" => Ok(PortKind::Vm),
                    "stream" => Ok(PortKind::Stream),
                    other => Err(anyhow::anyhow!(
                        "--kind: expected tap, vm or stream, got {other:?}"
                    )),
                };
                kind.and_then(|kind| {
                    let port = PortConfig {
                        name,
                        kind,
                        ifname,
                        mac,
                        netns,
                        path,
                        persistent,
                    };
                    client(&cli.control, Request::PortAdd { net, port })
                })
            }
        },
        Cmd::Mac { net } => client(&cli.control, Request::Mac { net }),
        Cmd::Leases { net } => client(&cli.control, Request::Leases { net }),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
