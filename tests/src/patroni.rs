//! A real Patroni cluster for the tests: one etcd 3.4 (Debian's
//! `etcd-server`) and Patroni 4.1 members (`tests/tools/fetch-patroni`),
//! each running PostgreSQL 15 as the OS user `postgres`, on free loopback
//! ports, in a temp dir removed on drop (every process killed first).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pglb_cluster::{free_port, pg_bin, PgUser};
use serde_json::Value;

use crate::{http, wait_until};

/// Patroni's HA settings the tests use: the smallest Patroni accepts
/// (`ttl` ≥ 20, `retry_timeout` ≥ 3, `loop_wait + 2 × retry_timeout ≤ ttl`).
pub const TTL: u64 = 20;
pub const LOOP_WAIT: u64 = 2;
pub const RETRY_TIMEOUT: u64 = 5;

/// How a cluster is bootstrapped.
#[derive(Clone, Default)]
pub struct Options {
    pub failsafe_mode: bool,
    pub synchronous_mode_strict: bool,
}

/// One member.
pub struct Member {
    pub name: String,
    pub pg_port: u16,
    pub api_port: u16,
    config: PathBuf,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    tags: String,
}

impl Member {
    /// The postmaster's pid (from `postmaster.pid`).
    pub fn postmaster_pid(&self) -> Option<u32> {
        let text = fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// Patroni's pid.
    pub fn patroni_pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn api(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.api_port))
    }

    /// Patroni and every PostgreSQL process of this member.
    pub fn processes(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.patroni_pid().into_iter().collect();
        if let Some(postmaster) = self.postmaster_pid() {
            pids.push(postmaster);
            pids.extend(children(postmaster));
        }
        pids
    }
}

/// The direct children of `pid`.
fn children(pid: u32) -> Vec<u32> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    fs::read_to_string(path).unwrap_or_default().split_whitespace().filter_map(|p| p.parse().ok()).collect()
}

/// etcd, and the members Patroni runs.
pub struct PatroniCluster {
    pub dir: PathBuf,
    pub scope: String,
    pub etcd_port: u16,
    etcd_peer_port: u16,
    etcd: Option<Child>,
    pub members: Vec<Member>,
    patroni: PathBuf,
    user: PgUser,
    options: Options,
}

/// The patroni executable: `$PGLB_PATRONI`, else the venv
/// `tests/tools/fetch-patroni` makes.
fn patroni_bin() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PGLB_PATRONI") {
        return Some(PathBuf::from(path));
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/patroni/venv/bin/patroni");
    path.exists().then_some(path)
}

impl PatroniCluster {
    /// Starts etcd and `n` members and waits until one leads and every
    /// other streams from it. `None` (after [`crate::skip`]) when etcd or
    /// Patroni is not installed.
    pub fn start(n: usize, options: Options) -> Option<Self> {
        let Some(patroni) = patroni_bin() else {
            crate::skip("Patroni is not installed (run tests/tools/fetch-patroni)");
            return None;
        };
        if Command::new("etcd").arg("--version").output().is_err() {
            crate::skip("etcd is not installed (Debian package etcd-server)");
            return None;
        }
        let user = PgUser::detect().expect("the postgres OS user");
        let dir =
            std::env::temp_dir().join(format!("pglb-patroni-{}-{}", std::process::id(), free_port().expect("port")));
        fs::create_dir_all(&dir).expect("temp dir");
        user.own(&dir).expect("give the temp dir to postgres");
        let mut cluster = Self {
            scope: format!("pglbtest{}", free_port().expect("port")),
            dir,
            etcd_port: free_port().expect("port"),
            etcd_peer_port: free_port().expect("port"),
            etcd: None,
            members: Vec::new(),
            patroni,
            user,
            options,
        };
        cluster.start_etcd();
        // The first member bootstraps; the others clone from it.
        cluster.add_member();
        cluster.wait_leader(Duration::from_secs(90));
        for _ in 1..n {
            cluster.add_member();
        }
        cluster.wait_streaming(Duration::from_secs(120));
        Some(cluster)
    }

