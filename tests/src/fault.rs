//! Faults a test can inject and is sure to undo, even when it fails: a
//! frozen server (every process SIGSTOPped, as a VM pause or a stuck fsync
//! looks) and a network partition (nftables drops a port's traffic both
//! ways — silence, not a refusal).

use std::process::{Command, Stdio};

use pglb_cluster::Node;

/// Signals every pid in one kill(1) call, so the server stops or resumes
/// as one. kill fails for a pid that is gone (a backend that exited just
/// before the freeze is reaped as soon as the postmaster runs again) but
/// still signals the others, so its status is not the verdict.
fn kill(signal: &str, pids: &[u32]) {
    let _ = Command::new("kill").arg(signal).args(pids.iter().map(u32::to_string)).stderr(Stdio::null()).status();
}

/// The state letter of a process (`T`: stopped), from /proc.
fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// A server whose processes are all stopped; they continue on drop.
pub struct Freeze {
    pids: Vec<u32>,
}

impl Freeze {
    /// Stops the postmaster and every process it started.
    pub fn node(node: &Node) -> Self {
        let pids = node.processes();
        assert!(pids.len() > 1, "{} has no server processes to freeze", node.name);
        kill("-STOP", &pids);
        let stopped = (0..100).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(5));
            state(pids[0]) == Some('T')
        });
        assert!(stopped, "{}'s postmaster did not stop", node.name);
        Self { pids }
    }

    /// Lets the server run again.
    pub fn thaw(self) {}
}

impl Drop for Freeze {
    fn drop(&mut self) {
        kill("-CONT", &self.pids);
    }
}

/// All TCP traffic to and from one loopback port dropped; healed on drop.
pub struct Partition {
    table: String,
}

impl Partition {
    /// Drops every packet whose source or destination port is `port`.
    /// `None` (and a `SKIPPED:` line, or a failure under CI) without nft.
    pub fn port(port: u16) -> Option<Self> {
        if Command::new("nft").arg("--version").output().is_err() {
            crate::skip("nft (package nftables) is not installed");
            return None;
        }
        let table = format!("pglb_test_{port}");
        let script = format!(
            "add table inet {table}
             add chain inet {table} out {{ type filter hook output priority -10; policy accept; }}
             add rule inet {table} out tcp dport {port} drop
             add rule inet {table} out tcp sport {port} drop"
        );
        let out = Command::new("nft").args(["-f", "-"]).stdin(Stdio::piped()).stderr(Stdio::piped()).spawn().and_then(
            |mut c| {
                use std::io::Write;
                c.stdin.take().expect("stdin").write_all(script.as_bytes())?;
                c.wait_with_output()
            },
        );
        match out {
            Ok(o) if o.status.success() => Some(Self { table }),
            Ok(o) => panic!("nft refused the partition rules: {}", String::from_utf8_lossy(&o.stderr)),
            Err(e) => panic!("cannot run nft: {e}"),
        }
    }

    /// Lets the traffic through again.
    pub fn heal(self) {}
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = Command::new("nft").args(["delete", "table", "inet", &self.table]).status();
    }
}

/// The database servers squeezed into a CPU quota (cgroup v1 `cpu`
/// controller: CFS bandwidth), as a VM with CPU steal or a container at its
/// CPU limit is: each period they run for `quota`, then wait. Processes the
/// servers start later inherit it. Undone on drop.
pub struct Throttle {
    dir: std::path::PathBuf,
}

const CPU_CGROUP: &str = "/sys/fs/cgroup/cpu";

impl Throttle {
    /// `None` (and a `SKIPPED:` line, or a failure under CI) without a
    /// writable cgroup v1 `cpu` hierarchy.
    pub fn nodes(nodes: &[Node], quota: std::time::Duration, period: std::time::Duration) -> Option<Self> {
        let dir = std::path::Path::new(CPU_CGROUP).join(format!("pglb-test-{}", std::process::id()));
        if std::fs::create_dir_all(&dir).is_err() || !dir.join("cpu.cfs_quota_us").exists() {
            crate::skip("no writable cgroup v1 cpu controller at /sys/fs/cgroup/cpu");
            return None;
        }
        let throttle = Self { dir };
        let write = |file: &str, value: String| {
            std::fs::write(throttle.dir.join(file), &value).unwrap_or_else(|e| panic!("write {value} to {file}: {e}"))
        };
        write("cpu.cfs_period_us", period.as_micros().to_string());
        write("cpu.cfs_quota_us", quota.as_micros().to_string());
        for pid in nodes.iter().flat_map(Node::processes) {
            // A process may exit meanwhile; that is fine.
            let _ = std::fs::write(throttle.dir.join("cgroup.procs"), pid.to_string());
        }
        Some(throttle)
    }

    /// Throttled periods so far (`nr_throttled` of `cpu.stat`).
    pub fn throttled_periods(&self) -> u64 {
        let stat = std::fs::read_to_string(self.dir.join("cpu.stat")).unwrap_or_default();
        stat.lines().find_map(|l| l.strip_prefix("nr_throttled ")?.trim().parse().ok()).unwrap_or(0)
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        let members = std::fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
        for pid in members.lines() {
            let _ = std::fs::write(std::path::Path::new(CPU_CGROUP).join("cgroup.procs"), pid);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}
