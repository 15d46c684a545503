//! Running the real `pglb` binary with a config file.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pglb_cluster::{free_port, Cluster};

use crate::{http, wait_until};

/// The `pglb` binary of this workspace, built once per test binary with the
/// same profile as the tests (or `$PGLB_BIN`).
pub fn pglb_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("PGLB_BIN") {
            return PathBuf::from(bin);
        }
        let exe = std::env::current_exe().expect("current exe");
        // target/<profile>/deps/<test> → target/<profile>
        let profile_dir = exe.parent().and_then(Path::parent).expect("target dir").to_owned();
        let mut cmd = workspace_command(env!("CARGO"));
        cmd.args(["build", "--quiet", "-p", "pglb", "--bin", "pglb"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build for pglb");
        assert!(status.success(), "cargo build -p pglb failed");
        profile_dir.join("pglb")
    })
}

/// Runs `pglb upgrade` for the pglb serving `config` (the workspace's binary
/// is the client; the running pglb starts its own binary): exit code,
/// stdout, stderr.
pub fn upgrade(config: &Path) -> (i32, String, String) {
    let out = Command::new(pglb_bin()).args(["upgrade", "--config"]).arg(config).output().expect("run pglb upgrade");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// The new process's pid in `pglb upgrade`'s answer ("upgraded: pid N ...").
pub fn upgraded_pid(out: &str) -> Option<u32> {
    out.split("pid ").nth(1)?.split_whitespace().next()?.parse().ok()
}

/// `program` (cargo, or a script that runs it) in the workspace root,
/// without the per-package variables `cargo test` sets: build scripts that
/// track them (ring's does) would see a change and rebuild half the tree.
pub fn workspace_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    for (key, _) in std::env::vars_os() {
        let name = key.to_string_lossy();
        let per_package = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_PRIMARY_",
            "CARGO_TARGET_TMPDIR",
            "CARGO_RUSTC_CURRENT_DIR",
        ];
        if per_package.iter().any(|p| name.starts_with(p)) {
            cmd.env_remove(&key);
        }
    }
    cmd
}

/// The admin token of the configs [`Yaml`] writes (in `admin-token` beside
/// the config, as `admin.token_file`), unless a test names another.
pub const TEST_TOKEN: &str = "test-admin-token-0123456789abcdef";

/// A config under construction: the cluster's nodes as backends, free ports
/// for the listeners and the admin endpoint, an admin token file.
#[derive(Clone)]
pub struct Yaml {
    /// Extra top-level YAML, e.g. `forwarder: copy`.
    pub top: String,
    pub admin: u16,
    /// The admin endpoint's host (`127.0.0.1`, or `0.0.0.0` for a wildcard).
    pub admin_host: String,
    /// Extra YAML inside `admin:`, e.g. `token_env: ADMIN_TOKEN`.
    pub admin_extra: String,
    pub health: String,
    pub listeners: Vec<(String, u16, String)>,
    pub backends: Vec<(String, String)>,
    /// Files written beside the config (name, contents), e.g. a password file.
    pub files: Vec<(String, String)>,
    /// `clusters:` entries; with any, `listeners` and `backends` are not written.
    pub clusters: Vec<ClusterYaml>,
}

/// One entry of `clusters:`.
#[derive(Clone)]
pub struct ClusterYaml {
    pub name: String,
    /// More YAML for the entry (e.g. `system_identifier: "..."`, a `health:` block).
    pub extra: String,
    pub listeners: Vec<(String, u16, String)>,
    pub backends: Vec<(String, String)>,
}

impl ClusterYaml {
    /// Backends `pg0..` for `nodes`.
    pub fn new(name: &str, cluster: &Cluster) -> Self {
        let backends = cluster
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (format!("pg{i}"), format!("address: {}", n.address())))
            .collect();
        Self { name: name.into(), extra: String::new(), listeners: Vec::new(), backends }
    }

    /// Adds a listener on a free port (`Pglb::port("cluster/name")`).
    pub fn listener(mut self, name: &str, extra: &str) -> Self {
        self.listeners.push((name.into(), free_port().expect("free port"), extra.into()));
        self
    }
}

impl Yaml {
    /// Backends `pg0..` for the cluster's nodes; quick checks with trust auth.
    pub fn for_cluster(cluster: &Cluster) -> Self {
        Self::for_nodes(&cluster.nodes)
    }

