//! The running pglb's side of an upgrade: start the new binary, hand it the
//! sockets and the state, step aside — or, on any failure, keep serving.

use std::future::Future;
use std::os::fd::AsFd;
use std::process::Stdio;
use std::time::Duration;

use pglb_admin::UpgradeRequest;
use pglb_control::Command as Topology;
use serde_json::json;
use tokio::net::{UnixListener, UnixStream};
use tokio::process::Child;
use tokio::sync::oneshot;

use super::channel::Channel;
use super::{SocketDir, CONNECT_WITHIN, SOCKET_ENV, STEP_WITHIN};
use crate::run::Server;
use crate::signals::Signals;
use crate::systemd::Notifier;

/// How an upgrade ended for the old process.
pub enum Outcome {
    /// The new process (this pid) accepts now; this one retires, hearing
    /// admin states on `channel` meanwhile.
    Done { pid: u32, channel: Channel },
    /// This process keeps serving; why the upgrade failed.
    Failed(String),
    /// A stop signal came during the upgrade (the child was stopped).
    Stopped,
}

/// Why the steps stopped.
enum Abort {
    Failed(String),
    Stopped,
}

/// Undoes what the steps did to this process if they do not all succeed.
#[derive(Default)]
struct Undo {
    gate_closed: bool,
    state_handed: bool,
}

/// One upgrade (SIGUSR2, or `request` from `POST /upgrade`, which is
/// answered with the outcome).
pub async fn upgrade(
    server: &Server,
    request: Option<UpgradeRequest>,
    signals: &mut Signals,
    notifier: Notifier,
) -> Outcome {
    let outcome = attempt(server, signals, notifier).await;
    let answer = match &outcome {
        Outcome::Done { pid, .. } => Ok(*pid),
        Outcome::Failed(why) => {
            tracing::error!("upgrade failed: {why}; this pglb keeps serving");
            Err(why.clone())
        }
        Outcome::Stopped => Err("a stop signal came during the upgrade".to_owned()),
    };
    if let Some(request) = request {
        let _ = request.send(answer);
    }
    outcome
}

async fn attempt(server: &Server, signals: &mut Signals, notifier: Notifier) -> Outcome {
    let exe = match &server.launch.exe {
        Ok(exe) => exe.clone(),
        Err(why) => return Outcome::Failed(why.clone()),
    };
    if let Err(why) = check_config(&exe, &server.path).await {
        return Outcome::Failed(why);
    }
    let dir = match SocketDir::make() {
        Ok(dir) => dir,
        Err(e) => return Outcome::Failed(format!("cannot make a private folder for the hand-over socket: {e}")),
    };
    let path = dir.socket();
    let _ = std::fs::remove_file(&path);
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            return Outcome::Failed(format!(
                "cannot create the hand-over socket {} ({e}); under systemd the unit needs RuntimeDirectory=pglb",
                path.display()
            ))
        }
    };

    let mut cmd = tokio::process::Command::new(&exe);
    cmd.args(&server.launch.args)
        .env(SOCKET_ENV, &path)
        // The watchdog is the new process's once it is the main one.
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null());
    let mut child = match spawn_when_written(&mut cmd).await {
        Ok(child) => child,
        Err(e) => return Outcome::Failed(format!("cannot start {}: {e}", exe.display())),
    };
    let pid = child.id().unwrap_or_default();
    tracing::info!(pid, binary = %exe.display(), "upgrade: started the new pglb; it checks its config and its backends before it takes over");
    let mut undo = Undo::default();
    let abort = match steps(server, &listener, &mut child, pid, signals, notifier, &mut undo).await {
        Ok(channel) => return Outcome::Done { pid, channel },
        Err(abort) => abort,
    };
    // The child goes first: had it begun accepting, both processes would
    // accept for a moment and its clients would be cut when it is killed.
    let _ = child.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    if undo.gate_closed {
        server.accepting.send_replace(true);
    }
    if undo.state_handed {
        for cluster in &server.clusters {
            let _ = cluster.topology.commands.send(Topology::KeepSaving).await;
        }
    }
    match abort {
        Abort::Failed(why) => Outcome::Failed(why),
        Abort::Stopped => Outcome::Stopped,
    }
}

