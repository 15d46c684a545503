//! `/status` and `/connections`: what the current routing table and the
//! session registries say, as JSON. No secrets.

use std::time::UNIX_EPOCH;

use pglb_control::fleet::FleetView;
use pglb_proxy::{ListenerView, SessionView};
use pglb_routing::{Health, ItemKey, NodeKey, Receiver, RoutingTable};
use serde_json::{json, Value};

use crate::server::LiveConfig;

/// Renders the `/status` document: per cluster a summary (`clusters`),
/// every backend and listener with its `cluster`; a single-cluster pglb
/// also keeps its cluster's summary at the top level, as before clusters.
pub fn status_json(
    clusters: &[pglb_control::TopologyHandle],
    live: &LiveConfig,
    listeners: &[ListenerView],
    store: Option<&pglb_store::StoreStatus>,
) -> String {
    let mut summaries = Vec::new();
    let (mut backends, mut routes) = (Vec::new(), Vec::new());
    for topology in clusters {
        let table = topology.table.load();
        let fleet = topology.fleet.as_ref().map(|f| f.load_full());
        backends.extend(backends_json(&topology.cluster, &table, fleet.as_deref()));
        routes.extend(listeners_json(&topology.cluster, &table, listeners));
        summaries.push(cluster_json(topology, &table));
    }
    let mut status = json!({
        "pid": std::process::id(),
        "config": {
            "path": live.path,
            "hash": live.hash,
            "loaded_at": live.loaded_at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            "last_reload": live.last_reload.as_ref().map(|r| json!({
                "at": r.at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
                "result": if r.error.is_some() { "failure" } else { "success" },
                "error": r.error,
            })),
        },
        "shared_state": store.map(store_json),
        "clusters": summaries,
        "backends": backends,
        "listeners": routes,
    });
    let single = if clusters.len() == 1 { status["clusters"][0].as_object().cloned() } else { None };
    if let Some(fields) = single {
        for (key, value) in fields.into_iter().filter(|(k, _)| k != "name" && k != "summary") {
            status[key] = value;
        }
    }
    serde_json::to_string_pretty(&status).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// One cluster's routing state in a line or two.
fn cluster_json(topology: &pglb_control::TopologyHandle, table: &RoutingTable) -> Value {
    let primaries: Vec<&str> = table
        .backends
        .iter()
        .filter(|b| b.role == pglb_routing::ObservedRole::Primary && b.serving())
        .map(|b| b.config.name.as_str())
        .collect();
    let healthy = table.backends.iter().filter(|b| b.state.health() == Health::Healthy).count();
    let fenced = table.backends.iter().filter(|b| b.fenced.is_some()).count();
    json!({
        "name": &*topology.cluster,
        "generation": table.generation,
        "split_brain": table.split_brain,
        "primary_visible": table.primary_visible,
        "primary_restarting": table.restarting.map(|i| &table.backends[i].config.name),
        "identity": {
            // A string: system identifiers exceed what JSON numbers hold exactly.
            "system_identifier": table.identity.system_id.map(|id| id.to_string()),
            "source": table.identity.source.map(|s| s.as_str()),
            "settled": !table.identity.pending,
            "unsettled": !table.identity.in_doubt.is_empty(),
            "in_doubt": table.identity.in_doubt.iter().map(|(b, id)| json!({"backend": b, "system_identifier": id.to_string()})).collect::<Vec<_>>(),
        },
        "restored": *topology.restored,
        "restored_from": topology.restored_from,
        "patroni": table.patroni.as_ref().map(|p| patroni_json(p)),
        "fleet": topology.fleet.as_ref().map(|f| fleet_json(&f.load())),
        "summary": {
            "primary": primaries,
            "backends": table.backends.len(),
            "healthy": healthy,
            "fenced": fenced,
        },
    })
}

/// The fleet's store as this instance sees it.
fn store_json(store: &pglb_store::StoreStatus) -> Value {
    json!({
        "instance": store.instance,
        "prefix": store.prefix,
        "reachable": store.reachable,
        "endpoint": store.endpoint,
        "revision": store.revision,
        "last_sync_unix_ms": store.last_sync_unix_ms,
        "watching": store.watching,
        "watch_revision": store.watch_revision,
        "error": store.error,
    })
}

/// A cluster's shared items: each with who set it and when.
fn fleet_json(fleet: &FleetView) -> Value {
    let items: Vec<Value> = fleet
        .items
        .iter()
        .map(|item| {
            json!({
                "item": item.key.path(),
                "node": item.backend,
                "value": pglb_control::fleet::describe(&item.stored.value),
                "instance": item.stored.instance,
                "at_unix_ms": item.stored.at_unix_ms,
                "revision": item.stored.revision,
            })
        })
        .collect();
    let pending: Vec<Value> = fleet
        .pending
        .iter()
        .map(|(key, value)| json!({"item": key.path(), "value": pglb_control::fleet::describe(value)}))
        .collect();
    json!({
        "instance": fleet.instance,
        "system_identifier": fleet.system_id.map(|id| id.to_string()),
        "reachable": fleet.reachable,
        "synced": fleet.synced,
        "items": items,
        "pending": pending,
        "conflicts": fleet.conflicts,
        "last_conflict": fleet.last_conflict,
    })
}

/// Which fleet item holds backend `b`'s admin state, if one does.
fn admin_origin(b: &pglb_routing::BackendEntry, fleet: Option<&FleetView>) -> Value {
    let node = match &b.member {
        Some(_) => NodeKey::Member(b.config.name.clone()),
        None => NodeKey::Address(b.config.address()),
    };
    let key = ItemKey::Admin(node);
    match fleet.and_then(|f| f.items.iter().find(|i| i.key == key)) {
        Some(item) => {
            json!({"instance": item.stored.instance, "at_unix_ms": item.stored.at_unix_ms, "revision": item.stored.revision})
        }
        None => Value::Null,
    }
}

/// What Patroni said last, and how pglb uses it.
fn patroni_json(view: &pglb_routing::PatroniView) -> Value {
    let seconds =
        |t: Option<std::time::SystemTime>| t.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs());
    json!({
        "state": view.trust.as_str(),
        "leader_lock_used": view.trust == pglb_routing::Trust::Lock,
        "explain": view.trust.explain(),
        "leader": view.leader,
        "standby_leader": view.standby_leader,
        "paused": view.paused,
        "members": view.members.values().filter(|m| !m.departed).count(),
        "answered_by": view.answered_by,
        "answered_at": seconds(view.answered_at),
        "error": view.error,
    })
}

