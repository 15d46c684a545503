//! Many clusters behind one pglb: each rw/ro reaches its own cluster, one
//! cluster's failover, fence, reload or flood changes nothing for the
//! others (their sessions keep their backend process, their routing tables
//! are not republished), two clusters share an address by TLS server name,
//! and operators act on `cluster/backend`. Small clusters of their own
//! (a primary and a replica, or a single node): every test here disturbs
//! them.

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use pglb_cluster::{Cluster, Spec};
use pglb_tests::pglb::pglb_bin;
use pglb_tests::psql::psql;
use pglb_tests::{wait_until, wire, ClusterYaml, Pglb, Yaml};

const SETTLE: Duration = Duration::from_secs(30);

fn start(tag: &str, replicas: usize, ssl: bool) -> Cluster {
    let cluster = Cluster::start(&Spec { tag: tag.into(), replicas, ssl, ..Spec::default() }).expect("cluster");
    pglb_tests::cluster::create_check_users_on(&cluster, replicas);
    cluster
}

fn system_identifier(port: u16) -> Result<String, String> {
    psql(port, "SELECT system_identifier FROM pg_control_system()", &[])
}

fn identifier_of(cluster: &Cluster) -> String {
    cluster.primary().sql("SELECT system_identifier FROM pg_control_system()").expect("system identifier")
}

/// The entry of `/status`'s `list` (`backends`, `listeners`) of `cluster` called `name`.
fn entry(pglb: &Pglb, list: &str, cluster: &str, name: &str) -> serde_json::Value {
    let status = pglb.status();
    let all = status[list].as_array().cloned().unwrap_or_default();
    all.into_iter().find(|e| e["cluster"] == cluster && e["name"] == name).unwrap_or_default()
}

/// The routing generation of `cluster` (`/status`).
fn generation(pglb: &Pglb, cluster: &str) -> u64 {
    let status = pglb.status();
    let all = status["clusters"].as_array().cloned().unwrap_or_default();
    let entry = all.into_iter().find(|c| c["name"] == cluster).unwrap_or_else(|| panic!("no cluster {cluster}"));
    entry["generation"].as_u64().expect("generation")
}

fn wait_eligible(pglb: &Pglb, cluster: &str, listener: &str, want: &[&str]) {
    wait_until(&format!("{cluster}/{listener} routes to {want:?}"), SETTLE, || {
        let l = entry(pglb, "listeners", cluster, listener);
        let got: Vec<String> =
            l["backends"].as_array().into_iter().flatten().filter_map(|b| b.as_str().map(str::to_owned)).collect();
        if got == want {
            Ok(())
        } else {
            Err(format!("{got:?}\n{}", pglb.log()))
        }
    });
}

