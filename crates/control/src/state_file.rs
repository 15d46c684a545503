//! The state file: pglb's safety state (`pglb_routing::SavedState`) as JSON,
//! written atomically (a temp file of this process's own beside it, created
//! new with mode 0600, fsync, rename, fsync of the folder) by a thread of its
//! own whenever the state changes, under a lock on `.<name>.lock` so that two
//! processes (the old and the new one of an upgrade) never write at once,
//! and read once at start. A missing file is a first start; a corrupt one is reported and
//! ignored (and replaced at the next change), never fatal.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use pglb_routing::{AdminState, Fence, FenceKind, SavedAdmin, SavedFence, SavedLagging, SavedNotFollowing, SavedState};
use serde_json::{json, Value};

/// Reads the state file: `Ok(None)` if there is none yet.
pub fn read(path: &Path) -> Result<Option<SavedState>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read: {e}")),
    };
    parse(&text).map(Some)
}

/// A state from its JSON text (the file's, or one handed over at an upgrade).
pub fn parse(text: &str) -> Result<SavedState, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    if v["version"] != 1 {
        return Err(format!("unknown version {}", v["version"]));
    }
    let text_of = |v: &Value, key: &str| v[key].as_str().map(str::to_owned).ok_or_else(|| format!("missing `{key}`"));
    let mut saved = SavedState {
        system_id: match &v["system_identifier"] {
            Value::Null => None,
            id => Some(id.as_str().and_then(|s| s.parse().ok()).ok_or("bad `system_identifier`")?),
        },
        max_timeline: v["max_timeline"].as_u64().and_then(|t| u32::try_from(t).ok()).ok_or("bad `max_timeline`")?,
        ..SavedState::default()
    };
    for f in v["fences"].as_array().ok_or("missing `fences`")? {
        let kind = FenceKind::parse(&text_of(f, "kind")?).ok_or("unknown fence `kind`")?;
        let fence = Fence { kind, reason: text_of(f, "reason")? };
        saved.fences.push(SavedFence { backend: text_of(f, "backend")?, address: text_of(f, "address")?, fence });
    }
    for a in v["admin"].as_array().ok_or("missing `admin`")? {
        let state = AdminState::parse(&text_of(a, "state")?).ok_or("unknown admin `state`")?;
        saved.admin.push(SavedAdmin { backend: text_of(a, "backend")?, address: text_of(a, "address")?, state });
    }
    // Lag evidence: absent in files of earlier releases.
    for g in v["lagging"].as_array().into_iter().flatten() {
        let (listener, backend, address) = (text_of(g, "listener")?, text_of(g, "backend")?, text_of(g, "address")?);
        saved.lagging.push(SavedLagging { listener, backend, address });
    }
    for f in v["not_following"].as_array().into_iter().flatten() {
        let ms = f["since_unix_ms"].as_u64().ok_or("bad `since_unix_ms`")?;
        let since = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms);
        saved.not_following.push(SavedNotFollowing {
            backend: text_of(f, "backend")?,
            address: text_of(f, "address")?,
            since,
        });
    }
    Ok(saved)
}

