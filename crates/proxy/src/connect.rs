//! Connecting to a backend, and the socket options both sides get.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// TCP_NODELAY and keepalive, so a dead peer is noticed within minutes.
pub fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let keepalive =
        TcpKeepalive::new().with_time(Duration::from_secs(60)).with_interval(Duration::from_secs(10)).with_retries(6);
    let _ = SockRef::from(stream).set_tcp_keepalive(&keepalive);
}

/// Connects to `addr` within `timeout`: the address the backend's checks
/// verified, so there is no name lookup on the data path (a resolver outage
/// does not stall clients, and a re-pointed name cannot send a client to a
/// server nobody checked). `user_timeout` (TCP_USER_TIMEOUT) bounds how long
/// sent data may stay unacknowledged: a session to a vanished host fails
/// then, not after the kernel's ~15 minutes of retransmissions.
pub async fn connect(addr: SocketAddr, timeout: Duration, user_timeout: Duration) -> io::Result<TcpStream> {
    let attempt = TcpStream::connect(addr);
    let stream = tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connect timed out after {timeout:?}")))??;
    tune(&stream);
    #[cfg(target_os = "linux")]
    let _ = SockRef::from(&stream).set_tcp_user_timeout(Some(user_timeout));
    #[cfg(not(target_os = "linux"))]
    let _ = user_timeout;
    Ok(stream)
}