/// `pglb ARGS --config CONFIG`: exit code, stdout, stderr.
fn cli(config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(pglb_bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("PGLB_ADMIN_TOKEN")
        .output()
        .expect("run pglb");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// A logged-in session through `port` and its backend's pid.
fn session(port: u16) -> (TcpStream, String) {
    let mut s = wire::login(port).expect("log in");
    let pid = wire::scalar(&mut s, "SELECT pg_backend_pid()").expect("backend pid");
    (s, pid)
}

/// Cluster a (a primary and a replica, and by mistake the node of b) is
/// promoted; b and c (single nodes, TLS on, also sharing one address by
/// server name) are untouched by it: their sessions keep their backend
/// process and work, their routing tables are not republished. Drains by
/// `cluster/backend`; a name two clusters use is ambiguous; an unknown
/// cluster has its own exit code.
#[test]
fn a_failover_in_one_cluster_changes_nothing_for_the_others() {
    let a = start("mc-a", 1, false);
    let b = start("mc-b", 0, true);
    let c = start("mc-c", 0, true);
    let shared_port = pglb_cluster::free_port().expect("free port");
    let mut ca = ClusterYaml::new("a", &a).listener("rw", "role: primary").listener("ro", "role: replica");
    ca.backends.push(("stray".into(), format!("address: {}", b.primary().address())));
    let mut cb = ClusterYaml::new("b", &b).listener("rw", "role: primary");
    cb.listeners.push(("rw-sni".into(), shared_port, "role: primary\n    sni: [rw.b.pglb.test]".into()));
    let mut cc = ClusterYaml::new("c", &c).listener("rw", "role: primary");
    cc.listeners.push(("rw-sni".into(), shared_port, "role: primary\n    sni: [rw.c.pglb.test]".into()));
    let yaml = Yaml::for_clusters(vec![ca, cb, cc]);
    let pglb = Pglb::start(&yaml);
    wait_eligible(&pglb, "a", "rw", &["pg0"]);
    wait_eligible(&pglb, "a", "ro", &["pg1"]);
    wait_eligible(&pglb, "b", "rw", &["pg0"]);
    wait_eligible(&pglb, "c", "rw", &["pg0"]);

    // Each rw reaches its own cluster.
    let (ida, idb, idc) = (identifier_of(&a), identifier_of(&b), identifier_of(&c));
    assert_eq!(system_identifier(pglb.port("a/rw")).as_deref(), Ok(ida.as_str()));
    assert_eq!(system_identifier(pglb.port("b/rw")).as_deref(), Ok(idb.as_str()));
    assert_eq!(system_identifier(pglb.port("c/rw")).as_deref(), Ok(idc.as_str()));
    assert_eq!(psql(pglb.port("a/ro"), "SELECT pg_is_in_recovery()", &[]).as_deref(), Ok("t"));
    // Two clusters on one address, told apart by server name.
    for (name, id) in [("rw.b.pglb.test", &idb), ("rw.c.pglb.test", &idc)] {
        let conninfo = format!(
            "host={name} hostaddr=127.0.0.1 port={shared_port} sslmode=require user=postgres dbname=postgres connect_timeout=10"
        );
        let out = Command::new("psql")
            .arg(conninfo)
            .args(["-XAtq", "-c", "SELECT system_identifier FROM pg_control_system()"])
            .output()
            .expect("psql");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), id.as_str(), "{name}: {out:?}\n{}", pglb.log());
    }
    // b's node listed by mistake in a: fenced in a, still serving b.
    let stray = entry(&pglb, "backends", "a", "stray");
    assert_eq!(stray["fenced"], true, "{stray}");
    assert_eq!(entry(&pglb, "backends", "b", "pg0")["fenced"], false);

    let (mut in_b, pid_b) = session(pglb.port("b/rw"));
    let (mut in_c, pid_c) = session(pglb.port("c/rw"));
    // /connections names each session's cluster.
    let (_, body) = pglb_tests::http::get(pglb.admin, "/connections").expect("GET /connections");
    let connections: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let mut clusters: Vec<&str> =
        connections["connections"].as_array().into_iter().flatten().filter_map(|c| c["cluster"].as_str()).collect();
    clusters.sort_unstable();
    assert_eq!(clusters, ["b", "c"], "{body}");
    // A cancel arriving on b's address goes to b's server only (c's backend
    // has the same name, pg0, and a session too).
    let mut cancel = TcpStream::connect(("127.0.0.1", pglb.port("b/rw"))).expect("connect");
    cancel.write_all(&wire::cancel_request(4242, &[1, 2, 3, 4])).expect("send the cancel");
    let _ = cancel.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = std::io::Read::read_to_end(&mut cancel, &mut Vec::new());
    let forwarded = wait_until("the cancel to be passed on", SETTLE, || {
        let log = pglb.log();
        let to: Vec<String> = log
            .lines()
            .filter(|l| l.contains("cancel request forwarded"))
            .filter_map(|l| Some(l.split("cancel{cluster=").nth(1)?.split('}').next()?.to_owned()))
            .collect();
        if to.is_empty() {
            Err("not yet".to_owned())
        } else {
            Ok(to)
        }
    });
    assert_eq!(forwarded, ["b"], "the cancel reached another cluster's server");
    let (gen_b, gen_c) = (generation(&pglb, "b"), generation(&pglb, "c"));
    let failures = |cluster: &str| pglb.metric("pglb_health_check_failures_total", &[("cluster", cluster)]);
    let (failed_b, failed_c) = (failures("b"), failures("c"));

    let checks = |cluster: &str| {
        pglb.metric("pglb_health_check_duration_seconds_count", &[("cluster", cluster), ("backend", "pg0")])
    };
    let (checks_a, checks_b, started) = (checks("a"), checks("b"), std::time::Instant::now());
    a.nodes[0].stop("fast");
    a.nodes[1].promote().expect("promote a's replica");
    wait_eligible(&pglb, "a", "rw", &["pg1"]);
    // a checks at its fast pace while it settles; b at its own interval
    // (500ms): a's failover adds no check of b.
    let (more_a, more_b, took) = (checks("a") - checks_a, checks("b") - checks_b, started.elapsed().as_secs_f64());
    let at_interval = (took / 0.5).ceil() + 2.0;
    assert!(
        more_b <= at_interval,
        "b was checked {more_b} times in {took:.1}s (at most {at_interval} at its interval)"
    );
    println!("during a's failover ({took:.1}s): checks of a/pg0 +{more_a}, of b/pg0 +{more_b}");
    assert_eq!(system_identifier(pglb.port("a/rw")).as_deref(), Ok(ida.as_str()));

    assert_eq!(wire::scalar(&mut in_b, "SELECT pg_backend_pid()").as_deref(), Ok(pid_b.as_str()), "b's session");
    assert_eq!(wire::scalar(&mut in_c, "SELECT pg_backend_pid()").as_deref(), Ok(pid_c.as_str()), "c's session");
    assert!(generation(&pglb, "a") > 0);
    assert_eq!((generation(&pglb, "b"), generation(&pglb, "c")), (gen_b, gen_c), "b's or c's table was republished");
    assert_eq!((failures("b"), failures("c")), (failed_b, failed_c), "a's failover touched b's or c's checks");
    let m = pglb.metrics();
    assert!(m.contains(&format!("pglb_routing_generation{{cluster=\"b\"}} {gen_b}")), "{m}");
    assert!(m.contains("pglb_backend_up{cluster=\"a\",backend=\"pg0\"} 0"), "{m}");
    assert!(m.contains("pglb_backend_up{cluster=\"b\",backend=\"pg0\"} 1"), "{m}");

    // Operators name the cluster; a name used by several is ambiguous.
    let config = &pglb.config;
    let (code, out, err) = cli(config, &["drain", "c/pg0"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(entry(&pglb, "backends", "c", "pg0")["admin_state"], "drained");
    assert_eq!(entry(&pglb, "backends", "b", "pg0")["admin_state"], "enabled", "b's pg0 is another backend");
    let (code, _, err) = cli(config, &["drain", "pg0"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("name the cluster"), "{err}");
    let (code, _, err) = cli(config, &["drain", "nope/pg0"]);
    assert_eq!(code, 6, "an unknown cluster: {err}");
    assert!(err.contains("no cluster named `nope`"), "{err}");
    assert_eq!(pglb.post("/backends/stray/disable").0, 200, "a name only one cluster has needs no cluster");
    assert_eq!(entry(&pglb, "backends", "a", "stray")["admin_state"], "disabled");
    let (code, out, err) = cli(config, &["enable", "c/pg0"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = cli(config, &["status"]);
    assert_eq!(code, 0);
    assert!(out.contains("cluster a: primary pg1") && out.contains("cluster b: primary pg0"), "{out}");
    assert_eq!(wire::scalar(&mut in_c, "SELECT 1").as_deref(), Ok("1"), "c's session after the drain and enable");
}

/// A flood of silent connections on one cluster's listener takes at most
/// half the pending budget; another cluster's clients are served. Then
/// reloads add, change and remove clusters; an untouched cluster keeps its
/// session and is not republished; the state file holds every cluster.
#[test]
fn reloads_and_floods_of_one_cluster_leave_the_others_alone() {
    let x = start("mc-x", 0, false);
    let y = start("mc-y", 0, false);
    let z = start("mc-z", 0, false);
    let cx = ClusterYaml::new("x", &x).listener("rw", "role: primary\n    startup_timeout: 60s");
    let cy = ClusterYaml::new("y", &y).listener("rw", "role: primary");
    let yaml = Yaml::for_clusters(vec![cx.clone(), cy.clone()])
        .top("state_file: state.json\nlimits:\n  max_pending: 40\n  max_pending_per_source: 40");
    let pglb = Pglb::start(&yaml);
    wait_eligible(&pglb, "x", "rw", &["pg0"]);
    wait_eligible(&pglb, "y", "rw", &["pg0"]);

    // The flood: 60 silent connections to x's listener.
    let flood: Vec<TcpStream> =
        (0..60).map(|_| TcpStream::connect(("127.0.0.1", pglb.port("x/rw"))).expect("connect")).collect();
    let rejected =
        || pglb.metric("pglb_clients_rejected_total", &[("cluster", "x"), ("reason", "address_pending_full")]);
    wait_until("x's half of the budget is full", SETTLE, || match rejected() {
        r if r >= 40.0 => Ok(()),
        r => Err(format!("{r} refused")),
    });
    assert_eq!(pglb.metric("pglb_pending_connections", &[]), 20.0, "x holds half of 40");
    assert_eq!(psql(pglb.port("y/rw"), "SELECT 1", &[]).as_deref(), Ok("1"), "y is served during x's flood");
    drop(flood);

    let (mut in_y, pid_y) = session(pglb.port("y/rw"));
    let gen_y = generation(&pglb, "y");
    assert_eq!(pglb.post("/clusters/y/backends/pg0/drain").0, 200);
    assert_eq!(pglb.post("/clusters/y/backends/pg0/enable").0, 200);
    let gen_y = generation(&pglb, "y").max(gen_y);
    assert_eq!(pglb.post("/clusters/x/backends/pg0/drain").0, 200);
    wait_until("the state file holds both clusters", SETTLE, || {
        let text = std::fs::read_to_string(pglb.dir.join("state.json")).unwrap_or_default();
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        match (&doc["version"], &doc["clusters"]["x"]["admin"][0]["state"]) {
            (v, s) if *v == 2 && *s == "drained" && doc["clusters"]["y"].is_object() => Ok(()),
            _ => Err(text),
        }
    });
    assert_eq!(pglb.post("/clusters/x/backends/pg0/enable").0, 200);

    // Reload: z is added, x changed (a second listener), y untouched.
    let cz = ClusterYaml::new("z", &z).listener("rw", "role: primary");
    let cx2 = cx.clone().listener("any", "role: any");
    let mut next = yaml.clone();
    next.clusters = vec![cx2, cy.clone(), cz];
    let reload = |next: &Yaml| {
        std::fs::write(&pglb.config, next.render()).expect("write the config");
        let before = pglb.metric("pglb_config_reloads_total", &[("result", "success")]);
        pglb.signal("HUP");
        wait_until("the reload", SETTLE, || {
            match pglb.metric("pglb_config_reloads_total", &[("result", "success")]) - before {
                d if d >= 1.0 => Ok(()),
                _ => Err(pglb.log()),
            }
        });
    };
    reload(&next);
    let ports = next.ports();
    let port = |name: &str| ports.iter().find(|(n, _)| n == name).map(|(_, p)| *p).expect("port");
    wait_eligible(&pglb, "z", "rw", &["pg0"]);
    assert_eq!(system_identifier(port("z/rw")).as_deref(), Ok(identifier_of(&z).as_str()));
    assert_eq!(system_identifier(port("x/any")).as_deref(), Ok(identifier_of(&x).as_str()));
    assert_eq!(wire::scalar(&mut in_y, "SELECT pg_backend_pid()").as_deref(), Ok(pid_y.as_str()));
    assert_eq!(generation(&pglb, "y"), gen_y, "y's table was republished by a reload that did not touch it");

    // Reload: x is removed; its listeners close, its series go.
    next.clusters.remove(0);
    reload(&next);
    wait_until("x's listener is closed", SETTLE, || match TcpStream::connect(("127.0.0.1", port("x/rw"))) {
        Err(_) => Ok(()),
        Ok(_) => Err("still accepting".into()),
    });
    let status = pglb.status();
    let names: Vec<&str> =
        status["clusters"].as_array().into_iter().flatten().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(names, ["y", "z"]);
    wait_until("x's series are gone", SETTLE, || match pglb.metrics() {
        m if !m.contains("cluster=\"x\"") => Ok(()),
        m => Err(m),
    });
    assert_eq!(wire::scalar(&mut in_y, "SELECT pg_backend_pid()").as_deref(), Ok(pid_y.as_str()));
    assert_eq!(generation(&pglb, "y"), gen_y);
    let _ = in_y.write_all(&[b'X', 0, 0, 0, 4]);
}
