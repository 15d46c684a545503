//! The TLS server name (SNI) of a client's ClientHello, for routing several
//! listeners on one address by name. pglb reads the ClientHello — all of it,
//! which may span several TLS records and TCP segments, up to
//! [`MAX_CLIENT_HELLO`] bytes — and passes it on unchanged; it never
//! decrypts anything (the ClientHello is sent in the clear). The handshake
//! message is parsed with `tls-parser`.

use std::io;

use tls_parser::{parse_tls_client_hello_extensions, parse_tls_handshake_client_hello, SNIType, TlsExtension};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::protocol::MAX_TLS_RECORD;

/// Most bytes of TLS records pglb reads to find the end of a ClientHello.
/// Browsers' largest (with post-quantum key shares) are under 2 KiB; libpq's
/// are smaller. A client whose ClientHello is longer is refused.
pub const MAX_CLIENT_HELLO: usize = 32 * 1024;

/// A whole ClientHello, as the records that carried it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The records, byte for byte as received.
    pub bytes: Vec<u8>,
    /// Bytes the client sent after the ClientHello's last record that came
    /// in the same reads: passed on after `bytes`, unchanged.
    pub after: Vec<u8>,
    /// The host name of the server_name extension, in lower case.
    pub server_name: Option<String>,
}

/// Why no server name could be read.
#[derive(Debug, thiserror::Error)]
pub enum SniError {
    #[error("client closed the connection in the middle of its TLS ClientHello")]
    Closed,
    #[error("TLS ClientHello longer than {MAX_CLIENT_HELLO} bytes")]
    TooLong,
    #[error("not a TLS ClientHello: {0}")]
    Malformed(&'static str),
    #[error("cannot read the TLS ClientHello: {0}")]
    Io(#[from] io::Error),
}

/// Bytes asked of the client per read: a ClientHello of 1-byte records
/// costs a read per `READ_CHUNK` bytes, not two per record.
const READ_CHUNK: usize = 4096;

/// Reads the rest of the ClientHello whose first record is `first` (read
/// whole by `read_first`) and finds its server name. Each record is looked
/// at once: the work grows with the bytes, whatever their records' sizes.
pub async fn read_client_hello<R: AsyncRead + Unpin>(r: &mut R, first: Vec<u8>) -> Result<ClientHello, SniError> {
    let mut hello = Reassembly::default();
    let mut bytes = first;
    loop {
        if let Some(message) = hello.take_records(&bytes)? {
            let server_name = server_name(&message)?;
            let after = bytes.split_off(hello.records_end);
            return Ok(ClientHello { bytes, after, server_name });
        }
        let room = MAX_CLIENT_HELLO - bytes.len();
        if room == 0 {
            return Err(SniError::TooLong);
        }
        let start = bytes.len();
        bytes.resize(start + room.min(READ_CHUNK), 0);
        let n = r.read(&mut bytes[start..]).await?;
        bytes.truncate(start + n);
        if n == 0 {
            return Err(SniError::Closed);
        }
    }
}

/// The server name in `records` (one or more whole TLS handshake records
/// holding a whole ClientHello), as [`read_client_hello`] finds it.
pub fn server_name_of(records: &[u8]) -> Result<Option<String>, SniError> {
    if records.len() > MAX_CLIENT_HELLO {
        return Err(SniError::TooLong);
    }
    match Reassembly::default().take_records(records)? {
        Some(message) => server_name(&message),
        None => Err(SniError::Closed),
    }
}

/// The handshake payload of the records seen so far.
#[derive(Default)]
struct Reassembly {
    payload: Vec<u8>,
    /// Where in the bytes read the next record begins.
    records_end: usize,
}

impl Reassembly {
    /// Takes the whole records of `bytes` past those already taken; the
    /// ClientHello message (header included) once they hold all of it.
    fn take_records(&mut self, bytes: &[u8]) -> Result<Option<Vec<u8>>, SniError> {
        loop {
            let rest = &bytes[self.records_end..];
            if rest.len() >= 3 && (rest[0] != 0x16 || rest[1] != 3) {
                return Err(SniError::Malformed("not a sequence of TLS handshake records"));
            }
            if rest.len() < 5 {
                return Ok(None);
            }
            let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
            if len == 0 || len > MAX_TLS_RECORD - 5 {
                return Err(SniError::Malformed("a TLS record of a length no ClientHello is sent in"));
            }
            if self.records_end + 5 + len > MAX_CLIENT_HELLO {
                return Err(SniError::TooLong);
            }
            let Some(record) = rest.get(5..5 + len) else { return Ok(None) };
            self.payload.extend_from_slice(record);
            self.records_end += 5 + len;
            if let Some(message) = self.message()? {
                return Ok(Some(message));
            }
        }
    }

    /// The ClientHello message, once the payload holds all of it.
    fn message(&self) -> Result<Option<Vec<u8>>, SniError> {
        let payload = &self.payload;
        if payload.len() < 4 {
            return Ok(None);
        }
        if payload[0] != 1 {
            return Err(SniError::Malformed("the first handshake message is not a ClientHello"));
        }
        let len = (usize::from(payload[1]) << 16) | (usize::from(payload[2]) << 8) | usize::from(payload[3]);
        if 4 + len > MAX_CLIENT_HELLO {
            return Err(SniError::TooLong);
        }
        Ok(payload.get(..4 + len).map(<[u8]>::to_vec))
    }
}

/// The host name of the server_name extension of a ClientHello message.
fn server_name(message: &[u8]) -> Result<Option<String>, SniError> {
    let (_, hello) =
        parse_tls_handshake_client_hello(&message[4..]).map_err(|_| SniError::Malformed("unreadable ClientHello"))?;
    let Some(ext) = hello.ext else { return Ok(None) };
    let (_, extensions) =
        parse_tls_client_hello_extensions(ext).map_err(|_| SniError::Malformed("unreadable ClientHello extensions"))?;
    for extension in extensions {
        if let TlsExtension::SNI(names) = extension {
            let host = names.iter().find(|(kind, _)| *kind == SNIType::HostName);
            return Ok(host.map(|(_, name)| String::from_utf8_lossy(name).to_ascii_lowercase()));
        }
    }
    Ok(None)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ClientHello handshake message naming `name` (if any).
    pub fn client_hello_message(name: Option<&str>) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend([7u8; 32]); // random
        body.push(0); // no session id
        body.extend([0, 2, 0x13, 0x01]); // one cipher suite
        body.extend([1, 0]); // null compression
        let mut ext = Vec::new();
        if let Some(name) = name {
            let n = name.as_bytes();
            let list_len = n.len() + 3;
            ext.extend([0, 0]); // server_name
            ext.extend(((list_len + 2) as u16).to_be_bytes());
            ext.extend((list_len as u16).to_be_bytes());
            ext.push(0); // host_name
            ext.extend((n.len() as u16).to_be_bytes());
            ext.extend(n);
        }
        body.extend((ext.len() as u16).to_be_bytes());
        body.extend(ext);
        let mut message = vec![1];
        message.extend(&(body.len() as u32).to_be_bytes()[1..]);
        message.extend(body);
        message
    }

    /// `message` cut into TLS records of at most `chunk` bytes.
    pub fn records(message: &[u8], chunk: usize) -> Vec<u8> {
        message
            .chunks(chunk)
            .flat_map(|c| {
                let mut r = vec![0x16, 3, 1];
                r.extend((c.len() as u16).to_be_bytes());
                r.extend(c);
                r
            })
            .collect()
    }

    #[test]
    fn finds_the_name_in_one_record_or_many() {
        let message = client_hello_message(Some("RW.db.example.com"));
        for chunk in [message.len(), 10, 1] {
            assert_eq!(server_name_of(&records(&message, chunk)).expect("parsed"), Some("rw.db.example.com".into()));
        }
        assert_eq!(server_name_of(&records(&client_hello_message(None), 1000)).expect("parsed"), None);
    }

    #[tokio::test]
    async fn reads_the_records_that_follow_the_first() {
        let message = client_hello_message(Some("ro.db.example.com"));
        let all = records(&message, 16);
        let first = all[..5 + 16].to_vec();
        let mut rest = &all[5 + 16..];
        let hello = read_client_hello(&mut rest, first).await.expect("whole hello");
        assert_eq!(hello.bytes, all);
        assert_eq!(hello.server_name.as_deref(), Some("ro.db.example.com"));
        let mut truncated = &all[5 + 16..all.len() - 1];
        let first = all[..5 + 16].to_vec();
        assert!(matches!(read_client_hello(&mut truncated, first).await, Err(SniError::Closed)));
    }

    #[test]
    fn a_hello_past_the_cap_is_refused() {
        let mut message = vec![1, 0x01, 0x00, 0x00]; // claims 64 KiB
        message.extend([0u8; 100]);
        assert!(matches!(server_name_of(&records(&message, 200)), Err(SniError::TooLong)));
    }
}
