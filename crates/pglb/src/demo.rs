//! `pglb demo`: a real local cluster (primary + two streaming replicas) with
//! pglb in front of it, serving the repository's `lb.yaml`.

use std::path::PathBuf;

use anyhow::Context;
use pglb_cluster::{Cluster, Spec};

/// The example config, also compiled in so the demo runs from anywhere.
const LB_YAML: &str = include_str!("../../../lb.yaml");
/// The loopback ports `lb.yaml` uses: rw, ro, admin, then the three nodes.
const DEMO_PORTS: [u16; 3] = [15432, 15433, 15434];

pub fn run() -> anyhow::Result<()> {
    println!("pglb demo: starting a primary and two streaming replicas (initdb + pg_basebackup)...");
    let spec = Spec { tag: "demo".into(), replicas: 2, ports: DEMO_PORTS.to_vec(), ..Spec::default() };
    let cluster = Cluster::start(&spec).context("cannot start the demo cluster")?;
    cluster
        .primary()
        .sql("CREATE ROLE pglb_check LOGIN; GRANT pg_monitor TO pglb_check")
        .context("cannot create the check user")?;
    for replica in &cluster.nodes[1..] {
        let exists = "SELECT count(*) FROM pg_roles WHERE rolname = 'pglb_check'";
        replica.wait_for(exists, "1", std::time::Duration::from_secs(30))?;
    }
    let (path, text) = config_for(&cluster)?;
    let config = pglb_config::load_str(&path, &text).map_err(|e| anyhow::anyhow!("{e}"))?;
    print_welcome(&cluster, &config, &path);
    let runtime = crate::run::runtime()?;
    // Started again, `pglb demo` would start a second cluster of its own.
    let launch = crate::upgrade::Launch::refused(
        "the demo cannot be upgraded: it owns its cluster, and started again it would start another; upgrades are for `pglb run --config FILE`",
    );
    let result = runtime.block_on(crate::run::serve(path.clone(), config, launch));
    println!("pglb demo: stopping the cluster and removing {}", cluster.root.display());
    drop(cluster);
    result
}

/// `lb.yaml` as is when its ports are free, else a copy with free ports in
/// the cluster's temp dir.
fn config_for(cluster: &Cluster) -> anyhow::Result<(PathBuf, String)> {
    let mut text = LB_YAML.to_owned();
    for (node, wanted) in cluster.nodes.iter().zip(DEMO_PORTS) {
        if node.port != wanted {
            text = text.replace(&format!("127.0.0.1:{wanted}"), &format!("127.0.0.1:{}", node.port));
        }
    }
    for port in [6432u16, 6433, 9631] {
        if !port_free(port) {
            let free = pglb_cluster::free_port()?;
            text = text.replace(&format!("127.0.0.1:{port}"), &format!("127.0.0.1:{free}"));
        }
    }
    let local = PathBuf::from("lb.yaml");
    let same_as_local = std::fs::read_to_string(&local).is_ok_and(|t| t == text);
    if same_as_local {
        return Ok((local, text));
    }
    let path = cluster.root.join("lb.yaml");
    std::fs::write(&path, &text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok((path, text))
}

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn print_welcome(cluster: &Cluster, config: &pglb_config::Config, path: &std::path::Path) {
    let port_of =
        |name: &str| config.listeners().find(|(_, l)| l.name == name).map(|(_, l)| l.listen.port()).unwrap_or(0);
    let bin = pglb_cluster::pg_bin();
    let primary = cluster.primary();
    let standby = &cluster.nodes[1];
    // PostgreSQL runs as `postgres` when the demo runs as root.
    let as_pg =
        if pglb_cluster::PgUser::detect().is_ok_and(|u| u.ids.is_some()) { "runuser -u postgres -- " } else { "" };
    println!(
        "
pglb demo is running with config {config}
  cluster: primary {p0}, replicas {p1} and {p2} (data in {root})

  read-write (primary):   psql -h 127.0.0.1 -p {rw} -U postgres -c 'SELECT inet_server_port(), pg_is_in_recovery()'
  read-only (replicas):   psql -h 127.0.0.1 -p {ro} -U postgres -c 'SELECT inet_server_port(), pg_is_in_recovery()'
  status:                 {exe} status --config {config}    (or curl -s http://{admin}/status)
  metrics:                curl -s http://{admin}/metrics

  watch a failover — stop the primary, promote a replica, and rw follows it:
    {as_pg}{bin}/pg_ctl -D {d0} stop -m fast
    psql -h 127.0.0.1 -p {p1} -U postgres -c 'SELECT pg_promote()'
    psql -h 127.0.0.1 -p {rw} -U postgres -c 'SELECT inet_server_port()'    # now {p1}

  then bring the old primary back as a replica of the new one (pglb unfences it
  once it streams on the new timeline):
    {as_pg}{bin}/pg_rewind -D {d0} -R --source-server='host=127.0.0.1 port={p1} user=postgres dbname=postgres'
    {as_pg}{bin}/pg_ctl -D {d0} -l {d0}/rejoined.log start
    {exe} status --config {config}    # pg1: healthy replica

Ctrl-C stops pglb and the cluster and removes its files.",
        config = path.display(),
        p0 = primary.port,
        p1 = standby.port,
        p2 = cluster.nodes[2].port,
        root = cluster.root.display(),
        rw = port_of("rw"),
        ro = port_of("ro"),
        admin = config.admin.listen,
        bin = bin.display(),
        exe = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "pglb".into()),
        d0 = primary.data.display(),
    );
}
