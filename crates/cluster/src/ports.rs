//! Free loopback ports.
//!
//! A port found by binding port 0 and letting go is only free "a moment
//! ago": two tests of one binary running in parallel could be handed the
//! same one. Every port handed out here is remembered for the life of the
//! process and never handed out twice.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Mutex;

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A loopback port that was free a moment ago (the OS picks it), and that
/// this process has not handed out before.
pub fn free_port() -> std::io::Result<u16> {
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed = handed.get_or_insert_with(HashSet::new);
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if handed.insert(port) {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, "no fresh free port after 100 tries"))
}

/// True if nothing listens on 127.0.0.1:`port` and it can be bound.
pub fn is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn no_port_is_handed_out_twice() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            assert!(seen.insert(super::free_port().expect("a port")), "a port was handed out twice");
        }
    }
}
