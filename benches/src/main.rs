//! `pglb-bench`: side-by-side benchmarks of pglb against direct connections
//! and HAProxy, on real local PostgreSQL clusters, loopback only.
//!
//! A program run by hand (`cargo run --release -p pglb-benches -- <suite>`);
//! it is never part of `cargo test`. Every child process it starts (pglb,
//! HAProxy, PostgreSQL) is stopped when its owner drops, on error paths too.
#![forbid(unsafe_code)]

mod child;
mod cli;
mod copy;
mod haproxy;
mod idle;
mod pgbench;
mod pglb;
mod probe;
mod procstat;
mod proctree;
mod stats;
mod suites;
mod sys;
mod table;
mod targets;

use std::process::ExitCode;

fn main() -> ExitCode {
    let command = match cli::parse(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(message) => {
            eprintln!("pglb-bench: {message}\n\n{}", cli::USAGE);
            return ExitCode::from(2);
        }
    };
    match suites::run(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("pglb-bench: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
