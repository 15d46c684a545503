//! `pglb`: run the balancer, check a config, or start the demo.
#![forbid(unsafe_code)]

mod checkers;
mod cli;
mod demo;
mod enforce;
mod limits;
mod reload;
mod run;
mod telemetry;

use std::process::ExitCode;

fn main() -> ExitCode {
    let command = match cli::parse(std::env::args_os().skip(1)) {
        Ok(c) => c,
        Err(message) => {
            eprintln!("pglb: {message}\n\n{}", cli::USAGE);
            return ExitCode::from(2);
        }
    };
    match command {
        cli::Command::Help => {
            println!("{}", cli::USAGE);
            ExitCode::SUCCESS
        }
        cli::Command::Version => {
            println!("pglb {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        cli::Command::Check { config } => run::check(&config),
        cli::Command::Run { config } => report(run::run_blocking(&config)),
        cli::Command::Demo => {
            telemetry::init_logging(pglb_config::LogFormat::Text);
            report(demo::run())
        }
    }
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("pglb: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
