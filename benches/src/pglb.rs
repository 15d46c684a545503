//! The pglb under test: this workspace's release binary, started with a
//! config file in a scratch dir, polled through `/status`, killed on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pglb_cluster::free_port;
use serde_json::Value;

use crate::child::{self, poll, Guard, Scratch};
use pglb_testkit::http;

/// Health checks as in the brief: 1s interval and timeout, rise 2, fall 2.
pub const HEALTH: &str = "interval: 1s
  timeout: 1s
  rise: 2
  fall: 2
  user: pglb_check
  sslmode: disable";

/// The pglb binary: `$PGLB_BIN`, else `target/release/pglb`, built first
/// with `cargo build --release -p pglb` when `build` is set.
pub fn binary(build: bool) -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("PGLB_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("the benches package has no parent dir")?;
    if build {
        eprintln!("building pglb: cargo build --release -p pglb");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--release", "-p", "pglb", "--bin", "pglb"])
            .current_dir(root)
            .status()
            .context("cannot run cargo to build pglb")?;
        if !status.success() {
            bail!("`cargo build --release -p pglb` failed ({status})");
        }
    }
    // target/<profile>/pglb-bench → target/release/pglb (honours CARGO_TARGET_DIR).
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let target = exe.parent().and_then(Path::parent).map_or_else(|| root.join("target"), Path::to_owned);
    let bin = target.join("release").join("pglb");
    if !bin.exists() {
        bail!("{} does not exist: run `cargo build --release -p pglb` or set PGLB_BIN", bin.display());
    }
    Ok(bin)
}

/// One listener of the config.
pub struct Listener {
    pub name: &'static str,
    pub port: u16,
    /// `primary` or `replica`.
    pub role: &'static str,
    pub balance: &'static str,
}

/// An lb.yaml: the admin port is picked at render time.
pub struct Config {
    /// `splice` or `copy`; `None` leaves pglb's default.
    pub forwarder: Option<&'static str>,
    pub listeners: Vec<Listener>,
    /// (name, `host:port`).
    pub backends: Vec<(String, String)>,
}

impl Config {
    fn render(&self, admin: u16) -> String {
        let mut out = String::new();
        if let Some(f) = self.forwarder {
            out += &format!("forwarder: {f}\n");
        }
        out += &format!("admin:\n  listen: 127.0.0.1:{admin}\nhealth:\n  {HEALTH}\nlisteners:\n");
        for l in &self.listeners {
            out += &format!(
                "  - name: {}\n    listen: 127.0.0.1:{}\n    role: {}\n    balance: {}\n",
                l.name, l.port, l.role, l.balance
            );
        }
        out += "backends:\n";
        for (name, address) in &self.backends {
            out += &format!("  - name: {name}\n    address: {address}\n");
        }
        out
    }
}

/// A running pglb.
pub struct Pglb {
    guard: Guard,
    admin: SocketAddr,
    _scratch: Scratch,
}

impl Pglb {
    /// Validates the config with `pglb check`, then starts pglb on it.
    pub fn start(bin: &Path, config: &Config) -> Result<Self> {
        Self::start_yaml(bin, |admin| config.render(admin))
    }

    /// Like [`Pglb::start`], with `RUST_LOG` set to `rust_log` (e.g. the
    /// connection log off: `info,pglb::connection=off`).
    pub fn start_logging(bin: &Path, config: &Config, rust_log: &str) -> Result<Self> {
        Self::launch(bin, |admin| config.render(admin), rust_log)
    }

    /// Like [`Pglb::start`], for a config written by `yaml`, given the
    /// admin port (for configs [`Config`] cannot express, e.g. `clusters:`).
    pub fn start_yaml(bin: &Path, yaml: impl FnOnce(u16) -> String) -> Result<Self> {
        Self::launch(bin, yaml, "info")
    }

