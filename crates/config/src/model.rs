//! The validated, normalised config. Every value here has been checked.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::Secret;

/// A whole, valid `lb.yaml`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub admin: AdminConfig,
    pub health: HealthConfig,
    pub listeners: Vec<ListenerConfig>,
    pub backends: Vec<BackendConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    pub interval: Duration,
    /// Covers connect + login + query of one check.
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub user: String,
    /// `None` means trust authentication.
    pub password: Option<Secret>,
    pub database: String,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
}

/// TLS for health checks, with libpq's meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    /// Encrypt; verify the server certificate only when `sslrootcert` is set.
    Require,
}

/// What a backend is, or what a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Primary,
    Replica,
    /// Listener only: every healthy backend.
    Any,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::Any => "any",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    LeastConn,
    /// Power of two random choices, by active connections over weight.
    Random,
}

impl Balance {
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::LeastConn => "least_conn",
            Balance::Random => "random",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    pub name: String,
    pub listen: SocketAddr,
    pub role: Role,
    /// Served while no backend of `role` is eligible.
    pub fallback: Option<Role>,
    pub balance: Balance,
    /// Per backend connect attempt.
    pub connect_timeout: Duration,
    /// How long a new client may take to send its first message.
    pub startup_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub name: String,
    /// Host name or IP address, without the port.
    pub host: String,
    pub port: u16,
    pub weight: u32,
}

impl BackendConfig {
    /// `host:port`, bracketing IPv6 literals.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}
