//! The `lb.yaml` model and everything YAML.
//!
//! Parsing is strict (unknown keys are errors), then every semantic problem is
//! collected at once, each naming the file, the item (`listeners[1].role`), the
//! line and column where it can be known, and what to write instead. Nothing
//! outside this crate touches YAML. No sockets are bound here.
#![forbid(unsafe_code)]

mod cidr;
mod duration;
mod error;
mod load;
mod model;
mod patroni;
mod positions;
mod raw;
mod secret;
mod shared_state;
mod size;
mod suggest;
mod validate;

pub use cidr::Cidr;
pub use duration::{format_duration, parse_duration};
pub use error::{ConfigError, Problem};
pub use load::{load_admin, load_file, load_str};
pub use model::{
    sni_matches, tags_match, AdminAccess, AdminConfig, BackendConfig, Balance, Cluster, Config, EtcdConfig, Forwarder,
    HealthConfig, Limits, ListenerConfig, LogFormat, MultiPrimary, OnIneligible, OnLag, PatroniConfig, PatroniUrl,
    Role, SharedStateConfig, SslMode, Tags, DEFAULT_CLUSTER,
};
pub use secret::{Secret, SecretError, SecretSource};
pub use size::parse_bytes;
pub use validate::DEFAULT_TOKEN_FILE;
