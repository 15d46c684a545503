//! Just enough of the PostgreSQL wire protocol for a balancer: the client's
//! first message (startup, SSL/GSS negotiation, cancel, or the TLS record
//! that opens a PostgreSQL 17+ direct TLS connection) and ErrorResponse.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::reason::Reject;

/// PostgreSQL's own cap on a startup packet (MAX_STARTUP_PACKET_LENGTH).
pub const MAX_FIRST_MESSAGE: usize = 10_000;

/// The largest TLS record a client may open with: a TLSPlaintext fragment
/// is at most 2^14 bytes (RFC 8446 §5.1), after a 5-byte record header.
pub const MAX_TLS_RECORD: usize = 5 + (1 << 14);

/// A CancelRequest carries a secret key of 4 bytes (protocol 3.0) up to 256
/// bytes (3.2, PostgreSQL 18): the message is 16 to 268 bytes long.
pub const CANCEL_LENGTHS: std::ops::RangeInclusive<usize> = 16..=268;

/// The first byte of a TLS handshake record (a ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;

const CANCEL_REQUEST: u32 = 80_877_102;
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;

/// What a client opened with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstKind {
    SslRequest,
    GssEncRequest,
    /// A cancel for the session with this process id.
    Cancel {
        pid: u32,
    },
    /// A protocol-3 StartupMessage (any minor version).
    Startup {
        user: Option<String>,
        database: Option<String>,
    },
    /// A TLS handshake record: PostgreSQL 17+ direct TLS
    /// (`sslnegotiation=direct`). pglb cannot read what follows; the record
    /// is passed on unchanged and the server does the handshake.
    DirectTls,
}

/// A client's first message, kept whole so it can be passed on unchanged.
#[derive(Debug, Clone)]
pub struct FirstMessage {
    pub bytes: Vec<u8>,
    pub kind: FirstKind,
    /// On an address routed by server name, pglb answered the client's
    /// SSLRequest itself and `bytes` is the ClientHello that followed: the
    /// backend must get an SSLRequest of pglb's first and answer `S`.
    pub via_ssl_request: bool,
    /// The TLS server name the client asked for, when pglb read it.
    pub server_name: Option<String>,
}

impl FirstMessage {
    pub fn new(bytes: Vec<u8>, kind: FirstKind) -> Self {
        Self { bytes, kind, via_ssl_request: false, server_name: None }
    }
}

/// The SSLRequest pglb sends a backend on the client's behalf.
pub const SSL_REQUEST_BYTES: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Why a first message was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum FirstMessageError {
    #[error("client closed the connection before sending a startup message")]
    Closed,
    #[error("first message length {0} is outside 8..={MAX_FIRST_MESSAGE}")]
    BadLength(u32),
    #[error("first message has unknown code {0} (not a PostgreSQL client)")]
    UnknownCode(u32),
    #[error("cancel request length {0} is outside 16..=268")]
    BadCancel(usize),
    #[error("direct TLS: first record is not a TLS 1.x handshake of 1..=16384 bytes (version {0:#06x}, length {1})")]
    BadTlsRecord(u16, usize),
    #[error("cannot read first message: {0}")]
    Io(#[from] io::Error),
}

impl FirstMessageError {
    /// Why the client is turned away, as a metric label.
    pub fn kind(&self) -> Reject {
        match self {
            Self::Closed => Reject::ClientClosed,
            Self::BadLength(_) | Self::UnknownCode(_) | Self::BadCancel(_) | Self::BadTlsRecord(..) => {
                Reject::BadStartup
            }
            Self::Io(_) => Reject::ClientError,
        }
    }
}

/// Reads one client message that has no type byte (every pre-startup
/// message), or the whole first TLS record of a direct TLS connection.
pub async fn read_first<R: AsyncRead + Unpin>(r: &mut R) -> Result<FirstMessage, FirstMessageError> {
    let mut head = [0u8; 8];
    match r.read_exact(&mut head[..4]).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FirstMessageError::Closed),
        Err(e) => return Err(e.into()),
    }
    // A PostgreSQL message starting with 0x16 would claim 369 MB or more:
    // that first byte can only be TLS.
    if head[0] == TLS_HANDSHAKE {
        return read_tls_record(r, [head[0], head[1], head[2], head[3]]).await;
    }
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    if !(8..=MAX_FIRST_MESSAGE as u32).contains(&len) {
        return Err(FirstMessageError::BadLength(len));
    }
    let mut bytes = vec![0u8; len as usize];
    bytes[..4].copy_from_slice(&head[..4]);
    r.read_exact(&mut bytes[4..]).await.map_err(eof_is_closed)?;
    let kind = classify(&bytes)?;
    Ok(FirstMessage::new(bytes, kind))
}

