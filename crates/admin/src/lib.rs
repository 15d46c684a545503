//! The admin HTTP endpoint. It reads snapshots and renders them; it is never
//! on the data path.
//!
//! - `GET /metrics`: Prometheus text.
//! - `GET /health`: 200 while pglb serves (liveness of pglb, not of the
//!   database), 503 once it is shutting down.
//! - `GET /status`: backends and listeners as JSON.
#![forbid(unsafe_code)]

mod server;
mod status;

pub use server::{serve, AdminState};
pub use status::status_json;
