//! Faults a test can inject and is sure to undo, even when it fails: a
//! frozen server (every process SIGSTOPped, as a VM pause or a stuck fsync
//! looks) and a network partition (nftables drops a port's traffic both
//! ways — silence, not a refusal).

use std::process::Command;

use pglb_cluster::Node;

fn kill(signal: &str, pids: &[u32]) {
    let status = Command::new("kill").arg(signal).args(pids.iter().map(u32::to_string)).status();
    assert!(status.is_ok_and(|s| s.success()), "kill {signal} {pids:?} failed");
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
        let out = Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().expect("stdin").write_all(script.as_bytes())?;
                c.wait_with_output()
            });
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
