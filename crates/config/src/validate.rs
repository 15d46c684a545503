//! Semantic validation: raw file → `Config`, collecting every problem.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::error::Problem;
use crate::model::*;
use crate::positions::Positions;
use crate::raw::*;
use crate::{parse_duration, Secret};

pub struct Validator<'a> {
    positions: &'a Positions,
    base: &'a Path,
    problems: Vec<Problem>,
}

impl<'a> Validator<'a> {
    pub fn new(positions: &'a Positions, base: &'a Path) -> Self {
        Self {
            positions,
            base,
            problems: Vec::new(),
        }
    }

    pub fn run(mut self, raw: RawConfig) -> Result<Config, Vec<Problem>> {
        let admin = self.admin(raw.admin);
        let health = self.health(raw.health.unwrap_or_default());
        let listeners = self.listeners(raw.listeners);
        let backends = self.backends(raw.backends);
        if self.problems.is_empty() {
            Ok(Config {
                admin,
                health,
                listeners,
                backends,
            })
        } else {
            Err(self.problems)
        }
    }

    fn problem(&mut self, item: &str, message: String, help: impl Into<String>) {
        let pos = self.positions.find(item);
        self.problems.push(Problem {
            item: item.to_owned(),
            line: pos.map(|p| p.0),
            column: pos.map(|p| p.1),
            message,
            help: Some(help.into()),
        });
    }

