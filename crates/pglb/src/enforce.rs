//! Closes sessions whose backend may no longer serve their listener, each
//! time routing changes, for every listener context (including those a
//! reload replaced, while they still have sessions).

use std::sync::Arc;

use pglb_admin::AdminState;
use pglb_health::TopologyHandle;
use tokio_util::sync::CancellationToken;

pub async fn run(admin: Arc<AdminState>, topology: TopologyHandle, stop: CancellationToken) {
    let mut generation = topology.generation.clone();
    loop {
        let table = topology.table.load_full();
        let contexts = admin.listeners.load_full();
        for ctx in contexts.iter() {
            ctx.enforce(&table);
        }
        prune(&admin);
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = generation.changed() => if changed.is_err() { return },
        }
    }
}

/// Forgets replaced contexts whose sessions have all ended.
fn prune(admin: &AdminState) {
    admin.listeners.rcu(|all| {
        let mut keep: Vec<Arc<pglb_proxy::ListenerContext>> = Vec::new();
        for (i, ctx) in all.iter().enumerate() {
            // The newest context per address is current; older ones are kept
            // only while they hold sessions.
            let newer = all[i + 1..].iter().any(|c| c.listen == ctx.listen);
            let removed = ctx.config().is_none();
            if (!newer && !removed) || !ctx.registry.list().is_empty() {
                keep.push(ctx.clone());
            }
        }
        keep
    });
}
