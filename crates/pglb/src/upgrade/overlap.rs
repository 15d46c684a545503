//! The overlap after an upgrade: the old process finishes its sessions
//! while the new one serves everything else and answers the admin endpoint.
//! An operator's drain, disable or enable (in the new process) applies to
//! the old process's sessions too: the new process sends each backend whose
//! admin state changed over the hand-over channel, which stays open until
//! the old process exits, and the old one sets it in its own topology — a
//! disable closes its sessions on that backend there as well. (Hand-over
//! version 2; an older old process just does not hear them.)

use std::sync::Arc;

use pglb_config::DEFAULT_CLUSTER;
use pglb_control::{Command as Topology, TopologyHandle};
use pglb_routing::AdminState;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use super::channel::Channel;

/// The hand-over version from which the old process hears admin states.
pub const SINCE_VERSION: u64 = 2;
/// The hand-over version from which admin states name their cluster.
const CLUSTERS_SINCE: u64 = 3;

/// Each backend's admin state: (cluster, backend, state).
pub fn admin_states(clusters: &[TopologyHandle]) -> Vec<(String, String, AdminState)> {
    let mut states = Vec::new();
    for c in clusters {
        let table = c.table.load();
        states.extend(table.backends.iter().map(|b| (c.cluster.to_string(), b.config.name.clone(), b.admin)));
    }
    states
}

/// New process: sends the backends whose admin state differs from `sent`
/// (the states when the old process's final state was applied, before
/// this process accepted anything: an action between then and now is sent
/// at once), then each change, until the old process closes the channel
/// (it exited). An old process older than hand-over version 3 served one
/// cluster, `default`: it hears only that one's.
pub async fn relay(
    mut channel: Channel,
    clusters: Vec<TopologyHandle>,
    mut sent: Vec<(String, String, AdminState)>,
    peer: u64,
) {
    // Any cluster's routing change wakes the relay.
    let (wake, mut woken) = mpsc::channel::<()>(1);
    for c in &clusters {
        let (mut generation, wake) = (c.generation.clone(), wake.clone());
        tokio::spawn(async move {
            while generation.changed().await.is_ok() {
                if wake.send(()).await.is_err() {
                    return;
                }
            }
        });
    }
    drop(wake);
    let mut first = true;
    loop {
        if !std::mem::take(&mut first) {
            tokio::select! {
                woke = woken.recv() => if woke.is_none() { return },
                // The old process sends nothing more: this is its exit.
                _ = channel.recv() => return,
            }
        }
        let now = admin_states(&clusters);
        let changed: Vec<_> = now
            .iter()
            .filter(|(cluster, _, _)| peer >= CLUSTERS_SINCE || cluster == DEFAULT_CLUSTER)
            .filter(|(cluster, name, state)| !sent.iter().any(|(c, n, s)| c == cluster && n == name && s == state))
            .map(|(cluster, name, state)| json!({ "cluster": cluster, "name": name, "state": state.as_str() }))
            .collect();
        if changed.is_empty() {
            continue;
        }
        if channel.send(&json!({ "type": "admin", "backends": changed }), &[]).await.is_err() {
            return;
        }
        sent = now;
    }
}

/// Old process: applies the admin states the new process sends to its own
/// topologies (their enforcement closes what a disable must close), until
/// the new process closes the channel or this process exits. A state that
/// names no cluster (a new process of hand-over version 2) is `default`'s.
pub async fn apply(mut channel: Channel, clusters: Arc<Vec<TopologyHandle>>) {
    while let Ok((message, _)) = channel.recv().await {
        if message["type"] != "admin" {
            continue;
        }
        for backend in message["backends"].as_array().into_iter().flatten() {
            let name = backend["name"].as_str().unwrap_or_default().to_owned();
            let cluster = backend["cluster"].as_str().unwrap_or(DEFAULT_CLUSTER);
            let Some(state) = backend["state"].as_str().and_then(AdminState::parse) else { continue };
            // A cluster the new config added: this process has no sessions in it.
            let Some(topology) = clusters.iter().find(|c| &*c.cluster == cluster) else { continue };
            let (reply, done) = oneshot::channel();
            if topology.commands.send(Topology::Admin { backend: name.clone(), state, reply }).await.is_err() {
                return;
            }
            match done.await {
                Ok(Ok(())) => tracing::info!(
                    cluster,
                    backend = %name,
                    state = state.as_str(),
                    "upgrade overlap: set in the new process; applied to this process's sessions too"
                ),
                // A backend the new config added: this process has no sessions on it.
                _ => tracing::debug!(
                    cluster,
                    backend = %name,
                    "upgrade overlap: admin state for a backend this process does not know"
                ),
            }
        }
    }
}
