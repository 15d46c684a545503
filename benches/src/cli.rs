//! Command-line parsing: the suites and a few numeric options.

pub const USAGE: &str = "\
usage:
  pglb-bench throughput [--quick] [--duration SECS] [--rounds N] [--scale N] [--rate TPS]
                        [--copy-rows N] [--memory LOW,HIGH | --no-memory] [--targets LIST] [--no-build]
  pglb-bench failover   [--quick] [--promotions N] [--stalls N] [--stall-secs S] [--no-build]
  pglb-bench failover --patroni [--quick] [--promotions N] [--no-build]
  pglb-bench sockmap-pressure [--sessions N] [--parallel N] [--row-mb N] [--pause-ms N] [--hog-gib G]
                        [--churn-gib G] [--burners N] [--no-build]
  pglb-bench checks     [--backends N,N,...] [--window SECS] [--no-build]
  pglb-bench --help

throughput  direct vs pglb (splice) vs pglb (sockmap) vs HAProxy on one primary:
            pgbench select-only (saturated, and at a fixed --rate for whole-host CPU),
            connect rate, 1 GB COPY, TPC-B, idle-connection memory.
            defaults: --duration 10 --rounds 3 --scale 64 --copy-rows 1000000 --memory 2000,6000
            --quick:  --duration 5 --rounds 1 --scale 4 --copy-rows 100000 --memory 200,600
            --rate:   default half of HAProxy's select-only TPS in round 1 (below saturation)
            --targets: which of direct, pglb, pglb-nolog (connection log off), pglb-sockmap,
                      haproxy, haproxy-log (option tcplog) to run, comma-separated
                      (default direct,pglb,pglb-sockmap,haproxy); the memory test is not affected
failover    pglb vs HAProxy (external-check) through promotions of a replica:
            write-unavailability window and detection time; then stalls
            (SIGSTOP) of the primary: errors clients saw.
            default: --promotions 10 --stalls 5 --stall-secs 3; --quick: --promotions 2 --stalls 1
            --patroni: pglb vs HAProxy with Patroni's template (inter 3s fall 3, and inter 1s
            fall 2) on a real Patroni cluster: switchover, leader crash, Patroni stopped, REST
            APIs silent, etcd down; --promotions N rounds of each (default 2, --quick 1)
sockmap-pressure
            a reproduction, not a benchmark (issue 21): --sessions sessions through pglb with
            forwarder: sockmap, --parallel at a time, each asking for a row of --row-mb MB
            (up to 2 MB more) and then reading nothing for --pause-ms (a slow reader: a row
            past 4 MiB plus the socket buffers takes the session off the kernel path), with
            --hog-gib of memory held,
            --churn-gib allocated and freed in a loop and --burners threads spinning; counts
            sessions that were exact, wrong, reset or hung.
            default: --sessions 1000 --parallel 8 --row-mb 20 --pause-ms 150, no hog, churn or burners
checks      what health checks cost, pglb (one kept check connection per backend) vs HAProxy
            (option pgsql-check: a new login per check), every 1s, for N backend entries
            spread over 3 servers: balancer CPU and RSS, the servers' CPU and forks per second
            over a --window after 5s of settling, minus an idle baseline; then a linear
            extrapolation to 500 backends. N must be a multiple of 3.
            default: --backends 3,15,30,60 --window 30

--no-build  use the existing target/release/pglb (or $PGLB_BIN) instead of
            running `cargo build --release -p pglb` first.";

#[derive(Debug)]
pub enum Command {
    Throughput(Throughput, Common),
    Failover(Failover, Common),
    Pressure(Pressure, Common),
    Checks(Checks, Common),
    Help,
}

#[derive(Debug, Clone)]
pub struct Pressure {
    pub sessions: usize,
    pub parallel: usize,
    /// Smallest row, MB (each session adds up to 2 MB).
    pub row_mb: usize,
    /// How long each reader reads nothing after its query.
    pub pause: std::time::Duration,
    /// GiB of memory to hold.
    pub hog_gib: Option<f64>,
    /// GiB allocated, touched and freed in a loop.
    pub churn_gib: f64,
    pub burners: usize,
}

