//! The kernel path on plain loopback sockets: a "client" and a "server"
//! with a linked pair of sockets between them, as pglb holds.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::time::Duration;

use pglb_sockmap::{Fins, Kernel};

fn kernel() -> Option<Kernel> {
    match Kernel::load() {
        Ok(k) => Some(k),
        Err(err) if std::env::var_os("CI").is_none() => {
            eprintln!("skipped: {err}");
            None
        }
        Err(err) => panic!("sockmap unavailable under CI: {err}"),
    }
}

/// client <-> (a | b) <-> server, `a` and `b` being pglb's sockets.
fn pair() -> (TcpStream, TcpStream, TcpStream, TcpStream) {
    let front = TcpListener::bind("127.0.0.1:0").expect("bind");
    let back = TcpListener::bind("127.0.0.1:0").expect("bind");
    let client = TcpStream::connect(front.local_addr().expect("addr")).expect("connect");
    let (a, _) = front.accept().expect("accept");
    let b = TcpStream::connect(back.local_addr().expect("addr")).expect("connect");
    let (server, _) = back.accept().expect("accept");
    for s in [&client, &server] {
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    }
    (client, a, b, server)
}

/// A pair with pglb's two sockets linked.
fn linked(kernel: &Kernel) -> (TcpStream, TcpStream, TcpStream, TcpStream, pglb_sockmap::Link) {
    let (client, a, b, server) = pair();
    a.set_nonblocking(true).expect("nonblocking");
    b.set_nonblocking(true).expect("nonblocking");
    let link = kernel.link(a.as_fd(), b.as_fd()).expect("link");
    (client, a, b, server, link)
}

#[tokio::test]
async fn bytes_cross_both_ways_and_queued_bytes_are_not_lost() {
    let Some(kernel) = kernel() else { return };
    let (mut client, mut a, mut b, mut server) = pair();
    // The client's first message and more in one segment: pglb reads only
    // the first message, as its startup code does.
    client.write_all(b"FIRST+pipelined").expect("write");
    let mut first = [0u8; 5];
    a.read_exact(&mut first).expect("read first");
    b.write_all(&first).expect("write first");
    // The server answers before the link.
    let mut got = [0u8; 5];
    server.read_exact(&mut got).expect("server reads first");
    server.write_all(b"answer").expect("answer");
    std::thread::sleep(Duration::from_millis(50));
    a.set_nonblocking(true).expect("nonblocking");
    b.set_nonblocking(true).expect("nonblocking");
    // The verdict reads whole segments: what pglb has read of a segment
    // would go out again. So pglb passes on the rest of a segment it read
    // from before linking (pglb's forwarder does the same).
    let mut rest = [0u8; 64];
    let n = a.read(&mut rest).expect("the rest of the segment");
    b.write_all(&rest[..n]).expect("write the rest");
    client.write_all(b"+after").expect("write");
    let link = kernel.link(a.as_fd(), b.as_fd()).expect("link");
    let mut rest = [0u8; 16];
    server.read_exact(&mut rest).expect("server reads the pipelined bytes");
    assert_eq!(&rest, b"+pipelined+after");
    let mut answer = [0u8; 6];
    client.read_exact(&mut answer).expect("client reads the answer");
    assert_eq!(&answer, b"answer");
    for i in 0..100u32 {
        let msg = format!("ping {i}");
        client.write_all(msg.as_bytes()).expect("write");
        let mut buf = vec![0u8; msg.len()];
        server.read_exact(&mut buf).expect("read");
        assert_eq!(buf, msg.as_bytes());
        server.write_all(&buf).expect("echo");
        client.read_exact(&mut buf).expect("read echo");
    }
    // Since the link: "+after" and the pings one way; the answer and the echoes back.
    let pings: u64 = (0..100).map(|i| format!("ping {i}").len() as u64).sum();
    let [up, down] = link.flows(a.as_fd(), b.as_fd(), Fins::default()).expect("flows");
    assert_eq!(up, pglb_sockmap::Flow { received: 6 + pings, delivered: 6 + pings });
    assert_eq!(down, pglb_sockmap::Flow { received: 6 + pings, delivered: 6 + pings });
    kernel.unlink(link);
    drop((a, b));
    let _ = (&mut client, &mut server);
}

