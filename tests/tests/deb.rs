//! The Debian package, built with cargo-deb (`deploy/debian/build-deb`):
//! lintian shows no errors; `dpkg -i` on this machine installs the binary,
//! the unit (the kit's, with /usr/bin), the Prometheus rules and the Grafana
//! dashboard, creates the `pglb` user, owns /etc/pglb by its group, keeps
//! /etc/pglb/lb.yaml as a conffile, enables the unit without starting it; an
//! upgrade to a second build hands a running pglb over (`pglb upgrade`)
//! instead of restarting it: its open session goes on; `dpkg --purge` leaves
//! the machine as it was but for the `pglb` user.
//!
//! The README's install commands are run as written (`build-deb` with no
//! argument, then `apt install ./target/debian/...` from the repository's
//! root). It installs a package on this machine, so it runs only as root,
//! under CI or with `PGLB_TEST_SYSTEM=1`; a failure purges what it
//! installed. `build-deb`'s argument parsing is tested apart, with a stand-in
//! for cargo (nothing built or installed).

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use pglb_tests::pglb::{named, workspace_command};
use pglb_tests::proc::KillOnDrop;
use pglb_tests::{docs, shared_cluster, wait_until, which, wire, Yaml};

fn run(cmd: &mut Command) -> (i32, String) {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn ok(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let (code, text) = run(cmd);
    assert_eq!(code, 0, "{shown} failed:\n{text}");
    text
}

fn dpkg(args: &[&str]) -> Command {
    let mut cmd = Command::new("dpkg");
    cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// The package of revision `revision`, as build-deb writes it (an absolute
/// path without `..`, which lintian refuses).
fn deb(revision: u32) -> PathBuf {
    let dir = docs::root().join("target/debian");
    let dir = dir.canonicalize().unwrap_or(dir);
    dir.join(format!("pglb_{}-{revision}_amd64.deb", env!("CARGO_PKG_VERSION")))
}

/// Builds revision `revision` of the package, reusing the built binary.
fn build_again(revision: u32) -> PathBuf {
    let text = ok(workspace_command("deploy/debian/build-deb").args([&revision.to_string(), "--no-build"]));
    let deb = deb(revision);
    assert!(deb.exists(), "no {} after build-deb:\n{text}", deb.display());
    deb
}

/// Names of the files of the system, but for the places that change on
/// their own (logs, caches, dpkg's and apt's databases, temp files), the
/// backups adduser writes (`/etc/passwd-`...), and this test's own build:
/// the workspace (wherever it was cloned), its target directory, cargo's
/// and the user's home.
fn snapshot() -> BTreeSet<String> {
    let workspace = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let mut own: Vec<PathBuf> = [workspace.to_path_buf(), workspace.join("target"), std::env::temp_dir()]
        .into_iter()
        .chain(
            ["CARGO_HOME", "CARGO_TARGET_DIR", "HOME", "RUSTUP_HOME"]
                .iter()
                .filter_map(std::env::var_os)
                .map(PathBuf::from),
        )
        .filter_map(|p| p.canonicalize().ok())
        .collect();
    own.retain(|p| p != Path::new("/"));
    let skip = [
        "/proc",
        "/sys",
        "/dev",
        "/run",
        "/tmp",
        "/var/tmp",
        "/root",
        "/home",
        "/work",
        "/var/log",
        "/var/cache",
        "/var/lib/dpkg",
        "/var/lib/apt",
        "/var/lib/postgresql",
        "/var/spool",
        "/var/backups",
        "/var/mail",
        "/mnt",
        "/media",
        "/opt",
        "/srv",
    ];
    let mut seen = BTreeSet::new();
    let mut todo = vec![PathBuf::from("/")];
    while let Some(dir) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let text = path.to_string_lossy().into_owned();
            if skip.iter().any(|s| text == *s)
                || own.contains(&path)
                || (text.starts_with("/etc/") && text.ends_with('-'))
            {
                continue;
            }
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(path);
            }
            seen.insert(text);
        }
    }
    seen
}

/// Purges the package when the test ends, however it ends.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = run(&mut dpkg(&["--purge", "pglb"]));
    }
}

