//! Documented commands work as written. Every fenced block of the README
//! files says what it is; every shell block says whether it is run, and by
//! what (`pglb_tests::docs`); the runnable ones are run here, as written,
//! from the repository's root: a documented command cannot rot unnoticed.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pglb_tests::docs::{self, Block};
use pglb_tests::{skip, ChildOutput};

fn all_blocks() -> Vec<Block> {
    docs::FILES.iter().flat_map(|f| docs::blocks(f)).collect()
}

#[test]
fn every_block_says_what_it_is_and_every_shell_block_whether_it_runs() {
    let mut problems = Vec::new();
    for b in all_blocks() {
        if b.info.is_empty() {
            problems.push(format!("{}: a fence without a language (write ```text, ```yaml, ```sh...)", b.place()));
            continue;
        }
        if !b.is_shell() {
            continue;
        }
        let Some(marker) = b.marker.as_deref() else {
            problems.push(format!(
                "{}: a shell block without a <!-- runnable --> / <!-- not runnable: REASON --> line before it",
                b.place()
            ));
            continue;
        };
        if let Some((file, id)) = docs::runnable_by(marker) {
            let text = std::fs::read_to_string(docs::root().join(file)).unwrap_or_default();
            if !text.contains(&format!("docs::block(\"{id}\")")) {
                problems.push(format!("{}: marked runnable by {file}, which does not run block `{id}`", b.place()));
            }
        } else if let Some(reason) = marker.strip_prefix("not runnable:") {
            if reason.trim().len() < 10 {
                problems.push(format!("{}: say why it is not runnable", b.place()));
            }
        } else if marker != "runnable" && !marker.starts_with("runnable: until ") {
            problems.push(format!("{}: unknown marker `{marker}`", b.place()));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The files the repository holds, and their state, as git shows them: a
/// command run here must not write into the working tree.
fn tree_state() -> String {
    let out =
        Command::new("git").args(["status", "--porcelain", "--untracked-files=all"]).current_dir(docs::root()).output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
}

#[test]
fn runnable_blocks_run_as_written() {
    let blocks: Vec<Block> = all_blocks().into_iter().filter(|b| b.marker.as_deref() == Some("runnable")).collect();
    assert!(!blocks.is_empty(), "no runnable block at all");
    for b in blocks {
        let needs: Vec<&str> = ["promtool"].into_iter().filter(|t| b.body.contains(*t)).collect();
        if let Some(tool) = needs.iter().find(|t| pglb_tests::which(t).is_none()) {
            skip(&format!("{} runs {tool}, which is not installed", b.place()));
            continue;
        }
        let before = tree_state();
        let out = Command::new("sh").args(["-ec", &b.body]).current_dir(docs::root()).output().expect("run sh");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{} failed ({}):\n{}\n---\n{text}", b.place(), out.status, b.body);
        assert_eq!(tree_state(), before, "{} wrote into the working tree:\n{}", b.place(), b.body);
    }
}

/// Commands that serve until stopped (the demo): each runs until its output
/// shows what its marker names, then gets Ctrl-C and must exit cleanly.
#[test]
fn serving_blocks_start_serve_and_stop_as_written() {
    let blocks: Vec<Block> = all_blocks()
        .into_iter()
        .filter(|b| b.marker.as_deref().is_some_and(|m| m.starts_with("runnable: until ")))
        .collect();
    assert!(!blocks.is_empty(), "the demo's block is marked `runnable: until ...`");
    let _one_cluster_at_a_time = pglb_tests::exclusive();
    for b in blocks {
        let until = b.marker.as_deref().and_then(|m| m.strip_prefix("runnable: until ")).unwrap_or_default();
        let mut child = Command::new("sh")
            .args(["-ec", &format!("exec {}", b.body.trim())])
            .current_dir(docs::root())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run sh");
        let _kill = pglb_tests::proc::KillOnDrop(child.id());
        let mut output = ChildOutput::of(&mut child);
        // A release build may come first.
        output.wait_for(until, Duration::from_secs(900));
        let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            assert!(Instant::now() < deadline, "{}: still running 60 s after Ctrl-C:\n{}", b.place(), output.seen);
            std::thread::sleep(Duration::from_millis(100));
        };
        output.drain(Duration::from_millis(200));
        assert!(status.success(), "{}: exited {status} after Ctrl-C:\n{}", b.place(), output.seen);
    }
}
