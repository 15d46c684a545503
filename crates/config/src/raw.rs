//! The file as written: strict about keys, loose about values, so that
//! validation can report every bad value at once with its position.

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
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub forwarder: Option<Text>,
    pub shutdown_timeout: Option<Text>,
    pub log_format: Option<Text>,
    pub multi_primary: Option<Text>,
    pub defaults: Option<RawDefaults>,
    pub admin: Option<RawAdmin>,
    pub health: Option<RawHealth>,
    #[serde(default)]
    pub listeners: Vec<RawListener>,
    #[serde(default)]
    pub backends: Vec<RawBackend>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<Text>,
    pub token_env: Option<Text>,
    pub token_file: Option<Text>,
}

/// Listener settings that every listener inherits unless it sets its own.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDefaults {
    pub on_ineligible: Option<Text>,
    pub on_lag: Option<Text>,
    pub hold_timeout: Option<Text>,
    pub hold_max: Option<Text>,
    pub max_lag_bytes: Option<Text>,
    pub max_lag_seconds: Option<Text>,
    pub max_clients: Option<Text>,
    pub queue_timeout: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    pub interval: Option<Text>,
    pub fast_interval: Option<Text>,
    pub timeout: Option<Text>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
    pub down_after: Option<Text>,
    pub user: Option<Text>,
    pub password: Option<Text>,
    pub password_env: Option<Text>,
    pub password_file: Option<Text>,
    pub database: Option<Text>,
    pub sslmode: Option<Text>,
    pub sslrootcert: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
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
    pub max_lag_bytes: Option<Text>,
    pub max_lag_seconds: Option<Text>,
    pub max_clients: Option<Text>,
    pub queue_timeout: Option<Text>,
    pub allow: Option<Vec<Text>>,
    pub freebind: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub name: Option<Text>,
    pub address: Option<Text>,
    pub weight: Option<u32>,
    pub max_connections: Option<Text>,
    pub role: Option<Text>,
}
