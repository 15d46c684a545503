//! The state file: pglb's safety state (`pglb_routing::SavedState`) as JSON,
//! written atomically (a temp file of this process's own beside it, created
//! new with mode 0600, fsync, rename, fsync of the folder) by a thread of its
//! own whenever the state changes, under a lock on `.<name>.lock` so that two
//! processes (the old and the new one of an upgrade) never write at once,
//! and read once at start. A missing file is a first start; a corrupt one is reported and
//! ignored (and replaced at the next change), never fatal.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pglb_config::DEFAULT_CLUSTER;
use pglb_routing::{AdminState, Fence, FenceKind, SavedAdmin, SavedFence, SavedLagging, SavedNotFollowing, SavedState};
use serde::{Deserialize, Serialize};

/// The safety state of every cluster, by cluster name.
pub type States = BTreeMap<String, SavedState>;

/// The newest format this release writes.
pub const VERSION: u64 = 2;

/// Any version: read first to pick the format.
#[derive(Deserialize)]
struct Versioned {
    version: serde_json::Value,
}

/// Version 1 (single-cluster releases): one cluster's state at the top
/// level. Still written while the config is the single-cluster form, so
/// that a downgrade keeps reading it.
#[derive(Serialize, Deserialize)]
struct FileV1 {
    version: u64,
    #[serde(flatten)]
    state: ClusterState,
}

/// Version 2: a state per cluster.
#[derive(Serialize, Deserialize)]
struct FileV2 {
    version: u64,
    clusters: BTreeMap<String, ClusterState>,
}

/// One cluster's state as written (both versions).
#[derive(Serialize, Deserialize)]
struct ClusterState {
    /// A string: system identifiers exceed what JSON numbers hold exactly.
    system_identifier: Option<String>,
    max_timeline: u32,
    fences: Vec<FenceEntry>,
    admin: Vec<AdminEntry>,
    /// Lag evidence: absent in files of earlier releases.
    #[serde(default)]
    lagging: Vec<LaggingEntry>,
    #[serde(default)]
    not_following: Vec<NotFollowingEntry>,
}

#[derive(Serialize, Deserialize)]
struct FenceEntry {
    backend: String,
    address: String,
    kind: String,
    reason: String,
}

#[derive(Serialize, Deserialize)]
struct AdminEntry {
    backend: String,
    address: String,
    state: String,
}

#[derive(Serialize, Deserialize)]
struct LaggingEntry {
    listener: String,
    backend: String,
    address: String,
}

#[derive(Serialize, Deserialize)]
struct NotFollowingEntry {
    backend: String,
    address: String,
    since_unix_ms: u64,
}

impl ClusterState {
    fn of(state: &SavedState) -> Self {
        let ms = |t: SystemTime| t.duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or_default();
        Self {
            system_identifier: state.system_id.map(|id| id.to_string()),
            max_timeline: state.max_timeline,
            fences: state
                .fences
                .iter()
                .map(|f| FenceEntry {
                    backend: f.backend.clone(),
                    address: f.address.clone(),
                    kind: f.fence.kind.as_str().into(),
                    reason: f.fence.reason.clone(),
                })
                .collect(),
            admin: state
                .admin
                .iter()
                .map(|a| AdminEntry {
                    backend: a.backend.clone(),
                    address: a.address.clone(),
                    state: a.state.as_str().into(),
                })
                .collect(),
            lagging: state
                .lagging
                .iter()
                .map(|g| LaggingEntry {
                    listener: g.listener.clone(),
                    backend: g.backend.clone(),
                    address: g.address.clone(),
                })
                .collect(),
            not_following: state
                .not_following
                .iter()
                .map(|f| NotFollowingEntry {
                    backend: f.backend.clone(),
                    address: f.address.clone(),
                    since_unix_ms: u64::try_from(ms(f.since)).unwrap_or(u64::MAX),
                })
                .collect(),
        }
    }

    fn into_saved(self) -> Result<SavedState, String> {
        let system_id = match self.system_identifier {
            None => None,
            Some(id) => Some(id.parse().map_err(|_| "bad `system_identifier`")?),
        };
        let mut saved = SavedState { system_id, max_timeline: self.max_timeline, ..SavedState::default() };
        for f in self.fences {
            let kind = FenceKind::parse(&f.kind).ok_or("unknown fence `kind`")?;
            saved.fences.push(SavedFence {
                backend: f.backend,
                address: f.address,
                fence: Fence { kind, reason: f.reason },
            });
        }
        for a in self.admin {
            let state = AdminState::parse(&a.state).ok_or("unknown admin `state`")?;
            saved.admin.push(SavedAdmin { backend: a.backend, address: a.address, state });
        }
        for g in self.lagging {
            saved.lagging.push(SavedLagging { listener: g.listener, backend: g.backend, address: g.address });
        }
        for f in self.not_following {
            let since = UNIX_EPOCH + Duration::from_millis(f.since_unix_ms);
            saved.not_following.push(SavedNotFollowing { backend: f.backend, address: f.address, since });
        }
        Ok(saved)
    }
}

