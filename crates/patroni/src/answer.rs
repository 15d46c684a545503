//! Patroni's `GET /cluster`, parsed leniently: fields pglb does not use
//! are ignored, missing optional ones are `None`.

use pglb_config::Tags;
use serde::Deserialize;

/// One member as `/cluster` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub name: String,
    pub role: String,
    pub state: String,
    pub api_url: Option<String>,
    /// PostgreSQL's `connect_address`.
    pub host: Option<String>,
    pub port: Option<u16>,
    pub timeline: Option<u64>,
    pub lag: Option<u64>,
    pub tags: Tags,
}

impl Member {
    pub fn is_leader(&self) -> bool {
        self.role == "leader" || self.role == "master" || self.role == "primary"
    }
}

/// The whole answer.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClusterAnswer {
    pub members: Vec<Member>,
    pub pause: bool,
    pub scope: Option<String>,
}

#[derive(Deserialize)]
struct RawAnswer {
    #[serde(default)]
    members: Vec<RawMember>,
    #[serde(default)]
    pause: bool,
    scope: Option<String>,
}

#[derive(Deserialize)]
struct RawMember {
    name: String,
    #[serde(default)]
    role: String,
    #[serde(default)]
    state: String,
    api_url: Option<String>,
    host: Option<String>,
    port: Option<serde_json::Value>,
    timeline: Option<u64>,
    lag: Option<serde_json::Value>,
    #[serde(default)]
    tags: serde_json::Map<String, serde_json::Value>,
}

impl ClusterAnswer {
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let raw: RawAnswer = serde_json::from_slice(body).map_err(|e| format!("not Patroni's /cluster JSON: {e}"))?;
        let members = raw
            .members
            .into_iter()
            .map(|m| Member {
                name: m.name,
                role: m.role,
                state: m.state,
                api_url: m.api_url,
                host: m.host.filter(|h| !h.is_empty()),
                port: m.port.as_ref().and_then(number).and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0),
                timeline: m.timeline,
                lag: m.lag.as_ref().and_then(number),
                tags: m.tags.into_iter().map(|(k, v)| (k, text(&v))).collect(),
            })
            .collect();
        Ok(Self { members, pause: raw.pause, scope: raw.scope })
    }

    pub fn leader(&self) -> Option<&Member> {
        self.members.iter().find(|m| m.is_leader())
    }

    pub fn standby_leader(&self) -> Option<&Member> {
        self.members.iter().find(|m| m.role == "standby_leader")
    }
}

fn number(v: &serde_json::Value) -> Option<u64> {
    match v {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// A tag's value as text: strings as they are, `true`/`false`, numbers as
/// written (what a listener's `tags:` is compared with).
fn text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_patroni_4_answer_parses_with_its_tags_as_text() {
        let body = br#"{"members": [
            {"name": "pg1", "role": "leader", "state": "running", "api_url": "http://127.0.0.1:8008/patroni",
             "host": "127.0.0.1", "port": 5432, "timeline": 3, "tags": {"dc": "east", "failover_priority": 2}},
            {"name": "pg2", "role": "replica", "state": "streaming", "api_url": "http://127.0.0.1:8009/patroni",
             "host": "127.0.0.1", "port": 5433, "timeline": 3, "lag": 0, "receive_lag": 0,
             "tags": {"noloadbalance": true}},
            {"name": "pg3", "role": "replica", "state": "stopped", "lag": "unknown"}
        ], "scope": "demo", "pause": true}"#;
        let answer = ClusterAnswer::parse(body).expect("parses");
        assert!(answer.pause);
        assert_eq!(answer.leader().map(|m| m.name.as_str()), Some("pg1"));
        assert_eq!(answer.members[0].tags.get("failover_priority").map(String::as_str), Some("2"));
        assert_eq!(answer.members[1].tags.get("noloadbalance").map(String::as_str), Some("true"));
        assert_eq!(answer.members[2].lag, None);
        assert_eq!(answer.members[2].host, None);
        assert!(ClusterAnswer::parse(b"<html>").is_err());
    }
}