    pub fn for_nodes(nodes: &[pglb_cluster::Node]) -> Self {
        Self {
            top: String::new(),
            admin: free_port().expect("free port"),
            admin_host: "127.0.0.1".into(),
            admin_extra: "  token_file: admin-token\n".into(),
            health: "interval: 500ms\n  timeout: 500ms\n  rise: 2\n  fall: 2\n  user: pglb_check\n  sslmode: disable"
                .into(),
            listeners: Vec::new(),
            backends: nodes
                .iter()
                .enumerate()
                .map(|(i, n)| (format!("pg{i}"), format!("address: {}", n.address())))
                .collect(),
            files: vec![("admin-token".into(), format!("{TEST_TOKEN}\n"))],
            clusters: Vec::new(),
        }
    }

    /// A config of `clusters` only (no top-level listeners or backends).
    pub fn for_clusters(clusters: Vec<ClusterYaml>) -> Self {
        let mut yaml = Self::for_nodes(&[]);
        yaml.clusters = clusters;
        yaml
    }

    /// Every listener's port: `name` for top-level ones, `cluster/name` for
    /// those of `clusters:`.
    pub fn ports(&self) -> Vec<(String, u16)> {
        let mut ports: Vec<(String, u16)> = self.listeners.iter().map(|(n, p, _)| (n.clone(), *p)).collect();
        for c in &self.clusters {
            ports.extend(c.listeners.iter().map(|(n, p, _)| (format!("{}/{n}", c.name), *p)));
        }
        ports
    }

    /// Adds a file beside the config (relative paths in the config start there).
    pub fn file(mut self, name: &str, contents: &str) -> Self {
        self.files.push((name.into(), contents.into()));
        self
    }

    /// Adds a listener on a free port; `extra` is more YAML for it
    /// (e.g. `"role: replica\n    balance: round_robin"`).
    pub fn listener(mut self, name: &str, extra: &str) -> Self {
        self.listeners.push((name.into(), free_port().expect("free port"), extra.into()));
        self
    }

    /// Adds top-level YAML (one or more `key: value` lines).
    pub fn top(mut self, yaml: &str) -> Self {
        self.top.push_str(yaml);
        self.top.push('\n');
        self
    }

    /// Adds a line of YAML inside `admin:` (e.g. `token_env: ADMIN_TOKEN`,
    /// which replaces the default token file).
    pub fn admin(mut self, yaml: &str) -> Self {
        if yaml.trim_start().starts_with("token_") {
            self.admin_extra = self.admin_extra.replace("  token_file: admin-token\n", "");
        }
        self.admin_extra.push_str(&format!("  {yaml}\n"));
        self
    }

    /// No admin token at all: a config from before tokens were needed.
    pub fn without_token(mut self) -> Self {
        self.admin_extra = self.admin_extra.replace("  token_file: admin-token\n", "");
        self
    }

    pub fn health(mut self, health: &str) -> Self {
        self.health = health.into();
        self
    }

    /// Writes `lb.yaml` and the files beside it into `dir`; returns the
    /// config's path.
    pub fn write_into(&self, dir: &Path) -> PathBuf {
        let config = dir.join("lb.yaml");
        fs::write(&config, self.render()).expect("write config");
        for (name, contents) in &self.files {
            fs::write(dir.join(name), contents).expect("write a file beside the config");
        }
        config
    }

    pub fn render(&self) -> String {
        let mut out = format!(
            "{}admin:\n  listen: {}:{}\n{}health:\n  {}\n",
            self.top, self.admin_host, self.admin, self.admin_extra, self.health
        );
        if !self.clusters.is_empty() {
            out += "clusters:\n";
            for c in &self.clusters {
                out += &format!("  - name: {}\n", c.name);
                for line in c.extra.lines() {
                    out += &format!("    {line}\n");
                }
                out += "    listeners:\n";
                for (name, port, extra) in &c.listeners {
                    out += &format!(
                        "      - name: {name}\n        listen: 127.0.0.1:{port}\n        {}\n",
                        extra.replace("\n    ", "\n        ")
                    );
                }
                out += "    backends:\n";
                for (name, extra) in &c.backends {
                    out += &format!("      - name: {name}\n        {extra}\n");
                }
            }
            return out;
        }
        out += "listeners:\n";
        for (name, port, extra) in &self.listeners {
            out += &format!("  - name: {name}\n    listen: 127.0.0.1:{port}\n    {extra}\n");
        }
        // None: the backends come from Patroni.
        if !self.backends.is_empty() {
            out += "backends:\n";
        }
        for (name, extra) in &self.backends {
            out += &format!("  - name: {name}\n    {extra}\n");
        }
        out
    }
}