/// Reads the state file: `Ok(None)` if there is none yet.
pub fn read(path: &Path) -> Result<Option<States>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read: {e}")),
    };
    parse(&text).map(Some)
}

/// The states in a JSON text (the file's, or one handed over at an
/// upgrade): version 1 is the single cluster `default`.
pub fn parse(text: &str) -> Result<States, String> {
    let versioned: Versioned = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    match versioned.version.as_u64() {
        Some(1) => {
            let file: FileV1 = serde_json::from_str(text).map_err(|e| format!("version 1: {e}"))?;
            Ok(States::from([(DEFAULT_CLUSTER.to_owned(), file.state.into_saved()?)]))
        }
        Some(2) => {
            let file: FileV2 = serde_json::from_str(text).map_err(|e| format!("version 2: {e}"))?;
            file.clusters.into_iter().map(|(name, state)| Ok((name, state.into_saved()?))).collect()
        }
        _ => {
            Err(format!("unknown version {} (this release reads 1 and 2): written by a newer pglb?", versioned.version))
        }
    }
}

/// The file's text for `states`: version 1 while the only cluster is
/// `default` (what single-cluster releases read), else version 2.
pub fn render(states: &States) -> String {
    let text = match states.iter().next() {
        Some((name, state)) if states.len() == 1 && name == DEFAULT_CLUSTER => {
            serde_json::to_string_pretty(&FileV1 { version: 1, state: ClusterState::of(state) })
        }
        _ => serde_json::to_string_pretty(&FileV2 {
            version: VERSION,
            clusters: states.iter().map(|(name, s)| (name.clone(), ClusterState::of(s))).collect(),
        }),
    };
    text.unwrap_or_default() + "\n"
}

/// Writes `state` to `path` so that a crash leaves the old or the new file,
/// and another process writing it meanwhile waits for this write to end.
pub fn write(path: &Path, states: &States) -> std::io::Result<()> {
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
    file.write_all(render(states).as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(folder)?.sync_all()
}

/// A change for the state file's writer.
pub enum Update {
    /// A cluster's state now.
    Cluster(String, SavedState),
    /// A cluster a reload removed.
    Forget(String),
}

/// A thread that keeps every cluster's newest state, starting from
/// `states` (what was restored), and writes the whole file after each batch
/// of updates, so the topology tasks never wait on a disk.
pub fn spawn_writer(path: PathBuf, mut states: States) -> mpsc::Sender<Update> {
    let (tx, rx) = mpsc::channel::<Update>();
    let apply = |states: &mut States, update: Update| match update {
        Update::Cluster(name, state) => {
            states.insert(name, state);
        }
        Update::Forget(name) => {
            states.remove(&name);
        }
    };
    let spawned = std::thread::Builder::new().name("pglb-state-file".into()).spawn(move || {
        while let Ok(update) = rx.recv() {
            apply(&mut states, update);
            while let Ok(more) = rx.try_recv() {
                apply(&mut states, more);
            }
            match write(&path, &states) {
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
        // A file of an earlier release (no lag fields) still reads, as `default`.
        let earlier = r#"{"version": 1, "system_identifier": "7", "max_timeline": 2, "fences": [], "admin": []}"#;
        let read_earlier = parse(earlier).expect("an earlier release's file");
        let default = &read_earlier["default"];
        assert!(read_earlier.len() == 1 && default.max_timeline == 2 && default.system_id == Some(7));
        assert!(default.lagging.is_empty() && default.not_following.is_empty());
        // The single cluster `default` is still written as version 1 (a
        // downgrade reads it); several clusters as version 2.
        let single = States::from([("default".to_owned(), state.clone())]);
        assert!(render(&single).contains("\"version\": 1"), "{}", render(&single));
        assert_eq!(parse(&render(&single)), Ok(single.clone()));
        let many = States::from([("orders".to_owned(), state.clone()), ("billing".to_owned(), SavedState::default())]);
        assert!(render(&many).contains("\"version\": 2"));
        assert_eq!(parse(&render(&many)), Ok(many.clone()));
        let dir = std::env::temp_dir().join(format!("pglb-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("state.json");
        assert_eq!(read(&path), Ok(None), "no file: a first start");
        write(&path, &many).expect("write");
        assert_eq!(read(&path), Ok(Some(many)));
        std::fs::write(&path, "{\"version\": 1, \"fences\": [").expect("write garbage");
        assert!(read(&path).expect_err("corrupt").contains("not valid JSON"));
        std::fs::write(&path, "{\"version\": 3}").expect("write");
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
        let state = |fences: usize, timeline: u32| {
            States::from([(
                "default".to_owned(),
                SavedState {
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
                },
            )])
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
                let got = read(&path).expect("a whole state").expect("a state").remove("default").expect("default");
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
