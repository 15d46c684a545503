//! Free loopback ports.

use std::net::TcpListener;

/// A loopback port that was free a moment ago (the OS picks it).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// True if nothing listens on 127.0.0.1:`port` and it can be bound.
pub fn is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}