/// The file's text for `state`.
pub fn render(state: &SavedState) -> String {
    let fences: Vec<Value> = state
        .fences
        .iter()
        .map(|f| json!({"backend": f.backend, "address": f.address, "kind": f.fence.kind.as_str(), "reason": f.fence.reason}))
        .collect();
    let admin: Vec<Value> = state
        .admin
        .iter()
        .map(|a| json!({"backend": a.backend, "address": a.address, "state": a.state.as_str()}))
        .collect();
    let lagging: Vec<Value> = state
        .lagging
        .iter()
        .map(|g| json!({"listener": g.listener, "backend": g.backend, "address": g.address}))
        .collect();
    let not_following: Vec<Value> = state
        .not_following
        .iter()
        .map(|f| {
            let ms =
                f.since.duration_since(std::time::SystemTime::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or_default();
            json!({"backend": f.backend, "address": f.address, "since_unix_ms": u64::try_from(ms).unwrap_or(u64::MAX)})
        })
        .collect();
    // Still version 1: the lag fields are additions an earlier release
    // ignores, so a downgrade keeps reading the file.
    let doc = json!({
        "version": 1,
        "system_identifier": state.system_id.map(|id| id.to_string()),
        "max_timeline": state.max_timeline,
        "fences": fences,
        "admin": admin,
        "lagging": lagging,
        "not_following": not_following,
    });
    serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
}

/// Writes `state` to `path` so that a crash leaves the old or the new file,
/// and another process writing it meanwhile waits for this write to end.
pub fn write(path: &Path, state: &SavedState) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let folder = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("state");
    // Mode 0600, and a file planted there as a symlink is not followed.
    let private = |o: &mut std::fs::OpenOptions| o.write(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).clone();
    let lock = private(std::fs::OpenOptions::new().create(true)).open(folder.join(format!(".{name}.lock")))?;
    lock.lock()?;
    let tmp = folder.join(format!(".{name}.{}.tmp", std::process::id()));
    // Left by an earlier process with this pid that died mid-write.
    let _ = std::fs::remove_file(&tmp);
    let mut file = private(std::fs::OpenOptions::new().create_new(true)).open(&tmp)?;
    file.write_all(render(state).as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(folder)?.sync_all()
}

/// A thread that writes the newest state it was sent (older pending ones
/// are skipped), so the topology task never waits on a disk.
pub fn spawn_writer(path: PathBuf) -> mpsc::Sender<SavedState> {
    let (tx, rx) = mpsc::channel::<SavedState>();
    let spawned = std::thread::Builder::new().name("pglb-state-file".into()).spawn(move || {
        while let Ok(mut state) = rx.recv() {
            while let Ok(newer) = rx.try_recv() {
                state = newer;
            }
            match write(&path, &state) {
                Ok(()) => tracing::debug!(path = %path.display(), "state file written"),
                Err(err) => tracing::error!(
                    path = %path.display(),
                    error = %err,
                    "cannot write the state file: fences and admin states will not survive a restart until it is writable"
                ),
            }
        }
    });
    if let Err(err) = spawned {
        tracing::error!(error = %err, "cannot start the state file writer");
    }
    tx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_survives_the_round_trip_and_garbage_is_an_error() {
        let state = SavedState {
            system_id: Some(7_000_000_000_000_000_001),
            max_timeline: 3,
            fences: vec![SavedFence {
                backend: "pg0".into(),
                address: "10.0.0.1:5432".into(),
                fence: Fence { kind: FenceKind::Timeline, reason: "timeline 2 < 3".into() },
            }],
            admin: vec![SavedAdmin {
                backend: "pg1".into(),
                address: "10.0.0.2:5432".into(),
                state: AdminState::Drained,
            }],
            lagging: vec![SavedLagging {
                listener: "ro".into(),
                backend: "pg2".into(),
                address: "10.0.0.3:5432".into(),
            }],
            not_following: vec![SavedNotFollowing {
                backend: "pg2".into(),
                address: "10.0.0.3:5432".into(),
                since: std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_796_000_000_123),
            }],
        };
        // A file of an earlier release (no lag fields) still reads.
        let earlier = r#"{"version": 1, "system_identifier": "7", "max_timeline": 2, "fences": [], "admin": []}"#;
        let read_earlier = parse(earlier).expect("an earlier release's file");
        assert!(read_earlier.lagging.is_empty() && read_earlier.not_following.is_empty());
        let dir = std::env::temp_dir().join(format!("pglb-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("state.json");
        assert_eq!(read(&path), Ok(None), "no file: a first start");
        write(&path, &state).expect("write");
        assert_eq!(read(&path), Ok(Some(state)));
        std::fs::write(&path, "{\"version\": 1, \"fences\": [").expect("write garbage");
        assert!(read(&path).expect_err("corrupt").contains("not valid JSON"));
        std::fs::write(&path, "{\"version\": 2}").expect("write");
        assert!(read(&path).expect_err("unknown").contains("version"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Two writers at once (the old and the new process of an upgrade):
    /// whatever a reader finds is one whole state, never a mix; the file is
    /// the owner's only.
    #[test]
    fn two_writers_at_once_never_tear_the_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("pglb-state-race-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("state.json");
        let state = |fences: usize, timeline: u32| SavedState {
            system_id: Some(7),
            max_timeline: timeline,
            fences: (0..fences)
                .map(|i| SavedFence {
                    backend: format!("pg{i}"),
                    address: format!("10.0.0.{i}:5432"),
                    fence: Fence { kind: FenceKind::Timeline, reason: "x".repeat(2000) },
                })
                .collect(),
            ..SavedState::default()
        };
        write(&path, &state(1, 1)).expect("first write");
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            for (fences, timeline) in [(1, 1), (40, 2)] {
                let (path, stop) = (&path, &stop);
                s.spawn(move || {
                    for _ in 0..300 {
                        write(path, &state(fences, timeline)).expect("write");
                    }
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                });
            }
            let mut reads = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let got = read(&path).expect("a whole state").expect("a state");
                assert!(matches!((got.fences.len(), got.max_timeline), (1, 1) | (40, 2)), "a mix: {got:?}");
                reads += 1;
            }
            assert!(reads > 10, "{reads} reads");
        });
        let mode = std::fs::metadata(&path).expect("metadata").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the state file is the owner's only: {mode:o}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
