//! Semantic validation: raw file → `Config`, collecting every problem.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Problem;
use crate::model::*;
use crate::positions::Positions;
use crate::raw::*;
use crate::{parse_bytes, parse_duration, Cidr, Secret, SecretSource};

/// `max_lag_seconds` when a listener sets none.
pub const DEFAULT_MAX_LAG_SECONDS: Duration = Duration::from_secs(30);
/// `hold_restart_timeout` when a listener sets none: a crash restart's
/// recovery usually takes seconds; a client waits this long at most.
pub const DEFAULT_HOLD_RESTART_TIMEOUT: Duration = Duration::from_secs(30);
/// `release_rate` when a listener sets none: a full default hold
/// (`hold_max` 1000) is let through within a second.
pub const DEFAULT_RELEASE_RATE: u32 = 1000;
/// A vanished client holds its session this long at most, not the
/// kernel's ~15 minutes of retransmissions; a live client that reads nothing
/// for this long while its data waits is closed too.
pub const DEFAULT_CLIENT_TCP_USER_TIMEOUT: Duration = Duration::from_secs(120);

/// One level of inherited settings: the top level, or a cluster's own.
struct Layer {
    /// Item prefix: empty, or `clusters[i].`.
    prefix: String,
    health: RawHealth,
    defaults: RawDefaults,
}

pub struct Validator<'a> {
    positions: &'a Positions,
    pub(crate) base: &'a Path,
    problems: Vec<Problem>,
    warnings: Vec<Problem>,
}

impl<'a> Validator<'a> {
    pub fn new(positions: &'a Positions, base: &'a Path) -> Self {
        Self { positions, base, problems: Vec::new(), warnings: Vec::new() }
    }

    pub fn run(mut self, raw: RawConfig) -> Result<Config, Vec<Problem>> {
        self.unknown_keys("", &raw.other, TOP_KEYS);
        if let Some(d) = &raw.defaults {
            self.unknown_keys("defaults", &d.other, DEFAULTS_KEYS);
        }
        let limits = self.limits(raw.limits.unwrap_or_default());
        let forwarder = self.choice(
            "forwarder",
            raw.forwarder,
            &[
                ("splice", Forwarder::Splice),
                ("copy", Forwarder::Copy),
                ("sockmap", Forwarder::Sockmap),
                ("auto", Forwarder::Auto),
            ],
            Forwarder::Splice,
        );
        let shutdown_timeout = self.duration("shutdown_timeout", raw.shutdown_timeout, Duration::from_secs(30));
        let state_file = raw.state_file.and_then(|t| self.state_file(t));
        let log_format = self.choice(
            "log_format",
            raw.log_format,
            &[("text", LogFormat::Text), ("json", LogFormat::Json)],
            LogFormat::Text,
        );
        let admin = self.admin(raw.admin);
        let shared_state = raw.shared_state.and_then(|s| self.shared_state(s));
        let top = Layer {
            prefix: String::new(),
            health: raw.health.unwrap_or_default(),
            defaults: raw.defaults.unwrap_or_default(),
        };
        let clusters = match raw.clusters {
            None => vec![self.cluster(
                &top,
                None,
                RawCluster {
                    name: None,
                    multi_primary: raw.multi_primary,
                    system_identifier: raw.system_identifier,
                    defaults: None,
                    health: None,
                    patroni: raw.patroni,
                    listeners: raw.listeners,
                    backends: raw.backends,
                    other: BTreeMap::new(),
                },
            )],
            Some(list) => {
                if raw.patroni.is_some() {
                    self.problem(
                        "patroni",
                        "a top-level `patroni:` next to `clusters:`: whose members does it list?".into(),
                        "move it into the cluster Patroni runs (clusters[i].patroni)",
                    );
                }
                self.clusters(&top, list, raw.listeners, raw.backends, raw.system_identifier, raw.multi_primary)
            }
        };
        self.across_clusters(&clusters);
        // One problem reported once: a value every cluster inherits is
        // judged in each, under the same (top-level) item.
        let mut seen = std::collections::HashSet::new();
        self.problems.retain(|p| seen.insert((p.item.clone(), p.message.clone())));
        let mut seen = std::collections::HashSet::new();
        self.warnings.retain(|p| seen.insert((p.item.clone(), p.message.clone())));
        if self.problems.is_empty() {
            Ok(Config {
                forwarder,
                shutdown_timeout,
                state_file,
                log_format,
                limits,
                admin,
                shared_state,
                clusters: clusters.into_iter().map(Arc::new).collect(),
                warnings: self.warnings,
            })
        } else {
            Err(self.problems)
        }
    }

