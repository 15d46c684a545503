//! `/status` and `/connections` as tables a person reads at a glance
//! (`--json` prints the admin endpoint's JSON instead).

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// Listeners, then backends, with a header naming the live config.
pub fn status(status: &Value) -> String {
    let mut out = String::new();
    let config = &status["config"];
    let hash: String = config["hash"].as_str().unwrap_or("").chars().take(12).collect();
    out += &format!(
        "config {} (sha256 {hash}…, loaded {} ago)\n",
        text(&config["path"]),
        ago(config["loaded_at"].as_u64().unwrap_or(0))
    );
    let reload = &config["last_reload"];
    if let Some(at) = reload["at"].as_u64() {
        match reload["error"].as_str() {
            Some(error) => {
                out += &format!("last reload {} ago: REJECTED, the config above keeps serving: {error}\n", ago(at))
            }
            None => out += &format!("last reload {} ago: applied\n", ago(at)),
        }
    }
    let clusters = list(&status["clusters"]);
    let grouped = clusters.len() > 1 || clusters.iter().any(|c| c["name"] != "default");
    if !grouped {
        out += &cluster_section(status, status, None);
        return out;
    }
    for cluster in &clusters {
        out += &format!("\ncluster {}: {}\n", text(&cluster["name"]), one_line(cluster));
        out += &cluster_section(cluster, status, cluster["name"].as_str());
    }
    out
}

/// A cluster at a glance: its primary, how many backends are healthy and
/// fenced, whether it is split or its identity unsettled.
fn one_line(cluster: &Value) -> String {
    let summary = &cluster["summary"];
    let primary = match list(&summary["primary"]).as_slice() {
        [] => "NO PRIMARY".to_owned(),
        [one] => format!("primary {}", text(one)),
        many => format!("primaries {}", many.iter().map(text).collect::<Vec<_>>().join(", ")),
    };
    let mut line = format!("{primary}, {}/{} backends healthy", text(&summary["healthy"]), text(&summary["backends"]));
    match summary["fenced"].as_u64() {
        Some(0) | None => {}
        Some(n) => line += &format!(", {n} fenced"),
    }
    if cluster["split_brain"].as_bool() == Some(true) {
        line += ", SPLIT BRAIN";
    }
    if cluster["identity"]["unsettled"].as_bool() == Some(true) {
        line += ", IDENTITY UNSETTLED";
    }
    let patroni = &cluster["patroni"];
    if patroni.is_object() {
        line += &match patroni["state"].as_str() {
            Some("leader_lock") => format!(", Patroni leader {}", text(&patroni["leader"])),
            Some(state) => format!(", Patroni: own checks ({state})"),
            None => String::new(),
        };
    }
    line
}

