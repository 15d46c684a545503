//! What the kernel holds for TCP sockets, from `ss -tmnpi` and
//! `/proc/net/sockstat`: memory queued in socket buffers and byte counts.
//! A process's RSS does not show bytes held by the kernel; these do.

use std::io;
use std::process::Command;

/// One established TCP socket of a process, as `ss` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Socket {
    pub local_port: u16,
    pub peer_port: u16,
    /// Bytes waiting to be read (`Recv-Q`) and to be acknowledged (`Send-Q`).
    pub recv_q: u64,
    pub send_q: u64,
    /// `skmem` r (receive memory allocated) and t (send memory allocated), bytes.
    pub rmem: u64,
    pub wmem: u64,
    pub bytes_received: u64,
    pub bytes_acked: u64,
}

/// The established TCP sockets of process `pid`.
pub fn of_process(pid: u32) -> io::Result<Vec<Socket>> {
    let out = Command::new("ss").args(["-tmnpiH", "state", "established"]).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!("ss failed: {}", String::from_utf8_lossy(&out.stderr))));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let owner = format!("pid={pid},");
    let mut sockets = Vec::new();
    let mut current: Option<Socket> = None;
    for line in text.lines() {
        if !line.starts_with(char::is_whitespace) {
            sockets.extend(current.take());
            if line.contains(&owner) {
                current = parse_head(line);
            }
        } else if let Some(s) = current.as_mut() {
            parse_detail(line, s);
        }
    }
    sockets.extend(current);
    Ok(sockets)
}

fn parse_head(line: &str) -> Option<Socket> {
    // Recv-Q Send-Q Local:Port Peer:Port users:(...)
    let mut f = line.split_whitespace();
    let recv_q = f.next()?.parse().ok()?;
    let send_q = f.next()?.parse().ok()?;
    let port = |a: &str| a.rsplit(':').next().and_then(|p| p.parse().ok());
    let local_port = port(f.next()?)?;
    let peer_port = port(f.next()?)?;
    Some(Socket { local_port, peer_port, recv_q, send_q, ..Socket::default() })
}

fn parse_detail(line: &str, s: &mut Socket) {
    for item in line.split_whitespace() {
        if let Some(skmem) = item.strip_prefix("skmem:(").and_then(|r| r.strip_suffix(')')) {
            for part in skmem.split(',') {
                let (key, value) = part.split_at(part.find(|c: char| c.is_ascii_digit()).unwrap_or(part.len()));
                let value = value.parse().unwrap_or(0);
                match key {
                    "r" => s.rmem = value,
                    "t" => s.wmem = value,
                    _ => {}
                }
            }
        } else if let Some(v) = item.strip_prefix("bytes_received:") {
            s.bytes_received = v.parse().unwrap_or(0);
        } else if let Some(v) = item.strip_prefix("bytes_acked:") {
            s.bytes_acked = v.parse().unwrap_or(0);
        }
    }
}

/// The kernel's TCP memory in use, all sockets (`/proc/net/sockstat`
/// `TCP: ... mem N`, in pages), in bytes.
pub fn tcp_memory_bytes() -> io::Result<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat")?;
    let pages = text
        .lines()
        .find_map(|l| l.strip_prefix("TCP: "))
        .and_then(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.windows(2).find(|w| w[0] == "mem").and_then(|w| w[1].parse::<u64>().ok())
        })
        .ok_or_else(|| io::Error::other("no TCP mem in /proc/net/sockstat"))?;
    Ok(pages * 4096)
}

/// The maximum (third field) of `/proc/sys/net/ipv4/{name}` (`tcp_rmem` or
/// `tcp_wmem`): the most one socket's buffer autotunes to. 32 MiB if
/// unreadable.
pub fn tcp_buffer_max(name: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
        .ok()
        .and_then(|t| t.split_whitespace().nth(2).and_then(|v| v.parse().ok()))
        .unwrap_or(32 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_ss_prints() {
        let head = "0      0      127.0.0.1:43333 127.0.0.1:49128 users:((\"pglb\",pid=123,fd=12))";
        let mut s = parse_head(head).expect("head");
        parse_detail(
            "\t skmem:(r0,rb131072,t4352,tb2626560,f0,w0,o0,bl0,d0) ts sack cubic bytes_sent:410 bytes_acked:411 bytes_received:73 segs_out:3",
            &mut s,
        );
        assert_eq!(
            s,
            Socket {
                local_port: 43333,
                peer_port: 49128,
                recv_q: 0,
                send_q: 0,
                rmem: 0,
                wmem: 4352,
                bytes_received: 73,
                bytes_acked: 411
            }
        );
    }
}