/// The entry called `name` of a `/status` list (`backends`, `listeners`),
/// or `null`: entries are looked up by name, never by position.
pub fn named<'a>(list: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    static NULL: serde_json::Value = serde_json::Value::Null;
    list.as_array().and_then(|all| all.iter().find(|e| e["name"] == name)).unwrap_or(&NULL)
}

/// A running pglb; killed on drop.
pub struct Pglb {
    child: Child,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub admin: SocketAddr,
    pub ports: Vec<(String, u16)>,
    log: PathBuf,
}

impl Pglb {
    /// Writes `yaml` to a temp dir and starts pglb on it; waits for /health.
    pub fn start(yaml: &Yaml) -> Self {
        Self::start_with(yaml, &[])
    }

    pub fn start_with(yaml: &Yaml, env: &[(&str, &str)]) -> Self {
        Self::start_wrapped(yaml, env, &[])
    }

    /// Like [`Pglb::start_with`], run under `wrapper` (e.g. `["prlimit",
    /// "--nofile=64:64"]`), which must exec pglb so the pid stays pglb's.
    pub fn start_wrapped(yaml: &Yaml, env: &[(&str, &str)], wrapper: &[&str]) -> Self {
        Self::launch(yaml, env, wrapper, pglb_bin())
    }

    /// Like [`Pglb::start_with`], from another copy of the binary (which an
    /// upgrade test replaces).
    pub fn start_binary(yaml: &Yaml, env: &[(&str, &str)], binary: &Path) -> Self {
        Self::launch(yaml, env, &[], binary)
    }