#[tokio::test]
async fn a_fin_is_reported_and_a_gigabyte_arrives_whole() {
    let Some(kernel) = kernel() else { return };
    let (mut client, a, b, mut server, link) = linked(&kernel);
    let watch_a = kernel.watcher().watch(a.as_fd()).expect("watch");
    let writer = std::thread::spawn(move || {
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..1024 {
            client.write_all(&chunk).expect("write");
        }
        client.shutdown(Shutdown::Write).expect("shutdown");
        client
    });
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            // The FIN does not cross the link: stop at the byte count.
            let n = server.read(&mut buf).expect("read");
            total += n as u64;
            if total >= 1 << 30 || n == 0 {
                return (total, server);
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(60), async {
        while watch_a.hangup().events() & pglb_sockmap::watch::READ_CLOSED == 0 {
            watch_a.hangup().changed().await;
        }
    })
    .await
    .expect("the client's FIN was reported");
    let (total, _server) = reader.join().expect("reader");
    assert_eq!(total, 1 << 30);
    let _client = writer.join().expect("writer");
    let [up, _] = link.flows(a.as_fd(), b.as_fd(), Fins { received: [true, false], sent: [false; 2] }).expect("flows");
    assert_eq!(up, pglb_sockmap::Flow { received: 1 << 30, delivered: 1 << 30 });
    assert!(up.drained());
    drop(watch_a);
    kernel.unlink(link);
}

/// What the forwarder relies on at an EOF: the FIN is reported on the
/// socket that received it (and does not cross), the bytes before it do,
/// and the kernel flags `EPIPE` on the peer, which still works.
#[tokio::test]
async fn bytes_then_fin_arrive_and_the_fin_is_reported() {
    let Some(kernel) = kernel() else { return };
    let (mut client, a, b, mut server, link) = linked(&kernel);
    let watch_a = kernel.watcher().watch(a.as_fd()).expect("watch");
    client.write_all(b"query").expect("write");
    client.shutdown(Shutdown::Write).expect("shutdown");
    let mut got = [0u8; 5];
    server.read_exact(&mut got).expect("server reads");
    assert_eq!(&got, b"query");
    tokio::time::timeout(Duration::from_secs(10), async {
        while watch_a.hangup().events() & pglb_sockmap::watch::READ_CLOSED == 0 {
            watch_a.hangup().changed().await;
        }
    })
    .await
    .expect("the client's FIN was reported");
    let fins = Fins { received: [true, false], sent: [false; 2] };
    let [up, _] = link.flows(a.as_fd(), b.as_fd(), fins).expect("flows");
    assert_eq!(up, pglb_sockmap::Flow { received: 5, delivered: 5 });
    let epipe = wait_for_error(&b);
    assert_eq!(epipe.raw_os_error(), Some(libc::EPIPE), "{epipe}");
    server.write_all(b"result").expect("answer");
    let mut got = [0u8; 6];
    client.read_exact(&mut got).expect("the other direction still works");
    drop(watch_a);
    kernel.unlink(link);
}

fn wait_for_error(socket: &TcpStream) -> std::io::Error {
    for _ in 0..100 {
        if let Ok(Some(e)) = socket.take_error() {
            return e;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("no error reported on the peer socket");
}

/// Held: the bytes stay with the receiving socket, readable there, and TCP
/// pushes back on the sender once its receive memory is full.
#[tokio::test]
async fn a_held_link_keeps_bytes_readable_and_pushes_back() {
    let Some(kernel) = kernel() else { return };
    let (mut client, a, mut b, mut server, link) = linked(&kernel);
    server.write_all(b"redirected").expect("write");
    let mut got = [0u8; 10];
    client.read_exact(&mut got).expect("read");
    kernel.hold(&link).expect("hold");
    assert!(link.settled(a.as_fd(), b.as_fd(), Fins::default()).expect("settled"));
    server.write_all(b"held back").expect("write");
    std::thread::sleep(Duration::from_millis(50));
    assert!(link.settled(a.as_fd(), b.as_fd(), Fins::default()).expect("settled"));
    let mut buf = [0u8; 64];
    let n = b.read(&mut buf).expect("pglb reads what was held");
    assert_eq!(&buf[..n], b"held back");
    // A server writing 64 MB to a held socket nobody reads stalls.
    server.set_nonblocking(true).expect("nonblocking");
    let chunk = vec![1u8; 1 << 20];
    let mut sent = 0usize;
    for _ in 0..200 {
        match server.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("write: {e}"),
        }
    }
    assert!(sent < 32 << 20, "the server sent {sent} bytes to a held socket nobody read");
    kernel.unlink(link);
    let _ = &mut client;
}
