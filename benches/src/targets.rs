//! The ways of reaching PostgreSQL that the throughput suite compares:
//! directly, through pglb with the splice and the kernel (sockmap) data
//! paths, and through HAProxy.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use pglb_cluster::{free_port, Node};

use crate::haproxy::{self, Haproxy};
use crate::pglb::{self, Pglb};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Direct,
    PglbSplice,
    /// pglb (splice) with its connection log off (`pglb::connection=off`).
    PglbNoLog,
    PglbSockmap,
    Haproxy,
    /// HAProxy with `option tcplog`: one line per connection to its stdout,
    /// like pglb's connection log to its stderr (both a file here).
    HaproxyLog,
}

impl Kind {
    pub const ALL: [Kind; 6] =
        [Kind::Direct, Kind::PglbSplice, Kind::PglbNoLog, Kind::PglbSockmap, Kind::Haproxy, Kind::HaproxyLog];
    pub const BALANCERS: [Kind; 3] = [Kind::PglbSplice, Kind::PglbSockmap, Kind::Haproxy];
    /// The throughput suite's targets unless `--targets` says otherwise.
    pub const DEFAULT: [Kind; 4] = [Kind::Direct, Kind::PglbSplice, Kind::PglbSockmap, Kind::Haproxy];

    pub fn label(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::PglbSplice => "pglb (splice)",
            Kind::PglbNoLog => "pglb (splice, no log)",
            Kind::PglbSockmap => "pglb (sockmap)",
            Kind::Haproxy => "haproxy",
            Kind::HaproxyLog => "haproxy (tcplog)",
        }
    }

    /// The name `--targets` takes.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::PglbSplice => "pglb",
            Kind::PglbNoLog => "pglb-nolog",
            Kind::PglbSockmap => "pglb-sockmap",
            Kind::Haproxy => "haproxy",
            Kind::HaproxyLog => "haproxy-log",
        }
    }

    pub fn parse(name: &str) -> Option<Kind> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// Where a target sends clients.
#[derive(Debug, Clone, Copy)]
pub enum Route {
    /// A read-write port: the primary only.
    Primary,
    /// A read-only port balanced round-robin over every replica.
    Replicas,
}

/// The binaries under test.
pub struct Bins {
    pub pglb: PathBuf,
    pub haproxy: PathBuf,
}

/// A target clients connect to on `port`; its balancer process, if any,
/// runs until the target drops.
pub struct Target {
    pub kind: Kind,
    pub port: u16,
    /// The balancer's pid (`None` for direct).
    pub pid: Option<u32>,
    process: Process,
}

enum Process {
    None,
    Pglb(Box<Pglb>),
    Haproxy(Box<Haproxy>),
}

impl Target {
    /// The end of the balancer's log (empty for direct).
    pub fn log_tail(&self) -> String {
        match &self.process {
            Process::None => String::new(),
            Process::Pglb(p) => p.log_tail(),
            Process::Haproxy(h) => h.log_tail(),
        }
    }
}

/// Starts target `kind` in front of `nodes` (the primary first), ready to
/// serve: for pglb, once `/status` lists the backends the route needs.
/// `maxconn` sizes HAProxy's connection limits.
pub fn start(kind: Kind, bins: &Bins, route: Route, nodes: &[Node], maxconn: usize) -> Result<Target> {
    let primary = nodes.first().context("a cluster without nodes")?;
    let (port, pid, process) = match kind {
        Kind::Direct => (primary.port, None, Process::None),
        Kind::PglbSplice => start_pglb(bins, "splice", route, nodes, true)?,
        Kind::PglbNoLog => start_pglb(bins, "splice", route, nodes, false)?,
        Kind::PglbSockmap => start_pglb(bins, "sockmap", route, nodes, true)?,
        Kind::Haproxy => start_haproxy(bins, route, nodes, maxconn, false)?,
        Kind::HaproxyLog => start_haproxy(bins, route, nodes, maxconn, true)?,
    };
    Ok(Target { kind, port, pid, process })
}

fn start_pglb(
    bins: &Bins,
    forwarder: &'static str,
    route: Route,
    nodes: &[Node],
    connection_log: bool,
) -> Result<(u16, Option<u32>, Process)> {
    let port = free_port().context("cannot find a free port for pglb")?;
    let (name, role, need) = match route {
        Route::Primary => ("rw", "primary", 1),
        Route::Replicas => ("ro", "replica", nodes.len() - 1),
    };
    let config = pglb::Config {
        forwarder: Some(forwarder),
        listeners: vec![pglb::Listener { name, port, role, balance: "round_robin" }],
        backends: nodes.iter().enumerate().map(|(i, n)| (format!("pg{i}"), n.address())).collect(),
    };
    let rust_log = if connection_log { "info" } else { "info,pglb::connection=off" };
    let mut pglb = Pglb::start_logging(&bins.pglb, &config, rust_log)
        .with_context(|| format!("cannot start pglb ({forwarder})"))?;
    pglb.wait_ready(name, need, Duration::from_secs(30))?;
    Ok((port, Some(pglb.pid()), Process::Pglb(Box::new(pglb))))
}

fn start_haproxy(
    bins: &Bins,
    route: Route,
    nodes: &[Node],
    maxconn: usize,
    tcplog: bool,
) -> Result<(u16, Option<u32>, Process)> {
    let port = free_port().context("cannot find a free port for haproxy")?;
    let (name, servers) = match route {
        Route::Primary => ("rw", &nodes[..1]),
        Route::Replicas => ("ro", &nodes[1..]),
    };
    let mut lines = vec!["balance roundrobin".to_owned()];
    lines.extend(servers.iter().map(|n| format!("server {} {}", n.name, n.address())));
    let (global, mut defaults) = match tcplog {
        // One line per connection, written by HAProxy itself (no syslog
        // daemon in between), as pglb writes its connection log.
        true => (
            vec!["log stdout format raw local0 info".to_owned()],
            vec!["log global".to_owned(), "option tcplog".into()],
        ),
        false => (Vec::new(), Vec::new()),
    };
    defaults.push("option splice-auto".into());
    let config = haproxy::Config {
        maxconn,
        global,
        defaults,
        listens: vec![haproxy::Listen { name, port, lines }],
        scripts: Vec::new(),
    };
    let haproxy = Haproxy::start(&bins.haproxy, &config).context("cannot start haproxy")?;
    Ok((port, Some(haproxy.pid()), Process::Haproxy(Box::new(haproxy))))
}
