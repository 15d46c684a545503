//! Closes sessions whose backend may no longer serve their listener, each
//! time the cluster's routing changes, for every listener context of that
//! cluster (including those a reload replaced, while they still have
//! sessions). One task per cluster: a change in one never judges another's
//! sessions.

use std::sync::Arc;

use pglb_control::TopologyHandle;
use pglb_proxy::Contexts;
use tokio_util::sync::CancellationToken;

pub async fn run(contexts: Arc<Contexts>, topology: TopologyHandle, stop: CancellationToken) {
    let mut generation = topology.generation.clone();
    loop {
        contexts.enforce(&topology.cluster, &topology.table.load_full());
        contexts.prune();
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = generation.changed() => if changed.is_err() { return },
        }
    }
}
