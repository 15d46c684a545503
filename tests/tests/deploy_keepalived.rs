//! deploy/keepalived: the two-node VRRP pair, run for real with Debian's
//! keepalived in network namespaces this test makes (and the pair as a
//! fleet sharing its drains through etcd in the db namespace):
//!
//! ```text
//!   ns a: pglb + keepalived (10.200.0.11) ─┐
//!   ns b: pglb + keepalived (10.200.0.12) ─┤ bridge br0 ── ns db: PostgreSQL (10.200.0.21)
//!   ns c: the client        (10.200.0.30) ─┘   (ns br)      virtual IP 10.200.0.100
//! ```
//!
//! The keepalived configs are the repository's, with the example addresses
//! mapped into 10.200.0.0/24 (which exists only inside these namespaces).
//! Needs root, `ip` (iproute2), keepalived and curl; prints `SKIPPED:` and
//! returns when the machine cannot provide them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pglb_cluster::{pg_bin, PgUser};
use pglb_tests::pglb::pglb_bin;
use pglb_tests::wait_until;
use pglb_tests::which;

const A: &str = "10.200.0.11";
const B: &str = "10.200.0.12";
const DB: &str = "10.200.0.21";
const CLIENT: &str = "10.200.0.30";
const VIP: &str = "10.200.0.100";
/// The addresses the example configs use, and what the test maps them to.
const ADDRESS_MAP: [(&str, &str); 3] = [("10.0.0.3", A), ("10.0.0.4", B), ("10.0.0.5", VIP)];
const PORT: u16 = 5432;
/// The second database server of the fleet lab, on the same host.
const PORT2: u16 = 5433;
const ETCD: &str = "http://10.200.0.21:2379";
const TOKEN: &str = "fleet-lab-admin-token-0123456789";
/// Namespaces of this test: `pglb-ka-<pid>-<role>`.
const NS_PREFIX: &str = "pglb-ka-";

fn keepalived_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/keepalived")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("Uid:"))?.to_owned();
            line.split_whitespace().nth(2).map(|euid| euid == "0")
        })
        .unwrap_or(false)
}

/// Runs `cmd`; its stdout, or an error with its stderr.
fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn ip(args: &[&str]) -> Result<String, String> {
    run(Command::new("ip").args(args))
}

/// `program args...` inside namespace `ns`.
fn in_ns(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(program);
    cmd
}

/// `ip`, `keepalived` and `curl` present and we may make namespaces.
fn missing_tools() -> Option<String> {
    if !is_root() {
        return Some("network namespaces need root".into());
    }
    for (tool, package) in
        [("ip", "iproute2"), ("keepalived", "keepalived"), ("curl", "curl"), ("runuser", "util-linux")]
    {
        if which(tool).is_none() {
            return Some(format!("`{tool}` not found (apt-get install {package})"));
        }
    }
    None
}

/// Replaces the IPv4 address `from` where it is not part of a longer one.
fn replace_ip(text: &str, from: &str, to: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find(from) {
        let after = &rest[at + from.len()..];
        let whole = !after.starts_with(|c: char| c.is_ascii_digit())
            && !rest[..at].ends_with(|c: char| c.is_ascii_digit() || c == '.');
        out.push_str(&rest[..at]);
        out.push_str(if whole { to } else { from });
        rest = after;
    }
    out + rest
}

/// The repository's keepalived config for `host` with the example
/// addresses, script path and script user made to fit the test.
fn test_keepalived_conf(host: &str, script: &Path) -> String {
    let mut text = read(&keepalived_dir().join(format!("keepalived-{host}.conf")));
    for (from, to) in ADDRESS_MAP {
        assert!(text.contains(from), "keepalived-{host}.conf lost {from}");
        text = replace_ip(&text, from, to);
    }
    for (from, to) in [
        ("\"/etc/keepalived/check_pglb.sh\"", format!("\"{}\"", script.display())),
        // The test cannot create the `keepalived_script` user.
        ("script_user keepalived_script", "script_user nobody".into()),
    ] {
        assert!(text.contains(from), "keepalived-{host}.conf lost `{from}`");
        text = text.replace(from, &to);
    }
    text
}

