//! `pglb check` and `pglb` with good and bad configs, as an operator runs them.

use std::path::Path;
use std::process::Command;

use pglb_tests::pglb::pglb_bin;

fn run(args: &[&str], config: &str) -> (i32, String, String) {
    let dir = std::env::temp_dir().join(format!(
        "pglb-cli-{}-{}",
        std::process::id(),
        pglb_cluster::free_port().expect("port")
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("lb.yaml");
    std::fs::write(&path, config).expect("write");
    let out =
        Command::new(pglb_bin()).args(args).arg("--config").arg(&path).env("NO_COLOR", "1").output().expect("run pglb");
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const BAD: &str = "admin:
  listen: 127.0.0.1:9631
health:
  interval: 1s
  timeout: 5s
  password: a
  password_env: B
listeners:
  - name: rw
    listen: 127.0.0.1:5432
    role: primary
  - name: ro
    listen: 127.0.0.1:5432
    role: reader
    balance: fastest
backends:
  - name: pg1
    address: 10.0.0.11
";

#[test]
fn check_reports_every_problem_with_file_line_and_fix() {
    let (code, _, err) = run(&["check"], BAD);
    assert_eq!(code, 1, "{err}");
    for expected in [
        "lb.yaml:5:3: error: health.timeout: timeout (5s) is longer than interval (1s)",
        "lb.yaml:7:3: error: health.password_env: more than one password source is set",
        "lb.yaml:13:5: error: listeners[1].listen: address 127.0.0.1:5432 is already used by listeners[0]",
        "lb.yaml:14:5: error: listeners[1].role: unknown role `reader`",
        "help: write one of: primary, replica, any",
        "lb.yaml:15:5: error: listeners[1].balance: unknown balance policy `fastest`",
        "lb.yaml:18:5: error: backends[0].address: invalid backend address `10.0.0.11`",
        "6 problems found",
    ] {
        assert!(err.contains(expected), "missing `{expected}` in:\n{err}");
    }
}

#[test]
fn pglb_refuses_to_start_on_a_bad_config() {
    let (code, _, err) = run(&[], BAD);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("lb.yaml:14:5: error: listeners[1].role"), "{err}");
    assert!(err.contains("nothing was started"), "{err}");
}

#[test]
fn syntax_and_unknown_keys_are_located() {
    // An unknown key is reported with the closest known one, beside the
    // file's other problems (here: no role, no backends).
    let (code, _, err) = run(&["check"], "listeners:\n  - name: rw\n    lisen: 127.0.0.1:1\n");
    assert_eq!(code, 1);
    assert!(err.contains("lb.yaml:3:5: error: listeners[0].lisen: unknown key `lisen`"), "{err}");
    assert!(err.contains("help: did you mean `listen`?"), "{err}");
    assert!(err.contains("listeners[0].role: missing role") && err.contains("no backends are configured"), "{err}");
    // A section of the wrong shape, in the user's terms.
    let (code, _, err) = run(&["check"], "health: 5\n");
    assert_eq!(code, 1);
    assert!(
        err.contains("lb.yaml:1:9: error: health: expected a mapping (key: value lines), found the number 5"),
        "{err}"
    );
    let (code, _, err) = run(&["check"], "listeners: [\n");
    assert_eq!(code, 1);
    assert!(err.contains("lb.yaml:2:1: error:"), "{err}");
}

#[test]
fn unset_password_env_is_an_error() {
    let cfg = "health:\n  password_env: PGLB_TEST_SURELY_UNSET\nlisteners:\n  - {name: rw, listen: 127.0.0.1:1, role: primary}\nbackends:\n  - {name: a, address: 127.0.0.1:2}\n";
    let (code, _, err) = run(&["check"], cfg);
    assert_eq!(code, 1);
    assert!(
        err.contains(
            "lb.yaml:2:3: error: health.password_env: environment variable `PGLB_TEST_SURELY_UNSET` is not set"
        ),
        "{err}"
    );
}

#[test]
fn the_example_lb_yaml_is_valid_and_check_binds_nothing() {
    let example = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../lb.yaml"));
    let text = std::fs::read_to_string(example).expect("lb.yaml");
    // Hold one of its ports: `check` must still pass, since it binds nothing.
    let _busy = std::net::TcpListener::bind("127.0.0.1:6432");
    let (code, out, err) = run(&["check"], &text);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok (2 listeners, 3 backends)"), "{out}");
}

#[test]
fn a_taken_port_fails_startup_with_the_listener_named() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = busy.local_addr().expect("addr").port();
    let admin = pglb_cluster::free_port().expect("port");
    let cfg = format!(
        "admin:\n  listen: 127.0.0.1:{admin}\nlisteners:\n  - {{name: rw, listen: 127.0.0.1:{port}, role: primary}}\nbackends:\n  - {{name: a, address: 127.0.0.1:2}}\n"
    );
    let (code, _, err) = run(&[], &cfg);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("cannot bind listener `rw` to 127.0.0.1:{port}")), "{err}");
}
