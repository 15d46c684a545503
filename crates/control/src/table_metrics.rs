//! Cluster metrics, set from each published table.

use pglb_routing::{AdminState, FailureClass, Health, ObservedRole, RoutingTable, Trust};

/// Registers help text for the metrics set from the routing table.
pub fn describe_metrics() {
    use metrics::{describe_gauge, Unit};
    describe_gauge!(
        "pglb_backend_up",
        "1 while the backend is in service (healthy, degraded or unverified), 0 when it is down."
    );
    describe_gauge!("pglb_backend_state", "1 for the backend's state (healthy, degraded, unverified, down), else 0.");
    describe_gauge!("pglb_backend_role", "1 for the backend's current role (primary, replica, unknown), else 0.");
    describe_gauge!(
        "pglb_backend_fenced",
        "1 if the backend is fenced (split brain, timeline fork, other cluster), else 0."
    );
    describe_gauge!(
        "pglb_backend_admin_state",
        "1 for the backend's admin state (enabled, drained, disabled), else 0."
    );
    describe_gauge!(
        "pglb_backend_replication_lag_bytes",
        Unit::Bytes,
        "Replica's replay position behind the primary's current WAL position."
    );
    describe_gauge!(
        "pglb_backend_replication_lag_seconds",
        Unit::Seconds,
        "How long the primary has had WAL the replica has not replayed (0 when caught up; an idle primary is not lag)."
    );
    describe_gauge!("pglb_backend_max_connections", "Connection limit pglb keeps towards the backend (0: none).");
    describe_gauge!(
        "pglb_split_brain",
        "1 while more than one backend is primary on the same timeline and primary listeners route to none."
    );
    describe_gauge!(
        "pglb_backend_identity_in_doubt",
        "1 while the backend's system identifier ties with another's and none is pinned or saved (identity unsettled: nothing is routed), else 0."
    );
    describe_gauge!("pglb_listener_eligible_backends", "Backends the listener may use now.");
    describe_gauge!(
        "pglb_patroni_state",
        "1 for how pglb uses Patroni now (leader_lock: the lock vetoes other primaries; any other value: routing on pglb's own checks, and why), else 0. Only for clusters read from Patroni."
    );
    describe_gauge!(
        "pglb_patroni_members",
        "Members Patroni lists for the cluster (departed ones still draining not counted)."
    );
    describe_gauge!(
        "pglb_backend_vetoed",
        "1 while the backend answers as primary but Patroni's confirmed leader is another node (it gets no traffic), else 0."
    );
    describe_gauge!(
        "pglb_routing_generation",
        "The cluster's routing generation: moves each time its routing table changes what clients may be routed to (a failover, fence, admin action or reload of that cluster), and only then."
    );
}

/// Sets every per-backend and per-listener gauge from `table`.
pub fn export_table(cluster: &str, table: &RoutingTable) {
    let cluster = cluster.to_owned();
    for b in &table.backends {
        let name = b.config.name.clone();
        metrics::gauge!("pglb_backend_up", "cluster" => cluster.clone(), "backend" => name.clone())
            .set(f64::from(u8::from(b.state.up)));
        let health = b.state.health();
        for state in Health::ALL {
            let value = f64::from(u8::from(health == state));
            metrics::gauge!("pglb_backend_state", "cluster" => cluster.clone(), "backend" => name.clone(), "state" => state.as_str()).set(value);
        }
        for role in ObservedRole::ALL {
            let value = f64::from(u8::from(b.role == role));
            metrics::gauge!("pglb_backend_role", "cluster" => cluster.clone(), "backend" => name.clone(), "role" => role.as_str()).set(value);
        }
        for state in AdminState::ALL {
            let value = f64::from(u8::from(b.admin == state));
            metrics::gauge!("pglb_backend_admin_state", "cluster" => cluster.clone(), "backend" => name.clone(), "state" => state.as_str())
                .set(value);
        }
        metrics::gauge!("pglb_backend_fenced", "cluster" => cluster.clone(), "backend" => name.clone())
            .set(f64::from(u8::from(b.fenced.is_some())));
        if table.patroni.is_some() {
            metrics::gauge!("pglb_backend_vetoed", "cluster" => cluster.clone(), "backend" => name.clone())
                .set(f64::from(u8::from(b.vetoed.is_some())));
        }
        let in_doubt = table.identity.in_doubt.iter().any(|(d, _)| *d == name);
        metrics::gauge!("pglb_backend_identity_in_doubt", "cluster" => cluster.clone(), "backend" => name.clone())
            .set(f64::from(u8::from(in_doubt)));
        metrics::gauge!("pglb_backend_replication_lag_bytes", "cluster" => cluster.clone(), "backend" => name.clone())
            .set(b.lag.bytes.unwrap_or(0) as f64);
        metrics::gauge!("pglb_backend_replication_lag_seconds", "cluster" => cluster.clone(), "backend" => name.clone())
            .set(b.lag.seconds.unwrap_or(0.0));
        let limit = b.config.max_connections.unwrap_or(0) as f64;
        metrics::gauge!("pglb_backend_max_connections", "cluster" => cluster.clone(), "backend" => name.clone())
            .set(limit);
        for class in FailureClass::ALL {
            metrics::counter!("pglb_health_check_failures_total", "cluster" => cluster.clone(), "backend" => name.clone(), "class" => class.as_str())
                .increment(0);
        }
        let _ =
            metrics::histogram!("pglb_health_check_duration_seconds", "cluster" => cluster.clone(), "backend" => name);
    }
    metrics::gauge!("pglb_split_brain", "cluster" => cluster.clone()).set(f64::from(u8::from(table.split_brain)));
    if let Some(view) = &table.patroni {
        for trust in Trust::ALL {
            metrics::gauge!("pglb_patroni_state", "cluster" => cluster.clone(), "state" => trust.as_str())
                .set(f64::from(u8::from(view.trust == trust)));
        }
        let members = view.members.values().filter(|m| !m.departed).count();
        metrics::gauge!("pglb_patroni_members", "cluster" => cluster.clone()).set(members as f64);
    }
    metrics::gauge!("pglb_routing_generation", "cluster" => cluster.clone()).set(table.generation as f64);
    for l in &table.listeners {
        let labels = [
            ("cluster", cluster.clone()),
            ("listener", l.config.name.clone()),
            ("role", l.config.role.as_str().to_owned()),
        ];
        metrics::gauge!("pglb_listener_eligible_backends", &labels).set(l.eligible.len() as f64);
    }
}
