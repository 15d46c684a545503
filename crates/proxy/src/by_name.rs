//! Routing by TLS server name on an address several listeners share. pglb
//! reads the ClientHello — after answering the client's SSLRequest `S`
//! itself, or first thing for a direct TLS client — and picks the listener
//! whose `sni` has the name; the ClientHello and everything after it pass
//! unchanged, so TLS stays end to end between client and server.

use std::sync::Arc;
use std::time::Instant;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::address::AddressGroup;
use crate::listener::ListenerContext;
use crate::protocol::{read_first, tls_alert, FirstKind, FirstMessage};
use crate::reason::Reject;
use crate::sni::{read_client_hello, SniError};

/// TLS alert descriptions pglb sends.
const UNRECOGNIZED_NAME: u8 = 112;
const DECODE_ERROR: u8 = 50;

/// Why a client was not routed, and what it is told.
pub(crate) struct NameRefusal {
    pub reason: Reject,
    pub detail: String,
    pub answer: Answer,
}

pub(crate) enum Answer {
    /// A fatal TLS alert (the client is past its SSLRequest or opened with TLS).
    Alert(u8),
    /// A PostgreSQL FATAL error (a plaintext client that sent its startup).
    Fatal { sqlstate: &'static str, message: String },
    /// Just close.
    Close,
}

impl Answer {
    pub(crate) async fn send(&self, client: &mut TcpStream) {
        let bytes = match self {
            Self::Alert(description) => tls_alert(*description).to_vec(),
            Self::Fatal { sqlstate, message } => crate::protocol::fatal_error(sqlstate, message),
            Self::Close => Vec::new(),
        };
        let _ = client.write_all(&bytes).await;
        let _ = client.shutdown().await;
    }
}

/// Picks the listener for a client of `group` that opened with `first`;
/// returns it and the first message to pass on (the whole ClientHello for a
/// TLS client). Everything must arrive before `deadline` (startup_timeout).
pub(crate) async fn pick(
    group: &AddressGroup,
    client: &mut TcpStream,
    first: FirstMessage,
    deadline: Instant,
) -> Result<(Arc<ListenerContext>, FirstMessage), NameRefusal> {
    let deadline = tokio::time::Instant::from_std(deadline);
    let late = || NameRefusal {
        reason: Reject::StartupTimeout,
        detail: "no whole TLS ClientHello within startup_timeout".into(),
        answer: Answer::Close,
    };
    let mut first = first;
    for _ in 0..3 {
        match first.kind {
            FirstKind::DirectTls => {
                let hello = tokio::time::timeout_at(deadline, read_client_hello(client, first.bytes))
                    .await
                    .map_err(|_| late())?;
                return choose(group, hello, false);
            }
            FirstKind::SslRequest => {
                // PostgreSQL (since CVE-2021-23214) refuses bytes sent after
                // the SSLRequest before its answer: they were not encrypted.
                let mut peek = [0u8; 1];
                if !matches!(client.try_read(&mut peek), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock) {
                    return Err(NameRefusal {
                        reason: Reject::BadStartup,
                        detail: "bytes arrived after the SSLRequest before pglb's answer (protocol violation)".into(),
                        answer: Answer::Close,
                    });
                }
                client.write_all(b"S").await.map_err(|e| closed(&e.to_string()))?;
                let next = tokio::time::timeout_at(deadline, read_first(client)).await.map_err(|_| late())?;
                let next = next.map_err(|e| closed(&e.to_string()))?;
                if next.kind != FirstKind::DirectTls {
                    return Err(NameRefusal {
                        reason: Reject::BadStartup,
                        detail: "no TLS ClientHello after pglb answered the SSLRequest".into(),
                        answer: Answer::Close,
                    });
                }
                let hello = tokio::time::timeout_at(deadline, read_client_hello(client, next.bytes))
                    .await
                    .map_err(|_| late())?;
                return choose(group, hello, true);
            }
            FirstKind::GssEncRequest => {
                // No GSSAPI encryption through a name router: the name is in TLS.
                client.write_all(b"N").await.map_err(|e| closed(&e.to_string()))?;
                let next = tokio::time::timeout_at(deadline, read_first(client)).await.map_err(|_| late())?;
                first = next.map_err(|e| closed(&e.to_string()))?;
            }
            FirstKind::Startup { .. } => {
                return match group.default_listener() {
                    Some(ctx) => Ok((ctx.clone(), first)),
                    None => {
                        let message = format!(
                            "pglb: {} routes by TLS server name and has no default listener: connect with sslmode=require (or verify-full) and one of its host names",
                            group.listen
                        );
                        Err(NameRefusal {
                            reason: Reject::TlsRequired,
                            detail: message.clone(),
                            answer: Answer::Fatal { sqlstate: "08004", message },
                        })
                    }
                };
            }
            FirstKind::Cancel { .. } => {
                let ctx = group.first().ok_or_else(|| closed("no listener"))?;
                return Ok((ctx.clone(), first));
            }
        }
    }
    Err(NameRefusal {
        reason: Reject::BadStartup,
        detail: "too many negotiation requests".into(),
        answer: Answer::Close,
    })
}

fn closed(why: &str) -> NameRefusal {
    NameRefusal { reason: Reject::ClientError, detail: why.to_owned(), answer: Answer::Close }
}

fn choose(
    group: &AddressGroup,
    hello: Result<crate::sni::ClientHello, SniError>,
    via_ssl_request: bool,
) -> Result<(Arc<ListenerContext>, FirstMessage), NameRefusal> {
    let hello = hello.map_err(|e| match e {
        SniError::Closed => NameRefusal { reason: Reject::ClientClosed, detail: e.to_string(), answer: Answer::Close },
        SniError::Io(_) => closed(&e.to_string()),
        SniError::TooLong | SniError::Malformed(_) => {
            NameRefusal { reason: Reject::BadStartup, detail: e.to_string(), answer: Answer::Alert(DECODE_ERROR) }
        }
    })?;
    let Some(ctx) = group.for_name(hello.server_name.as_deref()) else {
        let detail = match &hello.server_name {
            Some(name) => {
                format!("no listener on {} serves server name `{name}`, and there is no default listener", group.listen)
            }
            None => format!("the client sent no server name (SNI), and {} has no default listener", group.listen),
        };
        return Err(NameRefusal {
            reason: Reject::UnknownServerName,
            detail,
            answer: Answer::Alert(UNRECOGNIZED_NAME),
        });
    };
    // Whatever the client sent after its ClientHello goes on after it.
    let mut bytes = hello.bytes;
    bytes.extend_from_slice(&hello.after);
    let mut first = FirstMessage::new(bytes, FirstKind::DirectTls);
    first.via_ssl_request = via_ssl_request;
    first.server_name = hello.server_name;
    Ok((ctx.clone(), first))
}
