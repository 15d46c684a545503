//! The validated, normalised config. Every value here has been checked.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::{Cidr, Secret, SecretSource};

/// A whole, valid `lb.yaml`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The data path: splice(2) pipes on Linux, or a userspace copy.
    pub forwarder: Forwarder,
    /// How long sessions may finish after SIGTERM before they are closed.
    pub shutdown_timeout: Duration,
    /// Where fences, the highest timeline and admin states are kept across
    /// restarts; `None`: they live in memory only.
    pub state_file: Option<PathBuf>,
    pub log_format: LogFormat,
    pub limits: Limits,
    pub admin: AdminConfig,
    /// `shared_state:`: the fleet's store; `None`: this instance's state is
    /// its own.
    pub shared_state: Option<SharedStateConfig>,
    /// The database clusters pglb fronts, in config order: a config without
    /// `clusters:` is one implicit cluster named `default`.
    pub clusters: Vec<Arc<Cluster>>,
    /// What is allowed but probably not meant: `pglb check` prints these,
    /// `pglb run` logs them.
    pub warnings: Vec<crate::Problem>,
}

impl Config {
    /// The cluster named `name`.
    pub fn cluster(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.clusters.iter().find(|c| c.name == name)
    }

    /// Every listener of every cluster, with its cluster.
    pub fn listeners(&self) -> impl Iterator<Item = (&Arc<Cluster>, &ListenerConfig)> {
        self.clusters.iter().flat_map(|c| c.listeners.iter().map(move |l| (c, l)))
    }

    /// Backends over all clusters.
    pub fn backend_count(&self) -> usize {
        self.clusters.iter().map(|c| c.backends.len()).sum()
    }

    /// Whether this is the single-cluster form (no `clusters:` list).
    pub fn implicit(&self) -> bool {
        matches!(self.clusters.as_slice(), [only] if only.implicit)
    }
}

/// The name of the cluster a config without `clusters:` describes.
pub const DEFAULT_CLUSTER: &str = "default";

/// One database cluster: its backends, the listeners that route to them,
/// how they are checked, and what identifies the cluster. Everything that
/// decides routing lives here, so that clusters never share a decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    /// Letters, digits, `-` and `_`; `default` for the implicit cluster.
    pub name: String,
    /// Written as the top-level `listeners`/`backends` (no `clusters:`).
    pub implicit: bool,
    /// What to do when more than one backend claims to be primary.
    pub multi_primary: MultiPrimary,
    /// The cluster's system identifier, pinned by the operator
    /// (`pg_control_system()`): a backend reporting another is fenced, and
    /// nothing the backends say or the state file holds overrides it.
    pub system_identifier: Option<u64>,
    pub health: HealthConfig,
    /// Members read from Patroni's REST API, besides `backends`.
    pub patroni: Option<PatroniConfig>,
    pub listeners: Vec<ListenerConfig>,
    pub backends: Vec<BackendConfig>,
}

/// `patroni:`: where to read the cluster's members, leader and tags.
#[derive(Debug, Clone, PartialEq)]
pub struct PatroniConfig {
    /// Members' REST API addresses, tried in order (then the `api_url`s
    /// the members publish).
    pub urls: Vec<PatroniUrl>,
    /// How often `GET /cluster` is read.
    pub interval: Duration,
    /// Per request.
    pub timeout: Duration,
    /// How long a member must be missing from every answer before it is
    /// removed (drained first).
    pub remove_after: Duration,
    /// CA certificates for `https` APIs (`restapi.cafile`); without it the
    /// system's are not used and an `https` API must present a chain to it.
    pub cafile: Option<PathBuf>,
    /// A client certificate and key, for `restapi.verify_client`.
    pub certfile: Option<PathBuf>,
    pub keyfile: Option<PathBuf>,
}

/// `shared_state:`: what a fleet of pglb instances shares through etcd.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedStateConfig {
    pub etcd: EtcdConfig,
    /// This instance's name in the store (who changed what): the host name
    /// unless set.
    pub instance_id: String,
    /// How often the whole prefix is read again (linearizable), besides the
    /// watch: the store's reachability, and what a silent watch missed.
    pub sync_interval: Duration,
}

