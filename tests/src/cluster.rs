//! Clusters for tests. Tests that do not disturb a cluster share one per
//! test binary (kept alive while any test holds it); destructive tests start
//! their own with [`pglb_cluster::Cluster::start`].

use std::sync::{Arc, Mutex, Weak};

use pglb_cluster::{Cluster, Spec};

/// Check users that exist on every node of the shared cluster.
pub const SCRAM_USER: (&str, &str) = ("pglb_scram", "scram-secret");
pub const MD5_USER: (&str, &str) = ("pglb_md5", "md5-secret");
pub const TLS_USER: (&str, &str) = ("pglb_tls", "tls-secret");

pub type SharedCluster = Arc<Cluster>;

static SHARED: Mutex<Weak<Cluster>> = Mutex::new(Weak::new());

/// The binary's shared cluster: a primary and two replicas with TLS on, and
/// check users for SCRAM, md5 and TLS-only logins. Started by the first test
/// that asks; stopped when the last holder drops it (also on panic).
pub fn shared_cluster() -> SharedCluster {
    let mut slot = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(cluster) = slot.upgrade() {
        return cluster;
    }
    let cluster = Arc::new(start_shared());
    *slot = Arc::downgrade(&cluster);
    cluster
}

fn start_shared() -> Cluster {
    let spec = Spec {
        tag: "test".into(),
        replicas: 2,
        ssl: true,
        hba: vec![
            format!("host all {} 127.0.0.1/32 scram-sha-256", SCRAM_USER.0),
            format!("host all {} 127.0.0.1/32 md5", MD5_USER.0),
            format!("hostnossl all {} 127.0.0.1/32 reject", TLS_USER.0),
            format!("hostssl all {} 127.0.0.1/32 scram-sha-256", TLS_USER.0),
        ],
        ..Spec::default()
    };
    let cluster = Cluster::start(&spec).expect("start the shared test cluster");
    create_check_users(&cluster);
    cluster
}

/// Creates the check users on the primary and waits until replicas have them.
pub fn create_check_users(cluster: &Cluster) {
    create_check_users_on(cluster, cluster.nodes.len() - 1);
}

/// Like [`create_check_users`], for a cluster with `replicas` replicas.
pub fn create_check_users_on(cluster: &Cluster, replicas: usize) {
    let primary = cluster.primary();
    let sql = format!(
        "SET password_encryption = 'scram-sha-256';
         CREATE ROLE {s} LOGIN PASSWORD '{sp}';
         CREATE ROLE {t} LOGIN PASSWORD '{tp}';
         SET password_encryption = 'md5';
         CREATE ROLE {m} LOGIN PASSWORD '{mp}';
         CREATE ROLE pglb_check LOGIN;
         GRANT pg_monitor TO {s}, {t}, {m}, pglb_check;",
        s = SCRAM_USER.0,
        sp = SCRAM_USER.1,
        t = TLS_USER.0,
        tp = TLS_USER.1,
        m = MD5_USER.0,
        mp = MD5_USER.1,
    );
    primary.sql(&sql).expect("create check users");
    for node in &cluster.nodes[1..=replicas] {
        node.wait_for(
            "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'pglb_%'",
            "4",
            std::time::Duration::from_secs(30),
        )
        .expect("check users replicate");
    }
}
