//! The file as written: loose about keys and values, so that validation can
//! report every problem at once with its position — unknown keys (collected
//! in `other`, with the closest known key as a suggestion), and values of
//! the wrong type, in the user's terms.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// Any YAML scalar, kept as text (`interval: 1` reaches validation as `"1"`,
/// which can then say "add a unit" instead of "expected a string").
#[derive(Debug, Clone)]
pub struct Text(pub String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl Visitor<'_> for TextVisitor {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a scalar (text or number)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
        }
        deserializer.deserialize_any(TextVisitor)
    }
}

#[derive(Debug, Deserialize)]
pub struct RawConfig {
    pub forwarder: Option<Text>,
    pub shutdown_timeout: Option<Text>,
    pub state_file: Option<Text>,
    pub log_format: Option<Text>,
    pub multi_primary: Option<Text>,
    pub system_identifier: Option<Text>,
    pub defaults: Option<RawDefaults>,
    pub limits: Option<RawLimits>,
    pub admin: Option<RawAdmin>,
    pub shared_state: Option<RawSharedState>,
    pub health: Option<RawHealth>,
    pub patroni: Option<RawPatroni>,
    #[serde(default)]
    pub listeners: Vec<RawListener>,
    #[serde(default)]
    pub backends: Vec<RawBackend>,
    pub clusters: Option<Vec<RawCluster>>,
    /// Keys this section does not know.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_yaml::Value>,
}

/// One entry of `clusters:`; what it leaves out it inherits from the top
/// level (`health` and `defaults` key by key).
#[derive(Debug, Deserialize)]
pub struct RawCluster {
    pub name: Option<Text>,
    pub multi_primary: Option<Text>,
    pub system_identifier: Option<Text>,
    pub defaults: Option<RawDefaults>,
    pub health: Option<RawHealth>,
    pub patroni: Option<RawPatroni>,
    #[serde(default)]
    pub listeners: Vec<RawListener>,
    #[serde(default)]
    pub backends: Vec<RawBackend>,
    /// Keys this section does not know.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_yaml::Value>,
}

/// `patroni:` of a cluster: where its members' REST APIs answer.
#[derive(Debug, Default, Deserialize)]
pub struct RawPatroni {
    pub urls: Option<OneOrMany>,
    pub interval: Option<Text>,
    pub timeout: Option<Text>,
    pub remove_after: Option<Text>,
    pub cafile: Option<Text>,
    pub certfile: Option<Text>,
    pub keyfile: Option<Text>,
    /// Keys this section does not know.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_yaml::Value>,
}

/// `shared_state:`: the fleet's store.
#[derive(Debug, Default, Deserialize)]
pub struct RawSharedState {
    pub etcd: Option<RawEtcd>,
    pub instance_id: Option<Text>,
    pub sync_interval: Option<Text>,
    /// Keys this section does not know.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawEtcd {
    pub endpoints: Option<OneOrMany>,
    pub prefix: Option<Text>,
    pub cafile: Option<Text>,
    pub certfile: Option<Text>,
    pub keyfile: Option<Text>,
    pub user: Option<Text>,
    pub password: Option<Text>,
    pub password_env: Option<Text>,
    pub password_file: Option<Text>,
    pub timeout: Option<Text>,
    /// Keys this section does not know.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_yaml::Value>,
}