/// `shared_state.etcd`: where the store answers, and as whom.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdConfig {
    /// Client URLs (etcd's `--advertise-client-urls`), tried in order.
    pub endpoints: Vec<PatroniUrl>,
    /// Every key pglb writes starts with it; ends with `/`.
    pub prefix: String,
    pub cafile: Option<PathBuf>,
    pub certfile: Option<PathBuf>,
    pub keyfile: Option<PathBuf>,
    /// etcd's authentication: a user limited to `prefix`.
    pub user: Option<String>,
    pub password: Option<SecretSource>,
    /// Per request (a watch is not bounded by it).
    pub timeout: Duration,
}

/// `http://host:port` or `https://host:port` (a path is not allowed).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PatroniUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl PatroniUrl {
    /// Parses `http[s]://host[:port][/]`; the port defaults to Patroni's 8008.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let (tls, rest) = if let Some(rest) = text.strip_prefix("https://") {
            (true, rest)
        } else {
            (false, text.strip_prefix("http://")?)
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() || rest.contains('/') || rest.contains('@') {
            return None;
        }
        let (host, port) = match rest.strip_prefix('[') {
            Some(v6) => {
                let (host, after) = v6.split_once(']')?;
                let port = match after.strip_prefix(':') {
                    Some(p) => p.parse().ok()?,
                    None if after.is_empty() => 8008,
                    None => return None,
                };
                (host.to_owned(), port)
            }
            None => match rest.rsplit_once(':') {
                Some((host, port)) => (host.to_owned(), port.parse().ok()?),
                None => (rest.to_owned(), 8008),
            },
        };
        let valid = !host.is_empty() && host.chars().all(|c| c.is_ascii_alphanumeric() || ".-:".contains(c));
        (valid && port != 0).then_some(Self { tls, host, port })
    }

    /// `host:port`, bracketing IPv6 literals.
    pub fn authority(&self) -> String {
        host_port(&self.host, self.port)
    }
}

impl std::fmt::Display for PatroniUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}", if self.tls { "https" } else { "http" }, self.authority())
    }
}

/// Tags: a member's (from Patroni, or a static backend's `tags:`) and a
/// listener's selector. Values are compared as text, exactly (`true`,
/// `1` and `east` as written; Patroni's JSON `true` is `true`).
pub type Tags = std::collections::BTreeMap<String, String>;

/// Whether `tags` carry every key of `selector` with the same value.
pub fn tags_match(selector: &Tags, tags: &Tags) -> bool {
    selector.iter().all(|(k, v)| tags.get(k) == Some(v))
}

/// Process-wide bounds on connections that hold no backend session yet:
/// before their first message, held, queued, and cancel requests. `None`:
/// the default, which follows the file descriptor limit pglb runs with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub max_pending: Option<usize>,
    pub max_pending_per_source: Option<usize>,
}

