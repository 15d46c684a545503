//! Why a listener has nothing to route to, in words an operator can act on:
//! "primary \"pg1\" is disabled by an operator", not "no healthy primary".
//! Read from one routing table, for the refusal a client gets and the
//! connection log.

use pglb_config::Role;

use crate::state::ObservedRole;
use crate::table::{AdminState, ListenerRoute, RoutingTable};

/// The cause of `route` having no eligible backend in `table`: every backend
/// of the roles it may use (its role, then its fallback), each with why it is
/// out; or, when none has such a role, what the backends are instead.
pub fn unavailable(route: &ListenerRoute, table: &RoutingTable) -> String {
    let wants = |role: ObservedRole| {
        let fits = |r: Role| match r {
            Role::Primary => role == ObservedRole::Primary,
            Role::Replica => role == ObservedRole::Replica,
            Role::Any => matches!(role, ObservedRole::Primary | ObservedRole::Replica),
        };
        fits(route.config.role) || route.config.fallback.is_some_and(fits)
    };
    let primaries: Vec<&str> = table
        .backends
        .iter()
        .filter(|b| b.role == ObservedRole::Primary && b.serving())
        .map(|b| b.config.name.as_str())
        .collect();
    let wants_primary = wants(ObservedRole::Primary);
    if table.identity.pending {
        if !table.identity.in_doubt.is_empty() {
            let doubt: Vec<String> = table.identity.in_doubt.iter().map(|(b, id)| format!("\"{b}\" {id}")).collect();
            return format!(
                "identity unsettled: the backends report different system identifiers ({}) and none is pinned or saved; set system_identifier: in the config",
                doubt.join(", ")
            );
        }
        return "the first health checks of every backend have not completed yet (the cluster's system identifier is not settled)".into();
    }
    if let (true, Some(leader)) = (route.config.role == Role::Primary, table.standby_leader()) {
        return format!(
            "the cluster is a Patroni standby cluster (its standby leader `{leader}` replicates from another cluster): it takes no writes; connect to the primary cluster"
        );
    }
    if wants_primary && table.split_brain {
        return format!(
            "two backends answer as primary ({}): no writes until one is fenced, demoted or disabled",
            primaries.join(", ")
        );
    }
    if wants_primary && table.awaiting_shared {
        return "waiting for the fleet's shared state (shared_state: etcd) to be read once: fences other pglb instances set must be known before writes are routed".into();
    }
    if wants_primary && !table.all_checked {
        return "the first health checks of every backend have not completed yet".into();
    }
    let mut out = Vec::new();
    for (i, b) in table.backends.iter().enumerate() {
        if !wants(b.role) {
            continue;
        }
        let name = &b.config.name;
        let cause = if b.admin == AdminState::Disabled {
            format!("disabled by an operator (pglb enable {name})")
        } else if b.admin == AdminState::Drained {
            format!("drained by an operator (pglb enable {name})")
        } else if let Some(fence) = &b.fenced {
            format!("fenced: {}", fence.reason)
        } else if let Some(veto) = &b.vetoed {
            format!("vetoed: {veto}")
        } else if b.member.as_ref().is_some_and(|m| m.departed) {
            "gone from Patroni's member list (drained until its sessions end)".into()
        } else if !b.selectable(route.config.role, &route.config.tags) && b.role == ObservedRole::Replica {
            if b.member.as_ref().is_some_and(|m| m.noloadbalance()) {
                "tagged noloadbalance in Patroni (out of read balancing)".into()
            } else {
                let want: Vec<String> = route.config.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("not tagged {} (the listener's tags)", want.join(", "))
            }
        } else if !b.state.up {
            match &b.state.last_error {
                Some(e) => format!("down ({})", e.reason),
                None => "down".into(),
            }
        } else if route.lagging.contains(&i) {
            let bytes = b.lag.bytes.map_or_else(|| "?".into(), |n| format!("{n} B"));
            let seconds = b.lag.seconds.map_or_else(|| "?".into(), |s| format!("{s:.1}s"));
            format!("lagging ({bytes} / {seconds} behind, past the listener's max_lag)")
        } else {
            continue;
        };
        out.push(format!("{} \"{name}\" is {cause}", b.role));
    }
    if !out.is_empty() {
        return out.join("; ");
    }
    let what = if wants_primary { "no primary elected" } else { "no replica" };
    let others: Vec<String> = table
        .backends
        .iter()
        .map(|b| {
            let state = if b.state.up { b.role.to_string() } else { "down".into() };
            format!("{} {state}", b.config.name)
        })
        .collect();
    if others.is_empty() {
        format!("{what}: no backends are configured")
    } else {
        format!("{what}: {}", others.join(", "))
    }
}
