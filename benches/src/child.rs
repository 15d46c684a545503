//! Child processes: long-running ones owned by a guard that kills them on
//! drop, short ones run to completion within a deadline; and scratch dirs.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A background process (pglb, HAProxy) with its stderr in a log file;
/// killed and reaped on drop.
pub struct Guard {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Guard {
    /// Spawns `cmd` with stdin/stdout closed and stderr to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Self> {
        let file = fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", cmd.get_program()))?;
        Ok(Self { name: name.to_owned(), child, log: log.to_owned() })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the log's tail if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!("{} exited ({status}); its log ends:\n{}", self.name, self.log_tail()),
            Err(e) => bail!("cannot wait for {}: {e}", self.name),
        }
    }

    /// The last 20 lines of stderr.
    /// The last lines of the log that explain something: per-connection
    /// lines (one per session) are left out, so a reason line is not
    /// drowned by the sessions it closed.
    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let telling: Vec<&str> =
            log.lines().filter(|l| !l.contains("pglb::connection") && !l.contains("closing session")).collect();
        tail(&telling.join("\n"), 20)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a finished command produced.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to completion, killing it after `timeout`. With `keep_stdout`
/// false, stdout goes to /dev/null (for bulk output).
pub fn run_within(cmd: &mut Command, what: &str, timeout: Duration, keep_stdout: bool) -> Result<Finished> {
    let stdout = if keep_stdout { Stdio::piped() } else { Stdio::null() };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {what} ({:?})", cmd.get_program()))?;
    let out = child.stdout.take().map(drain);
    let err = child.stderr.take().map(drain);
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().with_context(|| format!("cannot wait for {what}"))? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {}s and was killed", timeout.as_secs());
        }
        thread::sleep(Duration::from_millis(20));
    };
    let join = |h: Option<thread::JoinHandle<String>>| h.and_then(|h| h.join().ok()).unwrap_or_default();
    Ok(Finished { status, stdout: join(out), stderr: join(err) })
}

/// Like [`run_within`], but a non-zero exit is an error that quotes stderr.
pub fn run_ok(cmd: &mut Command, what: &str, timeout: Duration, keep_stdout: bool) -> Result<Finished> {
    let done = run_within(cmd, what, timeout, keep_stdout)?;
    if !done.status.success() {
        bail!("{what} failed ({}):\n{}", done.status, tail(&done.stderr, 15));
    }
    Ok(done)
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A temp dir for one process's config and log; removed on drop.
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Result<Self> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("pglb-bench-{tag}-{}-{n}", std::process::id()));
        fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Polls `f` every `every` until it returns `Ok(Ok(v))`. `Ok(Err(state))`
/// means "not yet" (quoted if time runs out); `Err` stops at once.
pub fn poll<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Result<Result<T, String>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match f()? {
            Ok(v) => return Ok(v),
            Err(state) => state,
        };
        if Instant::now() > deadline {
            bail!("timed out after {}s waiting for {what} (last: {last})", timeout.as_secs());
        }
        thread::sleep(every);
    }
}
