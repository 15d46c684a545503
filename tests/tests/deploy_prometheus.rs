//! deploy/prometheus: promtool accepts the scrape config and the rules, the
//! rules' unit tests pass and cover every alert, every series the rules
//! read is one a running pglb exports, and a real Prometheus scraping pglb
//! evaluates them all without error.

use std::collections::BTreeSet;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pglb_tests::{shared_cluster, wait_until, Pglb, Yaml};

fn prometheus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus")
}

fn read(name: &str) -> String {
    let path = prometheus_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn promtool() -> Option<PathBuf> {
    which("promtool")
}

#[test]
fn promtool_accepts_the_config_and_the_rules_pass_their_tests() {
    let Some(promtool) = promtool() else {
        pglb_tests::skip("promtool not found (apt-get install prometheus)");
        return;
    };
    for args in [
        &["check", "config", "prometheus.yml"][..],
        &["check", "rules", "pglb-rules.yml"],
        &["test", "rules", "pglb-rules.test.yml"],
    ] {
        let out = Command::new(&promtool).args(args).current_dir(prometheus_dir()).output().expect("run promtool");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "promtool {args:?}:\n{text}");
        assert!(text.contains("SUCCESS"), "promtool {args:?}:\n{text}");
    }
}

/// Values of `key: value` lines (outside block scalars), unquoted.
fn yaml_scalars(text: &str, key: &str) -> Vec<String> {
    let prefix = format!("{key}:");
    text.lines()
        .filter_map(|l| {
            let l = l.trim_start().trim_start_matches("- ");
            l.strip_prefix(&prefix)
        })
        .map(|v| v.trim().trim_matches(['"', '\'']).to_owned())
        .collect()
}

#[test]
fn every_alert_has_a_unit_test_in_which_it_fires() {
    let rules: BTreeSet<String> = yaml_scalars(&read("pglb-rules.yml"), "alert").into_iter().collect();
    assert!(rules.len() >= 10, "{rules:?}");
    // An alertname followed by a non-empty exp_alerts list.
    let tests = read("pglb-rules.test.yml");
    let mut firing = BTreeSet::new();
    let mut current = None;
    for line in tests.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("alertname:") {
            current = Some(name.trim().to_owned());
        } else if line.starts_with("- exp_labels:") {
            firing.extend(current.clone());
        }
    }
    let untested: Vec<_> = rules.difference(&firing).collect();
    assert!(untested.is_empty(), "alerts never seen firing: {untested:?}");
    let unknown: Vec<_> = firing.difference(&rules).collect();
    assert!(unknown.is_empty(), "tests of alerts that do not exist: {unknown:?}");
}

#[test]
fn rules_read_only_series_pglb_exports() {
    let exprs = pglb_tests::prom::rule_exprs(&read("pglb-rules.yml"));
    assert!(exprs.len() >= 10, "{exprs:?}");
    let cluster = shared_cluster();
    let yaml = Yaml::for_cluster(&cluster)
        .listener("rw", "role: primary")
        .listener("ro", "role: replica\n    fallback: primary");
    let pglb = Pglb::start(&yaml);
    // Right away: every series is registered at start-up, before any event.
    let exported = promql::Exported::parse(&pglb.metrics());
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for expr in &exprs {
        for selector in promql::selectors(expr) {
            used.insert(selector.metric.clone());
            // `up` is Prometheus' own series for every scrape target; the
            // `pglb_patroni_*` ones exist for clusters read from Patroni
            // (checked in tests/tests/patroni.rs, against real Patroni), the
            // `pglb_shared_state_*` ones with `shared_state:` (fleet.rs).
            let conditional = ["pglb_patroni_", "pglb_shared_state_"];
            if selector.metric != "up" && !conditional.iter().any(|p| selector.metric.starts_with(p)) {
                problems.extend(exported.check(&selector, expr));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    println!("rules read {} series: {used:?}", used.len());
}

#[test]
fn rules_evaluate_without_errors_on_prometheus_scraping_pglb() {
    let Some(bin) = which("prometheus") else {
        pglb_tests::skip("the prometheus server is not installed (apt-get install prometheus)");
        return;
    };
    let (_cluster, _pglb, prom) = scraping_pglb(&bin, &[("pglb-rules.yml", read("pglb-rules.yml"))]);
    // Every rule evaluated at least once since, and none failed (a vector
    // matching error, say, only shows on real series).
    let scraped = std::time::SystemTime::now();
    let rules = wait_until("every rule to be evaluated", Duration::from_secs(20), || {
        let groups = prom.api("/api/v1/rules")?["groups"].clone();
        let rules: Vec<serde_json::Value> = groups
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let fresh = |r: &serde_json::Value| {
            r["lastEvaluation"].as_str().and_then(rfc3339_seconds).is_some_and(|t| t > seconds_since_epoch(scraped))
        };
        match rules.iter().all(fresh) && !rules.is_empty() {
            true => Ok(rules),
            false => Err(format!("not all evaluated yet: {rules:?}")),
        }
    });
    let mut problems = Vec::new();
    for rule in &rules {
        if rule["health"] != "ok" {
            problems.push(format!("{}: {}", rule["name"], rule["lastError"]));
        }
        // A healthy cluster seen for seconds: nothing may fire.
        if rule["state"] == "firing" {
            problems.push(format!("{} fires on a healthy cluster: {}", rule["name"], rule["alerts"]));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    println!("{} rules evaluated cleanly", rules.len());
}

fn seconds_since_epoch(t: std::time::SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Seconds since the epoch of an RFC 3339 UTC time such as
/// `2026-11-25T23:49:21.123456789Z` (Prometheus' API format).
fn rfc3339_seconds(text: &str) -> Option<f64> {
    let (date, time) = text.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, min) = (t.next()?.parse::<i64>().ok()?, t.next()?.parse::<i64>().ok()?);
    let sec: f64 = t.next()?.parse().ok()?;
    // Days from civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3_600 + min * 60) as f64 + sec)
}

use pglb_tests::prom::{promql, scraping_pglb, which};
