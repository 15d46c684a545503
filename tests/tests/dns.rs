//! A backend named by a host name: sessions go to the address the checks
//! verified, never to one nobody checked; a re-pointed name is a new node
//! until its first check; a resolver outage stalls no client connect.
//!
//! pglb runs in a mount namespace of its own whose `/etc/hosts` and
//! `/etc/resolv.conf` are files of the test, edited in place while it runs.
//! The name's two addresses (127.0.0.2 and .3, one port) are relays to the
//! shared cluster's primary and to a replica; the relay of each records the
//! `application_name` of every connection's startup message.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pglb_tests::cluster::shared_cluster;
use pglb_tests::psql::where_am_i;
use pglb_tests::{wait_until, Pglb, Yaml};

const SETTLE: Duration = Duration::from_secs(15);
const NAME: &str = "pgdb.pglb.test";

/// Who connected through one relay: each connection's `application_name`.
type Seen = Arc<Mutex<Vec<String>>>;

/// Relays connections to `listener` on to 127.0.0.1:`to`.
fn relay(listener: TcpListener, to: u16) -> Seen {
    let seen: Seen = Arc::default();
    let record = seen.clone();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let record = record.clone();
            std::thread::spawn(move || {
                let _ = carry(client, to, &record);
            });
        }
    });
    seen
}

fn carry(mut client: TcpStream, to: u16, seen: &Mutex<Vec<String>>) -> std::io::Result<()> {
    let mut len = [0u8; 4];
    client.read_exact(&mut len)?;
    let mut body = vec![0u8; (u32::from_be_bytes(len) as usize).saturating_sub(4)];
    client.read_exact(&mut body)?;
    seen.lock().unwrap_or_else(|e| e.into_inner()).push(application_name(&body));
    let mut server = TcpStream::connect(("127.0.0.1", to))?;
    server.write_all(&len)?;
    server.write_all(&body)?;
    let (mut c2, mut s2) = (client.try_clone()?, server.try_clone()?);
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c2, &mut s2);
        let _ = s2.shutdown(Shutdown::Write);
    });
    let _ = std::io::copy(&mut server, &mut client);
    let _ = client.shutdown(Shutdown::Write);
    let _ = up.join();
    Ok(())
}

/// The `application_name` of a startup message's body (after the length).
fn application_name(body: &[u8]) -> String {
    let fields: Vec<&[u8]> = body.get(4..).unwrap_or_default().split(|b| *b == 0).collect();
    fields
        .chunks(2)
        .find(|kv| kv[0] == b"application_name")
        .and_then(|kv| kv.get(1))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

/// Two listeners on one port, at 127.0.0.2 and 127.0.0.3.
fn two_addresses() -> (TcpListener, TcpListener, u16) {
    for _ in 0..50 {
        let Ok(a) = TcpListener::bind("127.0.0.2:0") else { continue };
        let port = a.local_addr().expect("addr").port();
        if let Ok(b) = TcpListener::bind(("127.0.0.3", port)) {
            return (a, b, port);
        }
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.3");
}

/// Rewrites `path` in place (same inode: the bind mount follows it).
fn rewrite(path: &Path, text: &str) {
    std::fs::write(path, text).expect("rewrite a file pglb's namespace sees");
}

#[test]
fn a_re_pointed_host_name_sends_no_session_to_an_unchecked_address_and_a_resolver_outage_stalls_no_connect() {
    if pglb_tests::which("unshare").is_none() {
        pglb_tests::skip("unshare(1) is missing (util-linux)");
        return;
    }
    let cluster = shared_cluster();
    let (primary, replica) = (&cluster.nodes[0], &cluster.nodes[1]);
    let (a, b, port) = two_addresses();
    let (_to_primary, to_replica) = (relay(a, primary.port), relay(b, replica.port));

    let dir = std::env::temp_dir().join(format!("pglb-dns-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (hosts, resolv) = (dir.join("hosts"), dir.join("resolv.conf"));
    let named = |addr: &str| format!("127.0.0.1 localhost\n{addr} {NAME}\n");
    rewrite(&hosts, &named("127.0.0.2"));
    rewrite(&resolv, "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n");
    let script = format!(
        "mount --bind {} /etc/hosts && mount --bind {} /etc/resolv.conf && exec \"$0\" \"$@\"",
        hosts.display(),
        resolv.display()
    );
    let wrapper = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", &script];
    let mut yaml = Yaml::for_cluster(&cluster).listener("rw", "role: primary\n    hold_timeout: 0s");
    yaml.backends = vec![("db".into(), format!("address: {NAME}:{port}"))];
    let pglb = Pglb::start_wrapped(&yaml, &[], &wrapper);
    pglb.wait_eligible("rw", &["db"], SETTLE);
    assert_eq!(where_am_i(pglb.port("rw")), Ok((primary.port, false)));

    // A resolver outage: the name leaves /etc/hosts and DNS goes to a
    // server that never answers. Longer than the checker's lookup period:
    // its lookups hang; no client waits for them.
    let blackhole = UdpSocket::bind("127.0.0.9:53").expect("a DNS server that never answers");
    rewrite(&hosts, "127.0.0.1 localhost\n");
    rewrite(&resolv, "nameserver 127.0.0.9\noptions timeout:3 attempts:2\n");
    let outage = Instant::now();
    let mut slowest = Duration::ZERO;
    while outage.elapsed() < Duration::from_secs(8) {
        let t = Instant::now();
        assert_eq!(where_am_i(pglb.port("rw")), Ok((primary.port, false)), "during the outage");
        slowest = slowest.max(t.elapsed());
    }
    eprintln!("resolver outage: slowest connect and query through rw {slowest:?}");
    assert!(slowest < Duration::from_secs(3), "a client waited {slowest:?} during a resolver outage");
    assert_eq!(pglb.backend("db")["state"], "healthy", "{}", pglb.status());
    drop(blackhole);

    // The name is re-pointed at the replica's address. No rw session may
    // reach it: sessions go where the checks looked, and the new address
    // is a new node until checked (then it is a replica: rw has none).
    rewrite(&resolv, "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n");
    rewrite(&hosts, &named("127.0.0.3"));
    let moved = Instant::now();
    let mut served = 0;
    loop {
        match where_am_i(pglb.port("rw")) {
            Ok(at) => {
                assert_eq!(at, (primary.port, false), "an rw session reached {at:?}: not the checked address");
                served += 1;
            }
            // Refused while the new address is unchecked, or cut: a session
            // that began on the old address ends when its backend moves.
            Err(err) => assert!(
                ["no healthy primary", "EOF detected", "closed the connection", "terminating connection"]
                    .iter()
                    .any(|e| err.contains(e)),
                "{err}"
            ),
        }
        if pglb.backend("db")["role"] == "replica" {
            break;
        }
        assert!(moved.elapsed() < SETTLE * 2, "the new address was never checked: {}", pglb.status());
    }
    eprintln!("re-pointed: {served} rw sessions on the checked address, replica seen after {:?}", moved.elapsed());
    let seen = to_replica.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert_eq!(seen.first().map(String::as_str), Some("pglb-health"), "first at the new address: {seen:?}");
    wait_until("rw to route nowhere", SETTLE, || match where_am_i(pglb.port("rw")) {
        Err(err) if err.contains("no healthy primary") => Ok(()),
        other => Err(format!("{other:?}")),
    });
    assert!(pglb.log().contains("resolves elsewhere"), "{}", pglb.log());
    let _ = std::fs::remove_dir_all(&dir);
}