async fn steps(
    server: &Server,
    listener: &UnixListener,
    child: &mut Child,
    pid: u32,
    signals: &mut Signals,
    notifier: Notifier,
    undo: &mut Undo,
) -> Result<Channel, Abort> {
    let mut step = Step { child, pid, signals };
    let stream = step.run("connect to the hand-over socket", CONNECT_WITHIN, accept_from(listener, pid)).await?;
    let mut channel = Channel::new(stream);

    let state = saved(server, false).await.map_err(Abort::Failed)?;
    let mut fds = vec![server.admin_socket.1.as_fd()];
    fds.extend(server.listeners.iter().map(|l| l.fd.as_fd()));
    let hello = json!({
        "type": "hello",
        "version": super::channel::VERSION,
        "pid": std::process::id(),
        "admin": server.admin_socket.0.to_string(),
        "listeners": server.listeners.iter().map(|l| l.addr.to_string()).collect::<Vec<_>>(),
        "state": pglb_control::state_file::render(&state),
    });
    step.run("take the sockets", STEP_WITHIN, channel.send(&hello, &fds)).await?;
    let ready_within = server.first_checks_within() + Duration::from_secs(30);
    let (ready, _) = step.run("complete its first checks", ready_within, channel.expect("ready")).await?;
    super::channel::peer_version(&ready, "new pglb").map_err(Abort::Failed)?;

    // From here until `accepting`, clients wait in the backlog.
    server.accepting.send_replace(false);
    undo.gate_closed = true;
    let state = saved(server, true).await.map_err(Abort::Failed)?;
    undo.state_handed = true;
    let go = json!({ "type": "go", "state": pglb_control::state_file::render(&state) });
    step.run("take the final state", STEP_WITHIN, channel.send(&go, &[])).await?;
    step.run("start accepting", STEP_WITHIN, channel.expect("accepting")).await?;

    notifier.hand_over(pid).await;
    if let Err(e) = channel.send(&json!({ "type": "main" }), &[]).await {
        tracing::warn!(pid, error = %e, "upgrade: the new pglb accepts, but did not take the last message");
    }
    Ok(channel)
}

/// One step, raced against the child's exit, a deadline and a stop signal.
struct Step<'a> {
    child: &'a mut Child,
    pid: u32,
    signals: &'a mut Signals,
}

impl Step<'_> {
    async fn run<T>(
        &mut self,
        what: &str,
        within: Duration,
        step: impl Future<Output = std::io::Result<T>>,
    ) -> Result<T, Abort> {
        let pid = self.pid;
        tokio::select! {
            done = step => done.map_err(|e| Abort::Failed(format!("the new pglb (pid {pid}) did not {what}: {e}"))),
            status = self.child.wait() => {
                let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                Err(Abort::Failed(format!(
                    "the new pglb (pid {pid}) exited ({status}) before it could {what}; its own messages are in pglb's log"
                )))
            }
            _ = tokio::time::sleep(within) => Err(Abort::Failed(format!("the new pglb (pid {pid}) did not {what} within {within:?}"))),
            _ = self.signals.stop() => Err(Abort::Stopped),
        }
    }
}

/// The new binary's `pglb check` of the config file: the most common reason
/// an upgrade fails (a config the new version rejects) is told in full, not
/// left to the log.
async fn check_config(exe: &std::path::Path, config: &std::path::Path) -> Result<(), String> {
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("check")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let run = async { spawn_when_written(&mut cmd).await?.wait_with_output().await };
    let out = match tokio::time::timeout(Duration::from_secs(30), run).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(format!("cannot run {} check: {e}", exe.display())),
        Err(_) => {
            return Err(format!("{} check --config {} did not finish within 30s", exe.display(), config.display()))
        }
    };
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "`{} check --config {}` failed ({}); nothing changed:\n{}",
        exe.display(),
        config.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim_end()
    ))
}

/// Spawns `cmd`, waiting out "text file busy": the binary was just written
/// (a package manager renaming it into place, or any process that forked
/// while holding it open for writing) and the writer's descriptor goes away
/// within moments.
async fn spawn_when_written(cmd: &mut tokio::process::Command) -> std::io::Result<tokio::process::Child> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        match cmd.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

/// The first connection from `pid` (connections from other processes are
/// closed unread: only our child may take the sockets).
async fn accept_from(listener: &UnixListener, pid: u32) -> std::io::Result<UnixStream> {
    loop {
        let (stream, _) = listener.accept().await?;
        let peer = stream.peer_cred().ok().and_then(|c| c.pid());
        if peer.and_then(|p| u32::try_from(p).ok()) == Some(pid) {
            return Ok(stream);
        }
        tracing::warn!(
            ?peer,
            expected = pid,
            "upgrade: a connection to the hand-over socket from another process, closed"
        );
    }
}

/// Every cluster's safety state now; with `hand_over`, this process stops
/// writing the state file.
async fn saved(server: &Server, hand_over: bool) -> Result<pglb_control::state_file::States, String> {
    let gone = || "the topology task has stopped".to_owned();
    let mut states = pglb_control::state_file::States::new();
    for cluster in &server.clusters {
        let (reply, answer) = oneshot::channel();
        cluster.topology.commands.send(Topology::Saved { hand_over, reply }).await.map_err(|_| gone())?;
        states.insert(cluster.config.name.clone(), answer.await.map_err(|_| gone())?);
    }
    Ok(states)
}
