//! The control commands (`pglb status`, `connections`, `drain`, `disable`,
//! `enable`, `unfence`) run as an operator runs them, against a running
//! pglb: with and without the admin token, with pglb down, with an unknown
//! backend; the documented exit codes are asserted.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use pglb_tests::pglb::pglb_bin;
use pglb_tests::{shared_cluster, Pglb, Yaml};

const TOKEN: &str = "s3cret-admin-token";

/// Exit codes documented in `pglb --help` and the README.
const DONE: i32 = 0;
const USAGE: i32 = 2;
const NOT_RUNNING: i32 = 3;
const UNAUTHORIZED: i32 = 4;
const NO_SUCH_BACKEND: i32 = 5;

/// Runs `pglb ARGS` with `env`, from `dir`; no admin token in the
/// environment unless `env` sets it.
fn cli(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(pglb_bin());
    cmd.args(args).current_dir(dir).env_remove("PGLB_ADMIN_TOKEN").env_remove("PGLB_CONFIG").env_remove("CLI_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out: Output = cmd.output().expect("run pglb");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// A running pglb whose admin endpoint wants `TOKEN` (from `$CLI_TOKEN` in
/// its environment), and a config for the CLI with only an `admin` section:
/// the wildcard address of the same port, and the same token source.
fn start() -> (pglb_tests::SharedCluster, Pglb, std::path::PathBuf) {
    let cluster = shared_cluster();
    let yaml = Yaml::for_cluster(&cluster)
        .admin("token_env: CLI_TOKEN")
        .listener("rw", "role: primary")
        .listener("ro", "role: replica");
    let pglb = Pglb::start_with(&yaml, &[("CLI_TOKEN", TOKEN)]);
    pglb.wait_eligible("ro", &["pg1", "pg2"], Duration::from_secs(20));
    // No listeners, no backends, a health password file that does not exist:
    // the control commands read `admin` and nothing else.
    let config = pglb.dir.join("cli.yaml");
    std::fs::write(
        &config,
        format!(
            "admin:\n  listen: 0.0.0.0:{}\n  token_env: CLI_TOKEN\nhealth:\n  password_file: /nonexistent/check-password\n",
            pglb.admin.port()
        ),
    )
    .expect("write the CLI's config");
    (cluster, pglb, config)
}

#[test]
fn status_and_connections_show_tables_and_json() {
    let (_cluster, pglb, config) = start();
    let dir = pglb.dir.clone();
    let cfg = config.to_str().expect("utf-8 path");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let session = runtime.block_on(pglb_tests::pg::connect(pglb.port("rw")));

    // Reads need no token. The config is found through $PGLB_CONFIG.
    let (code, out, err) = cli(&dir, &["status"], &[("PGLB_CONFIG", cfg)]);
    assert_eq!(code, DONE, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].contains(&format!("(admin address from {cfg})")), "{out}");
    assert!(lines[1].starts_with(&format!("config {}", pglb.config.display())), "{out}");
    let row = |first: &str| lines.iter().find(|l| l.split_whitespace().next() == Some(first)).copied().unwrap_or("");
    assert!(row("LISTENER").contains("ROUTES TO"), "{out}");
    assert!(row("rw").contains("primary") && row("rw").contains("pg0"), "{out}");
    assert!(row("ro").contains("pg1 pg2"), "{out}");
    assert!(row("BACKEND").contains("STATE") && row("BACKEND").contains("LAG"), "{out}");
    for (name, role) in [("pg0", "primary"), ("pg1", "replica"), ("pg2", "replica")] {
        let fields: Vec<&str> = row(name).split_whitespace().collect();
        assert_eq!(fields.get(2..4), Some(&["healthy", role][..]), "{name}: {out}");
    }

    let (code, out, _) = cli(&dir, &["status", "--json", "--config", cfg], &[]);
    assert_eq!(code, DONE);
    let json: serde_json::Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert_eq!(json["backends"].as_array().map(Vec::len), Some(3), "{}", out);

    let (code, out, err) = cli(&dir, &["connections", "--config", cfg], &[]);
    assert_eq!(code, DONE, "{out}{err}");
    assert!(out.lines().any(|l| l.starts_with("rw ") && l.contains("pg0")), "{out}");
    assert!(out.ends_with("1 session\n"), "{out}");
    drop(session);
}

#[test]
fn actions_need_the_token_and_say_what_they_did() {
    let (_cluster, pglb, config) = start();
    let dir = pglb.dir.clone();
    let cfg = config.to_str().expect("utf-8 path");

    // The config names $CLI_TOKEN, which this shell does not have.
    let (code, _, err) = cli(&dir, &["drain", "pg1", "--config", cfg], &[]);
    assert_eq!(code, UNAUTHORIZED, "{err}");
    assert!(err.contains("no token was sent") && err.contains("CLI_TOKEN"), "{err}");
    let (code, _, err) = cli(&dir, &["drain", "pg1", "--config", cfg], &[("PGLB_ADMIN_TOKEN", "wrong")]);
    assert_eq!(code, UNAUTHORIZED, "{err}");
    assert!(err.contains("is wrong"), "{err}");
    assert_eq!(pglb.backend("pg1")["admin_state"], "enabled", "refused actions changed nothing");

    // The token from the config's source, from $PGLB_ADMIN_TOKEN, from --token-file.
    let (code, out, err) = cli(&dir, &["drain", "pg1", "--config", cfg], &[("CLI_TOKEN", TOKEN)]);
    assert_eq!((code, out.trim()), (DONE, "pg1: admin state is now drained"), "{err}");
    assert_eq!(pglb.backend("pg1")["admin_state"], "drained");
    let (code, out, _) = cli(&dir, &["disable", "pg1", "--config", cfg], &[("PGLB_ADMIN_TOKEN", TOKEN)]);
    assert_eq!((code, out.trim()), (DONE, "pg1: admin state is now disabled"));
    let token_file = pglb.dir.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("write the token file");
    let tf = token_file.to_str().expect("utf-8 path");
    let (code, out, _) = cli(&dir, &["enable", "pg1", "--config", cfg, "--token-file", tf], &[]);
    assert_eq!((code, out.trim()), (DONE, "pg1: admin state is now enabled"));
    assert_eq!(pglb.backend("pg1")["admin_state"], "enabled");
    let (code, out, _) = cli(&dir, &["unfence", "pg1", "--config", cfg, "--token-file", tf], &[]);
    assert_eq!((code, out.trim()), (DONE, "pg1: was not fenced; nothing to do"));

    let (code, _, err) = cli(&dir, &["drain", "nosuch", "--config", cfg, "--token-file", tf], &[]);
    assert_eq!(code, NO_SUCH_BACKEND, "{err}");
    assert!(err.contains("no backend named `nosuch`"), "{err}");
    let (code, _, _) = cli(&dir, &["drain", "../status", "--config", cfg, "--token-file", tf], &[]);
    assert_eq!(code, NO_SUCH_BACKEND);
}

#[test]
fn pglb_down_bad_usage_and_bad_config_have_their_own_exit_codes() {
    let dir = std::env::temp_dir().join(format!("pglb-cli-down-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let port = pglb_cluster::free_port().expect("free port");
    let config = dir.join("lb.yaml");
    std::fs::write(&config, format!("admin:\n  listen: 127.0.0.1:{port}\n")).expect("write config");

    // ./lb.yaml is found without --config.
    let (code, _, err) = cli(&dir, &["status"], &[]);
    assert_eq!(code, NOT_RUNNING, "{err}");
    assert!(err.contains(&format!("127.0.0.1:{port}")) && err.contains("is pglb running"), "{err}");
    let (code, _, _) = cli(&dir, &["drain", "pg0"], &[("PGLB_ADMIN_TOKEN", TOKEN)]);
    assert_eq!(code, NOT_RUNNING);

    let (code, _, err) = cli(&dir, &["drain"], &[]);
    assert_eq!(code, USAGE, "{err}");
    assert!(err.contains("needs a BACKEND"), "{err}");
    let (code, _, err) = cli(&dir, &["status", "--token-file", "/nonexistent/token"], &[]);
    assert_eq!(code, USAGE, "{err}");
    assert!(err.contains("--token-file /nonexistent/token"), "{err}");
    std::fs::write(&config, "admin:\n  listen: nowhere\n").expect("write config");
    let (code, _, err) = cli(&dir, &["status"], &[]);
    assert_eq!(code, USAGE, "{err}");
    assert!(err.contains("lb.yaml:2") && err.contains("invalid listen address"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// What a fake admin endpoint at `listener` was sent by one CLI command run
/// from `dir` with a token in the environment: the request's text.
fn request_seen(dir: &Path, listener: &std::net::TcpListener, args: &[&str]) -> (i32, String) {
    use std::io::{Read, Write};
    let handle = {
        let listener = listener.try_clone().expect("clone listener");
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("the CLI connects");
            s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).unwrap_or(0);
            let _ = s.write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            String::from_utf8_lossy(&buf[..n]).into_owned()
        })
    };
    let (code, _, _) = cli(dir, args, &[("PGLB_ADMIN_TOKEN", TOKEN)]);
    (code, handle.join().expect("fake endpoint"))
}

/// A `lb.yaml` in the current folder that someone else owns (or may write)
/// could point `admin.listen` anywhere: the CLI does not send it the token.
/// Reads never send the token at all.
#[test]
fn the_token_goes_only_to_a_trusted_configs_admin_address_and_only_for_actions() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("pglb-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let fake = std::net::TcpListener::bind("127.0.0.1:0").expect("a fake admin endpoint");
    let config = dir.join("lb.yaml");
    std::fs::write(&config, format!("admin:\n  listen: {}\n", fake.local_addr().expect("addr"))).expect("write");

    // Someone else's file: no token.
    let chowned = Command::new("chown").args(["nobody"]).arg(&config).status().is_ok_and(|s| s.success());
    assert!(chowned, "chown nobody (the test runs as root)");
    let (code, seen) = request_seen(&dir, &fake, &["drain", "pg0"]);
    assert_eq!(code, UNAUTHORIZED);
    assert!(seen.starts_with("POST /backends/pg0/drain"), "{seen}");
    assert!(!seen.to_lowercase().contains("authorization"), "the token went to a hostile config's address: {seen}");

    // Ours, but writable by others: no token either.
    Command::new("chown").arg("root").arg(&config).status().expect("chown root");
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let (_, seen) = request_seen(&dir, &fake, &["drain", "pg0"]);
    assert!(!seen.to_lowercase().contains("authorization"), "a config others may write got the token: {seen}");

    // Ours and not writable by others: the token goes with the action...
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let (_, seen) = request_seen(&dir, &fake, &["drain", "pg0"]);
    assert!(seen.contains(&format!("Bearer {TOKEN}")), "{seen}");
    // ...but never with a read.
    let (_, seen) = request_seen(&dir, &fake, &["status"]);
    assert!(seen.starts_with("GET /status") && !seen.to_lowercase().contains("authorization"), "{seen}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `pglb status` says which config it took the admin address from.
#[test]
fn status_names_the_config_it_used() {
    let (_cluster, pglb, config) = start();
    let (code, out, _) = cli(&pglb.dir, &["status", "--config", config.to_str().expect("utf-8")], &[]);
    assert_eq!(code, DONE);
    let first = out.lines().next().unwrap_or_default();
    assert!(first.contains(&format!("admin address from {}", config.display())), "{out}");
}