    fn admin(&mut self, raw: Option<RawAdmin>) -> AdminConfig {
        let text = raw.and_then(|a| a.listen).map(|t| t.0);
        let listen = match text {
            Some(t) => self.socket_addr("admin.listen", &t),
            None => None,
        };
        AdminConfig {
            listen: listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9631))),
        }
    }

    fn health(&mut self, raw: RawHealth) -> HealthConfig {
        let interval = self.duration("health.interval", raw.interval, Duration::from_secs(1));
        // The default timeout fits inside the interval, so a config that sets only
        // `interval` stays valid.
        let default_timeout = interval.min(Duration::from_secs(2));
        let timeout = self.duration("health.timeout", raw.timeout, default_timeout);
        if timeout > interval {
            self.problem(
                "health.timeout",
                format!(
                    "timeout ({}) is longer than interval ({})",
                    crate::format_duration(timeout),
                    crate::format_duration(interval)
                ),
                "a check must finish before the next one starts: make health.timeout at most health.interval",
            );
        }
        let rise = self.count("health.rise", raw.rise, 2);
        let fall = self.count("health.fall", raw.fall, 2);
        let password = self.password(raw.password, raw.password_env, raw.password_file);
        let sslmode = match raw.sslmode.map(|t| t.0).as_deref() {
            None | Some("prefer") => SslMode::Prefer,
            Some("disable") => SslMode::Disable,
            Some("require") => SslMode::Require,
            Some(other) => {
                self.problem(
                    "health.sslmode",
                    format!("unknown sslmode `{other}`"),
                    "write one of: disable, prefer, require",
                );
                SslMode::Prefer
            }
        };
        let sslrootcert = raw.sslrootcert.map(|t| self.base.join(t.0));
        if let Some(path) = &sslrootcert {
            if let Err(err) = std::fs::metadata(path) {
                self.problem(
                    "health.sslrootcert",
                    format!("cannot read {}: {err}", path.display()),
                    "point sslrootcert at a PEM file of CA certificates (relative paths start at the config file's folder)",
                );
            }
        }
        HealthConfig {
            interval,
            timeout,
            rise,
            fall,
            user: self.nonempty("health.user", raw.user, "pglb_check"),
            password,
            database: self.nonempty("health.database", raw.database, "postgres"),
            sslmode,
            sslrootcert,
        }
    }

    fn password(
        &mut self,
        inline: Option<Text>,
        env: Option<Text>,
        file: Option<Text>,
    ) -> Option<Secret> {
        let given = [inline.is_some(), env.is_some(), file.is_some()];
        if given.iter().filter(|g| **g).count() > 1 {
            let item = if env.is_some() {
                "health.password_env"
            } else {
                "health.password_file"
            };
            self.problem(
                item,
                "more than one password source is set".into(),
                "keep exactly one of password_env, password_file, password (or none for trust auth)",
            );
            return None;
        }
        if let Some(var) = env {
            return match std::env::var(&var.0) {
                Ok(value) => Some(Secret::new(value)),
                Err(_) => {
                    self.problem(
                        "health.password_env",
                        format!("environment variable `{}` is not set", var.0),
                        format!(
                            "export {}=... before starting pglb, or use password_file",
                            var.0
                        ),
                    );
                    None
                }
            };
        }
        if let Some(path) = file {
            let path = self.base.join(path.0);
            return match std::fs::read_to_string(&path) {
                Ok(text) => Some(Secret::new(text.trim_end_matches(['\r', '\n']))),
                Err(err) => {
                    self.problem(
                        "health.password_file",
                        format!("cannot read password file {}: {err}", path.display()),
                        "make the file readable by the user pglb runs as (relative paths start at the config file's folder)",
                    );
                    None
                }
            };
        }
        inline.map(|t| Secret::new(t.0))
    }

    fn listeners(&mut self, raw: Vec<RawListener>) -> Vec<ListenerConfig> {
        if raw.is_empty() {
            self.problem(
                "listeners",
                "no listeners are configured".into(),
                "add at least one listener, e.g. `- {name: rw, listen: 127.0.0.1:5432, role: primary}`",
            );
        }
        let mut names = HashMap::new();
        let mut addrs = HashMap::new();
        let mut out = Vec::new();
        for (i, l) in raw.into_iter().enumerate() {
            let at = |key: &str| format!("listeners[{i}].{key}");
            let name = self.required(&at("name"), l.name, "a short name such as `rw`");
            if let Some(prev) = names.insert(name.clone(), i) {
                self.problem(
                    &at("name"),
                    format!("duplicate listener name `{name}` (also listeners[{prev}])"),
                    "give every listener a distinct name",
                );
            }
            let listen =
                self.required(&at("listen"), l.listen, "an address such as 127.0.0.1:5432");
            let listen = self.socket_addr(&at("listen"), &listen);
            if let Some(addr) = listen {
                if let Some(prev) = addrs.insert(addr, i) {
                    self.problem(
                        &at("listen"),
                        format!("address {addr} is already used by listeners[{prev}]"),
                        "give every listener its own address or port",
                    );
                }
            }
            let role = self.role(&at("role"), l.role);
            let fallback = self.fallback(&at("fallback"), l.fallback, role);
            let balance = self.balance(&at("balance"), l.balance);
            out.push(ListenerConfig {
                name,
                listen: listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
                role,
                fallback,
                balance,
                connect_timeout: self.duration(
                    &at("connect_timeout"),
                    l.connect_timeout,
                    Duration::from_secs(3),
                ),
                startup_timeout: self.duration(
                    &at("startup_timeout"),
                    l.startup_timeout,
                    Duration::from_secs(10),
                ),
            });
        }
        out
    }

    fn role(&mut self, item: &str, raw: Option<Text>) -> Role {
        match raw.map(|t| t.0).as_deref() {
            Some("primary") => Role::Primary,
            Some("replica") => Role::Replica,
            Some("any") => Role::Any,
            other => {
                let message = match other {
                    Some(v) => format!("unknown role `{v}`"),
                    None => "missing role".into(),
                };
                self.problem(item, message, "write one of: primary, replica, any");
                Role::Primary
            }
        }
    }

    fn fallback(&mut self, item: &str, raw: Option<Text>, role: Role) -> Option<Role> {
        let text = raw?.0;
        if text == "primary" && role == Role::Replica {
            return Some(Role::Primary);
        }
        let message = if text == "primary" {
            format!(
                "fallback `primary` makes no sense on a `{}` listener",
                role.as_str()
            )
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

    fn backends(&mut self, raw: Vec<RawBackend>) -> Vec<BackendConfig> {
        if raw.is_empty() {
            self.problem(
                "backends",
                "no backends are configured".into(),
                "add at least one backend, e.g. `- {name: pg1, address: 10.0.0.11:5432}`",
            );
        }
        let mut names = HashMap::new();
        let mut addrs = HashMap::new();
        let mut out = Vec::new();
        for (i, b) in raw.into_iter().enumerate() {
            let at = |key: &str| format!("backends[{i}].{key}");
            let name = self.required(&at("name"), b.name, "a short name such as `pg1`");
            if let Some(prev) = names.insert(name.clone(), i) {
                self.problem(
                    &at("name"),
                    format!("duplicate backend name `{name}` (also backends[{prev}])"),
                    "give every backend a distinct name",
                );
            }
            let address = self.required(
                &at("address"),
                b.address,
                "host:port such as 10.0.0.11:5432",
            );
            let (host, port) = self.host_port(&at("address"), &address).unwrap_or_default();
            if !host.is_empty() {
                if let Some(prev) = addrs.insert((host.clone(), port), i) {
                    self.problem(
                        &at("address"),
                        format!("address {address} is already used by backends[{prev}]"),
                        "list every server once",
                    );
                }
            }
            let weight = b.weight.unwrap_or(1);
            if weight == 0 || weight > 1000 {
                self.problem(
                    &at("weight"),
                    format!("weight {weight} is out of range"),
                    "write a weight from 1 to 1000 (drain a backend by removing it instead)",
                );
            }
            out.push(BackendConfig {
                name,
                host,
                port,
                weight,
            });
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
                self.problem(
                    item,
                    "empty value".into(),
                    format!("write a name, e.g. `{default}`"),
                );
                default.to_owned()
            }
            Some(t) => t.0,
        }
    }

    fn count(&mut self, item: &str, raw: Option<u32>, default: u32) -> u32 {
        let n = raw.unwrap_or(default);
        if n == 0 || n > 100 {
            self.problem(
                item,
                format!("{n} is out of range"),
                "write a count from 1 to 100",
            );
            return default;
        }
        n
    }

    fn duration(&mut self, item: &str, raw: Option<Text>, default: Duration) -> Duration {
        let Some(text) = raw else { return default };
        match parse_duration(&text.0) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.problem(
                    item,
                    "duration is zero".into(),
                    "write a positive duration such as `500ms` or `2s`",
                );
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
        let parsed = text
            .parse::<SocketAddr>()
            .ok()
            .map(|a| (a.ip().to_string(), a.port()));
        let parsed = parsed.or_else(|| {
            let (host, port) = text.rsplit_once(':')?;
            let valid_host = !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
            Some((
                host.to_owned(),
                port.parse::<u16>().ok().filter(|p| *p != 0 && valid_host)?,
            ))
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
