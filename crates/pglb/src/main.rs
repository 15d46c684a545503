//! `pglb`: run the balancer, check a config, or start the demo.
#![forbid(unsafe_code)]

mod checkers;
mod cli;
mod clusters;
mod ctl;
mod data_path;
#[cfg(feature = "demo")]
mod demo;
mod enforce;
mod limits;
mod members;
mod reload;
mod run;
mod signals;
mod stop;
mod systemd;
mod telemetry;
mod upgrade;

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
        cli::Command::Check { config } => match cli::config_path(config) {
            Ok(config) => run::check(&config),
            Err(message) => usage_error(&message),
        },
        cli::Command::Run { config } => match cli::config_path(config) {
            Ok(config) => report(run::run_blocking(&config)),
            Err(message) => usage_error(&message),
        },
        cli::Command::Control { control, config, token_file, json } => {
            ctl::run(control, config, token_file, json).into()
        }
        #[cfg(feature = "demo")]
        cli::Command::Demo => {
            telemetry::init_logging(pglb_config::LogFormat::Text);
            report(demo::run())
        }
        #[cfg(not(feature = "demo"))]
        cli::Command::Demo => {
            eprintln!("pglb: this build has no demo (the packaged binary is built without it); from the source tree: cargo run --release -p pglb -- demo");
            ExitCode::from(2)
        }
    }
}

fn usage_error(message: &str) -> ExitCode {
    eprintln!("pglb: {message}\n\n{}", cli::USAGE);
    ExitCode::from(2)
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