fn mode_and_group(path: &str) -> (u32, u32) {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    (meta.permissions().mode() & 0o7777, meta.gid())
}

fn group_id(name: &str) -> u32 {
    let text = ok(Command::new("getent").args(["group", name]));
    text.split(':').nth(2).and_then(|g| g.trim().parse().ok()).unwrap_or_else(|| panic!("group {name}: {text}"))
}

/// The unit's directive lines (no comments, no blank lines).
fn directives(unit: &str) -> Vec<String> {
    unit.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned).collect()
}

#[test]
fn the_package_installs_upgrades_without_a_restart_and_purges_cleanly() {
    if !pglb_tests::may_change_the_machine("installs the pglb package and creates the pglb system user") {
        return;
    }
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let tools = ["dpkg", "lintian", "deb-systemd-helper", "adduser"];
    let cargo_deb = run(workspace_command(env!("CARGO")).args(["deb", "--version"])).0 == 0;
    if !root || !cargo_deb || tools.iter().any(|t| which(t).is_none()) {
        pglb_tests::skip(&format!("needs root, cargo-deb and {tools:?} (.ci/run installs them)"));
        return;
    }
    if run(&mut dpkg(&["-s", "pglb"])).0 == 0 {
        ok(&mut dpkg(&["--purge", "pglb"]));
    }
    // What the machine looks like before the install (the build writes only
    // to the workspace and cargo's home, which the snapshot leaves out).
    let before = snapshot();
    let _purge = Purge;
    // The README's commands, as written, from the repository's root: build
    // revision 1 and install it.
    let readme = docs::block("install-the-deb");
    let installed = ok(Command::new("sh")
        .args(["-ec", &readme.body])
        .current_dir(docs::root())
        .env("DEBIAN_FRONTEND", "noninteractive"));
    assert!(installed.contains("installed and enabled, not started"), "{}:\n{installed}", readme.place());
    let first = deb(1);
    // lintian: no errors (warnings are printed for the record).
    let (code, report) = run(Command::new("lintian").args(["--fail-on", "error"]).arg(&first));
    println!("lintian {}:\n{report}", first.display());
    assert_eq!(code, 0, "lintian found errors:\n{report}");
    let second = build_again(2);
    assert_eq!(mode_and_group("/usr/bin/pglb").0, 0o755);
    let files = ok(&mut dpkg(&["-L", "pglb"]));
    for file in [
        "/usr/bin/pglb",
        "/lib/systemd/system/pglb.service",
        "/etc/pglb/lb.yaml",
        "/usr/share/pglb/prometheus/pglb-rules.yml",
        "/usr/share/pglb/grafana/pglb.json",
        "/usr/share/doc/pglb/copyright",
        "/usr/share/doc/pglb/changelog.Debian.gz",
    ] {
        assert!(files.lines().any(|l| l == file), "{file} not in the package:\n{files}");
        assert!(Path::new(file).exists(), "{file} not installed");
    }
    println!("dpkg -L pglb:\n{files}");
    // The user, and /etc/pglb readable by its group only.
    let user = ok(Command::new("getent").args(["passwd", "pglb"]));
    assert!(user.trim_end().ends_with(":/nonexistent:/usr/sbin/nologin"), "{user}");
    let pglb_group = group_id("pglb");
    assert_eq!(mode_and_group("/etc/pglb"), (0o750, pglb_group));
    assert_eq!(mode_and_group("/etc/pglb/lb.yaml"), (0o640, pglb_group));
    // The admin token: made by the package, readable by root and pglb only.
    assert_eq!(mode_and_group("/etc/pglb/admin-token"), (0o640, pglb_group));
    let token = std::fs::read_to_string("/etc/pglb/admin-token").expect("admin token");
    assert!(token.trim().len() >= 32 && token.trim().bytes().all(|b| b.is_ascii_hexdigit()), "{token}");
    // What the package installs carries no demo (nor its cluster machinery).
    let (code, said) = run(Command::new("/usr/bin/pglb").arg("demo"));
    assert!(code == 2 && said.contains("this build has no demo"), "{code}: {said}");
    let conffiles = ok(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "pglb"]));
    assert!(conffiles.contains("/etc/pglb/lb.yaml"), "{conffiles}");
    // Enabled, not started: it waits for the check password.
    assert!(Path::new("/etc/systemd/system/multi-user.target.wants/pglb.service").exists(), "not enabled");
    // The unit is the kit's, with the binary in /usr/bin.
    let packaged = std::fs::read_to_string("/lib/systemd/system/pglb.service").expect("unit");
    let kit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/systemd/pglb.service"))
        .expect("kit unit")
        .replace("/usr/local/bin/pglb", "/usr/bin/pglb");
    assert_eq!(directives(&packaged), directives(&kit), "the packaged unit differs from the kit's");
    assert!(packaged.contains("ConditionPathExists=/etc/pglb/check-password"));
    if let Some(analyze) = which("systemd-analyze") {
        let (code, text) = run(Command::new(analyze).args(["verify", "--man=no", "/lib/systemd/system/pglb.service"]));
        assert!(code == 0 && text.trim().is_empty(), "systemd-analyze verify: {text}");
    }
    // The shipped example passes the check command its own header gives (the
    // credential, which only systemd provides, is a warning, not an error)
    // and listens on loopback only.
    let example = std::fs::read_to_string("/etc/pglb/lb.yaml").expect("example");
    let header = example.lines().find_map(|l| l.trim_start_matches('#').trim().strip_prefix("pglb check"));
    let check = header.and_then(|rest| rest.split("&&").next()).expect("a `pglb check` command in the header");
    let checked = ok(Command::new("sh").args(["-ec", &format!("pglb check{check}")]));
    assert!(checked.contains("is a systemd credential") && checked.contains("ok ("), "{checked}");
    for line in example.lines().filter(|l| l.trim_start().starts_with("listen:")) {
        assert!(line.contains("127.0.0.1:"), "the example serves beyond loopback: {line}");
    }

    // A running pglb (from the package's binary and conffile) with an open
    // session; the upgrade to the second build hands it over.
    let cluster = shared_cluster();
    // No token in the config: pglb and its control commands take the
    // package's /etc/pglb/admin-token.
    let yaml = Yaml::for_cluster(&cluster)
        .without_token()
        .listener("rw", "role: primary")
        .listener("ro", "role: replica")
        .top("shutdown_timeout: 20s");
    std::fs::write("/etc/pglb/lb.yaml", yaml.render()).expect("write /etc/pglb/lb.yaml");
    let log = std::env::temp_dir().join(format!("pglb-deb-{}.log", std::process::id()));
    let mut old = Command::new("/usr/bin/pglb")
        .args(["--config", "/etc/pglb/lb.yaml"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start pglb");
    let _old_guard = KillOnDrop(old.id());
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], yaml.admin));
    let rw = yaml.listeners[0].1;
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until("pglb serving rw", Duration::from_secs(20), || match pglb_tests::http::get(admin, "/status") {
        Ok((200, body)) if body.contains("\"pg0\"") && body.contains("\"primary_visible\": true") => Ok(()),
        other => Err(format!("{other:?}")),
    });
    let mut session = wire::login(rw).expect("a session through the running pglb");
    // The control commands work with the package's token, as root.
    let config = ["--config", "/etc/pglb/lb.yaml"];
    let drained = ok(Command::new("/usr/bin/pglb").arg("drain").arg("pg2").args(config));
    assert!(drained.contains("drained"), "{drained}");
    ok(Command::new("/usr/bin/pglb").arg("enable").arg("pg2").args(config));
    let (code, said) =
        run(Command::new("/usr/bin/pglb").arg("drain").arg("pg2").args(config).env("PGLB_ADMIN_TOKEN", "wrong"));
    assert_eq!(code, 4, "a wrong token is refused: {said}");
    let before_pid = wire::scalar(&mut session, "SELECT pg_backend_pid()").expect("query");

    let upgraded = ok(dpkg(&["-i", "--force-confold"]).arg(&second));
    println!("dpkg -i (upgrade):\n{upgraded}");
    assert!(upgraded.contains("handing the running pglb over"), "{upgraded}");
    assert!(upgraded.contains("pglb: upgraded: pid"), "{upgraded}\n{}", log_text());
    // No restart: the session goes on, on the same server process.
    let after_pid = wire::scalar(&mut session, "SELECT pg_backend_pid()").expect("the session survived the upgrade");
    assert_eq!(before_pid, after_pid);
    let status: serde_json::Value =
        serde_json::from_str(&pglb_tests::http::get(admin, "/status").expect("status").1).expect("json");
    let new_pid = status["pid"].as_u64().expect("pid") as u32;
    let _new_guard = KillOnDrop(new_pid);
    assert_ne!(new_pid, old.id(), "the admin endpoint is the new process's");
    assert_eq!(named(&status["backends"], "pg0")["role"], "primary");
    let mut fresh = wire::login(rw).expect("a new client through the new process");
    assert_eq!(wire::scalar(&mut fresh, "SELECT 1").as_deref(), Ok("1"));
    wire::terminate(fresh);
    wire::terminate(session);
    let exited = wait_until("the old pglb to exit", Duration::from_secs(30), || match old.try_wait() {
        Ok(Some(status)) => Ok(status.code()),
        _ => Err("running".into()),
    });
    assert_eq!(exited, Some(0), "{}", log_text());
    pglb_tests::proc::stop(new_pid, "TERM");
    assert!(!pglb_tests::proc::running(new_pid), "the new pglb did not stop on SIGTERM");
    let _ = std::fs::remove_file(&log);

    ok(&mut dpkg(&["--purge", "pglb"]));
    let after = snapshot();
    let added: Vec<&String> = after.difference(&before).collect();
    let removed: Vec<&String> = before.difference(&after).collect();
    if !(added.is_empty() && removed.is_empty()) {
        println!("purge left {added:#?}\nand removed {removed:#?}");
    }
    assert!(added.is_empty() && removed.is_empty(), "purge left {added:?} and removed {removed:?}");
    assert!(run(Command::new("getent").args(["passwd", "pglb"])).0 == 0, "the pglb system user stays");
}

