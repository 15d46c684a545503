//! deploy/systemd: the unit passes `systemd-analyze verify`, keeps its
//! promises (user, sandbox, stop timeout, credential), and the commands it
//! runs are the real CLI of the built binary, run the way systemd runs them.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use pglb_cluster::free_port;
use pglb_tests::pglb::pglb_bin;
use pglb_tests::which;
use pglb_tests::{http, wait_until};

/// The paths the unit is written for; the tests substitute them.
const UNIT_BIN: &str = "/usr/local/bin/pglb";
const UNIT_CONFIG: &str = "/etc/pglb/lb.yaml";
const CREDENTIAL_PATH: &str = "/run/credentials/pglb.service/check-password";
/// pglb's default `shutdown_timeout`.
const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

fn systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// `(section, key, value)` of every assignment, in order (comments skipped).
fn directives(unit: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("not an assignment: `{line}`"));
        assert!(!value.ends_with('\\'), "keep `{line}` on one line");
        out.push((section.clone(), key.trim().into(), value.trim().into()));
    }
    out
}

/// Every value of `key` in `[Service]`, in order.
fn service_values(unit: &str, key: &str) -> Vec<String> {
    directives(unit).into_iter().filter(|(s, k, _)| s == "Service" && k == key).map(|(_, _, v)| v).collect()
}

/// The last value of `key` in `[Service]` (what systemd uses for scalars).
fn service_value(unit: &str, key: &str) -> String {
    service_values(unit, key).pop().unwrap_or_else(|| panic!("pglb.service sets no {key}="))
}

/// A systemd time span such as `45s`, `1min 30s`, `500ms` or `90`.
fn timespan(text: &str) -> Duration {
    let mut total = Duration::ZERO;
    for part in text.split_whitespace() {
        let split = part.find(|c: char| !c.is_ascii_digit()).unwrap_or(part.len());
        let (n, unit) = part.split_at(split);
        let n: u64 = n.parse().unwrap_or_else(|_| panic!("bad time span `{text}`"));
        total += match unit {
            "ms" | "msec" => Duration::from_millis(n),
            "" | "s" | "sec" | "second" | "seconds" => Duration::from_secs(n),
            "m" | "min" | "minute" | "minutes" => Duration::from_secs(n * 60),
            other => panic!("unexpected unit `{other}` in `{text}`"),
        };
    }
    total
}

/// A temp dir removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "pglb-deploy-{tag}-{}-{}",
            std::process::id(),
            free_port().expect("free port")
        ));
        fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The unit with its binary path pointing at the built pglb.
fn unit_for_built_binary() -> String {
    let bin = pglb_bin().to_str().expect("utf-8 binary path");
    assert!(!bin.contains(' '), "binary path `{bin}` has a space");
    read(&systemd_dir().join("pglb.service")).replace(UNIT_BIN, bin)
}

fn output_text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn unit_passes_systemd_analyze_verify_with_and_without_the_drop_in() {
    let Some(analyze) = which("systemd-analyze") else {
        pglb_tests::skip("systemd-analyze not found (apt-get install systemd)");
        return;
    };
    let tmp = TempDir::new("systemd");
    let unit = tmp.0.join("pglb.service");
    fs::write(&unit, unit_for_built_binary()).expect("write unit");
    let verify = || {
        let out = Command::new(&analyze)
            .args(["verify", "--man=no"])
            .arg(&unit)
            .output()
            .expect("run systemd-analyze verify");
        // verify exits 0 on warnings such as an unknown key: none is allowed.
        let text = output_text(&out);
        assert!(out.status.success() && text.trim().is_empty(), "systemd-analyze verify: {}\n{text}", out.status);
    };
    verify();

    // The drop-in is read from pglb.service.d/ beside the unit.
    let dropins = tmp.0.join("pglb.service.d");
    fs::create_dir_all(&dropins).expect("drop-in dir");
    for name in ["low-ports.conf", "sockmap.conf"] {
        let conf = systemd_dir().join("pglb.service.d").join(name);
        fs::copy(&conf, dropins.join(name)).expect("copy drop-in");
        verify();
    }

    // The sandbox keeps the exposure score low (0 = locked down, 10 = none).
    let out = Command::new(&analyze)
        .args(["security", "--offline=yes", "--threshold=20"])
        .arg(&unit)
        .output()
        .expect("run systemd-analyze security");
    assert!(out.status.success(), "exposure above 2.0:\n{}", output_text(&out));
}

