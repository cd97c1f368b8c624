//! What the daemons' command lines share: the `serve` subcommand's arguments and
//! the exit status of a command.
//!
//! netd and stord are each a daemon (`serve --config FILE`) and the control CLI
//! that talks to it; both start the same way and end the same way, so that a user
//! sees one shape: `--config` names the TOML file, and a failed command prints
//! `PROGRAM: error: cause: cause` on stderr and exits 1.

use std::fmt::Display;
use std::path::PathBuf;
use std::process::ExitCode;

/// The arguments of a daemon's `serve` subcommand (flattened into it).
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// The TOML configuration file.
    #[arg(long)]
    pub config: PathBuf,
}

/// The exit status of a command: success, or its error printed after `prog` with
/// its causes (`{:#}`, which `anyhow` prints as the chain) and status 1.
pub fn exit_status<E: Display>(prog: &str, r: Result<(), E>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{prog}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn serve_args_take_config_and_require_it() {
        let c = Cli::try_parse_from(["d", "--config", "/etc/d.toml"]).unwrap();
        assert_eq!(c.serve.config, PathBuf::from("/etc/d.toml"));
        assert!(Cli::try_parse_from(["d"]).is_err());
    }

    #[test]
    fn exit_status_is_failure_for_an_error() {
        assert_eq!(exit_status::<String>("d", Ok(())), ExitCode::SUCCESS);
        assert_eq!(
            exit_status("d", Err("config: bad".to_string())),
            ExitCode::FAILURE
        );
    }
}