/// Reads the rest of a TLS record whose first 4 bytes are `head`: type,
/// version (major 3) and the high byte of the length.
async fn read_tls_record<R: AsyncRead + Unpin>(r: &mut R, head: [u8; 4]) -> Result<FirstMessage, FirstMessageError> {
    let mut low = [0u8; 1];
    r.read_exact(&mut low).await.map_err(eof_is_closed)?;
    let version = u16::from_be_bytes([head[1], head[2]]);
    let len = usize::from(u16::from_be_bytes([head[3], low[0]]));
    if head[1] != 3 || !(1..=MAX_TLS_RECORD - 5).contains(&len) {
        return Err(FirstMessageError::BadTlsRecord(version, len));
    }
    let mut bytes = vec![0u8; 5 + len];
    bytes[..4].copy_from_slice(&head);
    bytes[4] = low[0];
    r.read_exact(&mut bytes[5..]).await.map_err(eof_is_closed)?;
    Ok(FirstMessage::new(bytes, FirstKind::DirectTls))
}

fn eof_is_closed(e: io::Error) -> FirstMessageError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => FirstMessageError::Closed,
        _ => FirstMessageError::Io(e),
    }
}

fn classify(bytes: &[u8]) -> Result<FirstKind, FirstMessageError> {
    let code = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    match code {
        SSL_REQUEST if bytes.len() == 8 => Ok(FirstKind::SslRequest),
        GSSENC_REQUEST if bytes.len() == 8 => Ok(FirstKind::GssEncRequest),
        CANCEL_REQUEST if CANCEL_LENGTHS.contains(&bytes.len()) => {
            Ok(FirstKind::Cancel { pid: u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) })
        }
        CANCEL_REQUEST => Err(FirstMessageError::BadCancel(bytes.len())),
        c if c >> 16 == 3 => Ok(startup(&bytes[8..])),
        c => Err(FirstMessageError::UnknownCode(c)),
    }
}

/// Reads `user` and `database` from StartupMessage parameters (for logs).
fn startup(params: &[u8]) -> FirstKind {
    let mut fields = params.split(|b| *b == 0);
    let (mut user, mut database) = (None, None);
    while let (Some(k), Some(v)) = (fields.next(), fields.next()) {
        if k.is_empty() {
            break;
        }
        let value = Some(String::from_utf8_lossy(v).into_owned());
        match k {
            b"user" => user = value,
            b"database" => database = value,
            _ => {}
        }
    }
    FirstKind::Startup { user, database }
}

/// A fatal TLS alert record (`internal_error`), for a direct TLS client that
/// pglb turns away before any server answered: it cannot read a PostgreSQL
/// error, and an alert is what a TLS server sends when it cannot go on.
/// Sent in the clear, as an alert before the ServerHello is.
pub const TLS_ALERT_INTERNAL_ERROR: [u8; 7] = tls_alert(80);

/// A fatal TLS alert record with `description` (RFC 8446 §6): 80
/// internal_error, 112 unrecognized_name, 50 decode_error.
pub const fn tls_alert(description: u8) -> [u8; 7] {
    [0x15, 0x03, 0x03, 0x00, 0x02, 2, description]
}

/// A protocol-3 ErrorResponse, severity FATAL.
pub fn fatal_error(sqlstate: &str, message: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(message.len() + 32);
    for (tag, value) in [(b'S', "FATAL"), (b'V', "FATAL"), (b'C', sqlstate), (b'M', message)] {
        body.push(tag);
        body.extend(value.bytes().filter(|b| *b != 0));
        body.push(0);
    }
    body.push(0);
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(b'E');
    out.extend(((body.len() + 4) as u32).to_be_bytes());
    out.extend(body);
    out
}

/// What the start of a backend's answer to a StartupMessage says.
#[derive(Debug, PartialEq, Eq)]
pub enum FirstAnswer {
    /// Not one whole message (after any NegotiateProtocolVersion) has
    /// arrived yet.
    Incomplete,
    /// An answer for the client: authentication, or an error it must see.
    Pass,
    /// The server turned the login away for a reason about the server, not
    /// the client (57P03 cannot_connect_now: shutting down, starting up,
    /// in recovery; 57P01 admin_shutdown): another backend may take it.
    NotNow { sqlstate: String, message: String },
}

