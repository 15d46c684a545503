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
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let root = std::env::temp_dir().join(format!("pglb-{}-{}-{n}", spec.tag, std::process::id()));
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| ClusterError::Io { path, source }
        };
        std::fs::create_dir_all(&root).map_err(io(&root))?;
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

/// Removes clusters left by processes that died without cleaning up.
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_ours = entry.file_name().to_str().is_some_and(|n| n.starts_with("pglb-"));
        let owner = std::fs::read_to_string(path.join("owner.pid")).ok();
        let Some(owner) = owner.and_then(|o| o.trim().parse::<u32>().ok()) else {
            continue;
        };
        if !is_ours || Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        for dir in std::fs::read_dir(&path).into_iter().flatten().flatten() {
            if let Some(pid) = std::fs::read_to_string(dir.path().join("postmaster.pid"))
                .ok()
                .and_then(|t| t.lines().next().map(str::to_owned))
            {
                let _ = std::process::Command::new("kill").args(["-9", pid.trim()]).output();
            }
        }
        let _ = std::fs::remove_dir_all(&path);
    }
}