    fn launch(bin: &Path, yaml: impl FnOnce(u16) -> String, rust_log: &str) -> Result<Self> {
        let scratch = Scratch::new("pglb")?;
        let admin = free_port().context("cannot find a free port for the admin endpoint")?;
        let file = scratch.file("lb.yaml");
        std::fs::write(&file, yaml(admin)).with_context(|| format!("cannot write {}", file.display()))?;
        let check = child::run_within(
            Command::new(bin).arg("check").arg("--config").arg(&file),
            "pglb check",
            Duration::from_secs(10),
            true,
        )?;
        if !check.status.success() {
            bail!("pglb rejects the bench's config:\n{}{}", check.stdout, check.stderr);
        }
        let mut cmd = Command::new(bin);
        cmd.arg("--config").arg(&file).env("RUST_LOG", rust_log).env("NO_COLOR", "1");
        let guard = Guard::spawn("pglb", &mut cmd, &scratch.file("pglb.log"))?;
        Ok(Self { guard, admin: SocketAddr::from(([127, 0, 0, 1], admin)), _scratch: scratch })
    }

    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// Waits until listener `name` has at least `count` eligible backends.
    pub fn wait_ready(&mut self, name: &str, count: usize, timeout: Duration) -> Result<()> {
        let admin = self.admin;
        let guard = &mut self.guard;
        poll(&format!("pglb listener `{name}` to have {count} backends"), timeout, Duration::from_millis(100), || {
            guard.check_alive()?;
            let got = match status(admin) {
                Ok(s) => eligible(&s, name),
                Err(e) => return Ok(Err(format!("{e:#}"))),
            };
            Ok(if got.len() >= count { Ok(()) } else { Err(format!("{got:?}")) })
        })
    }

    /// Waits until `/status` lists `count` backends (all clusters), each
    /// checked and healthy.
    pub fn wait_checked(&mut self, count: usize, timeout: Duration) -> Result<()> {
        let admin = self.admin;
        let guard = &mut self.guard;
        poll(&format!("pglb to have {count} checked, healthy backends"), timeout, Duration::from_millis(100), || {
            guard.check_alive()?;
            let status = match status(admin) {
                Ok(s) => s,
                Err(e) => return Ok(Err(format!("{e:#}"))),
            };
            let (listed, good) = checked_healthy(&status);
            Ok(if listed == count && good == count { Ok(()) } else { Err(format!("{good} of {listed} listed")) })
        })
    }

    /// Health checks completed so far, every backend of every cluster
    /// (answered or failed): the count of the check-duration histogram.
    pub fn checks_done(&self) -> Result<f64> {
        let name = "pglb_health_check_duration_seconds_count";
        let text = self.metrics()?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// The `/status` document.
    pub fn status(&self) -> Result<Value> {
        status(self.admin)
    }

    pub fn log_tail(&self) -> String {
        self.guard.log_tail()
    }

    /// The `/metrics` page.
    pub fn metrics(&self) -> Result<String> {
        let (code, body) = http::get(self.admin, "/metrics").map_err(anyhow::Error::msg)?;
        if code != 200 {
            bail!("GET /metrics from {} answered {code}", self.admin);
        }
        Ok(body)
    }
}

fn status(admin: SocketAddr) -> Result<Value> {
    let (code, body) = http::get(admin, "/status").map_err(anyhow::Error::msg)?;
    if code != 200 {
        bail!("GET /status from {admin} answered {code}");
    }
    serde_json::from_str(&body).with_context(|| format!("/status is not JSON: {body}"))
}

/// Names of the backends listener `name` may use, per a `/status` document.
pub fn eligible(status: &Value, name: &str) -> Vec<String> {
    let listeners = status["listeners"].as_array().map(Vec::as_slice).unwrap_or_default();
    let listener = listeners.iter().find(|l| l["name"] == name);
    let backends = listener.and_then(|l| l["backends"].as_array()).map(Vec::as_slice).unwrap_or_default();
    backends.iter().filter_map(|b| b.as_str().map(str::to_owned)).collect()
}

/// (backends listed, of which checked and healthy), per a `/status` document.
pub fn checked_healthy(status: &Value) -> (usize, usize) {
    let backends = status["backends"].as_array().map(Vec::as_slice).unwrap_or_default();
    let good = backends.iter().filter(|b| b["checked"] == true && b["healthy"] == true).count();
    (backends.len(), good)
}

/// Backend `name`'s (healthy, role), per a `/status` document.
pub fn backend(status: &Value, name: &str) -> Option<(bool, String)> {
    let backends = status["backends"].as_array()?;
    let b = backends.iter().find(|b| b["name"] == name)?;
    Some((b["healthy"].as_bool()?, b["role"].as_str()?.to_owned()))
}