/// A config read only for its `admin` section; the rest is not looked at.
#[derive(Debug, Deserialize)]
pub struct RawAdminOnly {
    pub admin: Option<RawAdmin>,
    #[serde(flatten)]
    pub _rest: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
pub struct RawAdmin {
    pub listen: Option<Text>,
    pub token_env: Option<Text>,
    pub token_file: Option<Text>,
    /// Keys this section does not know.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_yaml::Value>,
}

/// Process-wide bounds on what clients can open.
#[derive(Debug, Default, Deserialize)]
pub struct RawLimits {
    pub max_pending: Option<Text>,
    pub max_pending_per_source: Option<Text>,
    /// Keys this section does not know.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_yaml::Value>,
}

/// Listener settings that every listener inherits unless it sets its own.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct RawDefaults {
    pub on_ineligible: Option<Text>,
    pub on_lag: Option<Text>,
    pub hold_timeout: Option<Text>,
    pub hold_max: Option<Text>,
    pub hold_restart_timeout: Option<Text>,
    pub release_rate: Option<Text>,
    pub max_lag_bytes: Option<Text>,
    pub max_lag_seconds: Option<Text>,
    pub max_clients: Option<Text>,
    pub queue_timeout: Option<Text>,
    pub client_tcp_user_timeout: Option<Text>,
    /// Keys this section does not know.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Default, Clone, Deserialize)]
pub struct RawHealth {
    pub interval: Option<Text>,
    pub fast_interval: Option<Text>,
    pub timeout: Option<Text>,
    pub rise: Option<Text>,
    pub fall: Option<Text>,
    pub down_after: Option<Text>,
    pub user: Option<Text>,
    pub password: Option<Text>,
    pub password_env: Option<Text>,
    pub password_file: Option<Text>,
    pub database: Option<Text>,
    pub sslmode: Option<Text>,
    pub sslrootcert: Option<Text>,
    /// Keys this section does not know.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
pub struct RawListener {
    pub name: Option<Text>,
    pub listen: Option<Text>,
    pub role: Option<Text>,
    pub fallback: Option<Text>,
    pub balance: Option<Text>,
    pub connect_timeout: Option<Text>,
    pub startup_timeout: Option<Text>,
    pub on_ineligible: Option<Text>,
    pub on_lag: Option<Text>,
    pub hold_timeout: Option<Text>,
    pub hold_max: Option<Text>,
    pub hold_restart_timeout: Option<Text>,
    pub release_rate: Option<Text>,
    pub max_lag_bytes: Option<Text>,
    pub max_lag_seconds: Option<Text>,
    pub max_clients: Option<Text>,
    pub queue_timeout: Option<Text>,
    pub client_tcp_user_timeout: Option<Text>,
    pub allow: Option<OneOrMany>,
    pub freebind: Option<Text>,
    pub sni: Option<OneOrMany>,
    pub tags: Option<BTreeMap<String, Text>>,
    /// Keys this section does not know.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
pub struct RawBackend {
    pub name: Option<Text>,
    pub address: Option<Text>,
    pub weight: Option<Text>,
    pub max_connections: Option<Text>,
    pub role: Option<Text>,
    pub tags: Option<BTreeMap<String, Text>>,
    /// Keys this section does not know.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_yaml::Value>,
}

/// One value or a list of them (`allow: 10.0.0.0/8` or `allow: [a, b]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(Text),
    Many(Vec<Text>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<Text> {
        match self {
            Self::One(t) => vec![t],
            Self::Many(v) => v,
        }
    }
}

/// The keys each section knows, for "did you mean" suggestions.
pub const TOP_KEYS: &[&str] = &[
    "forwarder",
    "shutdown_timeout",
    "state_file",
    "log_format",
    "multi_primary",
    "system_identifier",
    "defaults",
    "limits",
    "admin",
    "shared_state",
    "health",
    "listeners",
    "backends",
    "clusters",
    "patroni",
];
pub const CLUSTER_KEYS: &[&str] =
    &["name", "multi_primary", "system_identifier", "defaults", "health", "patroni", "listeners", "backends"];
pub const PATRONI_KEYS: &[&str] = &["urls", "interval", "timeout", "remove_after", "cafile", "certfile", "keyfile"];
pub const LIMITS_KEYS: &[&str] = &["max_pending", "max_pending_per_source"];
pub const SHARED_STATE_KEYS: &[&str] = &["etcd", "instance_id", "sync_interval"];
pub const ETCD_KEYS: &[&str] = &[
    "endpoints",
    "prefix",
    "cafile",
    "certfile",
    "keyfile",
    "user",
    "password",
    "password_env",
    "password_file",
    "timeout",
];
pub const ADMIN_KEYS: &[&str] = &["listen", "token_env", "token_file"];
pub const DEFAULTS_KEYS: &[&str] = &[
    "on_ineligible",
    "on_lag",
    "hold_timeout",
    "hold_max",
    "hold_restart_timeout",
    "release_rate",
    "max_lag_bytes",
    "max_lag_seconds",
    "max_clients",
    "queue_timeout",
    "client_tcp_user_timeout",
];
pub const HEALTH_KEYS: &[&str] = &[
    "interval",
    "fast_interval",
    "timeout",
    "rise",
    "fall",
    "down_after",
    "user",
    "password",
    "password_env",
    "password_file",
    "database",
    "sslmode",
    "sslrootcert",
];
pub const LISTENER_KEYS: &[&str] = &[
    "name",
    "listen",
    "role",
    "fallback",
    "balance",
    "connect_timeout",
    "startup_timeout",
    "on_ineligible",
    "on_lag",
    "hold_timeout",
    "hold_max",
    "hold_restart_timeout",
    "release_rate",
    "max_lag_bytes",
    "max_lag_seconds",
    "max_clients",
    "queue_timeout",
    "client_tcp_user_timeout",
    "allow",
    "freebind",
    "sni",
    "tags",
];
pub const BACKEND_KEYS: &[&str] = &["name", "address", "weight", "max_connections", "role", "tags"];

#[cfg(test)]
mod tests {
    use super::*;

