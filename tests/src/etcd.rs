//! A real etcd cluster for the tests (Debian's `etcd-server`, 3.4):
//! members on free loopback ports, data in a temp dir removed on drop
//! (every member killed first). Members can be killed and started again
//! on their data, as in an outage.

use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pglb_cluster::free_port;

use crate::{http, wait_until};

struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

pub struct Etcd {
    dir: PathBuf,
    members: Vec<Member>,
    initial: String,
}

impl Etcd {
    /// Starts `n` members and waits until each answers `/health`. `None`
    /// (after [`crate::skip`]) when etcd is not installed.
    pub fn start(n: usize) -> Option<Self> {
        if Command::new("etcd").arg("--version").output().is_err() {
            crate::skip("etcd is not installed (Debian package etcd-server)");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("pglb-etcd-{}-{}", std::process::id(), free_port().expect("port")));
        fs::create_dir_all(&dir).expect("temp dir");
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("e{i}"),
                client: free_port().expect("port"),
                peer: free_port().expect("port"),
                child: None,
            })
            .collect();
        let initial =
            members.iter().map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer)).collect::<Vec<_>>().join(",");
        let mut etcd = Self { dir, members, initial };
        for i in 0..n {
            etcd.spawn(i);
        }
        for i in 0..n {
            etcd.wait_healthy(i);
        }
        Some(etcd)
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", m.name)))
            .expect("etcd log");
        let child = Command::new("etcd")
            .args(["--name", &m.name, "--data-dir"])
            .arg(self.dir.join(&m.name))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{}", m.client))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{}", m.client))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{}", m.peer))
            .arg(format!("--initial-advertise-peer-urls=http://127.0.0.1:{}", m.peer))
            .arg(format!("--initial-cluster={}", self.initial))
            .args(["--initial-cluster-state", "new", "--initial-cluster-token", "pglb-test"])
            .args(["--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.members[i].child = Some(child);
    }

    fn wait_healthy(&self, i: usize) {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.members[i].client));
        wait_until(&format!("etcd member {i} /health"), Duration::from_secs(60), || match http::get(addr, "/health") {
            Ok((200, body)) if body.contains("true") => Ok(()),
            other => Err(format!("{other:?}")),
        });
    }

    /// Every member's client URL, for `shared_state.etcd.endpoints`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| format!("http://127.0.0.1:{}", m.client)).collect()
    }

    /// The YAML list of [`Etcd::endpoints`].
    pub fn endpoints_yaml(&self) -> String {
        format!("[{}]", self.endpoints().join(", "))
    }

    pub fn client_port(&self, i: usize) -> u16 {
        self.members[i].client
    }

    /// Kills member `i` (SIGKILL: as in a crash or an outage).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data, and waits until it answers.
    pub fn restart(&mut self, i: usize) {
        self.spawn(i);
        self.wait_healthy(i);
    }

    /// Starts every killed member again, then waits for all of them.
    pub fn restart_all(&mut self) {
        let stopped: Vec<usize> = (0..self.members.len()).filter(|&i| self.members[i].child.is_none()).collect();
        for &i in &stopped {
            self.spawn(i);
        }
        for i in stopped {
            self.wait_healthy(i);
        }
    }

    /// `etcdctl` against every member, for what a test writes or reads by hand.
    pub fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints().join(",")))
            .args(args)
            .output()
            .map_err(|e| format!("etcdctl: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
