//! The admin HTTP endpoint. It reads snapshots and renders them, and turns
//! operator actions into commands for the topology task; it is never on the
//! data path.
//!
//! - `GET /metrics`: Prometheus text (without the series of backends and
//!   listeners a reload removed, once no session uses them).
//! - `GET /health`: 200 while pglb serves (liveness of pglb, not of the
//!   database), 503 once it is shutting down.
//! - `GET /status`: backends, listeners and the live config as JSON.
//! - `GET /connections`: open client sessions.
//! - `POST /backends/{name}/{drain|disable|enable|unfence}`: operator
//!   actions, behind `Authorization: Bearer` when a token is configured.
//! - `POST /upgrade`: start the binary anew and hand over (same token).
#![forbid(unsafe_code)]

mod actions;
pub mod client;
mod exposition;
mod server;
mod status;

pub use server::{serve, AdminContext, LiveConfig, Reload, UpgradeRequest};
pub use status::{connections_json, status_json};
