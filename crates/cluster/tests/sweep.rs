//! Starting a cluster sweeps clusters left by dead test processes — and
//! nothing else: a file planted in the shared temp folder never makes the
//! sweeper (often root) signal a process, and a planted folder or symlink
//! is never followed or taken over.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use pglb_cluster::{Cluster, Spec};

/// A pid that no process has now (a child that has exited and been reaped).
fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().expect("run true");
    let pid = child.id();
    child.wait().expect("wait");
    pid
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

/// A folder that looks like a dead test's cluster whose `postmaster.pid`
/// names `victim`.
fn plant(path: &Path, victim: u32) {
    std::fs::create_dir_all(path.join("node0")).expect("plant");
    std::fs::write(path.join("owner.pid"), dead_pid().to_string()).expect("owner.pid");
    std::fs::write(path.join("node0/postmaster.pid"), format!("{victim}\n/tmp\n")).expect("postmaster.pid");
}

#[test]
fn a_planted_postmaster_pid_is_never_signalled_and_a_planted_folder_never_taken() {
    let tmp = std::env::temp_dir();
    let id = std::process::id();
    let mut victim = Command::new("sleep").arg("120").spawn().expect("a harmless process");
    // One of ours (as the sweeper sees it): removed, but its "postmaster"
    // is not a postgres in that folder, so it is not signalled.
    let ours = tmp.join(format!("pglb-planted-{id}"));
    plant(&ours, victim.id());
    // Not a folder but a symlink to one: neither followed nor removed.
    let target = tmp.join(format!("planted-target-{id}"));
    plant(&target, victim.id());
    let link = tmp.join(format!("pglb-link-{id}"));
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&target, &link).expect("symlink");
    // Someone else's (a user the sweeper does not run as): left alone.
    // Planted under another name and renamed once it is nobody's: the
    // other test in this binary sweeps concurrently and would rightly take
    // it while it is still ours.
    let foreign = tmp.join(format!("pglb-foreign-{id}"));
    let planting = tmp.join(format!("planting-foreign-{id}"));
    plant(&planting, victim.id());
    let chowned = Command::new("chown").args(["-R", "nobody"]).arg(&planting).status().is_ok_and(|s| s.success())
        && std::fs::rename(&planting, &foreign).is_ok();

    let cluster = Cluster::start(&Spec { tag: "sweep".into(), ..Spec::default() }).expect("a cluster");
    let root_mode = std::fs::metadata(&cluster.root).expect("root").permissions().mode() & 0o777;
    drop(cluster);

    let victim_alive = alive(victim.id());
    let (ours_gone, link_kept, target_kept) = (!ours.exists(), link.exists(), target.join("owner.pid").exists());
    let foreign_kept = foreign.join("owner.pid").exists();
    let _ = victim.kill();
    let _ = victim.wait();
    for path in [&ours, &target, &foreign, &planting] {
        let _ = std::fs::remove_dir_all(path);
    }
    let _ = std::fs::remove_file(&link);
    assert!(victim_alive, "the sweeper killed a process a planted postmaster.pid named");
    assert!(ours_gone, "a dead test's folder of ours is swept");
    assert!(link_kept && target_kept, "a planted symlink was followed or removed");
    if chowned {
        assert!(foreign_kept, "another user's folder was swept");
    }
    assert_eq!(root_mode, 0o700, "a cluster's folder is private");
}

#[test]
fn a_clusters_folder_is_new_private_and_not_a_name_one_can_plant() {
    let cluster = Cluster::start(&Spec { tag: "private".into(), ..Spec::default() }).expect("a cluster");
    let meta = std::fs::symlink_metadata(&cluster.root).expect("root");
    assert!(meta.is_dir(), "a real folder");
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    let name = cluster.root.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
    let random = name.rsplit('-').next().unwrap_or_default();
    assert!(random.len() == 8 && random.chars().all(|c| c.is_ascii_hexdigit()), "{name}");
    // Whoever the servers run as owns it, and nobody else can enter it.
    let owner = meta.uid();
    let user = pglb_cluster::PgUser::detect().expect("user").uid();
    assert_eq!(Some(owner), user);
}
