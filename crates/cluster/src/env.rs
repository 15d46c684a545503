//! Where the PostgreSQL binaries are, and which OS user runs them.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

/// The directory of initdb/pg_ctl/postgres: `$PGLB_PG_BIN`, else the newest
/// `/usr/lib/postgresql/*/bin`, else whatever is on PATH.
pub fn pg_bin() -> PathBuf {
    if let Some(dir) = std::env::var_os("PGLB_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p).unwrap_or_default()
}

/// The OS user that owns and runs the servers.
#[derive(Debug, Clone, Copy)]
pub struct PgUser {
    /// `None` when not root: run as ourselves.
    pub ids: Option<(u32, u32)>,
}

impl PgUser {
    /// `postgres` from /etc/passwd when we are root, else the current user.
    pub fn detect() -> Result<Self, String> {
        if !is_root() {
            return Ok(Self { ids: None });
        }
        let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| format!("cannot read /etc/passwd: {e}"))?;
        let ids = passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.len() > 3 && f[0] == "postgres")
            .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
            .ok_or("running as root but there is no `postgres` user: install the postgresql package")?;
        Ok(Self { ids: Some(ids) })
    }

    /// A command that runs as this user.
    pub fn command(&self, program: impl Into<PathBuf>) -> Command {
        let mut cmd = Command::new(program.into());
        if let Some((uid, gid)) = self.ids {
            cmd.uid(uid).gid(gid);
            cmd.env("HOME", "/tmp");
        }
        cmd
    }

    /// Gives `path` to this user.
    pub fn own(&self, path: &std::path::Path) -> std::io::Result<()> {
        match self.ids {
            Some((uid, gid)) => std::os::unix::fs::chown(path, Some(uid), Some(gid)),
            None => Ok(()),
        }
    }
}

fn is_root() -> bool {
    euid() == Some(0)
}

/// This process's effective user id.
pub(crate) fn euid() -> Option<u32> {
    // /proc/self/status "Uid:" line: real, effective, saved, fs.
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

impl PgUser {
    /// The uid the servers run as.
    pub fn uid(&self) -> Option<u32> {
        self.ids.map(|(uid, _)| uid).or_else(euid)
    }
}
