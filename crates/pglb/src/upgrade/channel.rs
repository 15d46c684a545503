//! The hand-over channel: a unix stream socket between the running pglb and
//! the new one, carrying one JSON object per line; the first message also
//! carries the listening sockets (`SCM_RIGHTS`, through rustix's safe
//! wrappers: received descriptors arrive as `OwnedFd`, close-on-exec).

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde_json::Value;
use tokio::io::Interest;
use tokio::net::UnixStream;

/// The hand-over's version, in each side's first message (`hello`,
/// `ready`). 0 is a pglb from before versions, whose messages carry none:
/// the same messages, so it is accepted (the first package upgrade comes
/// from such a binary). 2: after `main`, the channel stays open for the
/// overlap and carries admin states (`overlap`). 3: many clusters — the
/// state may be the state file's version 2 (a state per cluster), and
/// admin states name their cluster (a single-cluster state is still
/// version 1, so an older binary can take over from this one).
pub const VERSION: u64 = 3;
/// The versions this binary hands over to and takes over from.
const COMPATIBLE: std::ops::RangeInclusive<u64> = 0..=VERSION;

/// The version `peer` speaks, from its first message (none: 0), or why this
/// binary cannot hand over with it.
pub fn peer_version(message: &Value, peer: &str) -> Result<u64, String> {
    let version = match message.get("version") {
        None => 0,
        Some(v) => {
            v.as_u64().ok_or_else(|| format!("the {peer} sent a hand-over version that is not a number: {v}"))?
        }
    };
    if COMPATIBLE.contains(&version) {
        Ok(version)
    } else {
        Err(format!(
            "the {peer} speaks hand-over version {version}; this pglb speaks {} to {}: upgrade through a release that speaks both, or restart pglb instead",
            COMPATIBLE.start(),
            COMPATIBLE.end()
        ))
    }
}

/// The most sockets one message can carry (the kernel's SCM_MAX_FD is 253).
pub const MAX_FDS: usize = 250;

/// One end of the channel.
pub struct Channel {
    stream: UnixStream,
    /// Bytes received past the last whole line.
    pending: Vec<u8>,
}

impl Channel {
    pub fn new(stream: UnixStream) -> Self {
        Self { stream, pending: Vec::new() }
    }

    /// Sends `message` as one line, with `fds` attached to its first byte.
    pub async fn send(&self, message: &Value, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        if fds.len() > MAX_FDS {
            return Err(io::Error::other(format!("{} sockets to hand over; at most {MAX_FDS} fit", fds.len())));
        }
        let mut line = message.to_string().into_bytes();
        line.push(b'\n');
        let mut sent = 0;
        while sent < line.len() {
            let attach = if sent == 0 { fds } else { &[] };
            sent += self
                .stream
                .async_io(Interest::WRITABLE, || {
                    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(attach.len()))];
                    let mut control = SendAncillaryBuffer::new(&mut space);
                    if !attach.is_empty() && !control.push(SendAncillaryMessage::ScmRights(attach)) {
                        return Err(io::Error::other("no room for the sockets in the message"));
                    }
                    let iov = [IoSlice::new(&line[sent..])];
                    Ok(sendmsg(&self.stream, &iov, &mut control, SendFlags::NOSIGNAL)?)
                })
                .await?;
        }
        Ok(())
    }

    /// Receives the next line and the sockets that came with it.
    pub async fn recv(&mut self) -> io::Result<(Value, Vec<OwnedFd>)> {
        let mut fds = Vec::new();
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                let value = serde_json::from_slice(&line)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("not a hand-over message: {e}")))?;
                return Ok((value, fds));
            }
            let mut chunk = [0u8; 16 * 1024];
            let (n, got) = self
                .stream
                .async_io(Interest::READABLE, || {
                    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
                    let mut control = RecvAncillaryBuffer::new(&mut space);
                    let mut iov = [IoSliceMut::new(&mut chunk)];
                    let got = recvmsg(&self.stream, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)?;
                    if got.flags.contains(ReturnFlags::CTRUNC) {
                        return Err(io::Error::other("more sockets than expected: the message was cut"));
                    }
                    let mut fds = Vec::new();
                    for message in control.drain() {
                        if let RecvAncillaryMessage::ScmRights(rights) = message {
                            fds.extend(rights);
                        }
                    }
                    Ok((got.bytes, fds))
                })
                .await?;
            fds.extend(got);
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the other pglb closed the hand-over channel",
                ));
            }
            self.pending.extend_from_slice(&chunk[..n]);
        }
    }

    /// Receives the next message, which must be of `kind`.
    pub async fn expect(&mut self, kind: &str) -> io::Result<(Value, Vec<OwnedFd>)> {
        let (message, fds) = self.recv().await?;
        if message["type"] == kind {
            Ok((message, fds))
        } else if message["type"] == "failed" {
            Err(io::Error::other(message["why"].as_str().unwrap_or("no reason given").to_owned()))
        } else {
            let got = message["type"].as_str().unwrap_or("(none)").to_owned();
            Err(io::Error::new(io::ErrorKind::InvalidData, format!("expected a `{kind}` message, got `{got}`")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_peer_without_a_version_is_version_0_and_accepted_a_newer_one_is_refused() {
        assert_eq!(peer_version(&json!({ "type": "hello" }), "running pglb"), Ok(0));
        assert_eq!(peer_version(&json!({ "type": "hello", "version": VERSION }), "running pglb"), Ok(VERSION));
        let newer = peer_version(&json!({ "type": "ready", "version": VERSION + 1 }), "new pglb");
        let why = newer.expect_err("a newer, incompatible version");
        let said = format!("new pglb speaks hand-over version {}", VERSION + 1);
        assert!(why.contains(&said) && why.contains("restart pglb instead"), "{why}");
        assert!(peer_version(&json!({ "type": "ready", "version": "1" }), "new pglb").is_err());
    }
}
