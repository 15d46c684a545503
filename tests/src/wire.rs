//! A raw PostgreSQL client over a plain TcpStream, for tests that need
//! control over the socket itself (half-close, slow reading).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

/// Connects to 127.0.0.1:`port` and sends a StartupMessage for `postgres`,
/// without waiting for the answer (a client that pglb holds or queues).
pub fn start_up(port: u16) -> io::Result<TcpStream> {
    start_up_with(port, 0, &[])
}

/// Like [`start_up`], for protocol 3.`minor` with more parameters (such as
/// `_pq_.` protocol options).
pub fn start_up_with(port: u16, minor: u16, extra: &[(&str, &str)]) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(&startup_message(minor, extra))?;
    Ok(s)
}

/// A StartupMessage of protocol 3.`minor` for user and database `postgres`.
pub fn startup_message(minor: u16, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut params = b"user\0postgres\0database\0postgres\0".to_vec();
    for (k, v) in extra {
        params.extend(k.as_bytes());
        params.push(0);
        params.extend(v.as_bytes());
        params.push(0);
    }
    params.push(0);
    let mut msg = ((8 + params.len()) as u32).to_be_bytes().to_vec();
    msg.extend(((3u32 << 16) | u32::from(minor)).to_be_bytes());
    msg.extend(params);
    msg
}

/// A CancelRequest for process `pid` with secret `key` (4 bytes in
/// protocol 3.0, up to 256 since 3.2).
pub fn cancel_request(pid: u32, key: &[u8]) -> Vec<u8> {
    let mut msg = ((12 + key.len()) as u32).to_be_bytes().to_vec();
    msg.extend(80_877_102u32.to_be_bytes());
    msg.extend(pid.to_be_bytes());
    msg.extend(key);
    msg
}

/// Connects to 127.0.0.1:`port` as `postgres` (trust) and waits for ReadyForQuery.
pub fn login(port: u16) -> io::Result<TcpStream> {
    login_on(start_up(port)?)
}

/// Logs in on `s`, a fresh connection: StartupMessage, then the answer up
/// to ReadyForQuery.
pub fn start_up_on(mut s: TcpStream) -> io::Result<TcpStream> {
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(&startup_message(0, &[]))?;
    login_on(s)
}

fn login_on(mut s: TcpStream) -> io::Result<TcpStream> {
    loop {
        let (tag, body) = read_message(&mut s)?;
        match tag {
            b'Z' => return Ok(s),
            b'E' => return Err(io::Error::other(String::from_utf8_lossy(&body).into_owned())),
            _ => {}
        }
    }
}

/// Sends a simple Query message.
pub fn query(s: &mut TcpStream, sql: &str) -> io::Result<()> {
    s.write_all(&query_message(sql))
}

/// A simple Query message.
pub fn query_message(sql: &str) -> Vec<u8> {
    let mut msg = vec![b'Q'];
    msg.extend(((sql.len() + 5) as u32).to_be_bytes());
    msg.extend(sql.as_bytes());
    msg.push(0);
    msg
}

/// Reads one backend message: its tag and body.
pub fn read_message(s: &mut impl Read) -> io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head)?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len.saturating_sub(4)];
    s.read_exact(&mut body)?;
    Ok((head[0], body))
}

/// Runs `sql` and returns the first column of its last row (or the error).
pub fn scalar(s: &mut TcpStream, sql: &str) -> Result<String, String> {
    query(s, sql).map_err(|e| format!("send query: {e}"))?;
    let mut value = None;
    loop {
        let (tag, body) = read_message(s).map_err(|e| format!("read reply: {e}"))?;
        match tag {
            b'D' if body.len() >= 6 => {
                let len = i32::from_be_bytes([body[2], body[3], body[4], body[5]]);
                let text = usize::try_from(len).ok().and_then(|n| body.get(6..6 + n)).unwrap_or_default();
                value = Some(String::from_utf8_lossy(text).into_owned());
            }
            b'E' => return Err(String::from_utf8_lossy(&body).into_owned()),
            b'Z' => return value.ok_or_else(|| "no row".to_owned()),
            _ => {}
        }
    }
}

/// Ends a session the way libpq does: Terminate, then close.
pub fn terminate(mut s: TcpStream) {
    let _ = s.write_all(b"X\0\0\0\x04");
}

/// Waits until pglb closes the session: EOF or a reset (any message before
/// it, such as a FATAL, is skipped).
pub fn wait_closed(s: &mut TcpStream, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    s.set_read_timeout(Some(within)).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) if Instant::now() < deadline => {}
            Ok(_) => return Err("still sending data".into()),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err(format!("session still open after {within:?}"))
            }
            Err(_) => return Ok(()),
        }
    }
}

/// Half-closes the client's sending side.
pub fn shutdown_write(s: &TcpStream) -> io::Result<()> {
    s.shutdown(Shutdown::Write)
}

/// Reads everything until EOF; returns the tags of the messages seen.
pub fn read_to_eof(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut tags = Vec::new();
    loop {
        match read_message(s) {
            Ok((tag, _)) => tags.push(tag),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(tags),
            Err(e) => return Err(e),
        }
    }
}
