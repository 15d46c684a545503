//! Helpers shared by the end-to-end tests (`tests/`) and the benchmarks
//! (`benches/`), which both drive the built `pglb` binary from outside: a
//! tiny HTTP client for the admin endpoint, what /proc says about a
//! process, and finding a program on this machine.
#![deny(unsafe_code)]

pub mod http;
pub mod proc;
pub mod retransmit;
pub mod sockets;

use std::path::PathBuf;

/// The path of `program`: on `PATH`, or in the sbin/bin folders a root
/// shell would search (tools such as keepalived live in /usr/sbin).
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}
