//! `/status`: what the current routing table says, as JSON. No secrets.

use pglb_routing::RoutingTable;
use serde::Serialize;

#[derive(Serialize)]
struct Status<'a> {
    generation: u64,
    split_brain: bool,
    backends: Vec<Backend<'a>>,
    listeners: Vec<Listener<'a>>,
}

#[derive(Serialize)]
struct Backend<'a> {
    name: &'a str,
    address: String,
    weight: u32,
    healthy: bool,
    checked: bool,
    role: &'static str,
    active_connections: usize,
    last_error: Option<&'a str>,
}

#[derive(Serialize)]
struct Listener<'a> {
    name: &'a str,
    listen: String,
    role: &'static str,
    fallback: Option<&'static str>,
    balance: &'static str,
    via_fallback: bool,
    /// Backends eligible now, in config order.
    backends: Vec<&'a str>,
}

/// Renders the table as the `/status` document.
pub fn status_json(table: &RoutingTable) -> String {
    let backends = table
        .backends
        .iter()
        .map(|b| Backend {
            name: &b.config.name,
            address: b.config.address(),
            weight: b.config.weight,
            healthy: b.state.healthy,
            checked: b.state.checked,
            role: b.state.role.as_str(),
            active_connections: b.load.active(),
            last_error: b.state.last_error.as_deref(),
        })
        .collect();
    let listeners = table
        .listeners
        .iter()
        .map(|l| Listener {
            name: &l.config.name,
            listen: l.config.listen.to_string(),
            role: l.config.role.as_str(),
            fallback: l.config.fallback.map(|r| r.as_str()),
            balance: l.config.balance.as_str(),
            via_fallback: l.via_fallback,
            backends: l
                .eligible
                .iter()
                .map(|&i| table.backends[i].config.name.as_str())
                .collect(),
        })
        .collect();
    let status = Status {
        generation: table.generation,
        split_brain: table.split_brain,
        backends,
        listeners,
    };
    serde_json::to_string_pretty(&status).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}