/// One cluster's notes and tables: `notes` holds its restore notes,
/// identity and split brain (the cluster's entry, or the whole status of a
/// single-cluster pglb); `only` keeps the rows of that cluster.
fn cluster_section(notes: &Value, status: &Value, only: Option<&str>) -> String {
    let mut out = String::new();
    let status_rows = |key: &str| -> Vec<Value> {
        list(&status[key]).into_iter().filter(|row| only.is_none_or(|c| row["cluster"] == c)).collect()
    };
    let from = match notes["restored_from"].as_str() {
        Some("upgrade") => "the pglb this one took over from",
        _ => "the state file",
    };
    for note in list(&notes["restored"]) {
        out += &format!("restored at start from {from}: {}\n", text(&note));
    }
    let identity = &notes["identity"];
    if identity["unsettled"].as_bool() == Some(true) {
        let doubt: Vec<String> = list(&identity["in_doubt"])
            .iter()
            .map(|d| format!("{} {}", text(&d["backend"]), text(&d["system_identifier"])))
            .collect();
        out += &format!(
            "IDENTITY UNSETTLED: the backends report different system identifiers ({}); nothing is routed until system_identifier: is set in the config\n",
            doubt.join(", ")
        );
    } else if let Some(id) = identity["system_identifier"].as_str() {
        out += &format!("cluster system identifier {id} ({})\n", text(&identity["source"]));
    }
    if notes["split_brain"].as_bool() == Some(true) {
        out += "SPLIT BRAIN: more than one unfenced primary answers; writes are refused until one is fenced\n";
    }
    let patroni = &notes["patroni"];
    if patroni.is_object() {
        let mut line = format!("Patroni: {} — {}", text(&patroni["state"]), text(&patroni["explain"]));
        if let Some(leader) = patroni["leader"].as_str() {
            line += &format!("; leader {leader}");
        }
        if let Some(standby) = patroni["standby_leader"].as_str() {
            line += &format!("; STANDBY CLUSTER (standby leader {standby}): no writes");
        }
        if patroni["paused"].as_bool() == Some(true) {
            line += "; PAUSED (maintenance mode)";
        }
        if let Some(by) = patroni["answered_by"].as_str() {
            line += &format!("; last answer from {by}");
        }
        if let Some(at) = patroni["answered_at"].as_u64() {
            line += &format!(" ({} ago)", ago(at));
        }
        out += &line;
        out += "\n";
    }
    out += &shared_state(&notes["fleet"], &status["shared_state"]);
    out += "\n";
    let listeners: Vec<Vec<String>> = status_rows("listeners")
        .iter()
        .map(|l| {
            let role = match l["fallback"].as_str() {
                Some(f) => format!("{}→{f}", text(&l["role"])),
                None => text(&l["role"]),
            };
            let mut routes = names(&l["backends"]);
            if l["via_fallback"].as_bool() == Some(true) {
                routes += " (fallback)";
            }
            if l["degraded"].as_bool() == Some(true) {
                routes += " (degraded)";
            }
            let names: Vec<String> = list(&l["sni"]).iter().map(text).collect();
            let listen = match names.is_empty() {
                true => text(&l["listen"]),
                false => format!("{} ({})", text(&l["listen"]), names.join(" ")),
            };
            vec![
                text(&l["name"]),
                listen,
                role,
                text(&l["balance"]),
                routes,
                text(&l["clients_active"]),
                text(&l["clients_held"]),
                text(&l["clients_queued"]),
            ]
        })
        .collect();
    out += &table(&["LISTENER", "LISTEN", "ROLE", "BALANCE", "ROUTES TO", "ACTIVE", "HELD", "QUEUED"], &listeners);
    out += "\n";
    let backends: Vec<Vec<String>> = status_rows("backends")
        .iter()
        .map(|b| {
            vec![
                text(&b["name"]),
                text(&b["address"]),
                text(&b["state"]),
                text(&b["role"]),
                timeline(b),
                lag(b),
                text(&b["active_connections"]),
                admin(b),
                note(b),
            ]
        })
        .collect();
    out += &table(&["BACKEND", "ADDRESS", "STATE", "ROLE", "TL", "LAG", "SESSIONS", "ADMIN", "NOTE"], &backends);
    out
}

/// One row per open session.
pub fn connections(value: &Value) -> String {
    let rows: Vec<Vec<String>> = list(&value["connections"])
        .iter()
        .map(|c| {
            vec![
                text(&c["listener"]),
                text(&c["client"]),
                text(&c["backend"]),
                seconds(c["duration_s"].as_f64().unwrap_or(0.0)),
                bytes(c["bytes_client_to_backend"].as_u64().unwrap_or(0)),
                bytes(c["bytes_backend_to_client"].as_u64().unwrap_or(0)),
                text(&c["server_name"]),
            ]
        })
        .collect();
    let mut out = table(&["LISTENER", "CLIENT", "BACKEND", "DURATION", "SENT", "RECEIVED", "SERVER NAME"], &rows);
    out += &format!("{} session{}\n", rows.len(), if rows.len() == 1 { "" } else { "s" });
    out
}

/// Left-aligned columns, two spaces apart; the last column is not padded.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                s += cell;
            } else {
                s += &format!("{cell:<w$}  ");
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out += &line(row.iter().map(String::as_str).collect());
    }
    out
}

fn list(v: &Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_default()
}

/// A scalar as text; `-` for null.
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn names(v: &Value) -> String {
    let all: Vec<String> = list(v).iter().map(text).collect();
    if all.is_empty() {
        "(none)".to_owned()
    } else {
        all.join(" ")
    }
}

/// A primary's timeline, or the one a replica's WAL receiver streams.
fn timeline(b: &Value) -> String {
    match (&b["timeline"], &b["receiver_timeline"]) {
        (Value::Null, tl) => text(tl),
        (tl, _) => text(tl),
    }
}

fn lag(b: &Value) -> String {
    match (b["lag_bytes"].as_u64(), b["lag_seconds"].as_f64()) {
        (None, None) => "-".to_owned(),
        (bytes_behind, secs) => {
            let by = bytes_behind.map_or("-".to_owned(), bytes);
            let s = secs.map_or("-".to_owned(), seconds);
            format!("{by} / {s}")
        }
    }
}