    /// Every listed key is one the section really reads (not collected in `other`).
    #[test]
    fn listed_keys_are_known() {
        let mapping = |keys: &[&str]| keys.iter().map(|k| format!("{k}: x")).collect::<Vec<_>>().join(", ");
        let health: RawHealth = serde_yaml::from_str(&format!("{{{}}}", mapping(HEALTH_KEYS))).expect("health");
        assert!(health.other.is_empty(), "{:?}", health.other.keys());
        let l: RawListener =
            serde_yaml::from_str(&format!("{{{}}}", mapping(LISTENER_KEYS).replace("tags: x", "tags: {}")))
                .expect("listener");
        assert!(l.other.is_empty(), "{:?}", l.other.keys());
        let b: RawBackend =
            serde_yaml::from_str(&format!("{{{}}}", mapping(BACKEND_KEYS).replace("tags: x", "tags: {}")))
                .expect("backend");
        let p: RawPatroni = serde_yaml::from_str(&format!("{{{}}}", mapping(PATRONI_KEYS))).expect("patroni");
        assert!(p.other.is_empty(), "{:?}", p.other.keys());
        assert!(b.other.is_empty(), "{:?}", b.other.keys());
        let d: RawDefaults = serde_yaml::from_str(&format!("{{{}}}", mapping(DEFAULTS_KEYS))).expect("defaults");
        assert!(d.other.is_empty(), "{:?}", d.other.keys());
        let a: RawAdmin = serde_yaml::from_str(&format!("{{{}}}", mapping(ADMIN_KEYS))).expect("admin");
        assert!(a.other.is_empty(), "{:?}", a.other.keys());
        let cluster: RawCluster = serde_yaml::from_str(&format!(
            "{{{}}}",
            mapping(CLUSTER_KEYS)
                .replace("defaults: x", "defaults: {}")
                .replace("health: x", "health: {}")
                .replace("patroni: x", "patroni: {}")
                .replace("listeners: x", "listeners: []")
                .replace("backends: x", "backends: []")
        ))
        .expect("cluster");
        assert!(cluster.other.is_empty(), "{:?}", cluster.other.keys());
        let limits: RawLimits = serde_yaml::from_str(&format!("{{{}}}", mapping(LIMITS_KEYS))).expect("limits");
        assert!(limits.other.is_empty(), "{:?}", limits.other.keys());
        let top = "{forwarder: x, shutdown_timeout: x, state_file: x, log_format: x, multi_primary: x, system_identifier: x, defaults: {}, limits: {}, admin: {}, shared_state: {}, health: {}, listeners: [], backends: [], clusters: [], patroni: {}}";
        let c: RawConfig = serde_yaml::from_str(top).expect("top");
        assert!(c.other.is_empty() && TOP_KEYS.len() == 15, "{:?}", c.other.keys());
        let shared: RawSharedState =
            serde_yaml::from_str(&format!("{{{}}}", mapping(SHARED_STATE_KEYS).replace("etcd: x", "etcd: {}")))
                .expect("shared_state");
        assert!(shared.other.is_empty(), "{:?}", shared.other.keys());
        let etcd: RawEtcd = serde_yaml::from_str(&format!("{{{}}}", mapping(ETCD_KEYS))).expect("etcd");
        assert!(etcd.other.is_empty(), "{:?}", etcd.other.keys());
    }
}
