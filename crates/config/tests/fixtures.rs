//! Every fixture under `fixtures/valid` loads; every one under
//! `fixtures/invalid` fails with the problems its `.expected` file lists
//! (`line:column message-prefix`, one per line).

use std::path::{Path, PathBuf};

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("fixture dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn valid_fixtures_load() {
    let files = yaml_files("valid");
    assert!(files.len() >= 3, "fixtures not found: {files:?}");
    for file in files {
        if let Err(err) = pglb_config::load_file(&file) {
            panic!("{} should be valid:\n{err}", file.display());
        }
    }
}

#[test]
fn invalid_fixtures_fail_with_located_problems() {
    let files = yaml_files("invalid");
    assert!(files.len() >= 5, "fixtures not found: {files:?}");
    for file in files {
        let err = pglb_config::load_file(&file).expect_err(&format!("{} should be invalid", file.display()));
        let expected = std::fs::read_to_string(file.with_extension("expected")).expect("an .expected file per fixture");
        let got: Vec<String> = err
            .problems
            .iter()
            .map(|p| format!("{}:{} {}{}", p.line.unwrap_or(0), p.column.unwrap_or(0), item(p), p.message))
            .collect();
        for want in expected.lines().map(str::trim).filter(|l| !l.is_empty()) {
            assert!(got.iter().any(|g| g.starts_with(want)), "{}: no problem `{want}` in {got:#?}", file.display());
        }
        assert!(err.problems.iter().all(|p| p.help.is_some()), "{}: every problem says what to write", file.display());
    }
}

fn item(p: &pglb_config::Problem) -> String {
    if p.item.is_empty() {
        String::new()
    } else {
        format!("{}: ", p.item)
    }
}

#[test]
fn secrets_do_not_print() {
    let text = "health:\n  password: hunter2\nlisteners:\n  - {name: rw, listen: 127.0.0.1:1, role: primary}\nbackends:\n  - {name: a, address: 127.0.0.1:2}\n";
    let config = pglb_config::load_str(Path::new("x.yaml"), text).expect("valid");
    assert!(!format!("{config:?}").contains("hunter2"));
    let password = config.clusters[0].health.password.as_ref().and_then(|s| s.read().ok());
    assert_eq!(password.as_ref().map(|s| s.expose()), Some("hunter2"));
}

/// Every problem in one run, in the user's terms: a misspelled key gets the
/// closest known one, a wrong role causes no follow-on fallback error, and
/// nothing reads like Rust's type names.
#[test]
fn all_problems_at_once_with_suggestions() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/invalid/all-at-once.yaml");
    let err = pglb_config::load_file(&path).expect_err("invalid");
    let typo = err.problems.iter().find(|p| p.item == "health.intervall").expect("the misspelled key");
    assert!(typo.help.as_deref().is_some_and(|h| h.starts_with("did you mean `interval`?")), "{typo:?}");
    let replicaa = err.problems.iter().find(|p| p.item == "listeners[1].role").expect("the misspelled role");
    assert!(replicaa.help.as_deref().is_some_and(|h| h.contains("did you mean `replica`?")), "{replicaa:?}");
    assert!(!err.problems.iter().any(|p| p.item.ends_with("fallback")), "{:#?}", err.problems);
    let text = err.to_string();
    for rust in ["u32", "invalid type", "expected struct", "unknown field"] {
        assert!(!text.contains(rust), "`{rust}` in:\n{text}");
    }
}

/// Clusters inherit the top level key by key, their own values win, and
/// the single-cluster form is one cluster named `default`.
#[test]
fn clusters_inherit_the_top_level() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/valid");
    let config = pglb_config::load_file(&dir.join("clusters.yaml")).expect("valid");
    let names: Vec<&str> = config.clusters.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["orders", "billing_eu"]);
    let (orders, billing) = (&config.clusters[0], &config.clusters[1]);
    assert_eq!(orders.health.interval, std::time::Duration::from_secs(1));
    assert_eq!(billing.health.interval, std::time::Duration::from_secs(2), "a cluster's own health wins");
    assert_eq!((orders.health.user.as_str(), billing.health.user.as_str()), ("pglb_check", "billing_check"));
    assert_eq!(orders.listeners[0].hold_timeout, std::time::Duration::from_secs(5), "top-level defaults");
    assert_eq!(billing.listeners[0].hold_timeout, std::time::Duration::from_secs(10), "the cluster's defaults");
    assert_eq!(orders.system_identifier, Some(7_301_234_567_890_123_456));
    assert_eq!(billing.system_identifier, None);
    assert!(!config.implicit() && !orders.implicit);
    let single = pglb_config::load_file(&dir.join("minimal.yaml")).expect("valid");
    assert!(single.implicit());
    assert_eq!(single.clusters[0].name, pglb_config::DEFAULT_CLUSTER);
}
