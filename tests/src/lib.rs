//! The end-to-end harness: builds the `pglb` binary, starts it with a config
//! file the way an operator would, and talks to it over PostgreSQL and HTTP.
//! Every wait polls a condition with a deadline; nothing sleeps blindly.

pub mod cluster;
pub mod fault;
pub mod pg;
pub mod pg18;
pub mod pglb;
pub mod prom;
pub mod psql;
pub mod wire;

use std::time::{Duration, Instant};

pub use cluster::{shared_cluster, SharedCluster};
pub use pglb::{Pglb, Yaml};
pub use pglb_testkit::{http, proc, retransmit, sockets, which};

/// Serialises tests of one binary that start their own cluster, so two
/// clusters do not starve each other on a small machine.
pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Skips a test whose tool or privilege is missing: under CI (`.ci/run`
/// sets `CI`, and installs every tool the tests need) that is a failure,
/// never a silent pass. Elsewhere the test returns early, and the `SKIPPED:`
/// line goes to the terminal itself: cargo test captures a passing test's
/// stdout and stderr, so a plain println would hide the skip behind `ok`.
pub fn skip(why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{why} — CI installs everything the tests need (.ci/run), so this is a failure");
    }
    let line = format!("SKIPPED: {}: {why}\n", std::thread::current().name().unwrap_or("a test"));
    let on_terminal = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/tty")
        .and_then(|mut tty| std::io::Write::write_all(&mut tty, line.as_bytes()));
    if on_terminal.is_err() {
        // No terminal (a pipe, a log): the captured output is all there is.
        eprint!("{line}");
    }
}

/// Polls `f` every 50ms until it returns `Some`, or panics after `timeout`
/// with `what` and the last value seen.
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match f() {
            Ok(v) => return v,
            Err(e) => e,
        };
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last: {last}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