/// SQLSTATEs of a login turned away because of the server's state.
const NOT_NOW: [&[u8]; 2] = [b"57P03", b"57P01"];

/// Reads the start of a backend's answer to a StartupMessage (`bytes` as
/// peeked, nothing consumed). A NegotiateProtocolVersion may come first.
/// A login without a password answers AuthenticationOk and its session
/// parameters in one go: an error among those (the server began shutting
/// down while it started the session) is still before anything the client
/// acted on. Whatever else comes first is the client's to see.
pub fn first_answer(bytes: &[u8]) -> FirstAnswer {
    let mut rest = bytes;
    let mut whole = false;
    let partial = |whole: bool| if whole { FirstAnswer::Pass } else { FirstAnswer::Incomplete };
    loop {
        let Some(&kind) = rest.first() else { return partial(whole) };
        if !matches!(kind, b'E' | b'v' | b'R' | b'S' | b'K' | b'N') {
            return FirstAnswer::Pass;
        }
        if rest.len() < 5 {
            return partial(whole);
        }
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        if !(4..=MAX_FIRST_MESSAGE).contains(&len) {
            return FirstAnswer::Pass;
        }
        let Some(message) = rest.get(5..1 + len) else { return partial(whole) };
        match kind {
            b'E' => return not_now(message),
            // Anything but AuthenticationOk asks the client for something.
            b'R' if message != [0, 0, 0, 0] => return FirstAnswer::Pass,
            b'R' | b'S' | b'K' | b'N' => whole = true,
            _ => {}
        }
        rest = &rest[1 + len..];
    }
}

