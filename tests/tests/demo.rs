//! `pglb demo` as a user meets it: it starts, prints how to watch a
//! failover and how to bring the old primary back with pg_rewind, and each
//! printed command works as written; Ctrl-C stops it and removes its files.

use std::process::{Command, Stdio};
use std::time::Duration;

use pglb_tests::proc::KillOnDrop;
use pglb_tests::{wait_until, ChildOutput};

/// Runs one printed command line with `sh -c`; `Ok(output)` on success.
fn sh(line: &str) -> Result<String, String> {
    let out = Command::new("sh").args(["-c", line]).output().map_err(|e| e.to_string())?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{line}: {}\n{text}", out.status))
    }
}

#[test]
fn the_demos_printed_failover_and_rejoin_commands_work_as_written() {
    let _one_cluster_at_a_time = pglb_tests::exclusive();
    let dir = std::env::temp_dir().join(format!("pglb-demo-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut demo = Command::new(pglb_tests::pglb::pglb_bin())
        .arg("demo")
        .current_dir(&dir)
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pglb demo");
    let _kill = KillOnDrop(demo.id());
    let mut output = ChildOutput::of(&mut demo);
    output.wait_for("first checks of every backend completed", Duration::from_secs(120));
    let out = output.seen.clone();
    let section = |title: &str| -> Vec<String> {
        out.lines()
            .skip_while(|l| !l.contains(title))
            .skip(1)
            .skip_while(|l| !l.starts_with("    "))
            .take_while(|l| l.starts_with("    "))
            .map(|l| l.trim().to_owned())
            .collect()
    };
    let failover = section("watch a failover");
    let rejoin = section("bring the old primary back");
    assert_eq!(failover.len(), 3, "three failover commands:\n{out}");
    assert_eq!(rejoin.len(), 3, "three rejoin commands:\n{out}");
    let new_primary = failover[2].rsplit("# now ").next().expect("the new primary's port").trim().to_owned();

    sh(&failover[0]).expect("stop the primary");
    sh(&failover[1]).expect("promote a replica");
    wait_until("rw to follow the promotion", Duration::from_secs(30), || {
        let answer = sh(&failover[2])?;
        if answer.contains(&new_primary) {
            Ok(())
        } else {
            Err(answer)
        }
    });

    sh(&rejoin[0]).expect("pg_rewind the old primary");
    sh(&rejoin[1]).expect("start it as a replica");
    let status = wait_until("the old primary to serve as a healthy, unfenced replica", Duration::from_secs(60), || {
        let status = sh(&rejoin[2])?;
        let pg1 = status.lines().find(|l| l.starts_with("pg1 ")).unwrap_or_default();
        if pg1.contains("healthy") && pg1.contains("replica") && !pg1.contains("fenced") {
            Ok(status)
        } else {
            Err(status)
        }
    });
    println!("{status}");

    let root = out
        .lines()
        .find_map(|l| l.split("(data in ").nth(1))
        .map(|r| r.trim_end_matches(')').to_owned())
        .expect("the cluster's folder");
    let _ = Command::new("kill").args(["-INT", &demo.id().to_string()]).status();
    let status = wait_until("the demo to stop on Ctrl-C", Duration::from_secs(60), || match demo.try_wait() {
        Ok(Some(status)) => Ok(status),
        _ => Err("running".into()),
    });
    assert!(status.success(), "the demo exited {status}");
    assert!(!std::path::Path::new(&root).exists(), "the demo left {root}");
    let _ = std::fs::remove_dir_all(&dir);
}
