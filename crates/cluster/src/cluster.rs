//! A primary and its streaming replicas in one temp dir.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::env::{pg_bin, PgUser};
use crate::node::{append, run, Node};
use crate::ports::{free_port, is_free};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("{0}")]
    Setup(String),
}

/// What to build.
#[derive(Debug, Clone, Default)]
pub struct Spec {
    /// A short tag for the temp dir name (`pglb-<tag>-...`).
    pub tag: String,
    pub replicas: usize,
    /// Preferred ports, primary first; a taken one is replaced by a free one.
    pub ports: Vec<u16>,
    /// pg_hba.conf lines placed before the default loopback `trust` lines.
    pub hba: Vec<String>,
    /// Extra postgresql.conf settings for every node.
    pub settings: Vec<String>,
    /// Enable TLS with a self-signed certificate (made with `openssl`).
    pub ssl: bool,
    /// The server binaries to use instead of [`pg_bin`] (e.g. PostgreSQL 18
    /// unpacked from a package). Without a `pg_basebackup` of their own,
    /// replicas are made as cold copies of the cleanly stopped primary.
    pub bin: Option<PathBuf>,
}

/// A running cluster; stopped and removed on drop.
#[derive(Debug)]
pub struct Cluster {
    pub root: PathBuf,
    pub nodes: Vec<Node>,
    user: PgUser,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

impl Cluster {
    /// Builds and starts a primary and `spec.replicas` streaming replicas.
    pub fn start(spec: &Spec) -> Result<Self, ClusterError> {
        sweep_stale();
        let user = PgUser::detect().map_err(ClusterError::Setup)?;
        let bin = spec.bin.clone().unwrap_or_else(pg_bin);
        if !bin.join("initdb").exists() {
            return Err(ClusterError::Setup(format!(
                "no PostgreSQL server binaries in `{}`: install the postgresql package or set PGLB_PG_BIN",
                bin.display()
            )));
        }
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| ClusterError::Io { path, source }
        };
        let root = private_dir(&spec.tag).map_err(io(&std::env::temp_dir()))?;
        std::fs::write(root.join("owner.pid"), std::process::id().to_string()).map_err(io(&root))?;
        user.own(&root).map_err(io(&root))?;
        let mut cluster = Cluster { root, nodes: Vec::new(), user };
        let mut taken = Vec::new();
        for i in 0..=spec.replicas {
            let port = pick_port(spec.ports.get(i).copied(), &taken)?;
            taken.push(port);
            let name = if i == 0 { "node0".to_owned() } else { format!("node{i}") };
            let node = Node {
                data: cluster.root.join(&name),
                log: cluster.root.join(format!("{name}.log")),
                name,
                port,
                bin: bin.clone(),
                user,
            };
            if i == 0 {
                cluster.init_primary(&node, spec)?;
            } else {
                cluster.clone_replica(&cluster.nodes[0].clone(), &node)?;
            }
            node.start()?;
            cluster.nodes.push(node);
        }
        for replica in &cluster.nodes[1..] {
            replica.wait_for("SELECT pg_is_in_recovery()", "t", Duration::from_secs(30))?;
        }
        Ok(cluster)
    }

    pub fn primary(&self) -> &Node {
        &self.nodes[0]
    }

    fn init_primary(&self, node: &Node, spec: &Spec) -> Result<(), ClusterError> {
        let mut initdb = self.user.command(node.bin.join("initdb"));
        initdb.args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C", "-D"]).arg(&node.data);
        run(&mut initdb, "initdb")?;
        let mut hba = spec.hba.clone();
        hba.extend([
            "local all all trust".to_owned(),
            "host all all 127.0.0.1/32 trust".to_owned(),
            "host replication all 127.0.0.1/32 trust".to_owned(),
        ]);
        std::fs::write(node.data.join("pg_hba.conf"), hba.join("\n") + "\n")
            .map_err(|e| ClusterError::Io { path: node.data.join("pg_hba.conf"), source: e })?;
        let mut settings = vec![
            "listen_addresses = '127.0.0.1'".to_owned(),
            "max_connections = 200".to_owned(),
            "shared_buffers = 32MB".to_owned(),
            "fsync = off".to_owned(),
            "synchronous_commit = on".to_owned(),
            "full_page_writes = on".to_owned(),
            "wal_level = replica".to_owned(),
            "wal_log_hints = on".to_owned(),
            "max_wal_senders = 10".to_owned(),
            "wal_keep_size = '512MB'".to_owned(),
            "hot_standby = on".to_owned(),
            "hot_standby_feedback = on".to_owned(),
            "log_min_messages = warning".to_owned(),
        ];
        settings.extend(spec.settings.iter().cloned());
        if spec.ssl {
            self.make_certificate(node)?;
            settings.push("ssl = on".to_owned());
        }
        append(&node.data.join("postgresql.conf"), &settings)?;
        node.configure(&node_settings(node))
    }

