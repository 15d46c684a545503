//! A client of the admin endpoint, for the control commands (`pglb status`,
//! `pglb drain`...): one HTTP/1.1 request per connection, with hyper.

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::header::{AUTHORIZATION, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How long a control command waits for pglb to connect and answer.
const TIMEOUT: Duration = Duration::from_secs(5);

/// What the admin endpoint answered.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

/// Why no answer came.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to pglb's admin endpoint at {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("pglb's admin endpoint at {addr} did not answer within {}s", within.as_secs())]
    Timeout { addr: SocketAddr, within: Duration },
    #[error("bad answer from pglb's admin endpoint at {addr}: {detail}")]
    Http { addr: SocketAddr, detail: String },
}

/// Sends `method path` (with the bearer `token`, if any) and reads the reply.
pub async fn request(addr: SocketAddr, method: Method, path: &str, token: Option<&str>) -> Result<Reply, ClientError> {
    request_within(addr, method, path, token, TIMEOUT).await
}

/// [`request`], for an answer that may take up to `within` (an upgrade).
pub async fn request_within(
    addr: SocketAddr,
    method: Method,
    path: &str,
    token: Option<&str>,
    within: Duration,
) -> Result<Reply, ClientError> {
    tokio::time::timeout(within, exchange(addr, method, path, token))
        .await
        .unwrap_or(Err(ClientError::Timeout { addr, within }))
}

async fn exchange(addr: SocketAddr, method: Method, path: &str, token: Option<&str>) -> Result<Reply, ClientError> {
    let http = |e: &dyn std::fmt::Display| ClientError::Http { addr, detail: e.to_string() };
    let stream = TcpStream::connect(addr).await.map_err(|source| ClientError::Connect { addr, source })?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| http(&e))?;
    tokio::spawn(connection);
    let mut req = Request::builder().method(method).uri(path).header(HOST, addr.to_string());
    if let Some(token) = token {
        req = req.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    let req = req.body(Empty::<Bytes>::new()).map_err(|e| http(&e))?;
    let reply = sender.send_request(req).await.map_err(|e| http(&e))?;
    let status = reply.status().as_u16();
    let body = reply.into_body().collect().await.map_err(|e| http(&e))?.to_bytes();
    Ok(Reply { status, body: String::from_utf8_lossy(&body).into_owned() })
}
