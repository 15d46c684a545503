//! pglb under systemd, with a datagram socket standing in for the service
//! manager (`NOTIFY_SOCKET`): READY=1 only once every backend's first check
//! has completed (also with a dead and a silent backend), RELOADING=1 and
//! READY=1 around a reload, STOPPING=1 on SIGTERM, watchdog pings that
//! stop when either runtime is blocked, and an upgrade that hands systemd
//! the new main process (MAINPID=) before the old one exits.

use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::net::TcpListener;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pglb_tests::{shared_cluster, wait_until, Pglb, Yaml};
use rustix::net::{recvmsg, sockopt, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};

/// One datagram: who sent it (`SO_PASSCRED`), whether that process was
/// still running when it arrived, and the text.
#[derive(Debug, Clone)]
struct Note {
    pid: u32,
    sender_alive: bool,
    text: String,
}

/// The service manager's end: every datagram pglb sends, in order.
struct Manager {
    path: PathBuf,
    seen: Arc<Mutex<Vec<Note>>>,
}

impl Manager {
    fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("pglb-notify-{tag}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        sockopt::set_socket_passcred(&socket, true).expect("SO_PASSCRED");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            loop {
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmCredentials(1), ScmRights(8))];
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let Ok(got) = recvmsg(&socket, &mut [IoSliceMut::new(&mut buf)], &mut control, RecvFlags::CMSG_CLOEXEC)
                else {
                    return;
                };
                let mut pid = 0;
                for message in control.drain() {
                    match message {
                        RecvAncillaryMessage::ScmCredentials(cred) => {
                            pid = cred.pid.as_raw_nonzero().get().unsigned_abs();
                        }
                        // A BARRIER=1's pipe: closing it is systemd's answer.
                        RecvAncillaryMessage::ScmRights(fds) => drop(fds.collect::<Vec<_>>()),
                        _ => {}
                    }
                }
                let text = String::from_utf8_lossy(&buf[..got.bytes]).into_owned();
                let note = Note { pid, sender_alive: pglb_tests::proc::running(pid), text };
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(note);
            }
        });
        Self { path, seen }
    }

    fn notes(&self) -> Vec<Note> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn env(&self) -> (&'static str, &str) {
        ("NOTIFY_SOCKET", self.path.to_str().expect("utf-8 path"))
    }

    fn messages(&self) -> Vec<String> {
        self.notes().into_iter().map(|n| n.text).collect()
    }

    /// Waits for a message with line `line`; returns its index.
    fn wait_for(&self, line: &str, from: usize) -> usize {
        self.wait_for_line(&format!("`{line}`"), from, |l| l == line)
    }

    /// Waits for a message with a line starting with `prefix`; returns its index.
    fn wait_for_prefix(&self, prefix: &str, from: usize) -> usize {
        self.wait_for_line(&format!("`{prefix}...`"), from, |l| l.starts_with(prefix))
    }

    /// Waits for a message from index `from` on with a line that `fits`.
    fn wait_for_line(&self, what: &str, from: usize, fits: impl Fn(&str) -> bool) -> usize {
        wait_until(&format!("{what} from pglb"), Duration::from_secs(60), || {
            let all = self.messages();
            all.iter()
                .enumerate()
                .skip(from)
                .find(|(_, m)| m.lines().any(&fits))
                .map(|(i, _)| i)
                .ok_or_else(|| format!("{all:?}"))
        })
    }

    fn count(&self, line: &str) -> usize {
        self.messages().iter().filter(|m| m.lines().any(|l| l == line)).count()
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[test]
fn ready_waits_for_every_first_check_even_a_dead_and_a_silent_backend() {
    let cluster = shared_cluster();
    let manager = Manager::new("ready");
    // A backend that accepts and never answers: its first check completes
    // only at health.timeout. And one that refuses.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind the silent backend");
    let dead = pglb_cluster::free_port().expect("free port");
    let mut yaml = Yaml::for_cluster(&cluster)
        .health("interval: 2s\n  timeout: 2s\n  rise: 1\n  fall: 2\n  user: pglb_check\n  sslmode: disable")
        .listener("rw", "role: primary");
    yaml.backends.push(("silent".into(), format!("address: {}", silent.local_addr().expect("addr"))));
    yaml.backends.push(("dead".into(), format!("address: 127.0.0.1:{dead}")));
    let started = Instant::now();
    let pglb = Pglb::start_with(&yaml, &[manager.env()]);

    let ready = manager.wait_for("READY=1", 0);
    let status = pglb.status();
    for b in status["backends"].as_array().expect("backends") {
        assert_eq!(b["checked"], true, "READY=1 before the first check of {} completed: {b}", b["name"]);
    }
    assert!(started.elapsed() >= Duration::from_secs(2), "READY=1 came before the silent backend's 2s timeout");
    assert_eq!(ready, 0, "READY=1 is the first message: {:?}", manager.messages());
    let message = &manager.messages()[ready];
    assert!(message.contains("STATUS=primary pg0; 2/2 replicas healthy; 0 sessions"), "{message}");
    // Listeners were bound before READY: a client gets in at once.
    pglb_tests::psql::psql(pglb.port("rw"), "SELECT 1", &[]).expect("rw serves once ready");
    drop(silent);
}

#[test]
fn reload_is_bracketed_by_reloading_and_ready_and_sigterm_says_stopping() {
    let cluster = shared_cluster();
    let manager = Manager::new("reload");
    let yaml = Yaml::for_cluster(&cluster).top("shutdown_timeout: 3s").listener("rw", "role: primary");
    let mut pglb = Pglb::start_with(&yaml, &[manager.env()]);
    let ready = manager.wait_for("READY=1", 0);

    pglb.signal("HUP");
    let reloading = manager.wait_for("RELOADING=1", ready + 1);
    let message = &manager.messages()[reloading];
    let usec = message.lines().find_map(|l| l.strip_prefix("MONOTONIC_USEC="));
    assert!(
        usec.is_some_and(|u| u.parse::<u64>().is_ok_and(|u| u > 0)),
        "RELOADING=1 without MONOTONIC_USEC: {message}"
    );
    let ready_again = manager.wait_for("READY=1", reloading + 1);
    assert!(ready_again > reloading);

    // A session keeps the drain going; systemd hears STOPPING=1 and is asked
    // for more time while it lasts.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let session = runtime.block_on(pglb_tests::pg::connect(pglb.port("rw")));
    pglb.signal("TERM");
    let stopping = manager.wait_for("STOPPING=1", ready_again + 1);
    let extend = manager.wait_for("EXTEND_TIMEOUT_USEC=15000000", stopping);
    assert!(extend >= stopping, "{:?}", manager.messages());
    assert_eq!(pglb.wait_exit(Duration::from_secs(20)), Some(0));
    assert_eq!(manager.count("READY=1"), 2, "{:?}", manager.messages());
    drop(session);
}

/// pglb with a 1 s watchdog whose `runtime` is blocked 2 s after start.
fn watchdog_stops_when_blocked(runtime: &str) {
    let cluster = shared_cluster();
    let manager = Manager::new(runtime);
    let yaml = Yaml::for_cluster(&cluster).listener("rw", "role: primary");
    let stall = format!("{runtime}@2s");
    let pglb = Pglb::start_with(
        &yaml,
        &[manager.env(), ("WATCHDOG_USEC", "1000000"), ("PGLB_TEST_STALL_RUNTIME", stall.as_str())],
    );
    // Pings every 0.5 s while both runtimes run.
    wait_until("three watchdog pings", Duration::from_secs(10), || {
        let n = manager.count("WATCHDOG=1");
        if n >= 3 {
            Ok(())
        } else {
            Err(format!("{n}"))
        }
    });
    wait_until("pglb to say it withholds the pings", Duration::from_secs(15), || {
        let log = pglb.log();
        if log.contains("watchdog pings withheld") {
            Ok(())
        } else {
            Err(log)
        }
    });
    let before = manager.count("WATCHDOG=1");
    // Three ping intervals without a ping: systemd would restart pglb.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(manager.count("WATCHDOG=1"), before, "pings went on with the {runtime} runtime blocked");
    let log = pglb.log();
    let name = if runtime == "data" { "the data path runtime" } else { "the health check runtime" };
    assert!(log.contains(name), "the log names the blocked runtime:\n{log}");
}

#[test]
fn watchdog_pings_stop_when_the_health_runtime_is_blocked() {
    watchdog_stops_when_blocked("health");
}

#[test]
fn watchdog_pings_stop_when_the_data_runtime_is_blocked() {
    watchdog_stops_when_blocked("data");
}

#[test]
fn an_upgrade_makes_the_new_process_main_before_the_old_one_exits() {
    let cluster = shared_cluster();
    let manager = Manager::new("upgrade");
    // A backend that never answers keeps the new process's first checks
    // going for health.timeout (2 s): long enough for watchdog pings (every
    // 0.5 s) and a STATUS= that systemd would refuse from a process that is
    // not yet the main one.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind the silent backend");
    let mut yaml = Yaml::for_cluster(&cluster)
        .health("interval: 2s\n  timeout: 2s\n  rise: 1\n  fall: 2\n  user: pglb_check\n  sslmode: disable")
        .top("shutdown_timeout: 3s")
        .listener("rw", "role: primary");
    yaml.backends.push(("silent".into(), format!("address: {}", silent.local_addr().expect("addr"))));
    let mut old = Pglb::start_with(&yaml, &[manager.env(), ("WATCHDOG_USEC", "1000000")]);
    let ready = manager.wait_for("READY=1", 0);
    // A session the old process finishes after the hand-over.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let session = runtime.block_on(pglb_tests::pg::connect(old.port("rw")));

    let (code, out, err) = pglb_tests::pglb::upgrade(&old.config);
    let new_pid = pglb_tests::pglb::upgraded_pid(&out);
    let _stop_new = new_pid.map(pglb_tests::proc::KillOnDrop);
    assert_eq!(code, 0, "{out}{err}{}", old.log());
    let new_pid = new_pid.unwrap_or_else(|| panic!("no pid in `{out}`"));
    let handed = manager.wait_for_prefix("MAINPID=", ready + 1);
    let named = manager.messages()[handed].lines().find_map(|l| l.strip_prefix("MAINPID=")).map(str::to_owned);
    assert_eq!(named, Some(new_pid.to_string()), "MAINPID= names the new process");
    let ready_new = manager.wait_for("READY=1", handed + 1);
    drop(session);
    assert_eq!(old.wait_exit(Duration::from_secs(20)), Some(0), "{}", old.log());
    wait_until("watchdog pings from the new main process", Duration::from_secs(10), || {
        let pings = manager.notes().iter().filter(|n| n.pid == new_pid && n.text.trim_end() == "WATCHDOG=1").count();
        if pings >= 2 {
            Ok(())
        } else {
            Err(format!("{pings}"))
        }
    });
    drop(silent);

    let notes = manager.notes();
    let from = |pid: u32| notes.iter().enumerate().filter(move |(_, n)| n.pid == pid);
    let handed_note = &notes[handed];
    assert_eq!(handed_note.pid, old.pid(), "MAINPID= comes from the old (main) process: {notes:?}");
    assert!(handed_note.sender_alive, "MAINPID= arrived while the old process ran: {notes:?}");
    let barrier = from(old.pid()).find(|(i, n)| *i > handed && n.text.lines().any(|l| l == "BARRIER=1"));
    assert!(barrier.is_some(), "the old process waits for systemd to take MAINPID= (BARRIER=1): {notes:?}");
    assert!(from(new_pid).all(|(i, _)| i > handed), "the new process spoke before it was main: {notes:?}");
    assert_eq!(notes[ready_new].pid, new_pid, "READY=1 from the new main process: {notes:?}");
    // No gap in the watchdog: the old process feeds it with MAINPID= and
    // the new one with its READY=1, so no ping period spans the hand-over.
    let fed = |i: usize| notes[i].text.lines().any(|l| l == "WATCHDOG=1");
    assert!(fed(handed), "MAINPID= comes with WATCHDOG=1: {notes:?}");
    assert!(fed(ready_new), "the new process's READY=1 comes with WATCHDOG=1: {notes:?}");
    assert!(
        from(old.pid()).all(|(_, n)| !n.text.lines().any(|l| l == "STOPPING=1")),
        "the old process must not say STOPPING=1 (systemd would stop the service): {notes:?}"
    );
    assert!(
        from(old.pid()).all(|(i, n)| i <= handed || n.text.trim_end() == "BARRIER=1"),
        "the old process spoke after the hand-over: {notes:?}"
    );
}