    /// A self-signed server.crt/server.key in the data dir (replicas copy it).
    fn make_certificate(&self, node: &Node) -> Result<(), ClusterError> {
        let mut openssl = self.user.command("openssl");
        openssl
            .args(["req", "-new", "-x509", "-days", "2", "-nodes", "-newkey", "rsa:2048", "-subj", "/CN=localhost"])
            .arg("-keyout")
            .arg(node.data.join("server.key"))
            .arg("-out")
            .arg(node.data.join("server.crt"));
        run(&mut openssl, "openssl (making a test certificate)")?;
        let key = node.data.join("server.key");
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|e| ClusterError::Io { path: key, source: e })
    }

    fn clone_replica(&self, primary: &Node, node: &Node) -> Result<(), ClusterError> {
        if !node.bin.join("pg_basebackup").exists() {
            return self.copy_replica(primary, node);
        }
        let mut backup = self.user.command(node.bin.join("pg_basebackup"));
        backup
            .args(["-h", "127.0.0.1", "-U", "postgres", "-R", "-X", "stream", "-c", "fast", "--no-sync", "-p"])
            .arg(primary.port.to_string())
            .arg("-D")
            .arg(&node.data);
        run(&mut backup, &format!("pg_basebackup for {}", node.name))?;
        // The sockets live in the data dirs: the copy holds the primary's
        // socket lock files (and, cloned from a clone, its own port's, with
        // a pid that may be a zombie now), which would stop it starting.
        if let Ok(entries) = std::fs::read_dir(&node.data) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(".s.PGSQL.") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        node.configure(&node_settings(node))
    }

    /// A replica without pg_basebackup: stops the primary cleanly, copies its
    /// data directory, starts it again, and points the copy at it with
    /// `standby.signal` and `primary_conninfo`. The copy starts from the
    /// primary's shutdown checkpoint and streams from there.
    fn copy_replica(&self, primary: &Node, node: &Node) -> Result<(), ClusterError> {
        let running = primary.pid().is_some();
        primary.stop("fast");
        let mut copy = self.user.command("cp");
        copy.arg("-a").arg(&primary.data).arg(&node.data);
        let copied = run(&mut copy, &format!("copying {} to make {}", primary.name, node.name));
        if running {
            primary.start()?;
        }
        copied?;
        let signal = node.data.join("standby.signal");
        std::fs::write(&signal, "").map_err(|e| ClusterError::Io { path: signal.clone(), source: e })?;
        self.user.own(&signal).map_err(|e| ClusterError::Io { path: signal, source: e })?;
        let mut settings = node_settings(node);
        settings.push(format!(
            "primary_conninfo = 'host=127.0.0.1 port={} user=postgres application_name={}'",
            primary.port, node.name
        ));
        node.configure(&settings)
    }

    /// Starts `node`, a cleanly stopped server, as a replica streaming from
    /// `primary` (a switchover without rewind: the old primary follows the
    /// promoted one onto its timeline). `primary_conninfo` goes into
    /// postgresql.auto.conf, where `pg_basebackup -R` put the first one.
    pub fn follow(&self, node: &Node, primary: &Node) -> Result<(), ClusterError> {
        let signal = node.data.join("standby.signal");
        std::fs::write(&signal, "").map_err(|e| ClusterError::Io { path: signal.clone(), source: e })?;
        self.user.own(&signal).map_err(|e| ClusterError::Io { path: signal, source: e })?;
        let line = format!(
            "primary_conninfo = 'host=127.0.0.1 port={} user=postgres application_name={}'",
            primary.port, node.name
        );
        append(&node.data.join("postgresql.auto.conf"), &[line])?;
        node.start()
    }

    /// Makes a fresh replica of `primary` in `node`'s data dir (after a
    /// failover, to rejoin an old primary), and starts it.
    pub fn rebuild_replica(&self, node: &Node, primary: &Node) -> Result<(), ClusterError> {
        node.stop("immediate");
        let _ = std::fs::remove_dir_all(&node.data);
        self.clone_replica(primary, node)?;
        node.start()?;
        node.wait_for("SELECT pg_is_in_recovery()", "t", Duration::from_secs(30))
    }
}

