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
//!   actions, behind `Authorization: Bearer <token>`, always: refused when no
//!   token is configured (`policy`).
//! - `POST /upgrade`: start the binary anew and hand over (same token).
//!
//! It runs on a thread and runtime of its own, with bounded connections and
//! timeouts (`server::Limits`); `/health` is answered even over the limit.
#![forbid(unsafe_code)]

mod actions;
pub mod client;
mod exposition;
mod health_only;
pub mod policy;
mod server;
mod status;

pub use server::{serve, spawn, AdminContext, Limits, LiveConfig, Reload, UpgradeRequest};
pub use status::{connections_json, status_json};
