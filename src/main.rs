//! Entry point: parse the command line, run, and map the outcome to an exit code in one place.

#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

mod check;
mod check3;
mod cli;
mod dest;
mod dest3;
mod endpoint;
mod error;
mod etcd;
mod flat;
mod keys;
mod listing;
mod metrics;
mod mirror;
mod mirror3;
mod pace;
mod plan;
mod reload;
mod reload3;
mod startup;
mod v3;
mod watch;
mod watch3;

use std::ffi::OsString;
use std::process::ExitCode;

use cli::Command;

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let (check, json) = cli::asks_for_check(&args);
    let cmd = match cli::parse(args) {
        Ok(cmd) => cmd,
        // A command line that asks for a check and does not parse is a check result too.
        Err(e) if check => return check::refused(&e, json),
        Err(e) => return fail(&e),
    };
    let outcome = match cmd {
        Command::Help => {
            print!("{}", cli::HELP);
            Ok(())
        }
        Command::Version => {
            println!("etcdmirror {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Run(cfg) => match cfg.check {
            // A check reports every outcome itself, with its own exit codes.
            Some(opts) => {
                startup::init_quiet_logging(cfg.debug);
                return check::run(&cfg, opts);
            }
            None => {
                startup::init_logging(cfg.debug);
                startup::run(&cfg)
            }
        },
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// Report why the mirror stops, and exit with the code of the table.
fn fail(e: &error::Error) -> ExitCode {
    if log::log_enabled!(log::Level::Error) {
        log::error!("{e}");
    } else {
        eprintln!("etcdmirror: {e}");
    }
    ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1))
}