fn node_settings(node: &Node) -> Vec<String> {
    vec![format!("port = {}", node.port), format!("unix_socket_directories = '{}'", node.data.display())]
}

fn pick_port(preferred: Option<u16>, taken: &[u16]) -> Result<u16, ClusterError> {
    if let Some(p) = preferred.filter(|p| is_free(*p) && !taken.contains(p)) {
        return Ok(p);
    }
    for _ in 0..20 {
        let p = free_port().map_err(|e| ClusterError::Setup(format!("cannot find a free port: {e}")))?;
        if !taken.contains(&p) {
            return Ok(p);
        }
    }
    Err(ClusterError::Setup("cannot find a free port".into()))
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            node.stop("immediate");
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A new folder `pglb-<tag>-<pid>-<n>-<random>` in the temp folder, mode
/// 0700, made afresh: `create` fails on anything already there (a planted
/// folder or symlink), so nothing below is ever someone else's.
fn private_dir(tag: &str) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let mut last = None;
    for _ in 0..16 {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("pglb-{tag}-{}-{n}-{:08x}", std::process::id(), random());
        let path = std::env::temp_dir().join(name);
        match std::fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => return Ok(path),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free name")))
}

/// 32 random bits from the kernel.
fn random() -> u32 {
    let mut bytes = [0u8; 4];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
    u32::from_ne_bytes(bytes)
}

/// Removes clusters left by processes that died without cleaning up: only
/// folders of ours (owned by this user, not symlinks) whose owner is gone,
/// and a server in one is killed only when `/proc` shows it is a `postgres`
/// of the expected user working in that very data folder — never a pid a
/// file merely names.
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    let me = crate::env::euid();
    let servers = PgUser::detect().ok().and_then(|u| u.uid());
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        // Ours: a real folder (not a symlink) owned by this user or the
        // servers' (as root, cluster folders are given to `postgres`).
        let uid = Some(std::os::unix::fs::MetadataExt::uid(&meta));
        let is_ours = entry.file_name().to_str().is_some_and(|n| n.starts_with("pglb-"))
            && meta.is_dir()
            && (uid == me || uid == servers);
        let owner = std::fs::read_to_string(path.join("owner.pid")).ok();
        let Some(owner) = owner.and_then(|o| o.trim().parse::<u32>().ok()).filter(|&p| p > 1) else {
            continue;
        };
        if !is_ours || Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        for dir in std::fs::read_dir(&path).into_iter().flatten().flatten() {
            if let Some(pid) = postmaster_of(&dir.path(), servers) {
                let _ = std::process::Command::new("kill").args(["-9", &pid.to_string()]).output();
            }
        }
        let _ = std::fs::remove_dir_all(&path);
    }
}

/// The pid in `data/postmaster.pid`, if `/proc` shows it is a `postgres`
/// process of user `uid` whose working folder is `data`.
fn postmaster_of(data: &Path, uid: Option<u32>) -> Option<u32> {
    let meta = std::fs::symlink_metadata(data).ok()?;
    if !meta.is_dir() {
        return None;
    }
    let text = std::fs::read_to_string(data.join("postmaster.pid")).ok()?;
    let pid: u32 = text.lines().next()?.trim().parse().ok().filter(|&p| p > 1)?;
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let exe = std::fs::read_link(proc.join("exe")).ok()?;
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&proc).ok()?);
    let cwd = std::fs::read_link(proc.join("cwd")).ok()?;
    let here = data.canonicalize().ok()?;
    let is_postgres = exe.file_name().is_some_and(|n| n == "postgres");
    (is_postgres && Some(owner) == uid && cwd == here).then_some(pid)
}
