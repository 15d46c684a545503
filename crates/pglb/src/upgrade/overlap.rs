//! The overlap after an upgrade: the old process finishes its sessions
//! while the new one serves everything else and answers the admin endpoint.
//! An operator's drain, disable or enable (in the new process) applies to
//! the old process's sessions too: the new process sends each backend whose
//! admin state changed over the hand-over channel, which stays open until
//! the old process exits, and the old one sets it in its own topology — a
//! disable closes its sessions on that backend there as well. (Hand-over
//! version 2; an older old process just does not hear them.)

use std::sync::Arc;

use arc_swap::ArcSwap;
use pglb_control::Command as Topology;
use pglb_routing::{AdminState, RoutingTable};
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};

use super::channel::Channel;

/// The hand-over version from which the old process hears admin states.
pub const SINCE_VERSION: u64 = 2;

/// Each backend's admin state in `table`.
pub fn admin_states(table: &RoutingTable) -> Vec<(String, AdminState)> {
    table.backends.iter().map(|b| (b.config.name.clone(), b.admin)).collect()
}

/// New process: sends the backends whose admin state differs from `sent`
/// (the states when the old process's final state was applied, before
/// this process accepted anything: an action between then and now is sent
/// at once), then each change, until the old process closes the channel
/// (it exited).
pub async fn relay(
    mut channel: Channel,
    table: Arc<ArcSwap<RoutingTable>>,
    mut generation: watch::Receiver<u64>,
    mut sent: Vec<(String, AdminState)>,
) {
    let mut first = true;
    loop {
        if !std::mem::take(&mut first) {
            tokio::select! {
                changed = generation.changed() => if changed.is_err() { return },
                // The old process sends nothing more: this is its exit.
                _ = channel.recv() => return,
            }
        }
        let now = admin_states(&table.load());
        let changed: Vec<_> = now
            .iter()
            .filter(|(name, state)| !sent.iter().any(|(n, s)| n == name && s == state))
            .map(|(name, state)| json!({ "name": name, "state": state.as_str() }))
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
/// topology (its enforcement closes what a disable must close), until the
/// new process closes the channel or this process exits.
pub async fn apply(mut channel: Channel, commands: mpsc::Sender<Topology>) {
    while let Ok((message, _)) = channel.recv().await {
        if message["type"] != "admin" {
            continue;
        }
        for backend in message["backends"].as_array().into_iter().flatten() {
            let name = backend["name"].as_str().unwrap_or_default().to_owned();
            let Some(state) = backend["state"].as_str().and_then(AdminState::parse) else { continue };
            let (reply, done) = oneshot::channel();
            if commands.send(Topology::Admin { backend: name.clone(), state, reply }).await.is_err() {
                return;
            }
            match done.await {
                Ok(Ok(())) => tracing::info!(
                    backend = %name,
                    state = state.as_str(),
                    "upgrade overlap: set in the new process; applied to this process's sessions too"
                ),
                // A backend the new config added: this process has no sessions on it.
                _ => {
                    tracing::debug!(backend = %name, "upgrade overlap: admin state for a backend this process does not know")
                }
            }
        }
    }
}
