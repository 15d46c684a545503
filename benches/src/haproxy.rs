//! HAProxy from the distribution package: installed on demand, run in the
//! foreground (`-db`) with a generated config, asked for server states
//! through its stats socket, killed on drop.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::child::{self, poll, Guard, Scratch};

/// The `haproxy` binary; as root, installs Debian's package when missing.
pub fn ensure_installed() -> Result<PathBuf> {
    if let Some(bin) = find() {
        return Ok(bin);
    }
    let root = pglb_cluster::PgUser::detect().is_ok_and(|u| u.ids.is_some());
    if !root {
        bail!("haproxy is not installed: run `apt-get install -y haproxy` as root");
    }
    eprintln!("haproxy is missing: apt-get update && apt-get install -y haproxy");
    let apt = |args: &[&str], what: &str| {
        let mut cmd = Command::new("apt-get");
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        child::run_ok(&mut cmd, what, Duration::from_secs(900), false)
    };
    apt(&["update", "-q"], "apt-get update")?;
    apt(&["install", "-y", "-q", "haproxy"], "apt-get install haproxy")?;
    find().context("apt-get installed haproxy but it is not on PATH or in /usr/sbin")
}

fn find() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("haproxy"))
        .find(|bin| bin.is_file())
}

/// One `listen` section: TCP mode, bound on loopback.
pub struct Listen {
    pub name: &'static str,
    pub port: u16,
    /// More lines (`balance ...`, `server ...`); `{dir}` is the scratch dir.
    pub lines: Vec<String>,
}

/// A whole haproxy.cfg.
pub struct Config {
    pub maxconn: usize,
    pub global: Vec<String>,
    pub defaults: Vec<String>,
    pub listens: Vec<Listen>,
    /// Executable files written to the scratch dir: (name, text).
    pub scripts: Vec<(&'static str, String)>,
}

impl Config {
    fn render(&self, dir: &Path) -> String {
        let indent = |lines: &[String]| lines.iter().map(|l| format!("    {l}\n")).collect::<String>();
        let mut out = format!(
            "global\n    maxconn {m}\n    nbthread 2\n    stats socket {{dir}}/admin.sock mode 600 level admin\n{g}\
             defaults\n    mode tcp\n    maxconn {m}\n    timeout connect 3s\n    timeout client 1h\n    timeout server 1h\n{d}",
            m = self.maxconn,
            g = indent(&self.global),
            d = indent(&self.defaults),
        );
        for l in &self.listens {
            out += &format!("\nlisten {}\n    bind 127.0.0.1:{}\n{}", l.name, l.port, indent(&l.lines));
        }
        out.replace("{dir}", &dir.display().to_string())
    }
}

/// A running HAProxy.
pub struct Haproxy {
    guard: Guard,
    socket: PathBuf,
    _scratch: Scratch,
}

impl Haproxy {
    /// Writes the config (checked with `haproxy -c`), starts HAProxy and
    /// waits until its stats socket answers (listeners are bound by then).
    pub fn start(bin: &Path, config: &Config) -> Result<Self> {
        let scratch = Scratch::new("haproxy")?;
        for (name, text) in &config.scripts {
            let path = scratch.file(name);
            std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("cannot make {} executable", path.display()))?;
        }
        let file = scratch.file("haproxy.cfg");
        std::fs::write(&file, config.render(&scratch.path))
            .with_context(|| format!("cannot write {}", file.display()))?;
        child::run_ok(
            Command::new(bin).arg("-c").arg("-q").arg("-f").arg(&file),
            "haproxy -c (config check)",
            Duration::from_secs(10),
            true,
        )?;
        let mut cmd = Command::new(bin);
        cmd.arg("-f").arg(&file).arg("-db");
        let mut guard = Guard::spawn("haproxy", &mut cmd, &scratch.file("haproxy.log"))?;
        let socket = scratch.file("admin.sock");
        poll("haproxy's stats socket", Duration::from_secs(15), Duration::from_millis(50), || {
            guard.check_alive()?;
            Ok(ask(&socket, "show info").map(|_| ()).map_err(|e| format!("{e:#}")))
        })?;
        Ok(Self { guard, socket, _scratch: scratch })
    }

    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// The `status` column of `show stat` for `proxy`/`server` (`UP`,
    /// `DOWN`, `UP 1/2` while going down, ...).
    pub fn server_status(&self, proxy: &str, server: &str) -> Result<String> {
        let rows = self.stat_rows()?;
        let row = rows.iter().find(|r| {
            r.get("pxname").map(String::as_str) == Some(proxy) && r.get("svname").map(String::as_str) == Some(server)
        });
        match row {
            Some(row) => Ok(row.get("status").cloned().unwrap_or_default()),
            None => bail!("haproxy's `show stat` has no server {proxy}/{server}"),
        }
    }

    /// Column `column` of `show stat` for every server of `proxy` (not its
    /// FRONTEND and BACKEND lines), e.g. `check_status` (`L7OK`, `INI`...).
    pub fn server_column(&self, proxy: &str, column: &str) -> Result<Vec<String>> {
        let rows = self.stat_rows()?;
        let servers = rows.iter().filter(|r| {
            r.get("pxname").map(String::as_str) == Some(proxy)
                && !matches!(r.get("svname").map(String::as_str), Some("FRONTEND" | "BACKEND"))
        });
        Ok(servers.map(|r| r.get(column).cloned().unwrap_or_default()).collect())
    }

    /// `show stat`, one map of column to value per line.
    fn stat_rows(&self) -> Result<Vec<HashMap<String, String>>> {
        let csv = ask(&self.socket, "show stat")?;
        let mut lines = csv.lines();
        let header: Vec<&str> =
            lines.next().context("empty `show stat` answer")?.trim_start_matches("# ").split(',').collect();
        Ok(lines
            .filter(|l| !l.is_empty())
            .map(|l| header.iter().map(|h| (*h).to_owned()).zip(l.split(',').map(str::to_owned)).collect())
            .collect())
    }

    pub fn log_tail(&self) -> String {
        self.guard.log_tail()
    }
}

/// Sends one command to the stats socket; returns the whole answer.
fn ask(socket: &Path, command: &str) -> Result<String> {
    let mut stream = UnixStream::connect(socket).with_context(|| format!("cannot connect to {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    stream.write_all(format!("{command}\n").as_bytes())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).with_context(|| format!("no answer to `{command}` on {}", socket.display()))?;
    Ok(answer)
}