    /// `clusters:`: every entry, each inheriting the top level.
    fn clusters(
        &mut self,
        top: &Layer,
        list: Vec<RawCluster>,
        listeners: Vec<RawListener>,
        backends: Vec<RawBackend>,
        system_identifier: Option<Text>,
        multi_primary: Option<Text>,
    ) -> Vec<Cluster> {
        for (key, given) in [("listeners", !listeners.is_empty()), ("backends", !backends.is_empty())] {
            if given {
                self.problem(
                    key,
                    format!("top-level `{key}` next to `clusters:`: whose {key} are they?"),
                    format!("move them into the cluster they belong to (clusters[i].{key})"),
                );
            }
        }
        if list.is_empty() {
            self.problem("clusters", "`clusters:` is empty".into(), "list at least one cluster, or remove the key and write listeners and backends at the top level (one cluster named `default`)");
        }
        if system_identifier.is_some() && list.len() > 1 {
            self.problem(
                "system_identifier",
                "a top-level system_identifier would pin every cluster to one identity: only one of them can have it"
                    .into(),
                "move it into its cluster (clusters[i].system_identifier)",
            );
        }
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut out = Vec::new();
        for (i, mut c) in list.into_iter().enumerate() {
            c.system_identifier = c.system_identifier.or_else(|| system_identifier.clone());
            c.multi_primary = c.multi_primary.or_else(|| multi_primary.clone());
            let cluster = self.cluster(top, Some(i), c);
            if let Some(prev) = names.insert(cluster.name.clone(), i) {
                self.problem(
                    &format!("clusters[{i}].name"),
                    format!("duplicate cluster name `{}` (also clusters[{prev}])", cluster.name),
                    "give every cluster a distinct name",
                );
            }
            out.push(cluster);
        }
        out
    }

    /// One cluster: `index` is its place in `clusters:`, `None` for the
    /// implicit one (whose items are top-level).
    fn cluster(&mut self, top: &Layer, index: Option<usize>, raw: RawCluster) -> Cluster {
        let prefix = index.map(|i| format!("clusters[{i}].")).unwrap_or_default();
        let name = match index {
            None => DEFAULT_CLUSTER.to_owned(),
            Some(_) => {
                self.unknown_keys(prefix.trim_end_matches('.'), &raw.other, CLUSTER_KEYS);
                let name = self.required(&format!("{prefix}name"), raw.name, "a short name such as `orders`");
                let valid = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
                if !name.is_empty() && (!valid || name.len() > 63) {
                    self.problem(
                        &format!("{prefix}name"),
                        format!("cluster name `{name}` may hold only letters, digits, `-` and `_` (at most 63)"),
                        "it names the cluster in metrics, admin paths (`pglb drain orders/pg2`) and the state file: write e.g. `orders` or `billing-eu`",
                    );
                }
                name
            }
        };
        if let Some(d) = &raw.defaults {
            self.unknown_keys(&format!("{prefix}defaults"), &d.other, DEFAULTS_KEYS);
        }
        let own = Layer {
            prefix: prefix.clone(),
            health: raw.health.unwrap_or_default(),
            defaults: raw.defaults.unwrap_or_default(),
        };
        let layers: Vec<&Layer> = if index.is_some() { vec![&own, top] } else { vec![top] };
        let multi_primary = self.choice(
            &format!("{prefix}multi_primary"),
            raw.multi_primary,
            &[("fence", MultiPrimary::Fence), ("allow", MultiPrimary::Allow)],
            MultiPrimary::Fence,
        );
        let system_identifier =
            raw.system_identifier.and_then(|t| self.system_identifier(&format!("{prefix}system_identifier"), t));
        let health = self.health(&layers);
        let listeners = self.listeners(&prefix, raw.listeners, &layers);
        let patroni = raw.patroni.and_then(|p| self.patroni(&format!("{prefix}patroni"), p));
        let backends = self.backends(&prefix, raw.backends, patroni.is_some());
        Cluster {
            name,
            implicit: index.is_none(),
            multi_primary,
            system_identifier,
            health,
            patroni,
            listeners,
            backends,
        }
    }

    /// What clusters must agree on: listeners sharing an address, and a
    /// server listed in two clusters (allowed, likely a mistake).
    fn across_clusters(&mut self, clusters: &[Cluster]) {
        let prefix = |c: usize| if clusters[c].implicit { String::new() } else { format!("clusters[{c}].") };
        let listeners: Vec<(String, &ListenerConfig)> = clusters
            .iter()
            .enumerate()
            .flat_map(|(c, cluster)| {
                let prefix = prefix(c);
                cluster.listeners.iter().enumerate().map(move |(i, l)| (format!("{prefix}listeners[{i}]"), l))
            })
            .collect();
        self.shared_addresses(&listeners);
        let mut seen: HashMap<(String, u16), String> = HashMap::new();
        for (c, cluster) in clusters.iter().enumerate() {
            for (i, b) in cluster.backends.iter().enumerate() {
                if b.host.is_empty() {
                    continue;
                }
                match seen.get(&(b.host.clone(), b.port)) {
                    Some(other) if other != &cluster.name => self.warning(
                        &format!("{}backends[{i}].address", prefix(c)),
                        format!("{} is also a backend of cluster `{other}`", b.address()),
                        "a server belongs to one cluster: if this is a mistake, its system identifier will not match and it is fenced in this cluster (it keeps serving its own)",
                    ),
                    _ => {
                        seen.insert((b.host.clone(), b.port), cluster.name.clone());
                    }
                }
            }
        }
    }

    /// `limits:`: counts, each absent for the fd-limit default.
    fn limits(&mut self, raw: RawLimits) -> Limits {
        self.unknown_keys("limits", &raw.other, LIMITS_KEYS);
        let limits = Limits {
            max_pending: self.limit("limits.max_pending", raw.max_pending),
            max_pending_per_source: self.limit("limits.max_pending_per_source", raw.max_pending_per_source),
        };
        if let (Some(max), Some(per)) = (limits.max_pending, limits.max_pending_per_source) {
            if per > max {
                self.warning(
                    "limits.max_pending_per_source",
                    format!("max_pending_per_source ({per}) is above max_pending ({max}): one source may take the whole budget"),
                    "lower it, e.g. to a quarter of max_pending",
                );
            }
        }
        limits
    }