fn note(b: &Value) -> String {
    let mut notes = Vec::new();
    if b["fenced"].as_bool() == Some(true) {
        notes.push(format!("fenced ({}): {}", text(&b["fence_kind"]), text(&b["fence_reason"])));
    }
    if b["receiver"] == "not_streaming" {
        notes.push("WAL receiver not streaming".to_owned());
    }
    if let Some(pinned) = b["pinned_role"].as_str() {
        notes.push(format!("role pinned to {pinned}"));
    }
    if let Some(veto) = b["veto_reason"].as_str() {
        notes.push(format!("VETOED: {veto}"));
    }
    let member = &b["patroni"];
    if member.is_object() {
        let mut tags = Vec::new();
        if member["departed"].as_bool() == Some(true) {
            tags.push("left Patroni's list (draining)".to_owned());
        }
        for flag in ["noloadbalance", "nostream", "nofailover"] {
            if member[flag].as_bool() == Some(true) {
                tags.push(flag.to_owned());
            }
        }
        if let Some(p) = member["failover_priority"].as_str() {
            tags.push(format!("failover_priority {p}"));
        }
        notes.push(format!("Patroni {} {}", text(&member["role"]), text(&member["state"])));
        notes.extend(tags);
    }
    if let Some(tags) = b["tags"].as_object().filter(|t| !t.is_empty()) {
        let special = ["noloadbalance", "nostream", "nofailover", "failover_priority", "clonefrom", "replicatefrom"];
        let shown: Vec<String> = tags
            .iter()
            .filter(|(k, _)| !special.contains(&k.as_str()))
            .map(|(k, v)| format!("{k}={}", text(v)))
            .collect();
        if !shown.is_empty() {
            notes.push(format!("tags {}", shown.join(",")));
        }
    }
    if let Some(error) = b["last_error"].as_str() {
        notes.push(format!("last error ({}): {error}", text(&b["last_error_class"])));
    }
    notes.join("; ")
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn seconds(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!("{}h{:02}m", (s / 3600.0) as u64, ((s % 3600.0) / 60.0) as u64)
    }
}

/// A backend's admin state, and which pglb of the fleet set it.
fn admin(b: &Value) -> String {
    let state = text(&b["admin_state"]);
    let origin = &b["admin_origin"];
    match (origin["instance"].as_str(), origin["at_unix_ms"].as_u64()) {
        (Some(instance), Some(at)) => format!("{state} ({instance}, {} ago)", ago(at / 1000)),
        _ => state,
    }
}

/// A cluster's shared state in a line: the store, the items, what waits.
fn shared_state(cluster: &Value, store: &Value) -> String {
    if !cluster.is_object() {
        return String::new();
    }
    let items = list(&cluster["items"]).len();
    let pending = list(&cluster["pending"]);
    let mut line = match (store["reachable"].as_bool(), cluster["synced"].as_bool()) {
        (Some(true), Some(true)) => format!(
            "shared state: etcd {} (as {}), {items} item{}",
            text(&store["endpoint"]),
            text(&cluster["instance"]),
            if items == 1 { "" } else { "s" }
        ),
        (Some(true), _) => "shared state: etcd answers; the cluster's items are not read yet".to_owned(),
        _ => format!(
            "SHARED STATE: etcd unreachable ({}): routing uses the last known shared state; changes here are queued locally",
            text(&store["error"])
        ),
    };
    if !pending.is_empty() {
        let what: Vec<String> = pending.iter().map(|p| format!("{} {}", text(&p["item"]), text(&p["value"]))).collect();
        line += &format!("; {} queued locally: {}", pending.len(), what.join(", "));
    }
    if let Some(n) = cluster["conflicts"].as_u64().filter(|n| *n > 0) {
        line += &format!("; {n} conflict{} (last: {})", if n == 1 { "" } else { "s" }, text(&cluster["last_conflict"]));
    }
    line + "\n"
}