#[derive(Debug, Clone)]
pub struct Checks {
    /// Backend entries per run, ascending, each a multiple of 3.
    pub backends: Vec<usize>,
    /// How long each measurement window lasts.
    pub window: std::time::Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct Common {
    /// Build pglb with cargo before starting (unless `--no-build`).
    pub build: bool,
}

#[derive(Debug, Clone)]
pub struct Throughput {
    /// Seconds per pgbench run.
    pub duration: u64,
    pub rounds: usize,
    /// `pgbench -i -s`.
    pub scale: u32,
    /// `pgbench -R` of the fixed-rate select-only run; `None`: half of
    /// HAProxy's saturated select-only TPS in the first round.
    pub rate: Option<u64>,
    /// Rows of 1000 bytes in the COPY test (0 skips it).
    pub copy_rows: u64,
    /// Idle connections for the two memory points; `None` skips the test.
    pub memory: Option<(usize, usize)>,
    /// The pgbench rounds' targets, in table order.
    pub targets: Vec<crate::targets::Kind>,
}

#[derive(Debug, Clone)]
pub struct Failover {
    /// Against a real Patroni cluster (`--patroni`): `promotions` rounds of
    /// each Patroni event instead.
    pub patroni: bool,
    pub promotions: usize,
    pub stalls: usize,
    /// How long each stall freezes the primary.
    pub stall: std::time::Duration,
}

/// Options as given; `--quick` changes only the defaults of the others.
#[derive(Default)]
struct Given {
    quick: bool,
    patroni: bool,
    build: bool,
    duration: Option<u64>,
    rounds: Option<usize>,
    scale: Option<u32>,
    copy_rows: Option<u64>,
    rate: Option<u64>,
    memory: Option<Option<(usize, usize)>>,
    promotions: Option<usize>,
    stalls: Option<usize>,
    stall_secs: Option<u64>,
    sessions: Option<usize>,
    parallel: Option<usize>,
    row_mb: Option<usize>,
    pause_ms: Option<u64>,
    hog_gib: Option<f64>,
    churn_gib: Option<f64>,
    burners: Option<usize>,
    backends: Option<Vec<usize>>,
    window: Option<u64>,
    targets: Option<Vec<crate::targets::Kind>>,
}

impl Given {
    /// Whether any option of another suite than `checks` is set.
    fn any_but_checks(&self) -> bool {
        self.quick
            || self.duration.is_some()
            || self.rounds.is_some()
            || self.scale.is_some()
            || self.copy_rows.is_some()
            || self.rate.is_some()
            || self.memory.is_some()
            || self.promotions.is_some()
            || self.stalls.is_some()
            || self.stall_secs.is_some()
            || self.sessions.is_some()
            || self.parallel.is_some()
            || self.row_mb.is_some()
            || self.pause_ms.is_some()
            || self.hog_gib.is_some()
            || self.churn_gib.is_some()
            || self.burners.is_some()
            || self.targets.is_some()
    }
}

pub fn parse(mut args: impl Iterator<Item = String>) -> Result<Command, String> {
    let suite = match args.next().as_deref() {
        Some("-h" | "--help") | None => return Ok(Command::Help),
        Some(s @ ("throughput" | "failover" | "sockmap-pressure" | "checks")) => s.to_owned(),
        Some(other) => return Err(format!("unknown suite `{other}`")),
    };
    let mut given = Given { build: true, ..Given::default() };
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "--quick" => given.quick = true,
            "--patroni" if suite == "failover" => given.patroni = true,
            "--no-build" => given.build = false,
            "--no-memory" => given.memory = Some(None),
            "--duration" => given.duration = Some(number(&arg, &value()?)?),
            "--rounds" => given.rounds = Some(number(&arg, &value()?)?),
            "--scale" => given.scale = Some(number(&arg, &value()?)?),
            "--copy-rows" => given.copy_rows = Some(number(&arg, &value()?)?),
            "--rate" => given.rate = Some(number(&arg, &value()?)?),
            "--memory" => given.memory = Some(Some(pair(&arg, &value()?)?)),
            "--promotions" => given.promotions = Some(number(&arg, &value()?)?),
            "--stalls" => given.stalls = Some(number(&arg, &value()?)?),
            "--stall-secs" => given.stall_secs = Some(number(&arg, &value()?)?),
            "--sessions" => given.sessions = Some(number(&arg, &value()?)?),
            "--parallel" => given.parallel = Some(number(&arg, &value()?)?),
            "--pause-ms" => given.pause_ms = Some(number(&arg, &value()?)?),
            "--row-mb" => given.row_mb = Some(number(&arg, &value()?)?),
            "--burners" => given.burners = Some(number(&arg, &value()?)?),
            "--hog-gib" => given.hog_gib = Some(decimal(&arg, &value()?)?),
            "--churn-gib" => given.churn_gib = Some(decimal(&arg, &value()?)?),
            "--backends" => given.backends = Some(counts(&arg, &value()?)?),
            "--window" => given.window = Some(number(&arg, &value()?)?),
            "--targets" => given.targets = Some(targets(&arg, &value()?)?),
            _ => return Err(format!("unexpected argument `{arg}`")),
        }
    }
    let common = Common { build: given.build };
    if suite != "checks" && (given.backends.is_some() || given.window.is_some()) {
        return Err("--backends and --window belong to the checks suite".into());
    }
    Ok(match suite.as_str() {
        "throughput" => Command::Throughput(throughput(&given)?, common),
        "failover" => Command::Failover(failover(&given)?, common),
        "checks" => Command::Checks(checks(&given)?, common),
        _ => Command::Pressure(pressure(&given)?, common),
    })
}

fn checks(g: &Given) -> Result<Checks, String> {
    if g.any_but_checks() {
        return Err("the checks suite takes only --backends, --window and --no-build".into());
    }
    let mut backends = g.backends.clone().unwrap_or_else(|| vec![3, 15, 30, 60]);
    backends.sort_unstable();
    backends.dedup();
    if backends.iter().any(|&n| n == 0 || n % 3 != 0) {
        return Err(format!("--backends: each count must be a positive multiple of 3 (got {backends:?})"));
    }
    let window = g.window.unwrap_or(30);
    if window == 0 {
        return Err("--window must be at least 1".into());
    }
    Ok(Checks { backends, window: std::time::Duration::from_secs(window) })
}

