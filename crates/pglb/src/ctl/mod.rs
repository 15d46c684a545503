//! The control commands — `pglb status`, `connections`, `drain`, `disable`,
//! `enable`, `unfence`, `upgrade` — a client of the running pglb's admin
//! endpoint.
//! They read only the config's `admin` section, never the health password.

mod access;
mod render;

use std::path::PathBuf;
use std::process::ExitCode;

use hyper::Method;
use std::time::Duration;

use pglb_admin::client::{request_within, ClientError, Reply};

use crate::cli::Control;

/// The documented exit codes (`pglb --help`, README "Control commands").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Done = 0,
    Refused = 1,
    Usage = 2,
    NotRunning = 3,
    Unauthorized = 4,
    NoSuchBackend = 5,
    NoSuchCluster = 6,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e as u8)
    }
}

/// Runs one control command and says how it went.
pub fn run(control: Control, config: Option<PathBuf>, token_file: Option<PathBuf>, json: bool) -> Exit {
    // Only what changes something needs the token (and /connections, off a
    // loopback admin address): reads never send it.
    let wants_token = match control {
        Control::Status => false,
        Control::Connections => !loopback_admin(config.as_deref()),
        Control::Act { .. } | Control::Upgrade => true,
    };
    let access = match access::resolve(config, token_file, wants_token) {
        Ok(a) => a,
        Err(message) => {
            eprintln!("pglb: {message}");
            return Exit::Usage;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pglb: cannot start the async runtime: {e}");
            return Exit::Refused;
        }
    };
    runtime.block_on(execute(&control, &access, json))
}

async fn execute(control: &Control, access: &access::Access, json: bool) -> Exit {
    let (method, path) = match control {
        Control::Status => (Method::GET, "/status".to_owned()),
        Control::Connections => (Method::GET, "/connections".to_owned()),
        Control::Act { action, backend } => {
            let name_ok =
                |n: &str| !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            // Cluster names are letters, digits, `-` and `_` (the config's rule).
            let cluster_ok =
                |c: &str| !c.is_empty() && c.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b));
            match backend.split_once('/') {
                Some((cluster, name)) if cluster_ok(cluster) && name_ok(name) => {
                    (Method::POST, format!("/clusters/{cluster}/backends/{name}/{}", action.as_str()))
                }
                None if name_ok(backend) => (Method::POST, format!("/backends/{backend}/{}", action.as_str())),
                _ => {
                    eprintln!("pglb: `{backend}` is not a backend name (letters, digits, `-`, `_`, `.`, as `cluster/name` or `name`); `pglb status` lists them");
                    return Exit::NoSuchBackend;
                }
            }
        }
        Control::Upgrade => (Method::POST, "/upgrade".to_owned()),
    };
    // An upgrade answers once the new process serves: after its first checks.
    let within = if *control == Control::Upgrade { UPGRADE_WITHIN } else { Duration::from_secs(5) };
    let reply = match request_within(access.addr, method, &path, access.token.as_deref(), within).await {
        Ok(reply) => reply,
        Err(err) => return not_reached(access, &err),
    };
    match (reply.status, control) {
        (200, Control::Status | Control::Connections) => show(control, access, &reply, json),
        (200, Control::Act { backend, .. }) => {
            println!("{backend}: {}", done(&reply.body));
            Exit::Done
        }
        (200, Control::Upgrade) => {
            println!("pglb: {}", summary(&reply.body));
            Exit::Done
        }
        (401, _) => {
            eprintln!("pglb: the admin endpoint at {} refused the token: {}", access.addr, access.token_hint());
            Exit::Unauthorized
        }
        (403, _) => {
            eprintln!("pglb: the admin endpoint at {} refused: {}", access.addr, summary(&reply.body));
            Exit::Unauthorized
        }
        (404, Control::Act { .. }) if kind(&reply.body) == "no_such_cluster" => {
            eprintln!("pglb: {}; `pglb status` lists the clusters", summary(&reply.body));
            Exit::NoSuchCluster
        }
        (404, Control::Act { .. }) => {
            eprintln!("pglb: {}; `pglb status` lists the backends", summary(&reply.body));
            Exit::NoSuchBackend
        }
        (code, _) => {
            eprintln!("pglb: {path} answered {code}: {}", summary(&reply.body));
            Exit::Refused
        }
    }
}

/// How long `pglb upgrade` waits for the outcome: the new process's first
/// checks, and the old one's wait for them, are bounded well below this.
const UPGRADE_WITHIN: Duration = Duration::from_secs(180);

/// Whether the config's admin endpoint listens on loopback (unreadable
/// config: assume not, so a token is looked for).
fn loopback_admin(config: Option<&std::path::Path>) -> bool {
    let path = crate::cli::config_path(config.map(std::path::Path::to_owned)).ok();
    path.and_then(|p| pglb_config::load_admin(&p).ok()).is_some_and(|a| a.listen.ip().is_loopback())
}

fn show(control: &Control, access: &access::Access, reply: &Reply, json: bool) -> Exit {
    if json {
        println!("{}", reply.body.trim_end());
        return Exit::Done;
    }
    println!("pglb at {} (admin address from {})", access.addr, access.config.display());
    let value: serde_json::Value = match serde_json::from_str(&reply.body) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("pglb: the admin endpoint answered something that is not JSON ({e})");
            return Exit::Refused;
        }
    };
    let text = match control {
        Control::Connections => render::connections(&value),
        _ => render::status(&value),
    };
    print!("{text}");
    Exit::Done
}

fn not_reached(access: &access::Access, err: &ClientError) -> Exit {
    eprintln!(
        "pglb: {err}\n  is pglb running with this config ({})? `systemctl status pglb` or start it with `pglb run`",
        access.config.display()
    );
    match err {
        ClientError::Connect { .. } | ClientError::Timeout { .. } => Exit::NotRunning,
        ClientError::Http { .. } => Exit::Refused,
    }
}

/// The `error` or `result` of a JSON answer, else the body itself.
fn summary(body: &str) -> String {
    let value: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let field = value.as_ref().and_then(|v| v.get("error").or_else(|| v.get("result"))).and_then(|v| v.as_str());
    field.map(str::to_owned).unwrap_or_else(|| body.trim().to_owned())
}

/// The `kind` of a JSON error answer (empty if none).
fn kind(body: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    value["kind"].as_str().unwrap_or_default().to_owned()
}

/// What an action did, from its JSON answer.
fn done(body: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let what = match (value["admin_state"].as_str(), value["unfenced"].as_bool()) {
        (Some(state), _) => format!("admin state is now {state}"),
        (_, Some(true)) => "fence cleared".to_owned(),
        (_, Some(false)) => "was not fenced; nothing to do".to_owned(),
        _ => return body.trim().to_owned(),
    };
    match value["shared_state"].as_str() {
        Some(shared) => format!("{what}; {shared}"),
        None => what,
    }
}