#[test]
fn unit_runs_as_pglb_sandboxed_and_outlasts_the_drain() {
    let unit = read(&systemd_dir().join("pglb.service"));
    for (key, want) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("User", "pglb"),
        ("KillSignal", "SIGTERM"),
        ("Restart", "on-failure"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
        ("AmbientCapabilities", ""),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("LoadCredential", "check-password:/etc/pglb/check-password"),
        // The upgrade's hand-over socket: a place only this service writes.
        ("RuntimeDirectory", "pglb"),
        ("RuntimeDirectoryMode", "0700"),
    ] {
        assert_eq!(service_value(&unit, key), want, "{key}=");
    }
    let watchdog = timespan(&service_value(&unit, "WatchdogSec"));
    assert!(watchdog >= Duration::from_secs(10), "WatchdogSec={watchdog:?} would restart pglb on a busy host");
    let nofile: u64 = service_value(&unit, "LimitNOFILE").parse().expect("LimitNOFILE is a number");
    assert!((65_536..=1_048_576).contains(&nofile), "LimitNOFILE={nofile}");

    // systemd must not SIGKILL pglb while it drains sessions.
    let stop = timespan(&service_value(&unit, "TimeoutStopSec"));
    assert!(
        stop >= DEFAULT_SHUTDOWN_TIMEOUT + Duration::from_secs(10),
        "TimeoutStopSec={stop:?} leaves pglb's {DEFAULT_SHUTDOWN_TIMEOUT:?} drain no margin"
    );
    let example = read(&systemd_dir().join("lb.yaml"));
    if let Some(line) = example.lines().find(|l| l.trim_start().starts_with("shutdown_timeout:")) {
        let value = line.split(':').nth(1).expect("value");
        let value = value.split('#').next().expect("value").trim();
        assert!(timespan(value) < stop, "lb.yaml shutdown_timeout {value} >= TimeoutStopSec");
    }

    // The credential pglb reads is the one the unit loads.
    assert!(
        example.contains(&format!("password_file: {CREDENTIAL_PATH}")),
        "deploy/systemd/lb.yaml must read the password from {CREDENTIAL_PATH}"
    );

    let dropin = read(&systemd_dir().join("pglb.service.d/low-ports.conf"));
    for key in ["AmbientCapabilities", "CapabilityBoundingSet"] {
        assert_eq!(service_value(&dropin, key), "CAP_NET_BIND_SERVICE", "low-ports.conf {key}=");
    }
    // tests/tests/sockmap.rs runs pglb with exactly these capabilities.
    let dropin = read(&systemd_dir().join("pglb.service.d/sockmap.conf"));
    for key in ["AmbientCapabilities", "CapabilityBoundingSet"] {
        assert_eq!(service_value(&dropin, key), "CAP_BPF CAP_NET_ADMIN", "sockmap.conf {key}=");
    }
    assert_eq!(service_value(&dropin, "SystemCallFilter"), "bpf", "sockmap.conf SystemCallFilter=");
}

/// One Exec*= command line with the unit's paths replaced by the built
/// binary, `config` and `mainpid`; returns the argv.
fn command_line(exec: &str, config: &Path, mainpid: Option<u32>) -> Vec<String> {
    // No prefix such as `-` (ignore failure) or `+` (full privileges).
    assert!(exec.starts_with('/'), "`{exec}` should be an absolute path without prefix");
    exec.split_whitespace()
        .map(|word| match word {
            UNIT_BIN => pglb_bin().to_string_lossy().into_owned(),
            UNIT_CONFIG => config.to_string_lossy().into_owned(),
            "$MAINPID" | "${MAINPID}" => mainpid.expect("MAINPID").to_string(),
            other => other.to_owned(),
        })
        .collect()
}

fn run_line(argv: &[String]) -> Output {
    Command::new(&argv[0])
        .args(&argv[1..])
        .env("NO_COLOR", "1")
        .output()
        .unwrap_or_else(|e| panic!("run {argv:?}: {e}"))
}

/// Runs a list of Exec*= lines as systemd does: in order, stopping at the
/// first that fails. Returns the index and output of the one that failed.
fn run_sequence(lines: &[String], config: &Path, mainpid: Option<u32>) -> Option<(usize, Output)> {
    for (i, line) in lines.iter().enumerate() {
        let out = run_line(&command_line(line, config, mainpid));
        if !out.status.success() {
            return Some((i, out));
        }
    }
    None
}

/// A config valid today: a listener, the admin endpoint, one backend that
/// is down (pglb serves and answers /health regardless).
fn valid_config(admin: u16) -> String {
    format!(
        "admin:\n  listen: 127.0.0.1:{admin}\n\
         health:\n  interval: 500ms\n  timeout: 500ms\n  user: pglb_check\n  sslmode: disable\n\
         listeners:\n  - name: rw\n    listen: 127.0.0.1:{}\n    role: primary\n\
         backends:\n  - name: pg1\n    address: 127.0.0.1:{}\n",
        free_port().expect("port"),
        free_port().expect("port"),
    )
}

const INVALID_CONFIG: &str = "listeners:\n  - name: rw\n    listen: 127.0.0.1:1\n    role: reader\nbackends: []\n";

/// The service's main process; killed on drop if still running.
struct MainProcess {
    child: Child,
    log: PathBuf,
}

impl MainProcess {
    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_serves(&mut self, admin: SocketAddr, what: &str) {
        wait_until(what, Duration::from_secs(20), || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("pglb exited with {status} ({what}):\n{}", self.log());
            }
            match http::get(admin, "/health") {
                Ok((200, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        });
    }
}

impl Drop for MainProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- pglb log ---\n{}", self.log());
        }
    }
}