fn ago(epoch_secs: u64) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    seconds(now.saturating_sub(epoch_secs) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_status_reads_at_a_glance() {
        let status = json!({
            "split_brain": false,
            "config": {"path": "/etc/pglb/lb.yaml", "hash": "0123456789abcdef", "loaded_at": 0},
            "listeners": [
                {"name": "rw", "listen": "127.0.0.1:6432", "role": "primary", "fallback": null, "balance": "round_robin",
                 "backends": ["pg0"], "via_fallback": false, "degraded": false, "clients_active": 1, "clients_held": 0, "clients_queued": 0},
                {"name": "ro", "listen": "127.0.0.1:6433", "role": "replica", "fallback": "primary", "balance": "least_conn",
                 "backends": [], "via_fallback": false, "degraded": false, "clients_active": 0, "clients_held": 2, "clients_queued": 0}
            ],
            "backends": [
                {"name": "pg0", "address": "127.0.0.1:5432", "state": "healthy", "role": "primary", "timeline": 2,
                 "lag_bytes": null, "lag_seconds": null, "active_connections": 1, "admin_state": "enabled",
                 "fenced": false, "pinned_role": null, "last_error": null},
                {"name": "pg1", "address": "127.0.0.1:5433", "state": "down", "role": "replica", "timeline": 1,
                 "lag_bytes": 2048, "lag_seconds": 0.5, "active_connections": 0, "admin_state": "drained",
                 "fenced": true, "fence_kind": "timeline", "fence_reason": "timeline 1 < 2",
                 "pinned_role": null, "last_error": "connection refused", "last_error_class": "refused"}
            ]
        });
        let text = super::status(&status);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("config /etc/pglb/lb.yaml (sha256 0123456789ab…"), "{text}");
        assert_eq!(lines[2], "LISTENER  LISTEN          ROLE             BALANCE      ROUTES TO  ACTIVE  HELD  QUEUED");
        assert_eq!(lines[3], "rw        127.0.0.1:6432  primary          round_robin  pg0        1       0     0");
        assert_eq!(lines[4], "ro        127.0.0.1:6433  replica→primary  least_conn   (none)     0       2     0");
        assert!(
            lines[7] == "pg0      127.0.0.1:5432  healthy  primary  2   -               1         enabled",
            "{text}"
        );
        assert!(
            lines[8].contains("2.0 KiB / 0.5s")
                && lines[8].ends_with("fenced (timeline): timeline 1 < 2; last error (refused): connection refused"),
            "{text}"
        );
    }

    #[test]
    fn patroni_says_how_it_is_used_per_cluster_and_per_member() {
        let status = json!({
            "config": {"path": "lb.yaml", "hash": "0123456789abcdef", "loaded_at": 0},
            "patroni": {"state": "api_unreachable", "explain": "no Patroni REST API answers: routing on pglb's own checks, with the last known members",
                        "leader": "pg1", "standby_leader": null, "paused": true, "answered_by": "http://127.0.0.1:8008", "answered_at": null},
            "listeners": [],
            "backends": [
                {"name": "pg2", "address": "127.0.0.1:5433", "state": "healthy", "role": "replica", "timeline": 3,
                 "active_connections": 0, "admin_state": "enabled", "fenced": false, "veto_reason": null,
                 "patroni": {"role": "replica", "state": "streaming", "departed": true, "noloadbalance": true,
                             "nostream": false, "nofailover": true, "failover_priority": "0"},
                 "tags": {"dc": "east", "noloadbalance": "true"}}
            ]
        });
        let text = super::status(&status);
        assert!(
            text.contains("Patroni: api_unreachable — no Patroni REST API answers: routing on pglb's own checks, with the last known members; leader pg1; PAUSED (maintenance mode); last answer from http://127.0.0.1:8008"),
            "{text}"
        );
        assert!(
            text.contains("Patroni replica streaming; left Patroni's list (draining); noloadbalance; nofailover; failover_priority 0; tags dc=east"),
            "{text}"
        );
        let one = one_line(&json!({"summary": {"primary": ["pg1"], "healthy": 3, "backends": 3},
            "patroni": {"state": "leader_lock", "leader": "pg1"}}));
        assert_eq!(one, "primary pg1, 3/3 backends healthy, Patroni leader pg1");
    }

    #[test]
    fn connections_are_counted() {
        let value = json!({"connections": [{"listener": "rw", "client": "127.0.0.1:5000", "backend": "pg0",
            "duration_s": 75.0, "bytes_client_to_backend": 10, "bytes_backend_to_client": 3_000_000}]});
        let text = connections(&value);
        assert!(text.contains("rw        127.0.0.1:5000  pg0      1m15s     10 B  2.9 MiB"), "{text}");
        assert!(text.ends_with("1 session\n"));
    }
}
