//! Where the running pglb's admin endpoint is and which token to show it:
//! from the config's `admin` section, overridden by `--token-file` or
//! `$PGLB_ADMIN_TOKEN`. The token is shown only to a config file the
//! invoking user (or root) owns and nobody else may write: a `lb.yaml`
//! planted in the current folder must not learn it by pointing `admin.listen`
//! elsewhere.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use pglb_config::{Secret, SecretSource};

/// The environment variable that overrides the token source of the config.
pub const TOKEN_ENV: &str = "PGLB_ADMIN_TOKEN";

/// How to reach the admin endpoint.
pub struct Access {
    pub config: PathBuf,
    pub addr: SocketAddr,
    /// `None`: send no token (none configured, or none readable).
    pub token: Option<String>,
    /// Where the token came from, or why there is none: for a 401's message.
    origin: String,
}

/// Whether the file at `path` may be trusted with the token: owned by the
/// invoking user or root, and writable by no one else. `Err` says why not.
pub fn trusted(path: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let me = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX);
    if meta.uid() != me && meta.uid() != 0 {
        return Err(format!("{} is owned by uid {}, not by you or root", path.display(), meta.uid()));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!("{} is writable by others (mode {:o})", path.display(), meta.mode() & 0o777));
    }
    Ok(())
}

impl Access {
    /// What to tell the operator when the endpoint refused the token.
    pub fn token_hint(&self) -> String {
        match &self.token {
            Some(_) => format!(
                "the token from {} is wrong; pass the right one with --token-file FILE or {TOKEN_ENV}",
                self.origin
            ),
            None => format!("no token was sent ({}); pass it with --token-file FILE or {TOKEN_ENV}", self.origin),
        }
    }
}

/// Reads the config's `admin` section and picks the token, if `wants_token`
/// (a request that needs it) and the config may be trusted with it.
pub fn resolve(config: Option<PathBuf>, token_file: Option<PathBuf>, wants_token: bool) -> Result<Access, String> {
    let config = crate::cli::config_path(config)?;
    let admin = pglb_config::load_admin(&config).map_err(|err| {
        let problems: Vec<String> = err.problems.iter().map(|p| format!("{}: error: {p}", err.location(p))).collect();
        problems.join("\n")
    })?;
    let addr = reachable(admin.listen);
    let (token, origin) = if let Some(path) = token_file {
        let token =
            read(&SecretSource::File(path.clone())).map_err(|e| format!("--token-file {}: {e}", path.display()))?;
        (Some(token), format!("--token-file {}", path.display()))
    } else if let Some(token) = std::env::var(TOKEN_ENV).ok().filter(|t| !t.trim().is_empty()) {
        (Some(token.trim().to_owned()), TOKEN_ENV.to_owned())
    } else {
        match &admin.token {
            None => (None, format!("{} sets no admin token", config.display())),
            Some(source) => match read(source) {
                Ok(token) => (Some(token), describe(source)),
                // Reads need no token: go on without it, and say why on a 401.
                Err(e) => (None, format!("{}: {e}", describe(source))),
            },
        }
    };
    if !wants_token {
        return Ok(Access { config, addr, token: None, origin: "none is needed for this request".into() });
    }
    if let Err(why) = trusted(&config) {
        eprintln!("pglb: not sending the admin token to {addr}: {why}");
        return Ok(Access { config, addr, token: None, origin: why });
    }
    Ok(Access { config, addr, token, origin })
}

fn read(source: &SecretSource) -> Result<String, String> {
    source.read().map(|s: Secret| s.expose().trim().to_owned()).map_err(|e| e.to_string())
}

fn describe(source: &SecretSource) -> String {
    match source {
        SecretSource::Env(var) => format!("admin.token_env ({var})"),
        SecretSource::File(path) => format!("admin.token_file ({})", path.display()),
        SecretSource::Inline(_) => "the config".to_owned(),
    }
}

/// A wildcard listen address (`0.0.0.0`, `::`) is reached on loopback.
pub fn reachable(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), listen.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), listen.port()),
        _ => listen,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_are_reached_on_loopback() {
        let at = |s: &str| reachable(s.parse().expect("address"));
        assert_eq!(at("0.0.0.0:9631"), "127.0.0.1:9631".parse().expect("address"));
        assert_eq!(at("[::]:9631"), "[::1]:9631".parse().expect("address"));
        assert_eq!(at("10.0.0.5:9631"), "10.0.0.5:9631".parse().expect("address"));
    }
}