/// `build-deb [REVISION] [--no-build]`, in any order, under `sh` (dash): a
/// stand-in `cargo` on PATH records what it is asked; nothing is built.
#[test]
fn build_deb_takes_its_arguments_in_any_order() {
    let dir = std::env::temp_dir().join(format!("pglb-build-deb-args-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let log = dir.join("cargo-args");
    let cargo = dir.join("cargo");
    std::fs::write(&cargo, format!("#!/bin/sh\necho \"$@\" > {}\n", log.display())).expect("stand-in cargo");
    std::fs::set_permissions(&cargo, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = format!("{}:{}", dir.display(), std::env::var("PATH").unwrap_or_default());
    let build_deb = |args: &[&str]| {
        let _ = std::fs::remove_file(&log);
        let out = Command::new("sh")
            .arg(docs::root().join("deploy/debian/build-deb"))
            .args(args)
            .env("PATH", &path)
            .output()
            .expect("run build-deb");
        let asked = std::fs::read_to_string(&log).unwrap_or_default();
        (out.status.code(), asked.trim().to_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let want = |revision: &str, no_build: bool| {
        let tail = if no_build { " --no-build" } else { "" };
        format!("deb -p pglb --strip --deb-revision {revision} --output target/debian/{tail}")
    };
    for (args, revision, no_build) in [
        (&[][..], "1", false),
        (&["--no-build"][..], "1", true),
        (&["2"][..], "2", false),
        (&["2", "--no-build"][..], "2", true),
        (&["--no-build", "3"][..], "3", true),
        (&["1.2~rc1"][..], "1.2~rc1", false),
    ] {
        let (code, asked, err) = build_deb(args);
        assert_eq!((code, asked), (Some(0), want(revision, no_build)), "build-deb {args:?}: {err}");
    }
    for args in [&["2", "3"][..], &["--bogus"][..], &["two words"][..]] {
        let (code, asked, err) = build_deb(args);
        assert_eq!(code, Some(2), "build-deb {args:?} must refuse: {err}");
        assert!(asked.is_empty() && err.contains("usage: deploy/debian/build-deb"), "build-deb {args:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