impl Limits {
    /// `(max_pending, max_pending_per_source)` for a process allowed `fds`
    /// file descriptors: by default a quarter of them may wait, and one
    /// source address (an IPv6 /64) a quarter of those.
    pub fn resolve(&self, fds: u64) -> (usize, usize) {
        let fds = usize::try_from(fds).unwrap_or(usize::MAX);
        let max = self.max_pending.unwrap_or((fds / 4).max(64));
        let per_source = self.max_pending_per_source.unwrap_or((max / 4).max(16)).min(max);
        (max, per_source)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Bearer token required by mutating endpoints, when set.
    pub token: Option<Secret>,
}

/// What the control commands (`pglb status`, `pglb drain`...) need: where
/// the admin endpoint listens and where its token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminAccess {
    pub listen: SocketAddr,
    /// Not read yet: the caller decides (and may override it).
    pub token: Option<SecretSource>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarder {
    Splice,
    Copy,
    /// The kernel moves the bytes (eBPF sockmap); needs CAP_BPF +
    /// CAP_NET_ADMIN: pglb refuses to start without them.
    Sockmap,
    /// Sockmap where the kernel and privileges allow, otherwise splice.
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MultiPrimary {
    /// Route writes only to the primary on the highest timeline; none on a tie.
    Fence,
    /// Balance writes over every writable backend (logical replication, BDR).
    Allow,
}

/// What happens to sessions on a backend the listener may no longer use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnIneligible {
    Close,
    Keep,
}

/// What happens to sessions on a replica that falls behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnLag {
    Keep,
    Close,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    pub interval: Duration,
    /// Check interval while the topology is settling after a change.
    pub fast_interval: Duration,
    /// Covers connect + login + query of one check.
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// How long a backend may stay silent (checks time out) before it is
    /// taken out and its sessions close; until then it is only degraded.
    pub down_after: Duration,
    pub user: String,
    /// `None` means trust authentication. Read again before each login.
    pub password: Option<SecretSource>,
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
    pub on_ineligible: OnIneligible,
    pub on_lag: OnLag,
    /// How long a client waits for an eligible backend; zero refuses at once.
    pub hold_timeout: Duration,
    /// Most clients held at once; more are refused at once.
    pub hold_max: usize,
    /// How long a client may be held while the cluster's only primary is
    /// restarting in place (down with evidence of a restart, no other
    /// primary seen since); at least `hold_timeout`.
    pub hold_restart_timeout: Duration,
    /// New backend connections a second while held clients are let
    /// through (in arrival order); zero lets them all through at once.
    pub release_rate: u32,
    pub max_lag_bytes: Option<u64>,
    /// Also bounds how long a replica may stop following the primary.
    pub max_lag_seconds: Option<Duration>,
    /// Most clients forwarded at once through this listener.
    pub max_clients: Option<usize>,
    /// How long a client waits for a free place under a connection limit.
    pub queue_timeout: Duration,
    /// TCP_USER_TIMEOUT on client sockets: how long data sent to a client
    /// may stay unacknowledged (or its receive window stay shut) before its
    /// session is closed; zero leaves the kernel's (~15 minutes).
    pub client_tcp_user_timeout: Duration,
    /// Clients allowed to connect; empty allows everyone.
    pub allow: Vec<Cidr>,
    /// Bind even if the address is not (yet) local (IP_FREEBIND), for a VIP.
    pub freebind: bool,
    /// TLS server names this listener takes on its address (lower case;
    /// `*.suffix` for any name under `suffix`). Empty: the address's only
    /// listener, or its default (unmatched names and plaintext clients).
    pub sni: Vec<String>,
    /// Only backends carrying all these tags (empty: every backend).
    pub tags: Tags,
}

/// `pattern` (an exact name or `*.suffix`) matches server name `name`; a
/// wildcard needs at least one label before the suffix.
pub fn sni_matches(pattern: &str, name: &str) -> bool {
    let name = name.as_bytes();
    match pattern.strip_prefix("*.").map(str::as_bytes) {
        Some(suffix) => {
            let head = name.len().saturating_sub(suffix.len());
            name.len() > suffix.len() + 1 && name[head..].eq_ignore_ascii_case(suffix) && name[head - 1] == b'.'
        }
        None => pattern.as_bytes().eq_ignore_ascii_case(name),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub name: String,
    /// Host name or IP address, without the port.
    pub host: String,
    pub port: u16,
    pub weight: u32,
    /// Most connections pglb opens to this backend (all listeners).
    pub max_connections: Option<usize>,
    /// A pinned role: the backend serves only as this, whatever it reports.
    pub role: Option<Role>,
    /// Static tags; a Patroni member's come from Patroni.
    pub tags: Tags,
}

impl BackendConfig {
    /// `host:port`, bracketing IPv6 literals.
    pub fn address(&self) -> String {
        host_port(&self.host, self.port)
    }
}

/// `host:port`, bracketing IPv6 literals.
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::sni_matches;

    #[test]
    fn server_names_match_exactly_or_under_a_wildcard() {
        assert!(sni_matches("rw.db.example.com", "RW.db.Example.com"));
        assert!(!sni_matches("rw.db.example.com", "rw.db.example.co"));
        assert!(sni_matches("*.ro.example.com", "a.ro.example.com"));
        assert!(sni_matches("*.ro.example.com", "a.b.RO.example.com"));
        assert!(!sni_matches("*.ro.example.com", "ro.example.com"), "a wildcard needs a label before it");
        assert!(!sni_matches("*.ro.example.com", ".ro.example.com"));
        assert!(!sni_matches("*.ro.example.com", "xro.example.com"));
        assert!(!sni_matches("*.ro.example.com", "abxro.example.com"), "the suffix starts at a label");
        assert!(!sni_matches("*.example.com", "é.example.cöm"), "non-ASCII names neither match nor panic");
        assert!(!sni_matches("*.x", ""));
    }
}