/// The verdict on an ErrorResponse body.
fn not_now(message: &[u8]) -> FirstAnswer {
    let field = |tag: u8| message.split(|b| *b == 0).find(|f| f.first() == Some(&tag)).map(|f| &f[1..]);
    match field(b'C') {
        Some(code) if NOT_NOW.contains(&code) => FirstAnswer::NotNow {
            sqlstate: String::from_utf8_lossy(code).into_owned(),
            message: String::from_utf8_lossy(field(b'M').unwrap_or_default()).into_owned(),
        },
        _ => FirstAnswer::Pass,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(code: u32, rest: &[u8]) -> Vec<u8> {
        let mut m = ((8 + rest.len()) as u32).to_be_bytes().to_vec();
        m.extend(code.to_be_bytes());
        m.extend(rest);
        m
    }

    async fn read(bytes: &[u8]) -> Result<FirstMessage, FirstMessageError> {
        read_first(&mut &bytes[..]).await
    }

    #[tokio::test]
    async fn reads_startup_with_parameters() {
        let m = msg(196_608, b"user\0alice\0database\0app\0\0");
        let first = read(&m).await.expect("valid startup");
        assert_eq!(first.bytes, m);
        assert_eq!(first.kind, FirstKind::Startup { user: Some("alice".into()), database: Some("app".into()) });
    }

    #[tokio::test]
    async fn reads_negotiation_and_cancel() {
        assert_eq!(read(&msg(SSL_REQUEST, b"")).await.expect("ssl").kind, FirstKind::SslRequest);
        assert_eq!(read(&msg(GSSENC_REQUEST, b"")).await.expect("gss").kind, FirstKind::GssEncRequest);
        let cancel = msg(CANCEL_REQUEST, &[0, 0, 0, 42, 1, 2, 3, 4]);
        assert_eq!(read(&cancel).await.expect("cancel").kind, FirstKind::Cancel { pid: 42 });
    }

    #[tokio::test]
    async fn reads_a_direct_tls_record_whole() {
        let mut record = vec![0x16, 0x03, 0x01, 0x00, 0x04, 1, 0, 0, 0];
        let first = read(&record).await.expect("a ClientHello record");
        assert_eq!((first.kind, first.bytes.clone()), (FirstKind::DirectTls, record.clone()));
        record.extend(b"more bytes after the record stay unread");
        assert_eq!(read(&record).await.expect("record").bytes.len(), 9);
        assert!(matches!(read(&[0x16, 0x03, 0x01, 0x00, 0x04, 1]).await, Err(FirstMessageError::Closed)));
        assert!(matches!(
            read(&[0x16, 0x03, 0x03, 0x40, 0x01]).await,
            Err(FirstMessageError::BadTlsRecord(0x0303, 16385))
        ));
        assert!(matches!(read(&[0x16, 0x02, 0x00, 0x00, 0x04]).await, Err(FirstMessageError::BadTlsRecord(0x0200, 4))));
    }

    #[tokio::test]
    async fn cancel_keys_of_4_to_256_bytes() {
        for key in [4, 32, 256] {
            let cancel = msg(CANCEL_REQUEST, &[&[0, 0, 1, 0][..], &vec![7; key]].concat());
            assert_eq!(read(&cancel).await.expect("cancel").kind, FirstKind::Cancel { pid: 256 });
        }
        for key in [0, 3, 257] {
            let cancel = msg(CANCEL_REQUEST, &[&[0, 0, 1, 0][..], &vec![7; key]].concat());
            assert!(matches!(read(&cancel).await, Err(FirstMessageError::BadCancel(n)) if n == 12 + key));
        }
    }

    #[tokio::test]
    async fn rejects_garbage() {
        assert!(matches!(read(b"GET / HTTP/1.1\r\n\r\n").await, Err(FirstMessageError::BadLength(_))));
        assert!(matches!(read(&msg(1234, b"")).await, Err(FirstMessageError::UnknownCode(1234))));
        assert!(matches!(read(&[0, 0, 0x27, 0x11]).await, Err(FirstMessageError::BadLength(10001))));
        assert!(matches!(read(&[0, 0, 0, 20, 0]).await, Err(FirstMessageError::Closed)));
        assert!(matches!(read(b"").await, Err(FirstMessageError::Closed)));
    }

    #[test]
    fn error_response_is_well_formed() {
        let e = fatal_error("57P03", "pglb: no healthy primary");
        assert_eq!(e[0], b'E');
        let len = u32::from_be_bytes([e[1], e[2], e[3], e[4]]) as usize;
        assert_eq!(len + 1, e.len());
        assert!(e.ends_with(b"pglb: no healthy primary\0\0"));
    }

    #[test]
    fn a_login_turned_away_for_the_servers_state_is_recognised() {
        let shutting = fatal_error("57P03", "the database system is shutting down");
        assert_eq!(
            first_answer(&shutting),
            FirstAnswer::NotNow { sqlstate: "57P03".into(), message: "the database system is shutting down".into() }
        );
        let admin = fatal_error("57P01", "terminating connection due to administrator command");
        assert!(matches!(first_answer(&admin), FirstAnswer::NotNow { sqlstate, .. } if sqlstate == "57P01"));
        // Errors about the client are the client's to see.
        assert_eq!(first_answer(&fatal_error("28P01", "password authentication failed")), FirstAnswer::Pass);
        assert_eq!(first_answer(&fatal_error("53300", "too many clients")), FirstAnswer::Pass);
        // A SASL request.
        assert_eq!(first_answer(&[b'R', 0, 0, 0, 8, 0, 0, 0, 10]), FirstAnswer::Pass);
        // Split across reads, and after a NegotiateProtocolVersion.
        for cut in [0, 1, 4, 10, shutting.len() - 1] {
            assert_eq!(first_answer(&shutting[..cut]), FirstAnswer::Incomplete, "cut at {cut}");
        }
        let negotiate = [b'v', 0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0];
        let both = [&negotiate[..], &shutting].concat();
        assert!(matches!(first_answer(&both), FirstAnswer::NotNow { .. }));
        assert_eq!(first_answer(&both[..negotiate.len() + 3]), FirstAnswer::Incomplete);
        // A length no server sends: not ours to judge.
        assert_eq!(first_answer(&[b'E', 0xff, 0, 0, 0]), FirstAnswer::Pass);
        // Trust: AuthenticationOk and parameters, then the shutdown's 57P01.
        let ok = [b'R', 0, 0, 0, 8, 0, 0, 0, 0];
        let param = [&[b'S', 0, 0, 0, 8][..], b"a\0b\0"].concat();
        let late = [&ok[..], &param, &fatal_error("57P01", "terminating connection")].concat();
        assert!(matches!(first_answer(&late), FirstAnswer::NotNow { .. }));
        // ...but once the session is ready, or with only part of it here,
        // the answer is the client's.
        assert_eq!(first_answer(&[&ok[..], &param].concat()), FirstAnswer::Pass);
        assert_eq!(first_answer(&[&ok[..], &[b'Z', 0, 0, 0, 5, b'I']].concat()), FirstAnswer::Pass);
    }
}