    /// `state_file`: relative to the config's folder. Whether its folder is
    /// writable is found out at the first write (and logged): under systemd
    /// the unit's StateDirectory= makes it only when the service starts.
    fn state_file(&mut self, text: Text) -> Option<std::path::PathBuf> {
        if text.0.trim().is_empty() {
            self.problem(
                "state_file",
                "state_file is empty".into(),
                "write a path such as /var/lib/pglb/state.json, or remove the key",
            );
            return None;
        }
        Some(self.base.join(text.0.trim()))
    }

    /// `system_identifier`: a number, or the same digits quoted (YAML
    /// readers that turn big numbers into floats lose digits).
    fn system_identifier(&mut self, item: &str, text: Text) -> Option<u64> {
        match text.0.trim().parse::<u64>() {
            Ok(id) if id > 0 => Some(id),
            _ => {
                self.problem(
                    item,
                    format!("system_identifier `{}` is not a system identifier", text.0),
                    "write the number `SELECT system_identifier FROM pg_control_system()` shows on the primary, e.g. system_identifier: \"7301234567890123456\"",
                );
                None
            }
        }
    }

    pub(crate) fn problem(&mut self, item: &str, message: String, help: impl Into<String>) {
        let problem = self.at(item, message, help);
        self.problems.push(problem);
    }

    /// Allowed, but probably not what the operator meant.
    pub(crate) fn warning(&mut self, item: &str, message: String, help: impl Into<String>) {
        let warning = self.at(item, message, help);
        self.warnings.push(warning);
    }

    fn at(&self, item: &str, message: String, help: impl Into<String>) -> Problem {
        let pos = self.positions.find(item);
        Problem {
            item: item.to_owned(),
            line: pos.map(|p| p.0),
            column: pos.map(|p| p.1),
            message,
            help: Some(help.into()),
        }
    }

    fn admin(&mut self, raw: Option<RawAdmin>) -> AdminConfig {
        let (listen, token_env, token_file) = self.admin_fields(raw);
        let named = token_env.is_some() || token_file.is_some();
        let token = self.secret("admin.token", None, token_env, token_file).and_then(|s| s.read().ok());
        // The package's generated token, when the config names none.
        let token = token.or_else(|| (!named).then(default_token).flatten().and_then(|s| s.read().ok()));
        if token.is_none() && !listen.ip().is_loopback() {
            self.warning(
                "admin.listen",
                format!("the admin endpoint listens on {listen} with no token: actions (drain, disable, enable, unfence, upgrade) are refused, and /status and /metrics are readable by anyone who reaches it"),
                format!("set admin.token_file (e.g. {DEFAULT_TOKEN_FILE}, 0640 root:pglb, made by the package) and let only your monitoring reach the port"),
            );
        }
        if token.as_ref().is_some_and(|t| t.expose().trim().is_empty()) {
            self.problem(
                "admin.token_env",
                "the admin token is empty".into(),
                "set a long random token, e.g. `openssl rand -hex 32`",
            );
        }
        AdminConfig { listen, token }
    }

    /// The `admin` section alone, for `pglb status` and the other control
    /// commands: the address and where the token comes from, not read yet
    /// (the caller may be a user who cannot read it and overrides it).
    pub fn admin_access(mut self, raw: Option<RawAdmin>) -> Result<AdminAccess, Vec<Problem>> {
        let (listen, token_env, token_file) = self.admin_fields(raw);
        let token = match (token_env, token_file) {
            (Some(_), Some(_)) => {
                self.problem(
                    "admin.token_env",
                    "more than one token source is set".into(),
                    "keep exactly one of token_env, token_file (or none)",
                );
                None
            }
            (Some(var), None) => Some(SecretSource::Env(var.0)),
            (None, Some(path)) => Some(SecretSource::File(self.base.join(path.0))),
            (None, None) => default_token(),
        };
        if self.problems.is_empty() {
            Ok(AdminAccess { listen, token })
        } else {
            Err(self.problems)
        }
    }

