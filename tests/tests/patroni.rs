//! pglb in front of a real Patroni cluster (etcd 3.4, Patroni 4.1, three
//! PostgreSQL 15 members): members, tags and the leader lock read from
//! Patroni's REST API, with pglb's own checks as the evidence — neither a
//! silent Patroni nor a lost DCS takes the cluster dark.

use std::time::{Duration, Instant};

use pglb_tests::haproxy::Haproxy;
use pglb_tests::patroni::signal;
use pglb_tests::patroni::{Options, PatroniCluster, LOOP_WAIT, TTL};
use pglb_tests::prom::{promql, rule_exprs};
use pglb_tests::psql::{psql, where_am_i};
use pglb_tests::writers::Writers;
use pglb_tests::{exclusive, wait_until, Pglb, Yaml};

/// pglb reading `cluster` from the first member's REST API only (it learns
/// the others from `/cluster`), with `rw` and `ro` listeners and no static
/// backend.
fn pglb_for(cluster: &PatroniCluster) -> Pglb {
    pglb_with(cluster, "")
}

/// [`pglb_for`], with more `health:` lines (e.g. `down_after: 10s`).
fn pglb_with(cluster: &PatroniCluster, health: &str) -> Pglb {
    let first = cluster.members[0].api_port;
    let yaml = Yaml::for_nodes(&[])
        .health(&format!(
            "interval: 500ms\n  timeout: 500ms\n  rise: 2\n  fall: 2\n  user: postgres\n  sslmode: disable{health}"
        ))
        .top(&format!(
            "patroni:\n  urls: [http://127.0.0.1:{first}]\n  interval: 1s\n  timeout: 500ms\n  remove_after: 4s"
        ))
        .listener("rw", "role: primary\n    hold_timeout: 30s")
        .listener("ro", "role: replica");
    Pglb::start(&yaml)
}

/// HAProxy with the Patroni documentation's template (`option httpchk
/// OPTIONS /primary`, `inter 3s fall 3 rise 2 on-marked-down
/// shutdown-sessions`): rw on `port`, over every member.
fn haproxy_for(cluster: &PatroniCluster, port: u16) -> Option<Haproxy> {
    let servers: String = cluster
        .members
        .iter()
        .map(|m| format!("    server {} 127.0.0.1:{} maxconn 100 check port {}\n", m.name, m.pg_port, m.api_port))
        .collect();
    Haproxy::start(&format!(
        "global\n    maxconn 100\ndefaults\n    mode tcp\n    retries 2\n    timeout client 30m\n    timeout connect 4s\n    timeout server 30m\n    timeout check 5s\n\
         listen primary\n    bind 127.0.0.1:{port}\n    option httpchk OPTIONS /primary\n    http-check expect status 200\n\
         \x20   default-server inter 3s fall 3 rise 2 on-marked-down shutdown-sessions\n{servers}"
    ))
}

/// The port of the node a query through `port` lands on.
fn lands_on(port: u16) -> Result<u16, String> {
    where_am_i(port).map(|(p, _)| p)
}

