//! Operator actions on backends.

use pglb_control::Command;
use pglb_routing::{ActionError, AdminState};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

/// The outcome of an action: HTTP status and JSON body.
pub struct Reply {
    pub status: u16,
    pub body: String,
}

fn reply(status: u16, body: serde_json::Value) -> Reply {
    Reply { status, body: format!("{body}\n") }
}

/// Runs `action` on backend `name`.
pub async fn run(commands: &mpsc::Sender<Command>, name: &str, action: &str) -> Reply {
    let state = match action {
        "drain" => Some(AdminState::Drained),
        "disable" => Some(AdminState::Disabled),
        "enable" => Some(AdminState::Enabled),
        "unfence" => None,
        other => {
            return reply(
                404,
                json!({"error": format!("unknown action `{other}`"), "actions": ["drain", "disable", "enable", "unfence"]}),
            )
        }
    };
    let result = match state {
        Some(state) => {
            let (tx, rx) = oneshot::channel();
            let sent = commands.send(Command::Admin { backend: name.to_owned(), state, reply: tx }).await;
            match (sent, rx.await) {
                (Ok(()), Ok(r)) => r.map(|()| json!({"backend": name, "admin_state": state.as_str()})),
                _ => return reply(503, json!({"error": "pglb is shutting down"})),
            }
        }
        None => {
            let (tx, rx) = oneshot::channel();
            let sent = commands.send(Command::Unfence { backend: name.to_owned(), reply: tx }).await;
            match (sent, rx.await) {
                (Ok(()), Ok(r)) => r.map(|was| json!({"backend": name, "unfenced": was})),
                _ => return reply(503, json!({"error": "pglb is shutting down"})),
            }
        }
    };
    match result {
        Ok(body) => reply(200, body),
        Err(ActionError::NoSuchBackend(n)) => reply(404, json!({"error": format!("no backend named `{n}`")})),
        Err(ActionError::Conflict(why)) => reply(409, json!({"error": why})),
    }
}