#[test]
fn unit_commands_are_the_real_cli() {
    let unit = read(&systemd_dir().join("pglb.service"));
    let pre = service_values(&unit, "ExecStartPre");
    let start = service_values(&unit, "ExecStart");
    let reload = service_values(&unit, "ExecReload");
    assert_eq!(pre, [format!("{UNIT_BIN} check --config {UNIT_CONFIG}")]);
    assert_eq!(start, [format!("{UNIT_BIN} --config {UNIT_CONFIG}")]);
    assert_eq!(reload.len(), 2, "ExecReload: check, then SIGHUP: {reload:?}");
    assert!(reload[1].contains("-HUP $MAINPID"), "{reload:?}");

    let tmp = TempDir::new("unit-cli");
    let good = tmp.0.join("lb.yaml");
    let admin_port = free_port().expect("port");
    let admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
    fs::write(&good, valid_config(admin_port)).expect("write config");
    let bad = tmp.0.join("bad.yaml");
    fs::write(&bad, INVALID_CONFIG).expect("write config");

    // ExecStartPre: `pglb check` passes a valid config and fails a bad one,
    // so a bad config fails `systemctl start` before anything binds.
    assert!(run_sequence(&pre, &good, None).is_none());
    let (_, out) = run_sequence(&pre, &bad, None).expect("check fails");
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    assert!(output_text(&out).contains("unknown role `reader`"), "{}", output_text(&out));

    // ExecStart serves.
    let argv = command_line(&start[0], &good, None);
    let log = tmp.0.join("pglb.log");
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn ExecStart");
    let mut main = MainProcess { child, log };
    main.assert_serves(admin, "ExecStart to answer /health");
    let pid = main.child.id();

    // ExecReload on a valid file: check passes, SIGHUP reloads, pglb serves on.
    if let Some((i, out)) = run_sequence(&reload, &good, Some(pid)) {
        panic!("ExecReload[{i}] failed: {}", output_text(&out));
    }
    wait_until("the SIGHUP reload to succeed", Duration::from_secs(10), || {
        if let Ok(Some(status)) = main.child.try_wait() {
            panic!("pglb exited on SIGHUP with {status}:\n{}", main.log());
        }
        let metrics = http::get(admin, "/metrics")?.1;
        let line = r#"pglb_config_reloads_total{result="success"} 1"#;
        match metrics.lines().any(|l| l == line) {
            true => Ok(()),
            false => Err(format!("no `{line}` in /metrics")),
        }
    });
    main.assert_serves(admin, "pglb to serve after the reload");

    // ExecReload on a bad file stops at `pglb check`: `systemctl reload`
    // reports the failure, SIGHUP is never sent, the old config serves.
    fs::write(&good, INVALID_CONFIG).expect("break config");
    let (i, out) = run_sequence(&reload, &good, Some(pid)).expect("reload fails");
    assert_eq!((i, out.status.code()), (0, Some(1)), "{}", output_text(&out));
    main.assert_serves(admin, "pglb to keep serving after a refused reload");

    // Stop as systemd does: KillSignal, then SIGKILL after TimeoutStopSec.
    let signal = service_value(&unit, "KillSignal");
    let stop_timeout = timespan(&service_value(&unit, "TimeoutStopSec"));
    let sig = signal.trim_start_matches("SIG");
    let kill = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().expect("run kill");
    assert!(kill.success());
    let began = Instant::now();
    let status = wait_until("pglb to stop", stop_timeout, || match main.child.try_wait() {
        Ok(Some(status)) => Ok(status),
        _ => Err("still running".into()),
    });
    assert!(status.success(), "pglb exited with {status} on {signal}:\n{}", main.log());
    println!("pglb stopped {:?} after {signal}", began.elapsed());
}

#[test]
fn the_example_config_passes_pglb_check() {
    passes_pglb_check("lb.yaml", "unit-example");
}

/// deploy/patroni/lb.yaml: no backend listed, the members come from Patroni.
#[test]
fn the_patroni_example_config_passes_pglb_check() {
    passes_pglb_check("../patroni/lb.yaml", "patroni-example");
}

/// `file` (under deploy/systemd) passes `pglb check` with the unit's
/// credential and the package's token put where a test can write them.
fn passes_pglb_check(file: &str, tag: &str) {
    let tmp = TempDir::new(tag);
    let password = tmp.0.join("check-password");
    fs::write(&password, "example-secret\n").expect("write password");
    let token = tmp.0.join("admin-token");
    fs::write(&token, "0123456789abcdef0123456789abcdef\n").expect("write token");
    let example = read(&systemd_dir().join(file))
        .replace(CREDENTIAL_PATH, password.to_str().expect("utf-8"))
        .replace("/etc/pglb/admin-token", token.to_str().expect("utf-8"));
    assert!(example.contains("token_file:"), "the kit's config names the admin token: actions need one");
    let config = tmp.0.join("lb.yaml");
    fs::write(&config, example).expect("write config");
    let out = Command::new(pglb_bin())
        .args(["check", "--config"])
        .arg(&config)
        .env("NO_COLOR", "1")
        .output()
        .expect("run pglb check");
    assert!(out.status.success(), "{}", output_text(&out));
}