#[test]
fn members_tags_and_a_silent_patroni_api() {
    let _one = exclusive();
    let Some(mut cluster) = PatroniCluster::start(3, Options::default()) else { return };
    let leader = cluster.wait_leader(Duration::from_secs(30));
    let pglb = pglb_for(&cluster);
    let replicas: Vec<String> = cluster.members.iter().map(|m| m.name.clone()).filter(|n| *n != leader).collect();
    let replica_refs: Vec<&str> = replicas.iter().map(String::as_str).collect();

    // Every member found through one URL; rw on the leader, ro on the rest.
    pglb.wait_eligible("rw", &[&leader], Duration::from_secs(30));
    pglb.wait_eligible("ro", &replica_refs, Duration::from_secs(30));
    assert_eq!(lands_on(pglb.port("rw")), Ok(cluster.member(&leader).pg_port));
    let status = pglb.status();
    assert_eq!(status["patroni"]["state"], "leader_lock", "{status:#}");
    assert_eq!(status["patroni"]["leader"], leader.as_str());
    assert_eq!(pglb.metric("pglb_patroni_state", &[("state", "leader_lock")]), 1.0);
    // The alert rules' Patroni series are the ones pglb exports here.
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/pglb-rules.yml");
    let exported = promql::Exported::parse(&pglb.metrics());
    let mut checked = 0;
    for expr in rule_exprs(&std::fs::read_to_string(rules).expect("the rules")) {
        for selector in promql::selectors(&expr).into_iter().filter(|s| s.metric.starts_with("pglb_patroni_")) {
            assert_eq!(exported.check(&selector, &expr), Vec::<String>::new());
            checked += 1;
        }
    }
    assert!(checked > 0, "an alert reads pglb_patroni_state");

    // noloadbalance on a replica (config change + Patroni reload): out of
    // ro within a poll (plus Patroni's own loop to publish the tag).
    let quiet = replicas[0].clone();
    cluster.set_tags(&quiet, "noloadbalance: true");
    pglb.wait_eligible("ro", &[&replicas[1]], Duration::from_secs(LOOP_WAIT * 2 + 5));
    assert_eq!(pglb.backend(&quiet)["patroni"]["noloadbalance"], true);
    cluster.set_tags(&quiet, "noloadbalance: false");
    pglb.wait_eligible("ro", &replica_refs, Duration::from_secs(LOOP_WAIT * 2 + 5));

    // Maintenance mode: the lock is not used (it would not follow a manual
    // promotion); rw stays on the primary the checks see.
    cluster.patronictl(&["pause", &cluster.scope, "--wait"]).expect("patronictl pause");
    wait_until("pglb to see the pause", Duration::from_secs(10), || match pglb.status()["patroni"]["state"].as_str() {
        Some("paused") => Ok(()),
        other => Err(format!("{other:?}")),
    });
    assert_eq!(pglb.status()["patroni"]["paused"], true);
    assert_eq!(lands_on(pglb.port("rw")), Ok(cluster.member(&leader).pg_port));
    cluster.patronictl(&["resume", &cluster.scope, "--wait"]).expect("patronictl resume");
    wait_until("the lock to be used again", Duration::from_secs(10), || {
        match pglb.status()["patroni"]["state"].as_str() {
            Some("leader_lock") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });

    // A fourth member bootstrapped while pglb runs: in ro within two polls
    // of Patroni listing it as streaming; no reload.
    let fourth = cluster.add_member();
    cluster.wait_streaming(Duration::from_secs(120));
    let listed = Instant::now();
    let mut with_fourth = replica_refs.clone();
    with_fourth.push(&fourth);
    pglb.wait_eligible("ro", &with_fourth, Duration::from_secs(10));
    eprintln!("fourth member in ro {:?} after Patroni listed it streaming", listed.elapsed());
    assert!(!pglb.log().contains("reload"), "no reload was needed");

    // Removed (its Patroni stopped, the member key expires): it leaves.
    cluster.remove_member(&fourth);
    wait_until("the fourth member to leave pglb's backends", Duration::from_secs(TTL * 2 + 20), || {
        let status = pglb.status();
        match pglb_tests::pglb::named(&status["backends"], &fourth).is_null() {
            true => Ok(()),
            false => Err(format!("{}", pglb.backend(&fourth))),
        }
    });
    assert!(pglb.log().contains("Patroni member left the list"), "{}", pglb.log());

    // Every REST API silent (dropped) while PostgreSQL runs: pglb keeps
    // serving rw and ro on its own checks, and says so. HAProxy with the
    // Patroni template, beside it, cuts writes.
    let haproxy_port = pglb_cluster::free_port().expect("port");
    let Some(_haproxy) = haproxy_for(&cluster, haproxy_port) else { return };
    wait_until("HAProxy to route rw", Duration::from_secs(30), || lands_on(haproxy_port));
    let cut: Vec<_> = cluster.members.iter().filter_map(|m| pglb_tests::fault::Partition::port(m.api_port)).collect();
    wait_until("pglb to notice the silent APIs", Duration::from_secs(15), || {
        match pglb.status()["patroni"]["state"].as_str() {
            Some("api_unreachable") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    for _ in 0..20 {
        assert_eq!(lands_on(pglb.port("rw")), Ok(cluster.member(&leader).pg_port));
        assert!(lands_on(pglb.port("ro")).is_ok_and(|p| p != cluster.member(&leader).pg_port));
    }
    assert_eq!(pglb.metric("pglb_patroni_state", &[("state", "api_unreachable")]), 1.0);
    assert!(pglb.log().contains("no Patroni REST API answers"), "one log line says so");
    let lost = wait_until("HAProxy to cut rw (its checks go to the silent API)", Duration::from_secs(40), || {
        match lands_on(haproxy_port) {
            Err(e) => Ok(e),
            Ok(port) => Err(format!("still routes to {port}")),
        }
    });
    eprintln!("HAProxy (Patroni template) with every REST API silent: {lost}");
    assert_eq!(lands_on(pglb.port("rw")), Ok(cluster.member(&leader).pg_port), "pglb still routes rw");
    drop(cut);
    wait_until("the lock to be used again", Duration::from_secs(15), || {
        match pglb.status()["patroni"]["state"].as_str() {
            Some("leader_lock") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let _ = psql(pglb.port("rw"), "SELECT 1", &[]);
}

/// Every acknowledged write id is on `port` (the leader now).
fn all_present(port: u16, ids: &[i64]) -> usize {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let client = pglb_tests::pg::connect(port).await;
        let row = client
            .query_one("SELECT count(*) FROM pglb_writes WHERE id = ANY($1)", &[&ids])
            .await
            .expect("count the acknowledged writes");
        usize::try_from(row.get::<_, i64>(0)).unwrap_or(0)
    })
}

/// Waits until a write through pglb is acknowledged by `member` after `since`.
fn wait_ack(writers: &Writers, cluster: &PatroniCluster, member: &str, since: Instant, within: Duration) -> Instant {
    let port = cluster.member(member).pg_port;
    wait_until(&format!("a write acknowledged by {member}"), within, || {
        writers.first_ack_on(port, since).ok_or_else(|| format!("errors: {:?}", writers.errors_since(since)))
    })
}

#[test]
fn switchovers_a_crash_restart_a_stopped_patroni_and_a_frozen_leader() {
    let _one = exclusive();
    let Some(mut cluster) = PatroniCluster::start(3, Options::default()) else { return };
    let mut leader = cluster.wait_leader(Duration::from_secs(30));
    let pglb = pglb_with(&cluster, "\n  down_after: 10s");
    pglb.wait_eligible("rw", &[&leader], Duration::from_secs(30));
    let mut writers = Writers::start(pglb.port("rw"), Duration::from_millis(20));
    let began = Instant::now();
    wait_ack(&writers, &cluster, &leader, began, Duration::from_secs(10));

    // Three planned switchovers: rw follows each.
    for round in 1..=3 {
        let names: Vec<String> = cluster.members.iter().map(|m| m.name.clone()).collect();
        let at = names.iter().position(|n| *n == leader).expect("leader");
        let candidate = names[(at + 1) % names.len()].clone();
        let t0 = Instant::now();
        cluster.switchover(&leader, &candidate);
        let new = cluster.wait_new_leader(&leader, Duration::from_secs(60));
        assert_eq!(new, candidate);
        let acked = wait_ack(&writers, &cluster, &new, t0, Duration::from_secs(30));
        let (fresh, session) = writers.failures_since(t0);
        eprintln!(
            "switchover {round} {leader} → {new}: first write on {new} {:?} after the command; longest write gap {:?}; failed: {fresh} new-connection writes, {session} session writes; errors {:?}",
            acked - t0,
            writers.longest_gap_since(t0),
            writers.errors_since(t0)
        );
        cluster.wait_streaming(Duration::from_secs(60));
        leader = new;
    }
    let ids: Vec<i64> = writers.acknowledged().iter().map(|(_, id, _)| *id).collect();
    assert_eq!(all_present(cluster.member(&leader).pg_port, &ids), ids.len(), "no acknowledged write is lost");

    // kill -9 of the leader's postmaster: Patroni restarts PostgreSQL on
    // the same node, which keeps the lock; rw stays with it.
    let t0 = Instant::now();
    signal(cluster.member(&leader).postmaster_pid().expect("postmaster"), "KILL");
    let acked = wait_ack(&writers, &cluster, &leader, t0 + Duration::from_millis(50), Duration::from_secs(60));
    wait_until("the lock to stay with the restarted leader", Duration::from_secs(30), || match cluster.leader() {
        Some(l) if l == leader => Ok(()),
        other => Err(format!("Patroni's running leader: {other:?}")),
    });
    let (fresh, session) = writers.failures_since(t0);
    eprintln!(
        "kill -9 of {leader}'s postmaster: writes back on {leader} after {:?}; failed: {fresh} new-connection, {session} session; errors {:?}",
        acked - t0,
        writers.errors_since(t0)
    );
    assert_eq!(pglb.eligible("rw"), [leader.clone()]);

    // SIGTERM of the leader's Patroni: it stops PostgreSQL and gives up
    // the lock; rw moves to the new leader.
    let t0 = Instant::now();
    let stopped = leader.clone();
    cluster.signal_patroni(&stopped, "TERM");
    let new = cluster.wait_new_leader(&stopped, Duration::from_secs(60));
    let acked = wait_ack(&writers, &cluster, &new, t0, Duration::from_secs(60));
    let (fresh, session) = writers.failures_since(t0);
    eprintln!(
        "SIGTERM of {stopped}'s Patroni: writes on {new} after {:?}; failed: {fresh} new-connection, {session} session; errors {:?}",
        acked - t0,
        writers.errors_since(t0)
    );
    cluster.wait_patroni_exit(&stopped, Duration::from_secs(60));
    cluster.restart_patroni(&stopped);
    cluster.wait_streaming(Duration::from_secs(120));
    leader = new;

    // The whole leader frozen (Patroni and PostgreSQL) for longer than
    // ttl + loop_wait: another leader is elected; thawed, the old one must
    // not acknowledge a write.
    let frozen = leader.clone();
    let pids = cluster.member(&frozen).processes();
    let t0 = Instant::now();
    for pid in &pids {
        signal(*pid, "STOP");
    }
    let new = cluster.wait_new_leader(&frozen, Duration::from_secs(TTL + LOOP_WAIT + 60));
    let elected = Instant::now();
    let acked = wait_ack(&writers, &cluster, &new, t0, Duration::from_secs(60));
    eprintln!("{frozen} frozen: {new} elected and taking writes through pglb {:?} after the freeze", acked - t0);
    for pid in &pids {
        signal(*pid, "CONT");
    }
    let thawed = Instant::now();
    // Until the old leader's Patroni has demoted it, and a while after.
    wait_until(&format!("{frozen} to rejoin as a replica"), Duration::from_secs(90), || {
        let cluster_json = cluster.cluster_json().ok_or("no /cluster")?;
        let rejoined = cluster_json["members"].as_array().is_some_and(|ms| {
            ms.iter().any(|m| m["name"] == frozen.as_str() && m["role"] != "leader" && m["state"] == "streaming")
        });
        if rejoined && thawed.elapsed() > Duration::from_secs(5) {
            Ok(())
        } else {
            Err(format!("{cluster_json}"))
        }
    });
    let old_port = cluster.member(&frozen).pg_port;
    let late: Vec<_> =
        writers.acknowledged().into_iter().filter(|(at, _, p)| *p == old_port && *at >= elected).collect();
    assert!(late.is_empty(), "{} writes acknowledged by {frozen} after {new} was elected: {late:?}", late.len());
    assert_eq!(lands_on(pglb.port("rw")), Ok(cluster.member(&new).pg_port));
    writers.stop();
    eprintln!(
        "pglb log:\n{}",
        pglb.log()
            .lines()
            .filter(|l| l.contains("Patroni") || l.contains("fenced") || l.contains("veto"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn etcd_lost_without_and_with_failsafe_mode() {
    let _one = exclusive();
    let Some(mut cluster) = PatroniCluster::start(3, Options::default()) else { return };
    let leader = cluster.wait_leader(Duration::from_secs(30));
    let pglb = pglb_for(&cluster);
    pglb.wait_eligible("rw", &[&leader], Duration::from_secs(30));
    let mut writers = Writers::start(pglb.port("rw"), Duration::from_millis(50));

    // Without failsafe mode, Patroni demotes the leader when it cannot
    // reach etcd; pglb holds rw (no primary) and says why, then resumes
    // when etcd and a leader are back.
    let t0 = Instant::now();
    cluster.stop_etcd();
    wait_until("the leader to be demoted", Duration::from_secs(60), || match pglb.eligible("rw").as_slice() {
        [] => Ok(()),
        other => Err(format!("rw still on {other:?}")),
    });
    let demoted = t0.elapsed();
    let state = wait_until("pglb to say the DCS is unavailable", Duration::from_secs(15), || {
        match pglb.status()["patroni"]["state"].as_str() {
            Some(s @ ("dcs_unavailable" | "api_unreachable")) => Ok(s.to_owned()),
            other => Err(format!("{other:?}")),
        }
    });
    // A client arriving now is held, not refused: it writes once a leader is
    // back. It waits as long as rw holds (30 s), not psql's usual 10 s: on
    // a slow machine etcd's restart and Patroni's next loop can take longer.
    let rw = pglb.port("rw");
    let held = std::thread::spawn(move || {
        let sql = "INSERT INTO pglb_writes (writer) VALUES ('held') RETURNING inet_server_port()";
        psql(rw, sql, &[("PGCONNECT_TIMEOUT", "40")])
    });
    let restarted = Instant::now();
    cluster.start_etcd();
    let back = cluster.wait_leader(Duration::from_secs(90));
    let acked = wait_ack(&writers, &cluster, &back, restarted, Duration::from_secs(60));
    let port = held.join().expect("the held client");
    assert_eq!(port, Ok(cluster.member(&back).pg_port.to_string()), "the client held while there was no leader wrote");
    eprintln!(
        "etcd lost without failsafe: the leader was demoted {demoted:?} after; pglb said `{state}`; writes on {back} {:?} after etcd came back",
        acked - restarted
    );
    cluster.wait_streaming(Duration::from_secs(90));

    // With failsafe mode, the leader stays primary while it reaches every
    // member; pglb keeps routing to it and says so.
    cluster
        .patronictl(&["edit-config", &cluster.scope, "--set", "failsafe_mode=true", "--force"])
        .expect("edit-config");
    let leader = cluster.wait_leader(Duration::from_secs(30));
    // The leader publishes the members it must reach (the /failsafe key)
    // on its next loop: only then does failsafe mode hold.
    wait_until("the leader to publish the failsafe members", Duration::from_secs(30), || {
        let (status, body) =
            pglb_tests::http::get(cluster.member(&leader).api(), "/failsafe").map_err(|e| e.to_string())?;
        let all = cluster.members.iter().all(|m| body.contains(&format!("\"{}\"", m.name)));
        match (status, all) {
            (200, true) => Ok(()),
            _ => Err(format!("{status} {body}")),
        }
    });
    pglb.wait_eligible("rw", &[&leader], Duration::from_secs(30));
    let t0 = Instant::now();
    cluster.stop_etcd();
    wait_until("pglb to say failsafe", Duration::from_secs(30), || match pglb.status()["patroni"]["state"].as_str() {
        Some("failsafe") => Ok(()),
        other => Err(format!("{other:?}")),
    });
    // Longer than ttl: without failsafe the leader would have stepped down.
    let until = Instant::now() + Duration::from_secs(TTL + LOOP_WAIT);
    while Instant::now() < until {
        assert_eq!(pglb.eligible("rw"), std::slice::from_ref(&leader));
        std::thread::sleep(Duration::from_millis(500));
    }
    let (fresh, session) = writers.failures_since(t0);
    assert_eq!(
        (fresh, session),
        (0, 0),
        "writes failed while etcd was gone in failsafe mode: {:?}",
        writers.errors_since(t0)
    );
    let port = cluster.member(&leader).pg_port;
    assert!(writers.acknowledged().iter().filter(|(at, _, p)| *at > t0 && *p == port).count() > 100);
    cluster.start_etcd();
    wait_until("the lock to be used again", Duration::from_secs(60), || {
        match pglb.status()["patroni"]["state"].as_str() {
            Some("leader_lock") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    writers.stop();
}