    fn admin_fields(&mut self, raw: Option<RawAdmin>) -> (SocketAddr, Option<Text>, Option<Text>) {
        let (listen, token_env, token_file) = match raw {
            Some(a) => {
                self.unknown_keys("admin", &a.other, ADMIN_KEYS);
                (a.listen, a.token_env, a.token_file)
            }
            None => (None, None, None),
        };
        let listen = listen.and_then(|t| self.socket_addr("admin.listen", &t.0));
        (listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9631))), token_env, token_file)
    }

    fn choice<T: Copy>(&mut self, item: &str, raw: Option<Text>, options: &[(&str, T)], default: T) -> T {
        let Some(text) = raw else { return default };
        if let Some((_, v)) = options.iter().find(|(name, _)| *name == text.0) {
            return *v;
        }
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        self.problem(item, format!("unknown value `{}`", text.0), format!("write one of: {}", names.join(", ")));
        default
    }

    /// `health:` of the first layer that sets each key (a cluster's own, then
    /// the top level); a problem names the item where the value was written.
    fn health(&mut self, layers: &[&Layer]) -> HealthConfig {
        for layer in layers {
            self.unknown_keys(&format!("{}health", layer.prefix), &layer.health.other, HEALTH_KEYS);
        }
        let pick = |key: &str, get: fn(&RawHealth) -> &Option<Text>| -> (String, Option<Text>) {
            let layer = layers.iter().find(|l| get(&l.health).is_some()).unwrap_or(&layers[layers.len() - 1]);
            (format!("{}health.{key}", layer.prefix), get(&layer.health).clone())
        };
        let (item, v) = pick("interval", |h| &h.interval);
        let interval = self.duration(&item, v, Duration::from_secs(1));
        // The default timeout fits inside the interval, so a config that sets only
        // `interval` stays valid.
        let default_timeout = interval.min(Duration::from_secs(2));
        let (item, v) = pick("timeout", |h| &h.timeout);
        let timeout = self.duration(&item, v, default_timeout);
        if timeout > interval {
            self.problem(
                &item,
                format!(
                    "timeout ({}) is longer than interval ({})",
                    crate::format_duration(timeout),
                    crate::format_duration(interval)
                ),
                "a check must finish before the next one starts: make health.timeout at most health.interval",
            );
        }
        let (item, v) = pick("fast_interval", |h| &h.fast_interval);
        let fast_interval = self.duration(&item, v, interval.min(Duration::from_millis(250)));
        if fast_interval > interval {
            self.problem(
                &item,
                "fast_interval is longer than interval".into(),
                "fast_interval is the quicker pace used while the topology settles: make it at most health.interval",
            );
        }
        let (item, v) = pick("rise", |h| &h.rise);
        let rise = self.count(&item, v, 2);
        let (item, v) = pick("fall", |h| &h.fall);
        let fall = self.count(&item, v, 2);
        let (item, v) = pick("down_after", |h| &h.down_after);
        let down_after = self.duration(&item, v, Duration::from_secs(30));
        if down_after < interval * fall {
            self.problem(
                &item,
                format!(
                    "down_after ({}) is shorter than fall × interval ({})",
                    crate::format_duration(down_after),
                    crate::format_duration(interval * fall)
                ),
                "a silent backend is first degraded after `fall` checks, then down after down_after: make it at least fall × interval (default 30s)",
            );
        }
        // The password comes whole from one layer: a cluster that names any
        // source replaces the top level's.
        let secret_layer = layers
            .iter()
            .find(|l| {
                l.health.password.is_some() || l.health.password_env.is_some() || l.health.password_file.is_some()
            })
            .copied();
        let password = match secret_layer {
            Some(l) => self.secret(
                &format!("{}health.password", l.prefix),
                l.health.password.clone(),
                l.health.password_env.clone(),
                l.health.password_file.clone(),
            ),
            None => None,
        };
        let (item, v) = pick("sslmode", |h| &h.sslmode);
        let sslmode = match v.map(|t| t.0).as_deref() {
            None | Some("prefer") => SslMode::Prefer,
            Some("disable") => SslMode::Disable,
            Some("require") => SslMode::Require,
            Some(other) => {
                self.problem(&item, format!("unknown sslmode `{other}`"), "write one of: disable, prefer, require");
                SslMode::Prefer
            }
        };
        let (item, v) = pick("sslrootcert", |h| &h.sslrootcert);
        let sslrootcert = v.map(|t| self.base.join(t.0));
        if let Some(path) = &sslrootcert {
            if let Err(err) = std::fs::metadata(path) {
                self.problem(
                    &item,
                    format!("cannot read {}: {err}", path.display()),
                    "point sslrootcert at a PEM file of CA certificates (relative paths start at the config file's folder)",
                );
            }
        }
        let (user_item, user) = pick("user", |h| &h.user);
        let (database_item, database) = pick("database", |h| &h.database);
        HealthConfig {
            interval,
            fast_interval,
            timeout,
            rise,
            fall,
            down_after,
            user: self.nonempty(&user_item, user, "pglb_check"),
            password,
            database: self.nonempty(&database_item, database, "postgres"),
            sslmode,
            sslrootcert,
        }
    }

    /// The source of a secret given inline, as `<prefix>_env` or as
    /// `<prefix>_file`; it must resolve now (it is read again when used).
    pub(crate) fn secret(
        &mut self,
        prefix: &str,
        inline: Option<Text>,
        env: Option<Text>,
        file: Option<Text>,
    ) -> Option<SecretSource> {
        let given = [inline.is_some(), env.is_some(), file.is_some()];
        let what = prefix.rsplit('.').next().unwrap_or(prefix);
        if given.iter().filter(|g| **g).count() > 1 {
            let item = if env.is_some() { format!("{prefix}_env") } else { format!("{prefix}_file") };
            self.problem(
                &item,
                format!("more than one {what} source is set"),
                format!("keep exactly one of {what}_env, {what}_file, {what} (or none)"),
            );
            return None;
        }
        let (item, source, help) = match (inline, env, file) {
            (_, Some(var), _) => (
                format!("{prefix}_env"),
                SecretSource::Env(var.0.clone()),
                format!("export {}=... before starting pglb, or use {what}_file", var.0),
            ),
            (_, _, Some(path)) => (
                format!("{prefix}_file"),
                SecretSource::File(self.base.join(path.0)),
                "make the file readable by the user pglb runs as (relative paths start at the config file's folder)"
                    .to_owned(),
            ),
            (Some(text), _, _) => return Some(SecretSource::Inline(Secret::new(text.0))),
            (None, None, None) => return None,
        };
        let message = match source.read() {
            Ok(_) => return Some(source),
            Err(crate::secret::SecretError::File { path, source: err })
                if err.kind() == std::io::ErrorKind::NotFound && systemd_credential(&path) =>
            {
                self.warning(
                    &item,
                    format!("{} is a systemd credential: it exists only while the service runs", path.display()),
                    "not checked here; the unit's ExecStartPre (`pglb check`) checks it inside the service",
                );
                return Some(source);
            }
            Err(crate::secret::SecretError::EnvUnset(var)) => format!("environment variable `{var}` is not set"),
            Err(crate::secret::SecretError::File { path, source }) => {
                format!("cannot read {what} file {}: {source}", path.display())
            }
        };
        self.problem(&item, message, help);
        None
    }

    fn listeners(&mut self, prefix: &str, raw: Vec<RawListener>, layers: &[&Layer]) -> Vec<ListenerConfig> {
        if raw.is_empty() {
            self.problem(
                &format!("{prefix}listeners"),
                "no listeners are configured".into(),
                "add at least one listener, e.g. `- {name: rw, listen: 127.0.0.1:5432, role: primary}`",
            );
        }
        let mut names = HashMap::new();
        let mut out = Vec::new();
        for (i, l) in raw.into_iter().enumerate() {
            let listener = self.listener(prefix, i, l, layers);
            if let Some(prev) = names.insert(listener.name.clone(), i) {
                self.problem(
                    &format!("{prefix}listeners[{i}].name"),
                    format!("duplicate listener name `{}` (also {prefix}listeners[{prev}])", listener.name),
                    "give every listener a distinct name",
                );
            }
            if listener.listen.port() == 0 {
                self.problem(
                    &format!("{prefix}listeners[{i}].listen"),
                    format!("port 0 in {} would make the kernel pick a port nobody is told", listener.listen),
                    "write the port clients connect to, e.g. 127.0.0.1:6432",
                );
            }
            out.push(listener);
        }
        out
    }

    fn listener(&mut self, prefix: &str, i: usize, l: RawListener, layers: &[&Layer]) -> ListenerConfig {
        let at = |key: &str| format!("{prefix}listeners[{i}].{key}");
        // A listener's own value wins; else the first `defaults:` that sets
        // it, its cluster's then the top level's (errors name it there).
        let inherit = |key: &str, own: Option<Text>, get: fn(&RawDefaults) -> &Option<Text>| match own {
            Some(v) => (at(key), Some(v)),
            None => match layers.iter().find(|d| get(&d.defaults).is_some()) {
                Some(d) => (format!("{}defaults.{key}", d.prefix), get(&d.defaults).clone()),
                None => (format!("defaults.{key}"), None),
            },
        };
        let name = self.required(&at("name"), l.name, "a short name such as `rw`");
        let listen = self.required(&at("listen"), l.listen, "an address such as 127.0.0.1:5432");
        let listen = self.socket_addr(&at("listen"), &listen);
        let role = self.role(&at("role"), l.role);
        let fallback = self.fallback(&at("fallback"), l.fallback, role);
        let role = role.unwrap_or(Role::Primary);
        let balance = self.balance(&at("balance"), l.balance);
        let (item, v) = inherit("on_ineligible", l.on_ineligible, |d| &d.on_ineligible);
        let on_ineligible =
            self.choice(&item, v, &[("close", OnIneligible::Close), ("keep", OnIneligible::Keep)], OnIneligible::Close);
        let (item, v) = inherit("on_lag", l.on_lag, |d| &d.on_lag);
        let on_lag = self.choice(&item, v, &[("keep", OnLag::Keep), ("close", OnLag::Close)], OnLag::Keep);
        let (item, v) = inherit("hold_timeout", l.hold_timeout, |d| &d.hold_timeout);
        let hold_timeout = self.duration_or_zero(&item, v, Duration::from_secs(5));
        let (item, v) = inherit("hold_max", l.hold_max, |d| &d.hold_max);
        let hold_max = self.limit(&item, v).unwrap_or(1000);
        let (item, v) = inherit("hold_restart_timeout", l.hold_restart_timeout, |d| &d.hold_restart_timeout);
        let hold_restart_timeout = self.duration_or_zero(&item, v, DEFAULT_HOLD_RESTART_TIMEOUT).max(hold_timeout);
        let (item, v) = inherit("release_rate", l.release_rate, |d| &d.release_rate);
        let release_rate = self.rate(&item, v, DEFAULT_RELEASE_RATE);
        let (item, v) = inherit("max_lag_bytes", l.max_lag_bytes, |d| &d.max_lag_bytes);
        let max_lag_bytes = v.filter(|t| t.0 != "off").and_then(|t| self.bytes(&item, &t.0));
        let (item, v) = inherit("max_lag_seconds", l.max_lag_seconds, |d| &d.max_lag_seconds);
        let max_lag_seconds = match v {
            Some(t) if t.0 == "off" => None,
            // The default keeps a replica that stopped following the
            // primary (a failover it was not re-pointed for) from serving
            // stale reads for more than 30 s.
            None => Some(DEFAULT_MAX_LAG_SECONDS),
            other => Some(self.duration(&item, other, DEFAULT_MAX_LAG_SECONDS)),
        };
        let (item, v) = inherit("max_clients", l.max_clients, |d| &d.max_clients);
        let max_clients = self.limit(&item, v);
        let (item, v) = inherit("queue_timeout", l.queue_timeout, |d| &d.queue_timeout);
        let queue_timeout = self.duration_or_zero(&item, v, Duration::from_secs(5));
        let (item, v) = inherit("client_tcp_user_timeout", l.client_tcp_user_timeout, |d| &d.client_tcp_user_timeout);
        let client_tcp_user_timeout = self.duration_or_zero(&item, v, DEFAULT_CLIENT_TCP_USER_TIMEOUT);
        let allow = self.allowlist(&at("allow"), l.allow.map(OneOrMany::into_vec).unwrap_or_default());
        let freebind = self.flag(&at("freebind"), l.freebind);
        let sni = self.server_names(&at("sni"), l.sni.map(OneOrMany::into_vec).unwrap_or_default());
        let tags = self.tags(&at("tags"), l.tags);
        self.unknown_keys(&format!("{prefix}listeners[{i}]"), &l.other, LISTENER_KEYS);
        ListenerConfig {
            name,
            listen: listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
            role,
            fallback,
            balance,
            connect_timeout: self.duration(&at("connect_timeout"), l.connect_timeout, Duration::from_secs(3)),
            startup_timeout: self.duration(&at("startup_timeout"), l.startup_timeout, Duration::from_secs(10)),
            on_ineligible,
            on_lag,
            hold_timeout,
            hold_max,
            hold_restart_timeout,
            release_rate,
            max_lag_bytes,
            max_lag_seconds,
            max_clients,
            queue_timeout,
            client_tcp_user_timeout,
            allow,
            freebind,
            sni,
            tags,
        }
    }

    /// `sni:` entries: DNS names or `*.suffix` wildcards, kept in lower case.
    fn server_names(&mut self, item: &str, raw: Vec<Text>) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for (k, entry) in raw.into_iter().enumerate() {
            let name = entry.0.trim().to_ascii_lowercase();
            let host = name.strip_prefix("*.").unwrap_or(&name);
            let label_ok = |l: &str| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            };
            if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
                self.problem(
                    &format!("{item}[{k}]"),
                    format!("`{}` is not a server name", entry.0),
                    "write a DNS name such as rw.db.example.com, or `*.db.example.com` for every name under it",
                );
            } else if out.contains(&name) {
                self.problem(&format!("{item}[{k}]"), format!("`{name}` is listed twice"), "list each name once");
            } else {
                out.push(name);
            }
        }
        out
    }

    /// Listeners that share an address (of one cluster or several) are told
    /// apart by TLS server name: each names its own (`sni`), at most one is
    /// the default, no name is claimed twice, and what acts before the name
    /// is known agrees. `listeners`: each with its item path.
    fn shared_addresses(&mut self, listeners: &[(String, &ListenerConfig)]) {
        let mut by_addr: Vec<(SocketAddr, Vec<usize>)> = Vec::new();
        for (i, (_, l)) in listeners.iter().enumerate() {
            match by_addr.iter_mut().find(|(a, _)| *a == l.listen) {
                Some((_, group)) => group.push(i),
                None => by_addr.push((l.listen, vec![i])),
            }
        }
        for (addr, group) in by_addr.into_iter().filter(|(_, g)| g.len() > 1) {
            let defaults: Vec<usize> = group.iter().copied().filter(|&i| listeners[i].1.sni.is_empty()).collect();
            if defaults.len() > 1 {
                self.problem(
                    &format!("{}.listen", listeners[defaults[1]].0),
                    format!(
                        "address {addr} is already used by {}, and neither names server names (`sni`)",
                        listeners[defaults[0]].0
                    ),
                    "give every listener its own address or port, or give all but one of those sharing it `sni: [name, ...]` (the one without is the default)",
                );
            }
            let (first_item, first) = &listeners[group[0]];
            for &i in &group[1..] {
                let (item, l) = &listeners[i];
                let differs = [
                    ("allow", l.allow != first.allow),
                    ("freebind", l.freebind != first.freebind),
                    ("startup_timeout", l.startup_timeout != first.startup_timeout),
                ];
                for (key, _) in differs.iter().filter(|(_, d)| *d) {
                    self.problem(
                        &format!("{item}.{key}"),
                        format!(
                            "{item} shares {addr} with {first_item} but sets another {key}: it acts before the server name is known"
                        ),
                        format!("give every listener on {addr} the same {key}"),
                    );
                }
                for name in &l.sni {
                    if let Some(&j) =
                        group.iter().take_while(|&&j| j != i).find(|&&j| listeners[j].1.sni.contains(name))
                    {
                        self.problem(
                            &format!("{item}.sni"),
                            format!("server name `{name}` on {addr} is already claimed by {}", listeners[j].0),
                            "each server name goes to one listener of an address",
                        );
                    }
                }
            }
        }
    }

    fn allowlist(&mut self, item: &str, raw: Vec<Text>) -> Vec<Cidr> {
        let mut out = Vec::new();
        for (k, entry) in raw.into_iter().enumerate() {
            match Cidr::parse(&entry.0) {
                Ok(c) => out.push(c),
                Err(why) => self.problem(
                    &format!("{item}[{k}]"),
                    format!("invalid allowlist entry: {why}"),
                    "write an address block such as 10.0.0.0/8, 127.0.0.1/32 or fd00::/8",
                ),
            }
        }
        out
    }

    /// A positive count; absent means unlimited (`None`).
    fn limit(&mut self, item: &str, raw: Option<Text>) -> Option<usize> {
        let text = raw?.0;
        match text.trim().parse::<usize>() {
            Ok(n) if n > 0 => Some(n),
            _ => {
                self.problem(
                    item,
                    format!("`{text}` is not a positive whole number"),
                    "write a count such as 100, or remove the key for no limit",
                );
                None
            }
        }
    }

    /// A rate a second: a whole number, 0 for none.
    fn rate(&mut self, item: &str, raw: Option<Text>, default: u32) -> u32 {
        let Some(text) = raw.map(|t| t.0) else { return default };
        match text.trim().trim_end_matches("/s").trim().parse::<u32>() {
            Ok(n) => n,
            Err(_) => {
                self.problem(
                    item,
                    format!("`{text}` is not a rate"),
                    "write a whole number of connections a second such as 1000, or 0 to let held clients through at once",
                );
                default
            }
        }
    }

    fn bytes(&mut self, item: &str, text: &str) -> Option<u64> {
        match parse_bytes(text) {
            Ok(n) if n > 0 => Some(n),
            Ok(_) => {
                self.problem(item, "size is zero".into(), "write a positive size such as 16MB, or remove the key");
                None
            }
            Err(why) => {
                self.problem(item, format!("invalid size: {why}"), "write a byte count such as 16777216 or 16MB");
                None
            }
        }
    }

    fn duration_or_zero(&mut self, item: &str, raw: Option<Text>, default: Duration) -> Duration {
        match raw {
            Some(t) if parse_duration(&t.0).is_ok_and(|d| d.is_zero()) => Duration::ZERO,
            other => self.duration(item, other, default),
        }
    }

    /// The listener's role; `None` (reported) when missing or unknown.
    fn role(&mut self, item: &str, raw: Option<Text>) -> Option<Role> {
        match raw.map(|t| t.0).as_deref() {
            Some("primary") => Some(Role::Primary),
            Some("replica") => Some(Role::Replica),
            Some("any") => Some(Role::Any),
            other => {
                let message = match other {
                    Some(v) => format!("unknown role `{v}`"),
                    None => "missing role".into(),
                };
                let help = match other.and_then(|v| crate::suggest::closest(v, &["primary", "replica", "any"])) {
                    Some(near) => format!("did you mean `{near}`? write one of: primary, replica, any"),
                    None => "write one of: primary, replica, any".into(),
                };
                self.problem(item, message, help);
                None
            }
        }
    }

    /// The fallback role; not judged against a role that is itself wrong.
    fn fallback(&mut self, item: &str, raw: Option<Text>, role: Option<Role>) -> Option<Role> {
        let text = raw?.0;
        let role = role?;
        if text == "primary" && role == Role::Replica {
            return Some(Role::Primary);
        }
        let message = if text == "primary" {
            format!("fallback `primary` makes no sense on a `{}` listener", role.as_str())
        } else {
            format!("unknown fallback `{text}`")
        };
        self.problem(
            item,
            message,
            "only a `role: replica` listener takes a fallback, and it is `fallback: primary`; otherwise remove the key",
        );
        None
    }

    fn balance(&mut self, item: &str, raw: Option<Text>) -> Balance {
        match raw.map(|t| t.0).as_deref() {
            None | Some("round_robin") => Balance::RoundRobin,
            Some("least_conn") => Balance::LeastConn,
            Some("random") => Balance::Random,
            Some(other) => {
                self.problem(
                    item,
                    format!("unknown balance policy `{other}`"),
                    "write one of: round_robin, least_conn, random",
                );
                Balance::RoundRobin
            }
        }
    }

    fn backends(&mut self, prefix: &str, raw: Vec<RawBackend>, patroni: bool) -> Vec<BackendConfig> {
        if raw.is_empty() && !patroni {
            self.problem(
                &format!("{prefix}backends"),
                "no backends are configured".into(),
                "add at least one backend, e.g. `- {name: pg1, address: 10.0.0.11:5432}`, or read them from Patroni (`patroni: {urls: [http://10.0.0.11:8008]}`)",
            );
        }
        let mut names = HashMap::new();
        let mut addrs = HashMap::new();
        let mut out = Vec::new();
        for (i, b) in raw.into_iter().enumerate() {
            let at = |key: &str| format!("{prefix}backends[{i}].{key}");
            self.unknown_keys(&format!("{prefix}backends[{i}]"), &b.other, BACKEND_KEYS);
            let name = self.required(&at("name"), b.name, "a short name such as `pg1`");
            if let Some(prev) = names.insert(name.clone(), i) {
                self.problem(
                    &at("name"),
                    format!("duplicate backend name `{name}` (also {prefix}backends[{prev}])"),
                    "give every backend a distinct name",
                );
            }
            let address = self.required(&at("address"), b.address, "host:port such as 10.0.0.11:5432");
            let (host, port) = self.host_port(&at("address"), &address).unwrap_or_default();
            if !host.is_empty() {
                if let Some(prev) = addrs.insert((host.clone(), port), i) {
                    self.problem(
                        &at("address"),
                        format!("address {address} is already used by {prefix}backends[{prev}]"),
                        "list every server once",
                    );
                }
            }
            let weight = self.whole(&at("weight"), b.weight, 1, 1..=1000, "a weight (drain a backend instead of 0)");
            let max_connections = self.limit(&at("max_connections"), b.max_connections);
            let role = match b.role.map(|t| t.0).as_deref() {
                None => None,
                Some("primary") => Some(Role::Primary),
                Some("replica") => Some(Role::Replica),
                Some(other) => {
                    self.problem(
                        &at("role"),
                        format!("unknown backend role `{other}`"),
                        "write `replica` (reads only, e.g. a writable logical-replication subscriber) or `primary`, or remove the key to use the role the backend reports",
                    );
                    None
                }
            };
            let tags = self.tags(&at("tags"), b.tags);
            out.push(BackendConfig { name, host, port, weight, max_connections, role, tags });
        }
        out
    }

    fn required(&mut self, item: &str, raw: Option<Text>, example: &str) -> String {
        match raw {
            Some(t) if !t.0.trim().is_empty() => t.0,
            _ => {
                self.problem(item, "missing value".into(), format!("write {example}"));
                String::new()
            }
        }
    }

    fn nonempty(&mut self, item: &str, raw: Option<Text>, default: &str) -> String {
        match raw {
            None => default.to_owned(),
            Some(t) if t.0.trim().is_empty() => {
                self.problem(item, "empty value".into(), format!("write a name, e.g. `{default}`"));
                default.to_owned()
            }
            Some(t) => t.0,
        }
    }

    fn count(&mut self, item: &str, raw: Option<Text>, default: u32) -> u32 {
        self.whole(item, raw, default, 1..=100, "a count")
    }

    /// A whole number in `range`; anything else is a problem in the user's terms.
    fn whole(
        &mut self,
        item: &str,
        raw: Option<Text>,
        default: u32,
        range: std::ops::RangeInclusive<u32>,
        what: &str,
    ) -> u32 {
        let Some(text) = raw else { return default };
        match text.0.trim().parse::<u32>() {
            Ok(n) if range.contains(&n) => n,
            _ => {
                let (lo, hi) = (range.start(), range.end());
                self.problem(
                    item,
                    format!("`{}` is not a whole number from {lo} to {hi}", text.0),
                    format!("write {what} from {lo} to {hi}"),
                );
                default
            }
        }
    }

    fn flag(&mut self, item: &str, raw: Option<Text>) -> bool {
        match raw.map(|t| t.0).as_deref() {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => {
                self.problem(item, format!("`{other}` is not true or false"), "write true or false");
                false
            }
        }
    }

    /// Keys a section does not know: each is a problem, with the closest
    /// known key as a suggestion.
    pub(crate) fn unknown_keys(&mut self, section: &str, other: &BTreeMap<String, serde_yaml::Value>, known: &[&str]) {
        for key in other.keys() {
            let item = if section.is_empty() { key.clone() } else { format!("{section}.{key}") };
            let help = match crate::suggest::closest(key, known) {
                Some(near) => format!("did you mean `{near}`? (known here: {})", known.join(", ")),
                None => format!("remove it; known here: {}", known.join(", ")),
            };
            self.problem(&item, format!("unknown key `{key}`"), help);
        }
    }

    pub(crate) fn duration(&mut self, item: &str, raw: Option<Text>, default: Duration) -> Duration {
        let Some(text) = raw else { return default };
        match parse_duration(&text.0) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.problem(item, "duration is zero".into(), "write a positive duration such as `500ms` or `2s`");
                default
            }
            Err(why) => {
                self.problem(
                    item,
                    format!("invalid duration: {why}"),
                    "write a number with a unit: `500ms`, `2s`, `1m`",
                );
                default
            }
        }
    }

    fn socket_addr(&mut self, item: &str, text: &str) -> Option<SocketAddr> {
        match text.trim().parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.problem(
                    item,
                    format!("invalid listen address `{text}`"),
                    "write an IP address and port, e.g. 127.0.0.1:5432 or [::1]:5432",
                );
                None
            }
        }
    }

    fn host_port(&mut self, item: &str, text: &str) -> Option<(String, u16)> {
        let text = text.trim();
        let parsed = text.parse::<SocketAddr>().ok().map(|a| (a.ip().to_string(), a.port()));
        let parsed = parsed.or_else(|| {
            let (host, port) = text.rsplit_once(':')?;
            let valid_host =
                !host.is_empty() && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
            Some((host.to_owned(), port.parse::<u16>().ok().filter(|p| *p != 0 && valid_host)?))
        });
        if parsed.is_none() {
            self.problem(
                item,
                format!("invalid backend address `{text}`"),
                "write host:port, e.g. 10.0.0.11:5432, db1.example.internal:5432 or [fd00::1]:5432",
            );
        }
        parsed
    }
}

/// A file systemd puts in a service's credentials folder (`LoadCredential=`)
/// while the service runs: outside it (no `$CREDENTIALS_DIRECTORY` naming
/// its folder), it cannot be read and is not expected to be.
fn systemd_credential(path: &Path) -> bool {
    let inside = std::env::var_os("CREDENTIALS_DIRECTORY").is_some_and(|dir| path.starts_with(dir));
    path.starts_with("/run/credentials/") && !inside
}

/// The admin token the Debian package generates (0640 root:pglb). pglb and
/// the control commands use it when the config names no token.
pub const DEFAULT_TOKEN_FILE: &str = "/etc/pglb/admin-token";

/// [`DEFAULT_TOKEN_FILE`], when it exists.
fn default_token() -> Option<SecretSource> {
    let path = Path::new(DEFAULT_TOKEN_FILE);
    path.exists().then(|| SecretSource::File(path.to_owned()))
}
