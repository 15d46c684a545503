//! The end-to-end harness: builds the `pglb` binary, starts it with a config
//! file the way an operator would, and talks to it over PostgreSQL and HTTP.
//! Every wait polls a condition with a deadline; nothing sleeps blindly.

pub mod cluster;
pub mod docs;
pub mod etcd;
pub mod fault;
pub mod haproxy;
pub mod patroni;
pub mod pg;
pub mod pg18;
pub mod pglb;
pub mod prom;
pub mod psql;
pub mod wire;
pub mod writers;

use std::time::{Duration, Instant};

pub use cluster::{shared_cluster, SharedCluster};
pub use pglb::{ClusterYaml, Pglb, Yaml};
pub use pglb_testkit::{http, proc, retransmit, sockets, which};

/// Serialises tests of one binary that start their own cluster, so two
/// clusters do not starve each other on a small machine.
pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The variable that lets a test whose tool or privilege is missing pass as
/// skipped (outside CI) instead of failing.
pub const ALLOW_SKIP: &str = "PGLB_TEST_ALLOW_SKIP";
/// The variable that lets tests change the machine beyond their temp dirs
/// (install a package, create a system user); set under CI.
pub const SYSTEM: &str = "PGLB_TEST_SYSTEM";

/// A test whose tool or privilege is missing. Under CI (`.ci/run` sets
/// `CI`, and installs every tool the tests need) and by default that is a
/// failure, never a silent pass; with `PGLB_TEST_ALLOW_SKIP=1` the test
/// returns early after a `SKIPPED:` line.
pub fn skip(why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{why} — CI installs everything the tests need (.ci/run), so this is a failure");
    }
    if std::env::var_os(ALLOW_SKIP).is_none() {
        panic!(
            "{why} — install it (.ci/run lists every tool the tests need), or set {ALLOW_SKIP}=1 to skip such tests"
        );
    }
    announce_skip(why);
}

/// Whether a test may change the machine in a way that outlives it (`what`
/// it does): under CI, or with `PGLB_TEST_SYSTEM=1`. Otherwise it says so
/// in a `SKIPPED:` line and the test returns.
pub fn may_change_the_machine(what: &str) -> bool {
    if std::env::var_os("CI").is_some() || std::env::var_os(SYSTEM).is_some() {
        return true;
    }
    announce_skip(&format!("it {what}; set {SYSTEM}=1 to run it"));
    false
}

/// Prints `SKIPPED: <test>: <why>` where it is seen: libtest captures what a
/// test prints with `print!`/`eprint!` and shows it only for a failure, but
/// not what is written to stderr directly, so the line reaches the terminal
/// or the file the output goes to, for a passing test too.
fn announce_skip(why: &str) {
    let line = format!("SKIPPED: {}: {why}\n", std::thread::current().name().unwrap_or("a test"));
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
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

/// The lines a child writes to stdout and stderr, gathered as they come.
pub struct ChildOutput {
    lines: std::sync::mpsc::Receiver<String>,
    /// Everything seen so far.
    pub seen: String,
}

impl ChildOutput {
    /// Takes `child`'s piped stdout and stderr.
    pub fn of(child: &mut std::process::Child) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        let out = child.stdout.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>);
        let err = child.stderr.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>);
        for pipe in [out, err].into_iter().flatten() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in std::io::BufRead::lines(std::io::BufReader::new(pipe)).map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        Self { lines: rx, seen: String::new() }
    }

    /// Waits until the output shows `text`; panics with all of it after `timeout`.
    pub fn wait_for(&mut self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.seen.contains(text) {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => self.push(&line),
                Err(_) => panic!("no `{text}` within {timeout:?}:\n{}", self.seen),
            }
        }
    }

    /// Takes in what arrives within `quiet` of the last line.
    pub fn drain(&mut self, quiet: Duration) {
        while let Ok(line) = self.lines.recv_timeout(quiet) {
            self.push(&line);
        }
    }

    fn push(&mut self, line: &str) {
        self.seen.push_str(line);
        self.seen.push('\n');
    }
}
