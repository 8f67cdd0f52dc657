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

mod cli;
mod dest;
mod endpoint;
mod error;
mod etcd;
mod keys;
mod listing;
mod metrics;
mod mirror;
mod pace;
mod plan;
mod reload;
mod startup;
mod watch;

use std::process::ExitCode;

use cli::Command;

fn main() -> ExitCode {
    let outcome = cli::parse(std::env::args_os().skip(1)).and_then(|cmd| match cmd {
        Command::Help => {
            print!("{}", cli::HELP);
            Ok(())
        }
        Command::Version => {
            println!("etcdmirror {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Run(cfg) => {
            startup::init_logging(cfg.debug);
            startup::run(&cfg)
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if log::log_enabled!(log::Level::Error) {
                log::error!("{e}");
            } else {
                eprintln!("etcdmirror: {e}");
            }
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1))
        }
    }
}
