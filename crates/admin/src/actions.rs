//! Operator actions on backends.

use pglb_control::{Command, TopologyHandle};
use pglb_routing::{ActionError, AdminState};
use serde_json::json;
use tokio::sync::oneshot;

/// The outcome of an action: HTTP status and JSON body.
pub struct Reply {
    pub status: u16,
    pub body: String,
}

fn reply(status: u16, body: serde_json::Value) -> Reply {
    Reply { status, body: format!("{body}\n") }
}

/// The cluster an action on backend `name` is for: the one named, else
/// the only one with a backend of that name (the only cluster, for a
/// single-cluster config, whatever the name: its topology says "no such backend").
fn cluster_of<'a>(
    clusters: &'a [TopologyHandle],
    cluster: Option<&str>,
    name: &str,
) -> Result<&'a TopologyHandle, Reply> {
    let names = || clusters.iter().map(|c| c.cluster.to_string()).collect::<Vec<_>>();
    if let Some(cluster) = cluster {
        return clusters.iter().find(|c| &*c.cluster == cluster).ok_or_else(|| {
            reply(404, json!({"error": format!("no cluster named `{cluster}`"), "kind": "no_such_cluster", "clusters": names()}))
        });
    }
    if let [only] = clusters {
        return Ok(only);
    }
    let with: Vec<&TopologyHandle> =
        clusters.iter().filter(|c| c.table.load().backends.iter().any(|b| b.config.name == name)).collect();
    match with.as_slice() {
        [one] => Ok(one),
        [] => Err(reply(
            404,
            json!({"error": format!("no backend named `{name}` in any cluster"), "kind": "no_such_backend"}),
        )),
        many => {
            let in_: Vec<String> = many.iter().map(|c| c.cluster.to_string()).collect();
            Err(reply(
                409,
                json!({
                    "error": format!("backend `{name}` is in clusters {}: name the cluster, e.g. {}/{name}", in_.join(", "), in_[0]),
                    "kind": "ambiguous",
                    "clusters": in_,
                }),
            ))
        }
    }
}

/// Runs `action` on backend `name` of `cluster` (or of the one cluster
/// that has a backend so named).
pub async fn run(clusters: &[TopologyHandle], cluster: Option<&str>, name: &str, action: &str) -> Reply {
    let state = match action {
        "drain" => Some(AdminState::Drained),
        "disable" => Some(AdminState::Disabled),
        "enable" => Some(AdminState::Enabled),
        "unfence" => None,
        other => {
            return reply(
                404,
                json!({"error": format!("unknown action `{other}`"), "actions": ["drain", "disable", "enable", "unfence"]}),
            )
        }
    };
    let topology = match cluster_of(clusters, cluster, name) {
        Ok(t) => t,
        Err(refused) => return refused,
    };
    let commands = &topology.commands;
    let cluster = topology.cluster.to_string();
    let result = match state {
        Some(state) => {
            let (tx, rx) = oneshot::channel();
            let sent = commands.send(Command::Admin { backend: name.to_owned(), state, reply: tx }).await;
            match (sent, rx.await) {
                (Ok(()), Ok(r)) => {
                    r.map(|()| json!({"cluster": cluster, "backend": name, "admin_state": state.as_str()}))
                }
                _ => return reply(503, json!({"error": "pglb is shutting down"})),
            }
        }
        None => {
            let (tx, rx) = oneshot::channel();
            let sent = commands.send(Command::Unfence { backend: name.to_owned(), reply: tx }).await;
            match (sent, rx.await) {
                (Ok(()), Ok(r)) => r.map(|was| json!({"cluster": cluster, "backend": name, "unfenced": was})),
                _ => return reply(503, json!({"error": "pglb is shutting down"})),
            }
        }
    };
    match result {
        Ok(mut body) => {
            if let Some(fleet) = &topology.fleet {
                let fleet = fleet.load();
                body["shared_state"] = json!(if fleet.reachable && fleet.synced {
                    "sent to the fleet (etcd)"
                } else {
                    "queued locally: etcd is unreachable; applied on this instance, shared when it returns"
                });
            }
            reply(200, body)
        }
        Err(ActionError::NoSuchBackend(n)) => reply(
            404,
            json!({"error": format!("no backend named `{n}` in cluster `{cluster}`"), "kind": "no_such_backend"}),
        ),
        Err(ActionError::Conflict(why)) => reply(409, json!({"error": why})),
    }
}