    fn launch(yaml: &Yaml, env: &[(&str, &str)], wrapper: &[&str], binary: &Path) -> Self {
        remember_panics();
        let dir = std::env::temp_dir().join(format!("pglb-run-{}-{}", std::process::id(), free_port().expect("port")));
        fs::create_dir_all(&dir).expect("temp dir");
        let config = yaml.write_into(&dir);
        let log = dir.join("pglb.log");
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(binary);
                cmd
            }
            None => Command::new(binary),
        };
        cmd.arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info,pglb_proxy=debug")
            .env_remove("NO_COLOR")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("log file"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = spawn_when_written(&mut cmd);
        let mut pglb = Self {
            child,
            dir,
            config,
            admin: SocketAddr::from(([127, 0, 0, 1], yaml.admin)),
            ports: yaml.ports(),
            log,
        };
        wait_until("pglb /health", Duration::from_secs(20), || {
            if let Ok(Some(status)) = pglb.child.try_wait() {
                panic!("pglb exited with {status}:\n{}", pglb.log());
            }
            match http::get(pglb.admin, "/health") {
                Ok((200, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        });
        pglb
    }

    /// POSTs `path` (an action) with the config's admin token.
    pub fn post(&self, path: &str) -> (u16, String) {
        let auth = format!("Authorization: Bearer {TEST_TOKEN}");
        http::request(self.admin, "POST", path, &[&auth]).expect("POST to the admin endpoint")
    }

    /// The port of listener `name`.
    pub fn port(&self, name: &str) -> u16 {
        self.ports.iter().find(|(n, _)| n == name).map(|(_, p)| *p).expect("listener name")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn status(&self) -> serde_json::Value {
        let (code, body) = http::get(self.admin, "/status").expect("GET /status");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("status is JSON")
    }

    pub fn metrics(&self) -> String {
        http::get(self.admin, "/metrics").expect("GET /metrics").1
    }

    /// The sum of metric `name` over the series whose labels include every
    /// `labels` pair (0 if none).
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = self.metrics();
        let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            .filter(|l| wanted.iter().all(|w| l.contains(w.as_str())))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Health checks of `backend` completed so far (answered or failed).
    pub fn checks(&self, backend: &str) -> f64 {
        self.metric("pglb_health_check_duration_seconds_count", &[("backend", backend)])
    }

    /// Waits until `n` more checks of each of `backends` have completed:
    /// "pglb has looked N times", instead of a guess in wall time.
    pub fn wait_checks(&self, backends: &[&str], n: f64, timeout: Duration) {
        let start: Vec<f64> = backends.iter().map(|b| self.checks(b)).collect();
        wait_until(&format!("{n} more checks of {backends:?}"), timeout, || {
            let done: Vec<f64> = backends.iter().map(|b| self.checks(b)).collect();
            if done.iter().zip(&start).all(|(d, s)| d - s >= n) {
                Ok(())
            } else {
                Err(format!("{start:?} -> {done:?}"))
            }
        });
    }

    /// Backend `name` as `/status` shows it (`null` if there is none).
    pub fn backend(&self, name: &str) -> serde_json::Value {
        named(&self.status()["backends"], name).clone()
    }

    /// Listener `name` as `/status` shows it (`null` if there is none).
    pub fn listener(&self, name: &str) -> serde_json::Value {
        named(&self.status()["listeners"], name).clone()
    }

    /// Waits until backend `name` is in `state` (healthy, degraded, unverified, down).
    pub fn wait_state(&self, name: &str, state: &str, timeout: Duration) {
        wait_until(&format!("backend {name} to be {state}"), timeout, || {
            let b = self.backend(name);
            if b["state"] == state {
                Ok(())
            } else {
                Err(format!("{b}"))
            }
        });
    }

    /// Names of the backends listener `name` may use now.
    pub fn eligible(&self, name: &str) -> Vec<String> {
        let status = self.status();
        let listeners = status["listeners"].as_array().cloned().unwrap_or_default();
        let listener = listeners.iter().find(|l| l["name"] == name).cloned().unwrap_or_default();
        let backends = listener["backends"].as_array().cloned().unwrap_or_default();
        backends.iter().filter_map(|b| b.as_str().map(str::to_owned)).collect()
    }

    /// Waits until listener `name` may use exactly `want` (sorted names).
    pub fn wait_eligible(&self, name: &str, want: &[&str], timeout: Duration) {
        wait_until(&format!("listener {name} to route to {want:?}"), timeout, || {
            let mut got = self.eligible(name);
            got.sort();
            if got == want {
                Ok(())
            } else {
                Err(format!("{got:?}\n{}", self.log()))
            }
        });
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. "HUP", "TERM") to pglb with kill(1).
    pub fn signal(&self, signal: &str) {
        let status =
            Command::new("kill").arg(format!("-{signal}")).arg(self.pid().to_string()).status().expect("run kill");
        assert!(status.success(), "kill -{signal} {} failed", self.pid());
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        wait_until("pglb to exit", timeout, || match self.child.try_wait() {
            Ok(Some(status)) => Ok(status.code()),
            _ => Err("still running".into()),
        })
    }
}

/// The last panic message seen in this process, for [`Pglb`]'s drop.
static LAST_PANIC: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

/// Records every panic's message (then prints it as before), so a failed
/// test's pglb log can end with the reason rather than bury it above.
fn remember_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Ok(mut last) = LAST_PANIC.lock() {
                *last = info.to_string();
            }
            previous(info);
        }));
    });
}

impl Drop for Pglb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- pglb log ---\n{}", self.log());
            // CI shows the tail of a failed test's output: repeat why it failed.
            let why = LAST_PANIC.lock().map(|m| m.clone()).unwrap_or_default();
            eprintln!("--- end of pglb log; the test failed with: {why} ---");
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Spawns `cmd`, waiting out "text file busy": a copied binary stays busy
/// while any process this test binary forked meanwhile (psql, pg_ctl, from
/// another test thread) still holds the copy's write descriptor until its
/// own exec.
fn spawn_when_written(cmd: &mut Command) -> Child {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match cmd.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other.expect("spawn pglb"),
        }
    }
}

/// A copy of the pglb binary in its own folder, which the test replaces the
/// way a package upgrade does (a new file renamed over the old one).
pub struct Binary {
    pub dir: PathBuf,
    pub path: PathBuf,
}

impl Binary {
    pub fn copy(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("pglb-upgrade-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("binary dir");
        let path = dir.join("pglb");
        let me = Self { dir, path };
        me.replace_with(pglb_bin());
        me
    }

    pub fn replace_with(&self, source: &Path) {
        let next = self.dir.join("pglb.next");
        std::fs::copy(source, &next).expect("copy the binary");
        std::fs::rename(&next, &self.path).expect("rename over the binary");
    }

    pub fn replace_with_script(&self, script: &str) {
        let next = self.dir.join("pglb.next");
        std::fs::write(&next, script).expect("write script");
        std::fs::set_permissions(&next, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        std::fs::rename(&next, &self.path).expect("rename over the binary");
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
