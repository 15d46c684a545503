//! A reproduction of issue 21, not a benchmark: sessions through pglb with
//! `forwarder: sockmap` whose readers pause (a small receive buffer, no
//! reading for a while) while a 5-7 MB row is on its way — the slow reader
//! that makes pglb's backend socket drop segments and PostgreSQL retransmit
//! them, overlapping. Optionally with memory held and churned and CPU
//! burners. Each session ends exact, wrong (bytes differ, the session went
//! on), reset (pglb or the kernel ended it) or hung (no answer within the
//! deadline). Its counts are the point, for the binary under test
//! (`PGLB_BIN` runs another one, such as a previous release).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use pglb_cluster::{Cluster, Spec};

use crate::cli::Pressure;
use crate::pglb::{Config, Listener, Pglb};

/// How long a session may take before it counts as hung.
const DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Exact,
    /// Wrong bytes reached the client, and then the connection ended
    /// (reset or closed) within the deadline.
    CorruptEnded,
    /// Wrong bytes reached the client, and the connection was still open
    /// at the deadline: a real client would wait on.
    CorruptOpen,
    /// The connection ended before the answer, with nothing wrong read.
    Reset,
    /// No answer within the deadline, nothing wrong read.
    Hung,
}

pub fn run(opts: &Pressure, bin: &std::path::Path) -> Result<()> {
    let started = Instant::now();
    let spec = Spec { tag: "bench-pressure".into(), replicas: 0, ..Spec::default() };
    let cluster = Cluster::start(&spec).context("cannot start the cluster")?;
    super::create_check_user(&cluster)?;
    let primary = &cluster.nodes[0];
    let port = pglb_cluster::free_port()?;
    let config = Config {
        forwarder: Some("sockmap"),
        listeners: vec![Listener { name: "rw", port, role: "primary", balance: "round_robin" }],
        backends: vec![(primary.name.clone(), primary.address())],
    };
    let mut pglb = Pglb::start(bin, &config)?;
    pglb.wait_ready("rw", 1, Duration::from_secs(30))?;
    let hog_bytes = opts.hog_gib.map_or(0, |g| (g * f64::from(1u32 << 30)) as usize);
    eprintln!("holding {:.1} GiB, churning {:.1} GiB, {} CPU burners", gib(hog_bytes), opts.churn_gib, opts.burners);
    let hog = hog(hog_bytes);
    let stop = Arc::new(AtomicBool::new(false));
    let mut burners: Vec<_> = (0..opts.burners).map(|_| burner(stop.clone())).collect();
    if opts.churn_gib > 0.0 {
        burners.push(churn((opts.churn_gib * f64::from(1u32 << 30)) as usize, stop.clone()));
    }
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    let outcomes = std::thread::scope(|s| {
        let workers: Vec<_> = (0..opts.parallel)
            .map(|w| {
                s.spawn(move || {
                    (w..opts.sessions)
                        .step_by(opts.parallel)
                        .map(|i| {
                            let outcome = session(to, i, opts.row_mb, opts.pause);
                            if outcome != Outcome::Exact {
                                eprintln!("session {i}: {outcome:?}");
                            }
                            outcome
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap_or_default()).collect::<Vec<_>>()
    });
    stop.store(true, Ordering::Relaxed);
    for b in burners {
        let _ = b.join();
    }
    drop(hog);
    let metrics = pglb.metrics().unwrap_or_default();
    let count = |o| outcomes.iter().filter(|x| **x == o).count();
    println!(
        "\n== pglb-bench sockmap-pressure: {} sessions of a {}-{} MB row, {} at a time, readers paused {} ms; {:.1} GiB held, {:.1} GiB churned, {} burners; {}; took {:.0}s ==",
        opts.sessions,
        opts.row_mb,
        opts.row_mb + 2,
        opts.parallel,
        opts.pause.as_millis(),
        gib(hog_bytes),
        opts.churn_gib,
        opts.burners,
        bin.display(),
        started.elapsed().as_secs_f64()
    );
    println!("| outcome | sessions |\n| --- | --- |");
    println!("| exact | {} |", count(Outcome::Exact));
    println!("| wrong bytes, then the connection ended | {} |", count(Outcome::CorruptEnded));
    println!("| wrong bytes, connection still open after {}s | {} |", DEADLINE.as_secs(), count(Outcome::CorruptOpen));
    println!("| ended before the answer | {} |", count(Outcome::Reset));
    println!("| no answer in {}s | {} |", DEADLINE.as_secs(), count(Outcome::Hung));
    let shown =
        ["pglb_sockmap_demotions_total", "pglb_forward_integrity_errors_total", "pglb_forwarded_sessions_total"];
    for line in metrics.lines().filter(|l| shown.iter().any(|m| l.starts_with(m))) {
        println!("{line}");
    }
    Ok(())
}

/// 251 bytes (a prime period), repeated: a piece of the stream duplicated
/// or lost shifts what follows, which then shows as a wrong byte.
fn pattern() -> Vec<u8> {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    (0..251).map(|i| ALPHABET[i % ALPHABET.len()]).collect()
}

/// One session: log in, ask for a row of `mb` to `mb + 2` MB, read nothing
/// for `pause`, then read and check it; after wrong bytes, read on until
/// the connection ends or the deadline passes.
fn session(to: SocketAddr, i: usize, mb: usize, pause: Duration) -> Outcome {
    let pattern = pattern();
    let repeats = (mb * 1_000_000 + (i * 7919) % 2_000_000) / pattern.len();
    let sql = format!("SELECT repeat('{}', {repeats})", String::from_utf8_lossy(&pattern));
    let mut stream = None;
    let mut run = || -> std::io::Result<bool> {
        let socket = std::net::TcpStream::connect(to)?;
        socket2::SockRef::from(&socket).set_recv_buffer_size(32 * 1024)?;
        let s = stream.insert(socket);
        s.set_read_timeout(Some(DEADLINE))?;
        s.write_all(&startup())?;
        while message(s)?.0 != b'Z' {}
        s.write_all(&query(&sql))?;
        std::thread::sleep(pause);
        if message(s)?.0 != b'T' {
            return Ok(false);
        }
        let (tag, row) = message(s)?;
        let value = row.get(6..).unwrap_or_default();
        let exact = tag == b'D'
            && value.len() == repeats * pattern.len()
            && value.iter().enumerate().all(|(k, b)| *b == pattern[k % pattern.len()]);
        let tags = [message(s)?.0, message(s)?.0];
        // Terminate only after a good answer: after a wrong one, the
        // server must not be the one that ends the connection.
        let good = exact && tags == [b'C', b'Z'];
        if good {
            let _ = s.write_all(b"X\0\0\0\x04");
        }
        Ok(good)
    };
    match run() {
        Ok(true) => return Outcome::Exact,
        Ok(false) => {}
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {}
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            return Outcome::Hung
        }
        Err(_) => return Outcome::Reset,
    }
    // Wrong bytes were read: does the connection end, or stay open?
    let Some(mut s) = stream else { return Outcome::CorruptEnded };
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Outcome::CorruptEnded,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Outcome::CorruptOpen
            }
            Err(_) => return Outcome::CorruptEnded,
        }
    }
}

fn startup() -> Vec<u8> {
    let params = b"user\0postgres\0database\0postgres\0\0";
    let mut m = ((8 + params.len()) as u32).to_be_bytes().to_vec();
    m.extend(196_608u32.to_be_bytes());
    m.extend(params);
    m
}

fn query(sql: &str) -> Vec<u8> {
    let mut m = vec![b'Q'];
    m.extend(((sql.len() + 5) as u32).to_be_bytes());
    m.extend(sql.as_bytes());
    m.push(0);
    m
}

/// One backend message; a length no message of this session has (bytes
/// duplicated or lost before it) is `InvalidData`.
fn message(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head)?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if !(4..=64 << 20).contains(&len) || !b"RSKZTDCEN".contains(&head[0]) {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("message {head:?}")));
    }
    let mut body = vec![0u8; len - 4];
    s.read_exact(&mut body)?;
    Ok((head[0], body))
}

/// `bytes` of memory, every page touched so that it is really held.
fn hog(bytes: usize) -> Vec<u8> {
    let mut v = vec![0u8; bytes];
    for page in v.iter_mut().step_by(4096) {
        *page = 1;
    }
    v
}

/// Allocates `bytes`, touches every page, frees them; again until `stop`.
fn churn(bytes: usize, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            drop(std::hint::black_box(hog(bytes)));
        }
    })
}

fn burner(stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut x = 0u64;
        while !stop.load(Ordering::Relaxed) {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
    })
}

fn gib(bytes: usize) -> f64 {
    bytes as f64 / f64::from(1u32 << 30)
}