fn pressure(g: &Given) -> Result<Pressure, String> {
    let p = Pressure {
        sessions: g.sessions.unwrap_or(1000),
        parallel: g.parallel.unwrap_or(8),
        row_mb: g.row_mb.unwrap_or(20),
        pause: std::time::Duration::from_millis(g.pause_ms.unwrap_or(150)),
        hog_gib: g.hog_gib,
        churn_gib: g.churn_gib.unwrap_or(0.0),
        burners: g.burners.unwrap_or(0),
    };
    if p.sessions == 0 || p.parallel == 0 || p.row_mb == 0 {
        return Err("--sessions, --parallel and --row-mb must be at least 1".into());
    }
    Ok(p)
}

fn throughput(g: &Given) -> Result<Throughput, String> {
    let q = g.quick;
    let t = Throughput {
        duration: g.duration.unwrap_or(if q { 5 } else { 10 }),
        rounds: g.rounds.unwrap_or(if q { 1 } else { 3 }),
        scale: g.scale.unwrap_or(if q { 4 } else { 64 }),
        copy_rows: g.copy_rows.unwrap_or(if q { 100_000 } else { 1_000_000 }),
        rate: g.rate,
        memory: g.memory.unwrap_or(Some(if q { (200, 600) } else { (2000, 6000) })),
        targets: g.targets.clone().unwrap_or_else(|| crate::targets::Kind::DEFAULT.to_vec()),
    };
    if t.duration == 0 || t.rounds == 0 || t.scale == 0 || t.rate == Some(0) {
        return Err("--duration, --rounds, --scale and --rate must be at least 1".into());
    }
    if g.promotions.is_some() || g.stalls.is_some() || g.stall_secs.is_some() {
        return Err("--promotions, --stalls and --stall-secs belong to the failover suite".into());
    }
    Ok(t)
}

fn failover(g: &Given) -> Result<Failover, String> {
    let throughput_only = g.targets.is_some()
        || g.duration.is_some()
        || g.rounds.is_some()
        || g.scale.is_some()
        || g.copy_rows.is_some()
        || g.rate.is_some()
        || g.memory.is_some();
    if throughput_only {
        return Err(
            "--duration, --rounds, --scale, --rate, --copy-rows, --memory and --targets belong to the throughput suite"
                .into(),
        );
    }
    if g.patroni && (g.stalls.is_some() || g.stall_secs.is_some()) {
        return Err("--stalls and --stall-secs do not apply with --patroni".into());
    }
    let promotions = g.promotions.unwrap_or(match (g.patroni, g.quick) {
        (true, true) => 1,
        (true, false) => 2,
        (false, true) => 2,
        (false, false) => 10,
    });
    if promotions == 0 {
        return Err("--promotions must be at least 1".into());
    }
    let stalls = g.stalls.unwrap_or(if g.quick { 1 } else { 5 });
    let stall = std::time::Duration::from_secs(g.stall_secs.unwrap_or(3));
    if stall.is_zero() {
        return Err("--stall-secs must be at least 1".into());
    }
    Ok(Failover { patroni: g.patroni, promotions, stalls, stall })
}

fn decimal(flag: &str, text: &str) -> Result<f64, String> {
    text.parse().map_err(|_| format!("{flag}: `{text}` is not a number"))
}

fn number<T: std::str::FromStr>(flag: &str, text: &str) -> Result<T, String> {
    text.parse().map_err(|_| format!("{flag}: `{text}` is not a whole number"))
}

/// A comma-separated list of whole numbers, e.g. `3,15,30,60`.
fn counts(flag: &str, text: &str) -> Result<Vec<usize>, String> {
    text.split(',').map(|n| number(flag, n.trim())).collect()
}

/// A comma-separated list of target names, each once.
fn targets(flag: &str, text: &str) -> Result<Vec<crate::targets::Kind>, String> {
    let mut out = Vec::new();
    for name in text.split(',').map(str::trim) {
        let kind = crate::targets::Kind::parse(name).ok_or(format!(
            "{flag}: unknown target `{name}` (direct, pglb, pglb-nolog, pglb-sockmap, haproxy, haproxy-log)"
        ))?;
        if !out.contains(&kind) {
            out.push(kind);
        }
    }
    Ok(out)
}

/// `LOW,HIGH` with `0 < LOW < HIGH`.
fn pair(flag: &str, text: &str) -> Result<(usize, usize), String> {
    let (low, high) = text.split_once(',').ok_or(format!("{flag}: write two counts, e.g. `2000,6000`"))?;
    let (low, high) = (number(flag, low.trim())?, number(flag, high.trim())?);
    if low == 0 || high <= low {
        return Err(format!("{flag}: need 0 < LOW < HIGH, got {low},{high}"));
    }
    Ok((low, high))
}
