//! An install of the last single-cluster release upgrades in place to this
//! one and keeps its safety state: the previous release's binary (built
//! here from the repository's history) runs with a state file, a backend is
//! drained and another fenced; `pglb upgrade` hands its sockets and state to
//! this release's binary, which keeps the drain and the fence (the hand-over
//! of version 2 and the state file of version 1 both land in the cluster
//! `default`), and a restart of this release from that state file keeps them
//! too. A binary of its own: building the previous release takes both cores
//! for a while, and no other test should run meanwhile.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pglb_cluster::{Cluster, Spec};
use pglb_tests::pglb::{pglb_bin, upgrade, upgraded_pid, Binary};
use pglb_tests::proc::KillOnDrop;
use pglb_tests::{shared_cluster, wait_until, Pglb, Yaml};

/// The last release before clusters: its hand-over speaks version 2 and its
/// state file is version 1.
const PREVIOUS: &str = "74f71e4";

const SETTLE: Duration = Duration::from_secs(30);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The previous release's binary, built from `git archive` of [`PREVIOUS`]
/// into `target/previous-release` (kept between runs), or why it cannot be.
fn previous_binary() -> Result<PathBuf, String> {
    let target = root().join("target/previous-release");
    let source = target.join("source");
    let binary = target.join("debug/pglb");
    if binary.exists() {
        return Ok(binary);
    }
    let commit = format!("{PREVIOUS}^{{commit}}");
    let known = Command::new("git").current_dir(root()).args(["cat-file", "-e", &commit]).status();
    if !known.map_err(|e| format!("cannot run git: {e}"))?.success() {
        return Err(format!("commit {PREVIOUS} is not in this clone's history (a shallow clone?)"));
    }
    let _ = std::fs::remove_dir_all(&source);
    std::fs::create_dir_all(&source).map_err(|e| e.to_string())?;
    let archive = format!("git -C {} archive {PREVIOUS} | tar -x -C {}", root().display(), source.display());
    let unpacked = Command::new("sh").args(["-c", &archive]).status().map_err(|e| e.to_string())?;
    if !unpacked.success() {
        return Err(format!("`{archive}` failed"));
    }
    // Without optimisation: only its behaviour is tested, and it builds in
    // a fraction of the time.
    let mut build = pglb_tests::pglb::workspace_command(env!("CARGO"));
    build
        .current_dir(&source)
        .env("CARGO_TARGET_DIR", &target)
        .args(["build", "--quiet", "-p", "pglb", "--bin", "pglb"])
        .args(["--config", "profile.dev.opt-level=0", "--config", "profile.dev.debug=0"])
        .args(["--config", "profile.dev.package.\"*\".opt-level=0"]);
    let built = build.status().map_err(|e| format!("cannot run cargo: {e}"))?;
    if !built.success() {
        return Err(format!("building {PREVIOUS} failed (cargo build in {})", source.display()));
    }
    Ok(binary)
}

/// `pg2` drained and `stray` fenced, as `/status` shows them.
fn kept(pglb: &Pglb) -> Result<(), String> {
    let status = pglb.status();
    let (pg2, stray) =
        (pglb_tests::pglb::named(&status["backends"], "pg2"), pglb_tests::pglb::named(&status["backends"], "stray"));
    if pg2["admin_state"] == "drained" && stray["fenced"] == true {
        Ok(())
    } else {
        Err(format!("pg2 {pg2}\nstray {stray}\n{}", pglb.log()))
    }
}

#[test]
fn the_previous_release_upgrades_in_place_with_its_fence_and_drain() {
    let previous = match previous_binary() {
        Ok(binary) => binary,
        Err(why) => panic!("the previous release is needed for this test: {why}"),
    };
    let cluster = shared_cluster();
    // A node of another cluster listed by mistake: fenced on its identity.
    let other =
        Cluster::start(&Spec { tag: "previous-other".into(), replicas: 0, ..Spec::default() }).expect("cluster");
    pglb_tests::cluster::create_check_users_on(&other, 0);
    let mut yaml = Yaml::for_cluster(&cluster)
        .top("state_file: state.json")
        .listener("rw", "role: primary")
        .listener("ro", "role: replica");
    yaml.backends.push(("stray".into(), format!("address: {}", other.primary().address())));
    let installed = Binary::copy("previous");
    installed.replace_with(&previous);
    let old = Pglb::start_binary(&yaml, &[], &installed.path);
    old.wait_eligible("ro", &["pg1", "pg2"], SETTLE);
    assert_eq!(old.post("/backends/pg2/drain").0, 200, "{}", old.log());
    wait_until("the previous release fenced the stray node", SETTLE, || kept(&old));
    let state = old.dir.join("state.json");
    wait_until("the previous release's state file", SETTLE, || {
        let text = std::fs::read_to_string(&state).unwrap_or_default();
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        if doc["version"] == 1
            && doc["fences"].as_array().is_some_and(|f| !f.is_empty())
            && doc["admin"][0]["state"] == "drained"
        {
            Ok(())
        } else {
            Err(text)
        }
    });

    installed.replace_with(pglb_bin());
    let (code, out, err) = upgrade(&old.config);
    assert_eq!(code, 0, "pglb upgrade from {PREVIOUS} failed: {out}{err}\n{}", old.log());
    let pid = upgraded_pid(&out).unwrap_or_else(|| panic!("no pid in `{out}`"));
    let new = KillOnDrop(pid);
    assert_eq!(old.status()["pid"], serde_json::json!(pid), "the new release answers");
    kept(&old).unwrap_or_else(|e| panic!("the hand-over lost the drain or the fence: {e}"));
    assert_eq!(old.status()["restored_from"], "upgrade");
    assert_eq!(old.status()["clusters"][0]["name"], "default");
    old.wait_eligible("ro", &["pg1"], SETTLE);

    // This release keeps writing version 1 for a single-cluster config (the
    // previous release could read it back after a downgrade)...
    let text = std::fs::read_to_string(&state).expect("state file");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(doc["version"], 1, "{text}");
    // ... and a restart of this release from it keeps the drain and the fence.
    drop(new);
    let mut old = old;
    let _ = old.wait_exit(Duration::from_secs(10));
    let restarted = Pglb::start_binary(&yaml_in(&old.dir, &yaml), &[], pglb_bin());
    wait_until("the restarted release restored the state", SETTLE, || kept(&restarted));
    assert_eq!(restarted.status()["restored_from"], "state_file");
}

/// `yaml` with its state file at the absolute path in `dir` (a new run
/// writes its config into a folder of its own).
fn yaml_in(dir: &Path, yaml: &Yaml) -> Yaml {
    let mut yaml = yaml.clone();
    yaml.top = yaml.top.replace("state_file: state.json", &format!("state_file: {}", dir.join("state.json").display()));
    yaml
}
