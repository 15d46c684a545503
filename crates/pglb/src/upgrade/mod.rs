//! Binary upgrade without refusing a connection (`pglb upgrade`, SIGUSR2).
//!
//! The running pglb (the *old* process) starts its own binary again — the
//! path it was invoked as, so a package that replaced the file, or a
//! symlink re-pointed, starts the new version — with the same arguments, as its child: under systemd that
//! keeps the new process in the unit's cgroup, where the old one (the main
//! process) may name it the new main process. Then, over a unix socket in
//! `$RUNTIME_DIRECTORY` (or the temp folder), only from that child's pid:
//!
//! 1. old → new `hello`: the listening sockets and the admin socket
//!    (`SCM_RIGHTS`) and the old process's safety state (fences, highest
//!    timeline, admin states). The new one has loaded and checked its own
//!    config already (a bad one makes it exit, which the old one sees);
//!    it binds what the old one did not have, drops what its config no
//!    longer names, and starts its checks with that state, accepting nothing.
//! 2. new → old `ready`, once every backend's first check completed.
//! 3. The old process stops accepting (the sockets stay open: clients wait
//!    in the kernel's backlog, nobody is refused), stops writing the state
//!    file, and sends `go` with its final state.
//! 4. new: applies that state, owns the state file, opens its accept loops,
//!    answers `accepting`.
//! 5. old: under systemd, `MAINPID=<new>` and a `BARRIER=1`, so systemd has
//!    taken the new main process before anything else happens; then `main`.
//!    From then on the old process sends systemd nothing (no STOPPING=1):
//!    it closes its copies of the sockets, serves its sessions and its held
//!    and queued clients for up to `shutdown_timeout`, and exits 0.
//!    Meanwhile the channel stays open: admin states set in the new process
//!    apply to the old one's sessions too ([`overlap`]).
//!
//! Any failure before step 4 completes — the binary cannot start, exits,
//! misbehaves or is too slow, a stop signal arrives — kills the child and
//! leaves the old process accepting as before, saying why.

mod channel;
pub mod new;
pub mod old;
mod overlap;

pub use channel::Channel;
pub use overlap::apply as overlap_apply;

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

/// How the new process finds the hand-over socket.
pub const SOCKET_ENV: &str = "PGLB_UPGRADE_SOCKET";

/// How long the new process has to connect after it was started.
const CONNECT_WITHIN: Duration = Duration::from_secs(15);
/// How long it has to answer each step after `ready`.
const STEP_WITHIN: Duration = Duration::from_secs(10);

/// How this process was started, to start it again.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The path pglb was invoked as, made absolute at start (see
    /// [`invoked_as`]).
    pub exe: Result<PathBuf, String>,
    pub args: Vec<OsString>,
}

impl Launch {
    pub fn current() -> Self {
        let mut args = std::env::args_os();
        let argv0 = args.next();
        let cwd = std::env::current_dir().ok();
        let path = std::env::var_os("PATH");
        Self { exe: invoked_as(argv0.as_deref(), cwd.as_deref(), path.as_deref()), args: args.collect() }
    }

    /// A process that must not start itself again (`why` is the answer).
    #[cfg(feature = "demo")]
    pub fn refused(why: &str) -> Self {
        Self { exe: Err(why.to_owned()), args: Vec::new() }
    }
}

/// The path pglb was invoked as (`argv[0]`; a bare name is looked up in
/// `PATH`, as the shell did), made absolute against the folder it started
/// in, symlinks left as they are: an install where `/usr/local/bin/pglb`
/// links to `/opt/pglb/1.2/pglb` upgrades to whatever the link names when
/// `pglb upgrade` runs. `/proc/self/exe` would name 1.2 for ever. Used only
/// while it names the very binary that runs (same file at start); else, or
/// when argv[0] says nothing useful, `/proc/self/exe`.
fn invoked_as(
    argv0: Option<&std::ffi::OsStr>,
    cwd: Option<&std::path::Path>,
    path: Option<&std::ffi::OsStr>,
) -> Result<PathBuf, String> {
    use std::os::unix::fs::MetadataExt;
    let running = std::env::current_exe().map_err(|e| format!("cannot tell which binary this pglb runs: {e}"))?;
    let same_file = |candidate: &std::path::Path| match (std::fs::metadata(candidate), std::fs::metadata(&running)) {
        (Ok(a), Ok(b)) => a.is_file() && a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    };
    let invoked = argv0.map(PathBuf::from).filter(|p| !p.as_os_str().is_empty());
    let candidates: Vec<PathBuf> = match invoked {
        Some(p) if p.is_absolute() => vec![p],
        Some(p) if p.components().count() > 1 || p.to_string_lossy().contains('/') => {
            cwd.map(|cwd| cwd.join(&p)).into_iter().collect()
        }
        Some(name) => std::env::split_paths(path.unwrap_or_default())
            .filter(|dir| dir.is_absolute())
            .map(|dir| dir.join(&name))
            .collect(),
        None => Vec::new(),
    };
    Ok(candidates.into_iter().find(|c| same_file(c)).unwrap_or(running))
}

/// Where the hand-over socket goes: systemd's `RuntimeDirectory=`, else a
/// new folder of its own in the temp folder (mode 0700, made afresh: never
/// a name someone could have planted), removed with the socket.
struct SocketDir {
    path: PathBuf,
    /// Made by us (not the unit's): remove it afterwards.
    ours: bool,
}

impl SocketDir {
    fn make() -> std::io::Result<Self> {
        let runtime = std::env::var_os("RUNTIME_DIRECTORY")
            .map(|dirs| {
                // Several directories are separated by ':'; the first is ours.
                let first = dirs.to_string_lossy().split(':').next().unwrap_or_default().to_owned();
                PathBuf::from(first)
            })
            .filter(|p| !p.as_os_str().is_empty());
        if let Some(path) = runtime {
            return Ok(Self { path, ours: false });
        }
        use std::os::unix::fs::DirBuilderExt;
        let mut last = None;
        for _ in 0..16 {
            let name = format!("pglb-upgrade-{}-{:016x}", std::process::id(), fastrand::u64(..));
            let path = std::env::temp_dir().join(name);
            // `create` fails on anything already there, a symlink included.
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(Self { path, ours: true }),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no free name")))
    }

    fn socket(&self) -> PathBuf {
        self.path.join(format!("pglb-upgrade-{}.sock", std::process::id()))
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        if self.ours {
            let _ = std::fs::remove_dir(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_invoked_path_is_kept_through_a_symlink_and_made_absolute() {
        let dir = std::env::temp_dir().join(format!("pglb-invoked-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let running = std::env::current_exe().expect("exe");
        let link = dir.join("pglb");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&running, &link).expect("symlink");
        // Absolute, relative (with a slash), and a bare name on PATH: the link.
        assert_eq!(invoked_as(Some(link.as_os_str()), None, None), Ok(link.clone()));
        assert_eq!(invoked_as(Some("./pglb".as_ref()), Some(&dir), None), Ok(dir.join("./pglb")));
        let path = std::env::join_paths(["/nonexistent".as_ref(), dir.as_path()]).expect("PATH");
        assert_eq!(invoked_as(Some("pglb".as_ref()), None, Some(&path)), Ok(link.clone()));
        // A name that is not this binary, or none: /proc/self/exe.
        assert_eq!(invoked_as(Some("/bin/sh".as_ref()), None, None), Ok(running.clone()));
        assert_eq!(invoked_as(None, None, None), Ok(running.clone()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