/// A temp dir (mode 0755, so `nobody` may run the check script in it),
/// removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("pglb-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        set_mode(&dir, 0o755);
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A network namespace; on drop every process left in it is killed (they
/// are this test's) and it is deleted, with the links inside it.
struct Netns(String);

impl Netns {
    fn add(name: String) -> Result<Self, String> {
        ip(&["netns", "add", &name])?;
        let ns = Self(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"])?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        remove_netns(&self.0);
    }
}

fn remove_netns(name: &str) {
    for pid in ip(&["netns", "pids", name]).unwrap_or_default().split_whitespace() {
        let _ = Command::new("kill").args(["-KILL", pid]).output();
    }
    let _ = ip(&["netns", "del", name]);
}

/// Deletes namespaces left by test processes that died without cleaning up.
fn sweep_stale_namespaces() {
    let list = ip(&["netns", "list"]).unwrap_or_default();
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let owner = rest.split('-').next().unwrap_or("");
        if !owner.is_empty() && !Path::new(&format!("/proc/{owner}")).exists() {
            remove_netns(name);
        }
    }
}

/// The lab's namespaces, joined by a bridge in their own namespace.
struct Network {
    br: Netns,
    a: Netns,
    b: Netns,
    db: Netns,
    client: Netns,
}

impl Network {
    /// The lab's namespaces, `pglb-ka-<pid>-<tag>-<role>`.
    fn create(tag: &str) -> Result<Self, String> {
        let prefix = format!("{NS_PREFIX}{}-{tag}", std::process::id());
        let ns = |role: &str| Netns::add(format!("{prefix}-{role}"));
        let net = Self { br: ns("br")?, a: ns("a")?, b: ns("b")?, db: ns("db")?, client: ns("c")? };
        let br = net.br.0.as_str();
        ip(&["-n", br, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", br, "link", "set", "br0", "up"])?;
        for (host, port, addr) in
            [(&net.a, "va", A), (&net.b, "vb", B), (&net.db, "vdb", DB), (&net.client, "vc", CLIENT)]
        {
            // The veth is made inside the bridge namespace, its peer placed
            // straight into the host's: nothing touches the root namespace.
            ip(&["-n", br, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", &host.0])?;
            ip(&["-n", br, "link", "set", port, "master", "br0", "up"])?;
            ip(&["-n", &host.0, "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            ip(&["-n", &host.0, "link", "set", "eth0", "up"])?;
        }
        Ok(net)
    }

    /// Whether `host` holds the virtual IP now.
    fn holds_vip(&self, host: &Netns) -> bool {
        ip(&["-n", &host.0, "-4", "-o", "addr", "show", "dev", "eth0"])
            .is_ok_and(|out| out.contains(&format!(" {VIP}/")))
    }
}

/// A process of the test (pglb, keepalived); stopped on drop, log printed
/// if the test failed.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Self {
        let file = fs::File::create(&log).expect("log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Self { name: name.into(), child, log }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited with {status}:\n{}", self.name, self.log());
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    fn stop(&mut self, grace: Duration) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).output();
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
        if std::thread::panicking() {
            eprintln!("--- {} log ---\n{}", self.name, self.log());
        }
    }
}

/// PostgreSQL in the db namespace, listening on DB:`port` only.
struct Postgres {
    data: PathBuf,
    log: PathBuf,
    ns: String,
    user: PgUser,
}

impl Postgres {
    fn init(dir: &Path, ns: &Netns, port: u16) -> Self {
        let user = PgUser::detect().expect("the postgres OS user");
        let root = dir.join(format!("pg{port}"));
        fs::create_dir_all(&root).expect("pg dir");
        user.own(&root).expect("chown pg dir");
        let pg = Self { data: root.join("data"), log: root.join("postgres.log"), ns: ns.0.clone(), user };
        let mut initdb = user.command(pg_bin().join("initdb"));
        initdb
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .arg("--locale=C")
            .arg("-D")
            .arg(&pg.data);
        run(&mut initdb).expect("initdb");
        let conf = format!(
            "listen_addresses = '{DB}'\nport = {port}\nunix_socket_directories = '{}'\n\
             max_connections = 20\nshared_buffers = 16MB\nfsync = off\n",
            pg.data.display()
        );
        let mut file =
            fs::OpenOptions::new().append(true).open(pg.data.join("postgresql.conf")).expect("postgresql.conf");
        std::io::Write::write_all(&mut file, conf.as_bytes()).expect("write postgresql.conf");
        fs::write(pg.data.join("pg_hba.conf"), "local all all trust\nhost all all 10.200.0.0/24 trust\n")
            .expect("write pg_hba.conf");
        pg
    }

    /// Starts the server inside the namespace and waits until it is ready.
    fn start(&self) {
        let mut cmd = in_ns(&self.ns, "runuser");
        cmd.args(["-u", "postgres", "--"])
            .arg(pg_bin().join("pg_ctl"))
            .args(["-w", "-t", "30", "-D"])
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .arg("start");
        if let Err(e) = run(&mut cmd) {
            panic!("{e}\n{}", fs::read_to_string(&self.log).unwrap_or_default());
        }
    }

    fn stop(&self) {
        let _ = self
            .user
            .command(pg_bin().join("pg_ctl"))
            .args(["-w", "-t", "30", "-m", "immediate", "-D"])
            .arg(&self.data)
            .arg("stop")
            .output();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- postgres log ---\n{}", fs::read_to_string(&self.log).unwrap_or_default());
        }
    }
}

/// Whether this pglb's config accepts `freebind: true`.
fn pglb_accepts_freebind(dir: &Path) -> bool {
    let path = dir.join("freebind-probe.yaml");
    fs::write(&path, pglb_config(true)).expect("write probe");
    Command::new(pglb_bin()).args(["check", "--config"]).arg(&path).output().is_ok_and(|o| o.status.success())
}

/// Starts pglb in both balancer namespaces and waits until the track script
/// passes on each; `Err` with the log of one that exited.
fn start_pglbs(net: &Network, dir: &Path, script: &Path, config_text: &str) -> Result<Vec<Proc>, String> {
    let config = dir.join("lb.yaml");
    fs::write(&config, config_text).expect("write lb.yaml");
    let mut pglbs = Vec::new();
    for (host, ns) in [("a", &net.a), ("b", &net.b)] {
        let mut cmd = in_ns(&ns.0, pglb_bin());
        cmd.arg("--config").arg(&config).env("NO_COLOR", "1").env("RUST_LOG", "info");
        let log = dir.join(format!("pglb-{host}.log"));
        pglbs.push(Proc::spawn(&format!("pglb on {host}"), cmd, log));
    }
    for (p, ns) in pglbs.iter_mut().zip([&net.a, &net.b]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        // The track script itself says when pglb serves.
        while run(&mut in_ns(&ns.0, script)).is_err() {
            if let Ok(Some(status)) = p.child.try_wait() {
                return Err(format!("{} exited with {status}:\n{}", p.name, p.log()));
            }
            if Instant::now() > deadline {
                return Err(format!("{} never passed check_pglb.sh:\n{}", p.name, p.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(pglbs)
}

/// The same config on both balancers: the rw listener on the virtual IP.
fn pglb_config(freebind: bool) -> String {
    format!(
        "admin:\n  listen: 127.0.0.1:9631\n\
         health:\n  interval: 500ms\n  timeout: 500ms\n  rise: 2\n  fall: 2\n  user: postgres\n  sslmode: disable\n\
         listeners:\n  - name: rw\n    listen: {VIP}:{PORT}\n    role: primary\n{}\
         backends:\n  - name: db\n    address: {DB}:{PORT}\n",
        if freebind { "    freebind: true\n" } else { "" }
    )
}

/// keepalived on both balancers, each with its own pid files.
fn start_keepaliveds(net: &Network, dir: &Path, script: &Path) -> Vec<Proc> {
    let mut keepaliveds = Vec::new();
    for (host, ns) in [("a", &net.a), ("b", &net.b)] {
        let conf = dir.join(format!("keepalived-{host}.conf"));
        fs::write(&conf, test_keepalived_conf(host, script)).expect("write conf");
        let pid = |kind: &str| dir.join(format!("keepalived-{host}{kind}.pid"));
        let mut cmd = in_ns(&ns.0, "keepalived");
        cmd.args(["-n", "-l", "-D", "-G", "-P", "-f"])
            .arg(&conf)
            .arg(format!("--pid={}", pid("").display()))
            .arg(format!("--vrrp_pid={}", pid("-vrrp").display()))
            .arg(format!("--checkers_pid={}", pid("-checkers").display()));
        let log = dir.join(format!("keepalived-{host}.log"));
        keepaliveds.push(Proc::spawn(&format!("keepalived on {host}"), cmd, log));
    }
    keepaliveds
}

/// One of them takes the VIP (a, by priority, unless b started first):
/// the active host, the standby, their addresses and the active's index.
fn wait_for_vip<'n>(
    net: &'n Network,
    keepaliveds: &mut [Proc],
) -> (&'n Netns, &'n Netns, &'static str, &'static str, usize) {
    wait_until("a host to take the VIP", Duration::from_secs(20), || {
        for k in keepaliveds.iter_mut() {
            k.assert_running();
        }
        match (net.holds_vip(&net.a), net.holds_vip(&net.b)) {
            (true, false) => Ok((&net.a, &net.b, A, B, 0)),
            (false, true) => Ok((&net.b, &net.a, B, A, 1)),
            other => Err(format!("VIP on (a, b): {other:?}")),
        }
    })
}

/// The client's `inet_server_addr(), inet_client_addr()` through the VIP:
/// which server it reached, and from which balancer.
fn client_query(net: &Network) -> Result<(String, String), String> {
    let mut cmd = in_ns(&net.client.0, "psql");
    cmd.args(["-h", VIP, "-p", &PORT.to_string()])
        .args(["-U", "postgres", "-d", "postgres", "-XAtq"])
        .args(["-c", "SELECT host(inet_server_addr()), host(inet_client_addr())"])
        .env("PGCONNECT_TIMEOUT", "2");
    let out = run(&mut cmd)?;
    let (server, via) = out.trim().split_once('|').ok_or(format!("unexpected psql output `{out}`"))?;
    Ok((server.to_owned(), via.to_owned()))
}

/// pglb's `/status` in namespace `ns`, asked from inside it.
fn status_in(ns: &Netns) -> Result<serde_json::Value, String> {
    let mut cmd = in_ns(&ns.0, "curl");
    cmd.args(["-fsS", "--max-time", "1", "http://127.0.0.1:9631/status"]);
    serde_json::from_str(&run(&mut cmd)?).map_err(|e| e.to_string())
}

#[test]
fn keepalived_configs_are_a_valid_mirrored_pair() {
    if let Some(why) = missing_tools() {
        pglb_tests::skip(&why.to_string());
        return;
    }
    let tmp = TempDir::new("ka-conf");
    let script = tmp.0.join("check_pglb.sh");
    fs::copy(keepalived_dir().join("check_pglb.sh"), &script).expect("copy script");
    set_mode(&script, 0o755);
    for host in ["a", "b"] {
        let conf = tmp.0.join(format!("keepalived-{host}.conf"));
        fs::write(&conf, test_keepalived_conf(host, &script)).expect("write conf");
        let out =
            Command::new("keepalived").args(["--config-test", "-f"]).arg(&conf).output().expect("run keepalived -t");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        // keepalived 2.2.7 (Debian 12) kills itself with SIGTERM at the end
        // of a config test when script_user is set, even for a valid file
        // (acassen/keepalived#2617, fixed in 2.2.8); problems are printed.
        let sigterm = std::os::unix::process::ExitStatusExt::signal(&out.status) == Some(15);
        assert!(
            (out.status.success() || sigterm) && text.trim().is_empty(),
            "keepalived -t keepalived-{host}.conf: {}\n{text}",
            out.status
        );
    }
    // Mirrored: same router id and VIP, each one's peer is the other.
    let a = read(&keepalived_dir().join("keepalived-a.conf"));
    let b = read(&keepalived_dir().join("keepalived-b.conf"));
    let value = |text: &str, key: &str| -> String {
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with(&format!("{key} ")))
            .unwrap_or_else(|| panic!("no `{key}`"));
        line[key.len()..].split('#').next().unwrap_or("").trim().to_owned()
    };
    for key in ["virtual_router_id", "interface", "advert_int", "state"] {
        assert_eq!(value(&a, key), value(&b, key), "{key}");
    }
    assert_ne!(value(&a, "priority"), value(&b, "priority"));
    assert_ne!(value(&a, "router_id"), value(&b, "router_id"));
    let block = |text: &str| {
        let start = text.find("unicast_peer {").expect("unicast_peer");
        let end = start + text[start..].find('}').expect("}");
        text[start + "unicast_peer {".len()..end].trim().to_owned()
    };
    assert_eq!(block(&a), value(&b, "unicast_src_ip"));
    assert_eq!(block(&b), value(&a, "unicast_src_ip"));
    let vip = |text: &str| {
        let start = text.find("virtual_ipaddress {").expect("virtual_ipaddress");
        let end = start + text[start..].find('}').expect("}");
        text[start..end].to_owned()
    };
    assert_eq!(vip(&a), vip(&b));
}

#[test]
fn the_virtual_ip_follows_pglb_not_the_database() {
    if let Some(why) = missing_tools() {
        pglb_tests::skip(&why.to_string());
        return;
    }
    sweep_stale_namespaces();
    let began = Instant::now();
    let tmp = TempDir::new("ka");
    let _lab = pglb_tests::exclusive();
    let net = match Network::create("vip") {
        Ok(net) => net,
        Err(e) => {
            pglb_tests::skip(&format!("cannot create network namespaces here: {e}"));
            return;
        }
    };

    let pg = Postgres::init(&tmp.0, &net.db, PORT);
    pg.start();

    // pglb on both balancers, listening on the VIP before holding it.
    let script = tmp.0.join("check_pglb.sh");
    fs::copy(keepalived_dir().join("check_pglb.sh"), &script).expect("copy script");
    set_mode(&script, 0o755);
    let freebind = pglb_accepts_freebind(&tmp.0);
    if !freebind {
        println!("NOTE: `pglb check` rejects `freebind`; using net.ipv4.ip_nonlocal_bind=1");
        for ns in [&net.a, &net.b] {
            run(in_ns(&ns.0, "sysctl").args(["-qw", "net.ipv4.ip_nonlocal_bind=1"])).expect("sysctl");
        }
    }
    let mut pglbs = start_pglbs(&net, &tmp.0, &script, &pglb_config(freebind)).unwrap_or_else(|e| {
        panic!("{e}\n(the config has `freebind: {freebind}`: with it, pglb must bind the VIP it does not hold yet)")
    });

    let mut keepaliveds = start_keepaliveds(&net, &tmp.0, &script);
    let (active, standby, active_addr, standby_addr, index) = wait_for_vip(&net, &mut keepaliveds);
    println!("{} holds the VIP after {:?}", active.0, began.elapsed());
    wait_until("the client to reach the primary through the VIP", Duration::from_secs(15), || {
        match client_query(&net)? {
            (server, via) if server == DB && via == active_addr => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });

    // The database goes down: pglb still serves, so the VIP stays put.
    pg.stop();
    wait_until("pglb to see the database down", Duration::from_secs(10), || {
        let status = status_in(active)?;
        match pglb_tests::pglb::named(&status["backends"], "db")["healthy"].as_bool() {
            Some(false) => Ok(()),
            other => Err(format!("healthy: {other:?}")),
        }
    });
    // Watch for longer than keepalived needs to act (interval 1s, fall 2).
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(3) {
        assert!(net.holds_vip(active) && !net.holds_vip(standby), "the VIP moved while only the database was down");
        std::thread::sleep(Duration::from_millis(100));
    }
    pg.start();

    // pglb on the active host dies: the VIP moves within a few seconds.
    let killed = Instant::now();
    pglbs[index].child.kill().expect("kill pglb");
    wait_until("the VIP to move", Duration::from_secs(15), || match (net.holds_vip(active), net.holds_vip(standby)) {
        (false, true) => Ok(()),
        other => Err(format!("VIP on (active, standby): {other:?}")),
    });
    println!("the VIP moved {:?} after pglb was killed", killed.elapsed());
    assert!(killed.elapsed() < Duration::from_secs(10));
    wait_until("the client to reach the primary through the other balancer", Duration::from_secs(15), || {
        match client_query(&net)? {
            (server, via) if server == DB && via == standby_addr => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    println!("keepalived pair test took {:?}", began.elapsed());
}

/// etcd in the db namespace, on DB:2379 (reachable from both balancers).
fn start_etcd(net: &Network, dir: &Path) -> Proc {
    let mut cmd = in_ns(&net.db.0, "etcd");
    cmd.args(["--name", "lab", "--data-dir"])
        .arg(dir.join("etcd"))
        .arg(format!("--listen-client-urls={ETCD}"))
        .arg(format!("--advertise-client-urls={ETCD}"))
        .args(["--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380"])
        .args(["--initial-cluster=lab=http://127.0.0.1:2380", "--log-level", "warn"]);
    let etcd = Proc::spawn("etcd", cmd, dir.join("etcd.log"));
    wait_until("etcd in the db namespace", Duration::from_secs(30), || {
        run(in_ns(&net.a.0, "curl").args(["-fsS", "--max-time", "1", &format!("{ETCD}/health")]))
    });
    etcd
}

/// Each balancer's config: the rw listener on the VIP over two database
/// servers (both writable: `multi_primary: allow`), sharing through etcd.
fn fleet_config(host: &str, system_id: &str) -> String {
    format!(
        "admin:\n  listen: 127.0.0.1:9631\n  token_file: admin-token\n\
         multi_primary: allow\nsystem_identifier: \"{system_id}\"\n\
         shared_state:\n  instance_id: {host}\n  sync_interval: 1s\n  etcd:\n    endpoints: [{ETCD}]\n    timeout: 1s\n\
         health:\n  interval: 500ms\n  timeout: 500ms\n  rise: 2\n  fall: 2\n  user: postgres\n  sslmode: disable\n\
         listeners:\n  - name: rw\n    listen: {VIP}:{PORT}\n    role: primary\n    freebind: true\n\
         backends:\n  - name: db\n    address: {DB}:{PORT}\n  - name: db2\n    address: {DB}:{PORT2}\n"
    )
}

/// POSTs an action to the pglb in `ns`; its answer.
fn act(ns: &Netns, path: &str) -> Result<serde_json::Value, String> {
    let mut cmd = in_ns(&ns.0, "curl");
    cmd.args(["-fsS", "--max-time", "5", "-X", "POST", "-H", &format!("Authorization: Bearer {TOKEN}")])
        .arg(format!("http://127.0.0.1:9631{path}"));
    serde_json::from_str(&run(&mut cmd)?).map_err(|e| e.to_string())
}

fn admin_in(ns: &Netns, backend: &str) -> Result<String, String> {
    let status = status_in(ns)?;
    Ok(pglb_tests::pglb::named(&status["backends"], backend)["admin_state"].as_str().unwrap_or_default().to_owned())
}

fn wait_admin_in(ns: &Netns, backend: &str, want: &str) {
    wait_until(&format!("{backend} {want} in {}", ns.0), Duration::from_secs(20), || match admin_in(ns, backend)? {
        state if state == want => Ok(()),
        state => Err(state),
    });
}

/// The port of the server a client reached through the VIP.
fn server_port(net: &Network) -> Result<u16, String> {
    let mut cmd = in_ns(&net.client.0, "psql");
    cmd.args(["-h", VIP, "-p", &PORT.to_string(), "-U", "postgres", "-d", "postgres", "-XAtq"])
        .args(["-c", "SELECT inet_server_port()"])
        .env("PGCONNECT_TIMEOUT", "2");
    let out = run(&mut cmd)?;
    out.trim().parse().map_err(|_| format!("unexpected psql output `{out}`"))
}

#[test]
fn a_pair_sharing_state_through_etcd_keeps_a_drain_when_the_vip_moves() {
    if let Some(why) = missing_tools() {
        pglb_tests::skip(&why.to_string());
        return;
    }
    for (tool, package) in [("etcd", "etcd-server"), ("nft", "nftables")] {
        if which(tool).is_none() {
            pglb_tests::skip(&format!("`{tool}` not found (apt-get install {package})"));
            return;
        }
    }
    let _lab = pglb_tests::exclusive();
    sweep_stale_namespaces();
    let tmp = TempDir::new("ka-fleet");
    let net = match Network::create("fleet") {
        Ok(net) => net,
        Err(e) => {
            pglb_tests::skip(&format!("cannot create network namespaces here: {e}"));
            return;
        }
    };
    let (pg, pg2) = (Postgres::init(&tmp.0, &net.db, PORT), Postgres::init(&tmp.0, &net.db, PORT2));
    pg.start();
    pg2.start();
    let _etcd = start_etcd(&net, &tmp.0);
    let mut ask = in_ns(&net.db.0, "psql");
    ask.args(["-h", DB, "-p", &PORT.to_string(), "-U", "postgres", "-XAtqc"])
        .arg("SELECT system_identifier FROM pg_control_system()");
    let system_id = run(&mut ask).expect("system identifier").trim().to_owned();
    fs::write(tmp.0.join("admin-token"), format!("{TOKEN}\n")).expect("token file");
    let script = tmp.0.join("check_pglb.sh");
    fs::copy(keepalived_dir().join("check_pglb.sh"), &script).expect("copy script");
    set_mode(&script, 0o755);
    let mut pglbs = Vec::new();
    for (host, ns) in [("a", &net.a), ("b", &net.b)] {
        let config = tmp.0.join(format!("lb-{host}.yaml"));
        fs::write(&config, fleet_config(host, &system_id)).expect("write config");
        let mut cmd = in_ns(&ns.0, pglb_bin());
        cmd.arg("--config").arg(&config).env("NO_COLOR", "1").env("RUST_LOG", "info");
        pglbs.push(Proc::spawn(&format!("pglb on {host}"), cmd, tmp.0.join(format!("pglb-{host}.log"))));
    }
    for ns in [&net.a, &net.b] {
        wait_until("pglb to read the shared state", Duration::from_secs(20), || {
            let status = status_in(ns)?;
            match status["fleet"]["synced"].as_bool() {
                Some(true) => Ok(()),
                _ => Err(format!("{}", status["shared_state"])),
            }
        });
    }

    // A cut off from etcd (nftables in its namespace) while B drains db2
    // and A enables it: drain prevails over enable when A returns.
    act(&net.a, "/backends/db2/disable").expect("disable db2 on a");
    wait_admin_in(&net.b, "db2", "disabled");
    let cut = format!(
        "table inet pglbcut {{\n  chain out {{\n    type filter hook output priority 0;\n    ip daddr {DB} tcp dport 2379 drop\n  }}\n}}\n"
    );
    let rules = tmp.0.join("cut.nft");
    fs::write(&rules, cut).expect("write rules");
    run(in_ns(&net.a.0, "nft").arg("-f").arg(&rules)).expect("nft cuts a off from etcd");
    wait_until("a to see etcd unreachable", Duration::from_secs(20), || {
        match status_in(&net.a)?["shared_state"]["reachable"].as_bool() {
            Some(false) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let drained = act(&net.b, "/backends/db2/drain").expect("drain db2 on b");
    assert_eq!(drained["shared_state"], "sent to the fleet (etcd)", "{drained}");
    let enabled = act(&net.a, "/backends/db2/enable").expect("enable db2 on a");
    assert!(enabled["shared_state"].as_str().unwrap_or_default().starts_with("queued locally"), "{enabled}");
    assert_eq!(admin_in(&net.a, "db2").expect("status"), "enabled", "applied on a at once");
    run(in_ns(&net.a.0, "nft").args(["delete", "table", "inet", "pglbcut"])).expect("heal the cut");
    for ns in [&net.a, &net.b] {
        wait_admin_in(ns, "db2", "drained");
    }
    let a_log = pglbs[0].log();
    assert!(a_log.contains("shared state conflict"), "{a_log}");
    println!("partition outcome: db2 drained on both (drain > enable); a logged the conflict");

    // The pair: both enabled, clients through the VIP reach both servers.
    act(&net.b, "/backends/db2/enable").expect("enable db2 on b");
    for ns in [&net.a, &net.b] {
        wait_admin_in(ns, "db2", "enabled");
    }
    let mut keepaliveds = start_keepaliveds(&net, &tmp.0, &script);
    let (active, standby, _, _, index) = wait_for_vip(&net, &mut keepaliveds);
    wait_until("clients through the VIP reach db2 too", Duration::from_secs(15), || match server_port(&net)? {
        PORT2 => Ok(()),
        other => Err(format!("reached {other}")),
    });
    // Drain db2 on the active instance, then fail it: the standby takes the
    // VIP and gives db2 no new client.
    act(active, "/backends/db2/drain").expect("drain db2 on the active");
    wait_admin_in(standby, "db2", "drained");
    pglbs[index].child.kill().expect("kill the active pglb");
    wait_until("the VIP to move", Duration::from_secs(15), || match (net.holds_vip(active), net.holds_vip(standby)) {
        (false, true) => Ok(()),
        other => Err(format!("VIP on (active, standby): {other:?}")),
    });
    let mut reached = Vec::new();
    wait_until("a client through the standby", Duration::from_secs(15), || server_port(&net));
    for _ in 0..10 {
        reached.push(server_port(&net).expect("a client through the VIP"));
    }
    assert!(reached.iter().all(|p| *p == PORT), "the drained db2 got clients after the VIP moved: {reached:?}");
    drop(keepaliveds);
    drop(pglbs);
    pg2.stop();
}
