//! One PostgreSQL server of a cluster.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::cluster::ClusterError;
use crate::env::PgUser;

/// A server: its data directory, port and log.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub port: u16,
    pub data: PathBuf,
    pub log: PathBuf,
    pub(crate) bin: PathBuf,
    pub(crate) user: PgUser,
}

pub(crate) fn run(cmd: &mut Command, what: &str) -> Result<Output, ClusterError> {
    let out = cmd.output().map_err(|e| ClusterError::Command { what: what.to_owned(), detail: e.to_string() })?;
    if !out.status.success() {
        return Err(ClusterError::Command {
            what: what.to_owned(),
            detail: format!(
                "{}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    Ok(out)
}

impl Node {
    /// `127.0.0.1:port`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn pg_ctl(&self) -> Command {
        let mut cmd = self.user.command(self.bin.join("pg_ctl"));
        cmd.arg("-D").arg(&self.data);
        cmd
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(&self) -> Result<(), ClusterError> {
        let mut cmd = self.pg_ctl();
        cmd.args(["-w", "-t", "60", "-l"]).arg(&self.log).arg("start");
        run(&mut cmd, &format!("start {}", self.name)).map_err(|e| self.with_log(e))?;
        Ok(())
    }

    /// Stops the server (`fast` or `immediate`); a server already down is fine.
    pub fn stop(&self, mode: &str) {
        let _ = self.pg_ctl().args(["-w", "-t", "60", "-m", mode, "stop"]).output();
    }

    /// Promotes a standby and waits until it is out of recovery.
    pub fn promote(&self) -> Result<(), ClusterError> {
        run(self.pg_ctl().args(["-w", "-t", "60", "promote"]), &format!("promote {}", self.name))?;
        Ok(())
    }

    /// The postmaster's pid, if it runs.
    pub fn pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// The postmaster and every process it started (backends, WAL senders,
    /// the checkpointer...): all of them, to freeze the whole server.
    pub fn processes(&self) -> Vec<u32> {
        let Some(postmaster) = self.pid() else { return Vec::new() };
        let mut pids = vec![postmaster];
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
            let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            if ppid == Some(postmaster) {
                pids.push(pid);
            }
        }
        pids
    }

    /// Sends `signal` (e.g. "KILL", "STOP", "CONT") to the postmaster.
    pub fn signal(&self, signal: &str) -> Result<(), ClusterError> {
        let pid = self.pid().ok_or_else(|| ClusterError::Command {
            what: format!("signal {}", self.name),
            detail: "postmaster.pid is missing: the server is not running".into(),
        })?;
        run(Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()), "kill")?;
        Ok(())
    }

    /// Runs SQL as superuser over TCP and returns psql's unaligned output.
    pub fn sql(&self, sql: &str) -> Result<String, ClusterError> {
        let out = run(
            Command::new("psql")
                .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-XAtq", "-v", "ON_ERROR_STOP=1"])
                .arg("-p")
                .arg(self.port.to_string())
                .arg("-c")
                .arg(sql)
                .env_remove("PGPASSWORD"),
            &format!("psql on {}", self.name),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Polls `sql` until it returns `want`, or fails after `timeout`.
    pub fn wait_for(&self, sql: &str, want: &str, timeout: Duration) -> Result<(), ClusterError> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.sql(sql) {
                Ok(v) if v == want => return Ok(()),
                Ok(v) => last = v,
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(ClusterError::Timeout(format!("{}: `{sql}` never returned `{want}` (last: {last})", self.name)))
    }

    /// Appends settings to postgresql.conf (they override earlier lines).
    pub fn configure(&self, lines: &[String]) -> Result<(), ClusterError> {
        append(&self.data.join("postgresql.conf"), lines)
    }

    fn with_log(&self, err: ClusterError) -> ClusterError {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        ClusterError::Command { what: format!("{err}"), detail: tail.into_iter().rev().collect::<Vec<_>>().join("\n") }
    }
}

pub(crate) fn append(path: &Path, lines: &[String]) -> Result<(), ClusterError> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| ClusterError::Io { path: path.to_owned(), source: e })?;
    for line in lines {
        writeln!(file, "{line}").map_err(|e| ClusterError::Io { path: path.to_owned(), source: e })?;
    }
    Ok(())
}
