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
    PglbSockmap,
    Haproxy,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Direct, Kind::PglbSplice, Kind::PglbSockmap, Kind::Haproxy];
    pub const BALANCERS: [Kind; 3] = [Kind::PglbSplice, Kind::PglbSockmap, Kind::Haproxy];

    pub fn label(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::PglbSplice => "pglb (splice)",
            Kind::PglbSockmap => "pglb (sockmap)",
            Kind::Haproxy => "haproxy",
        }
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
        Kind::PglbSplice => start_pglb(bins, "splice", route, nodes)?,
        Kind::PglbSockmap => start_pglb(bins, "sockmap", route, nodes)?,
        Kind::Haproxy => start_haproxy(bins, route, nodes, maxconn)?,
    };
    Ok(Target { kind, port, pid, process })
}

fn start_pglb(
    bins: &Bins,
    forwarder: &'static str,
    route: Route,
    nodes: &[Node],
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
    let mut pglb = Pglb::start(&bins.pglb, &config).with_context(|| format!("cannot start pglb ({forwarder})"))?;
    pglb.wait_ready(name, need, Duration::from_secs(30))?;
    Ok((port, Some(pglb.pid()), Process::Pglb(Box::new(pglb))))
}

fn start_haproxy(bins: &Bins, route: Route, nodes: &[Node], maxconn: usize) -> Result<(u16, Option<u32>, Process)> {
    let port = free_port().context("cannot find a free port for haproxy")?;
    let (name, servers) = match route {
        Route::Primary => ("rw", &nodes[..1]),
        Route::Replicas => ("ro", &nodes[1..]),
    };
    let mut lines = vec!["balance roundrobin".to_owned()];
    lines.extend(servers.iter().map(|n| format!("server {} {}", n.name, n.address())));
    let config = haproxy::Config {
        maxconn,
        global: Vec::new(),
        defaults: vec!["option splice-auto".into()],
        listens: vec![haproxy::Listen { name, port, lines }],
        scripts: Vec::new(),
    };
    let haproxy = Haproxy::start(&bins.haproxy, &config).context("cannot start haproxy")?;
    Ok((port, Some(haproxy.pid()), Process::Haproxy(Box::new(haproxy))))
}