    /// Starts etcd (again, on the same data: a restart).
    pub fn start_etcd(&mut self) {
        let (client, peer) = (self.etcd_port, self.etcd_peer_port);
        let log = fs::OpenOptions::new().create(true).append(true).open(self.dir.join("etcd.log")).expect("etcd log");
        let child = Command::new("etcd")
            .args(["--name", "etcd0", "--data-dir"])
            .arg(self.dir.join("etcd"))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!("--initial-cluster=etcd0=http://127.0.0.1:{peer}"))
            .args(["--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.etcd = Some(child);
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], client));
        wait_until("etcd /health", Duration::from_secs(30), || match http::get(addr, "/health") {
            Ok((200, body)) if body.contains("true") => Ok(()),
            other => Err(format!("{other:?}")),
        });
    }

    /// Stops etcd (SIGKILL: the store is gone, as in an outage).
    pub fn stop_etcd(&mut self) {
        if let Some(mut child) = self.etcd.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Bootstraps (first) or clones (others) a new member and starts its
    /// Patroni; returns its name.
    pub fn add_member(&mut self) -> String {
        let i = self.members.len() + 1;
        let name = format!("pg{i}");
        let (pg_port, api_port) = (free_port().expect("port"), free_port().expect("port"));
        let data_dir = self.dir.join(&name);
        let config = self.dir.join(format!("{name}.yml"));
        let log = self.dir.join(format!("{name}.log"));
        let mut member =
            Member { name: name.clone(), pg_port, api_port, config, data_dir, log, child: None, tags: String::new() };
        self.write_config(&member);
        self.spawn(&mut member);
        self.members.push(member);
        name
    }

    fn write_config(&self, m: &Member) {
        let sync = if self.options.synchronous_mode_strict {
            "    synchronous_mode: true\n    synchronous_mode_strict: true\n"
        } else {
            ""
        };
        let yaml = format!(
            "scope: {scope}
name: {name}
log:
  level: INFO
restapi:
  listen: 127.0.0.1:{api}
  connect_address: 127.0.0.1:{api}
etcd3:
  hosts: [127.0.0.1:{etcd}]
bootstrap:
  dcs:
    ttl: {TTL}
    loop_wait: {LOOP_WAIT}
    retry_timeout: {RETRY_TIMEOUT}
    maximum_lag_on_failover: 1048576
    failsafe_mode: {failsafe}
{sync}    postgresql:
      use_pg_rewind: true
      parameters:
        wal_level: replica
        hot_standby: 'on'
        wal_log_hints: 'on'
        max_wal_senders: 10
        max_replication_slots: 10
        wal_keep_size: 128MB
  initdb:
    - encoding: UTF8
postgresql:
  listen: 127.0.0.1:{pg}
  connect_address: 127.0.0.1:{pg}
  data_dir: {data}
  bin_dir: {bin}
  pgpass: {dir}/pgpass-{name}
  authentication:
    superuser: {{username: postgres, password: postgres}}
    replication: {{username: replicator, password: replicator}}
    rewind: {{username: postgres, password: postgres}}
  pg_hba:
    - local all all trust
    - host all all 127.0.0.1/32 trust
    - host replication all 127.0.0.1/32 trust
  parameters:
    unix_socket_directories: {dir}
    shared_buffers: 16MB
    max_connections: 100
tags:
  noloadbalance: false
{tags}",
            scope = self.scope,
            name = m.name,
            api = m.api_port,
            etcd = self.etcd_port,
            failsafe = self.options.failsafe_mode,
            pg = m.pg_port,
            data = m.data_dir.display(),
            bin = pg_bin().display(),
            dir = self.dir.display(),
            tags = m.tags,
        );
        fs::write(&m.config, yaml).expect("write the Patroni config");
        self.user.own(&m.config).expect("give the config to postgres");
    }

    fn spawn(&self, m: &mut Member) {
        let log = fs::OpenOptions::new().create(true).append(true).open(&m.log).expect("patroni log");
        self.user.own(&m.log).expect("give the log to postgres");
        let child = self
            .user
            .command(&self.patroni)
            .arg(&m.config)
            .current_dir(&self.dir)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn patroni");
        m.child = Some(child);
    }

    pub fn member(&self, name: &str) -> &Member {
        self.members.iter().find(|m| m.name == name).unwrap_or_else(|| panic!("no member {name}"))
    }

    fn member_mut(&mut self, name: &str) -> &mut Member {
        self.members.iter_mut().find(|m| m.name == name).unwrap_or_else(|| panic!("no member {name}"))
    }

    /// `GET /cluster` from the first member that answers.
    pub fn cluster_json(&self) -> Option<Value> {
        self.members.iter().find_map(|m| match http::get(m.api(), "/cluster") {
            Ok((200, body)) => serde_json::from_str(&body).ok(),
            _ => None,
        })
    }

    /// The member with role `leader` that is running.
    pub fn leader(&self) -> Option<String> {
        let cluster = self.cluster_json()?;
        cluster["members"]
            .as_array()?
            .iter()
            .find(|m| m["role"] == "leader" && m["state"] == "running")
            .and_then(|m| m["name"].as_str().map(str::to_owned))
    }

    /// Waits until a leader runs; returns its name.
    pub fn wait_leader(&self, timeout: Duration) -> String {
        wait_until("a running Patroni leader", timeout, || self.leader().ok_or_else(|| self.tail_logs()))
    }

    /// Waits until a leader other than `old` runs.
    pub fn wait_new_leader(&self, old: &str, timeout: Duration) -> String {
        wait_until(&format!("a Patroni leader other than {old}"), timeout, || match self.leader() {
            Some(l) if l != old => Ok(l),
            other => Err(format!("leader {other:?}")),
        })
    }

    /// Waits until every running member's Patroni lists it as leader or
    /// streaming.
    pub fn wait_streaming(&self, timeout: Duration) {
        let want: Vec<String> = self.members.iter().filter(|m| m.child.is_some()).map(|m| m.name.clone()).collect();
        wait_until("every member leading or streaming", timeout, || {
            let cluster = self.cluster_json().ok_or("no /cluster answer")?;
            let members = cluster["members"].as_array().cloned().unwrap_or_default();
            let ready = |name: &String| {
                members.iter().any(|m| {
                    m["name"] == name.as_str()
                        && ((m["role"] == "leader" && m["state"] == "running") || m["state"] == "streaming")
                })
            };
            if want.iter().all(ready) {
                Ok(())
            } else {
                Err(format!("{cluster}"))
            }
        });
    }

    /// `patronictl` with this cluster's config (the first member's).
    pub fn patronictl(&self, args: &[&str]) -> Result<String, String> {
        let ctl = self.patroni.with_file_name("patronictl");
        let out = self
            .user
            .command(ctl)
            .arg("-c")
            .arg(&self.members[0].config)
            .args(args)
            .current_dir(&self.dir)
            .output()
            .map_err(|e| format!("cannot run patronictl: {e}"))?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if out.status.success() {
            Ok(text)
        } else {
            Err(text)
        }
    }

    /// A planned switchover from the leader to `candidate`.
    pub fn switchover(&self, leader: &str, candidate: &str) {
        self.patronictl(&["switchover", &self.scope, "--leader", leader, "--candidate", candidate, "--force"])
            .unwrap_or_else(|e| panic!("patronictl switchover {leader} → {candidate}: {e}"));
    }

    /// Sets a member's tags (YAML lines under `tags:`) and reloads its
    /// Patroni, as an operator does.
    pub fn set_tags(&mut self, name: &str, tags: &str) {
        let member = self.member_mut(name);
        member.tags = tags.lines().map(|l| format!("  {}\n", l.trim())).collect();
        let member = self.member(name);
        self.write_config(member);
        signal(member.patroni_pid().expect("patroni runs"), "HUP");
    }

    /// Sends `sig` to the member's Patroni.
    pub fn signal_patroni(&self, name: &str, sig: &str) {
        signal(self.member(name).patroni_pid().expect("patroni runs"), sig);
    }

    /// Waits for the member's Patroni to exit (after SIGTERM).
    pub fn wait_patroni_exit(&mut self, name: &str, timeout: Duration) {
        let member = self.member_mut(name);
        let mut child = member.child.take().expect("patroni runs");
        wait_until(&format!("{name}'s Patroni to exit"), timeout, || match child.try_wait() {
            Ok(Some(_)) => Ok(()),
            other => Err(format!("{other:?}")),
        });
    }

    /// Starts a member's Patroni again (its data stays).
    pub fn restart_patroni(&mut self, name: &str) {
        let i = self.members.iter().position(|m| m.name == name).expect("member");
        let mut member = self.members.remove(i);
        self.spawn(&mut member);
        self.members.insert(i, member);
    }

    /// Stops a member for good (Patroni SIGTERM: it stops PostgreSQL).
    pub fn remove_member(&mut self, name: &str) {
        self.signal_patroni(name, "TERM");
        self.wait_patroni_exit(name, Duration::from_secs(60));
    }

    /// The last lines of every Patroni log (for a failure message).
    pub fn tail_logs(&self) -> String {
        let mut out = String::new();
        for m in &self.members {
            let text = fs::read_to_string(&m.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out += &format!("--- {} ---\n{}\n", m.name, lines[lines.len().saturating_sub(8)..].join("\n"));
        }
        out
    }
}

/// `kill -SIG pid`.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).stderr(Stdio::null()).status();
}

impl Drop for PatroniCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            // Thaw first: a stopped process does not die of SIGTERM.
            for pid in m.processes() {
                signal(pid, "CONT");
            }
            if let Some(mut child) = m.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            if let Some(postmaster) = m.postmaster_pid() {
                signal(postmaster, "KILL");
                for pid in children(postmaster) {
                    signal(pid, "KILL");
                }
            }
        }
        self.stop_etcd();
        if std::thread::panicking() {
            eprintln!("Patroni logs (kept in {}):\n{}", self.dir.display(), self.tail_logs());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
