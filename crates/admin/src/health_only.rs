//! A connection over the admin endpoint's limit: it has a moment to ask for
//! `GET /health` (keepalived's check), which is answered; anything else, or
//! nothing in time, is told 503 and closed. Read by hand, a few bytes, no
//! HTTP machinery: it must stay cheap under a flood.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::policy::{record, Denied};
use crate::server::AdminContext;

pub async fn answer(mut stream: TcpStream, state: &AdminContext, within: Duration) {
    let mut head = [0u8; 64];
    let mut len = 0;
    let asked = tokio::time::timeout(within, async {
        while len < head.len() && !head[..len].contains(&b'\n') {
            match stream.read(&mut head[len..]).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => len += n,
            }
        }
        true
    })
    .await
    .unwrap_or(false);
    let line = &head[..len];
    let wants_health = asked && (line.starts_with(b"GET /health ") || line.starts_with(b"GET /health?"));
    let reply = if !wants_health {
        record(Denied::OverCapacity, "");
        format!("HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{}\n", Denied::OverCapacity.message().len() + 1, Denied::OverCapacity.message())
    } else if state.draining.load(std::sync::atomic::Ordering::Relaxed) {
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\nconnection: close\r\ncontent-length: 14\r\n\r\nshutting down\n".to_owned()
    } else {
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\ncontent-length: 3\r\n\r\nok\n".to_owned()
    };
    let _ = tokio::time::timeout(within, stream.write_all(reply.as_bytes())).await;
    let _ = stream.shutdown().await;
}
