//! What survives a restart of pglb: with `state_file`, an operator's drain
//! (and fences, and the highest timeline: see crates/routing/tests) is
//! written when it changes and restored at start, where `/status` and
//! `pglb status` show it; a corrupt state file is reported and ignored.

use std::process::Command;
use std::time::Duration;

use pglb_tests::pglb::pglb_bin;
use pglb_tests::{shared_cluster, wait_until, Pglb, Yaml};

fn yaml_with_state(cluster: &pglb_cluster::Cluster) -> Yaml {
    Yaml::for_cluster(cluster).top("state_file: state.json").listener("ro", "role: replica")
}

#[test]
fn a_drain_survives_a_crash_and_a_restart() {
    let cluster = shared_cluster();
    let yaml = yaml_with_state(&cluster);
    let mut first = Pglb::start(&yaml);
    first.wait_eligible("ro", &["pg1", "pg2"], Duration::from_secs(20));
    let (code, body) = first.post("/backends/pg1/drain");
    assert_eq!(code, 200, "{body}");
    let state = first.dir.join("state.json");
    wait_until("the drain in the state file", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&state).map_err(|e| e.to_string())?;
        if text.contains("\"drained\"") && text.contains("\"pg1\"") {
            Ok(())
        } else {
            Err(text)
        }
    });
    // A crash: no chance to save anything more.
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(10));
    let saved = std::fs::read_to_string(&state).expect("the state file outlives pglb");

    // The same config, in the same folder.
    let mut again = yaml;
    again.files.push(("state.json".into(), saved));
    let second = Pglb::start(&again);
    wait_until("pg1 restored as drained", Duration::from_secs(20), || {
        let status = second.status();
        let pg1 = pglb_tests::pglb::named(&status["backends"], "pg1").clone();
        if pg1["admin_state"] == "drained" && status["restored"].to_string().contains("pg1: drained") {
            Ok(())
        } else {
            Err(format!("{status}"))
        }
    });
    second.wait_eligible("ro", &["pg2"], Duration::from_secs(20));
    let out = Command::new(pglb_bin()).args(["status", "--config"]).arg(&second.config).output().expect("pglb status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("restored at start from the state file: pg1: drained"), "{text}");
    assert!(second.log().contains("restored from the state file: pg1: drained"), "{}", second.log());
}

#[test]
fn a_corrupt_state_file_is_reported_and_ignored() {
    let cluster = shared_cluster();
    let yaml = yaml_with_state(&cluster).file("state.json", "{\"version\": 1, \"fences\": [");
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("ro", &["pg1", "pg2"], Duration::from_secs(20));
    assert!(pglb.log().contains("the state file is unusable (not valid JSON"), "{}", pglb.log());
    assert_eq!(pglb.status()["restored"], serde_json::json!([]));
    // The next change replaces it with a good one.
    let (code, _) = pglb.post("/backends/pg2/disable");
    assert_eq!(code, 200);
    wait_until("a valid state file", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(pglb.dir.join("state.json")).map_err(|e| e.to_string())?;
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(v) if v["admin"][0]["state"] == "disabled" => Ok(()),
            _ => Err(text),
        }
    });
}