fn member_json(m: &pglb_routing::MemberView) -> Value {
    json!({
        "role": m.role,
        "state": m.state,
        "timeline": m.timeline,
        "lag_bytes": m.lag,
        "departed": m.departed,
        "noloadbalance": m.noloadbalance(),
        "nostream": m.nostream(),
        "nofailover": m.nofailover(),
        "failover_priority": m.failover_priority(),
    })
}

fn backends_json(cluster: &str, table: &RoutingTable, fleet: Option<&FleetView>) -> Vec<Value> {
    table
        .backends
        .iter()
        .map(|b| {
            json!({
                "cluster": cluster,
                "name": b.config.name,
                "address": b.config.address(),
                "weight": b.config.weight,
                "state": b.state.health().as_str(),
                "up": b.state.up,
                "healthy": b.state.health() == Health::Healthy,
                "checked": b.state.checked,
                "role": b.role.as_str(),
                "observed_role": b.state.role.as_str(),
                "pinned_role": b.config.role.map(|r| r.as_str()),
                "timeline": b.state.facts.timeline,
                "receiver": b.state.facts.receiver.map(|r| match r {
                    Receiver::Streaming { .. } => "streaming",
                    Receiver::NotStreaming => "not_streaming",
                    Receiver::Hidden => "hidden",
                }),
                "receiver_timeline": match b.state.facts.receiver {
                    Some(Receiver::Streaming { timeline }) => timeline,
                    _ => None,
                },
                "system_identifier": b.state.facts.system_id.map(|id| id.to_string()),
                "fenced": b.fenced.is_some(),
                "fence_kind": b.fenced.as_ref().map(|f| f.kind.as_str()),
                "fence_reason": b.fenced.as_ref().map(|f| &f.reason),
                "vetoed": b.vetoed.is_some(),
                "veto_reason": b.vetoed,
                "rejoining": b.rejoining,
                "tags": b.tags,
                "patroni": b.member.as_ref().map(member_json),
                "admin_state": b.admin.as_str(),
                "admin_origin": admin_origin(b, fleet),
                "lag_bytes": b.lag.bytes,
                "lag_seconds": b.lag.seconds,
                "active_connections": b.load.active(),
                "max_connections": b.config.max_connections,
                "last_error": b.state.last_error.as_ref().map(|e| &e.reason),
                "last_error_class": b.state.last_error.as_ref().map(|e| e.class.as_str()),
            })
        })
        .collect()
}

fn listeners_json(cluster: &str, table: &RoutingTable, listeners: &[ListenerView]) -> Vec<Value> {
    table
        .listeners
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let names = |set: &[usize]| set.iter().map(|&b| table.backends[b].config.name.clone()).collect::<Vec<_>>();
            let ctx = listeners.iter().find(|c| c.name == l.config.name && &*c.cluster == cluster);
            json!({
                "cluster": cluster,
                "name": l.config.name,
                "listen": l.config.listen.to_string(),
                "sni": l.config.sni,
                "role": l.config.role.as_str(),
                "fallback": l.config.fallback.map(|r| r.as_str()),
                "balance": l.config.balance.as_str(),
                "tags": l.config.tags,
                "via_fallback": l.via_fallback,
                "degraded": l.degraded,
                "backends": names(&l.eligible),
                "lagging": names(&l.lagging),
                "clients_held": ctx.map(|c| c.held),
                "clients_queued": ctx.map(|c| c.queued),
                "clients_active": ctx.map(|c| c.active),
                "index": i,
            })
        })
        .collect()
}

/// Renders `/connections`: every open session of every listener.
pub fn connections_json(sessions: &[SessionView]) -> String {
    let out: Vec<Value> = sessions
        .iter()
        .map(|s| {
            json!({
                "cluster": &*s.cluster,
                "listener": s.listener,
                "client": s.client.to_string(),
                "backend": s.backend,
                "backend_local_port": s.backend_local_port,
                "server_name": s.server_name,
                "via_fallback": s.via_fallback,
                "started_at": s.started.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0),
                "duration_s": s.started.elapsed().map(|d| d.as_secs_f64()).unwrap_or(0.0),
                "bytes_client_to_backend": s.bytes_client_to_backend,
                "bytes_backend_to_client": s.bytes_backend_to_client,
                "forwarder": s.forwarder,
            })
        })
        .collect();
    serde_json::to_string_pretty(&json!({ "connections": out })).unwrap_or_default()
}
