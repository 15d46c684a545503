//! deploy/grafana: the dashboard is valid JSON that Grafana can import, is
//! laid out without overlaps, filters every query by the `instance`
//! variable, its PromQL parses, every series it reads is one a running pglb
//! exports, and on a real Prometheus scraping pglb every query runs and the
//! topology panels show the cluster's roles.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use pglb_tests::{shared_cluster, wait_until, Pglb, Yaml};
use serde_json::Value;

fn dashboard() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/pglb.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every panel, rows' nested panels included.
fn panels(dash: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    let mut stack: Vec<&Value> = dash["panels"].as_array().expect("panels").iter().collect();
    while let Some(p) = stack.pop() {
        if let Some(nested) = p["panels"].as_array() {
            stack.extend(nested);
        }
        out.push(p);
    }
    out
}

/// (panel title, expr) of every query.
fn queries(dash: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(dash) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("target without expr");
            out.push((p["title"].as_str().unwrap_or("").to_owned(), expr.to_owned()));
        }
    }
    out
}

fn variable<'a>(dash: &'a Value, name: &str) -> &'a Value {
    dash["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no `{name}` variable"))
}

/// The selector of the `instance` variable's `label_values(SELECTOR, instance)`.
fn instance_variable_selector(dash: &Value) -> String {
    let var = variable(dash, "instance");
    let query = var["query"]["query"].as_str().or(var["query"].as_str()).expect("instance variable query");
    let inner = query
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(", instance)"))
        .unwrap_or_else(|| panic!("`{query}` should be label_values(METRIC, instance)"));
    inner.to_owned()
}

#[test]
fn dashboard_is_importable_and_laid_out() {
    let dash = dashboard();
    assert_eq!(dash["uid"], "pglb");
    assert!(dash["title"].is_string() && dash["schemaVersion"].as_u64() >= Some(30));
    assert!(dash["id"].is_null(), "an exported dashboard carries no database id");

    let ds = variable(&dash, "datasource");
    assert_eq!((&ds["type"], &ds["query"]), (&"datasource".into(), &"prometheus".into()));
    let instance = variable(&dash, "instance");
    assert_eq!(instance["type"], "query");
    assert_eq!(instance["multi"], true, "several pglb instances at once");
    assert_eq!(instance["includeAll"], true);
    let cluster = variable(&dash, "cluster");
    assert_eq!(
        (&cluster["type"], &cluster["multi"], &cluster["includeAll"]),
        (&"query".into(), &true.into(), &true.into())
    );

    let mut ids = BTreeSet::new();
    let mut boxes: Vec<(String, [u64; 4])> = Vec::new();
    for p in panels(&dash) {
        let title = p["title"].as_str().expect("panel title").to_owned();
        assert!(ids.insert(p["id"].as_u64().expect("panel id")), "duplicate id: {title}");
        let g = &p["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| g[k].as_u64().expect("gridPos"));
        assert!(w > 0 && h > 0 && x + w <= 24, "{title}: gridPos {g}");
        for (other, [ox, oy, ow, oh]) in &boxes {
            let apart = x + w <= *ox || *ox + ow <= x || y + h <= *oy || *oy + oh <= y;
            assert!(apart, "`{title}` overlaps `{other}`");
        }
        boxes.push((title.clone(), [x, y, w, h]));
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no query");
        let refs: BTreeSet<&str> = targets.iter().filter_map(|t| t["refId"].as_str()).collect();
        assert_eq!(refs.len(), targets.len(), "{title}: refIds must be unique");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
        }
    }
}

#[test]
fn every_query_is_filtered_by_instance_and_the_topics_are_covered() {
    let dash = dashboard();
    let mut used = BTreeSet::new();
    for (title, expr) in queries(&dash) {
        let selectors = promql::selectors(&expr);
        assert!(!selectors.is_empty(), "{title}: no series in `{expr}`");
        for s in selectors {
            let filtered = s.matchers.iter().any(|(l, op, v)| l == "instance" && op == "=~" && v == "$instance");
            assert!(filtered, "{title}: `{}` lacks instance=~\"$instance\" in `{expr}`", s.metric);
            // Per-cluster series follow the cluster selector (the config's
            // reload series are the process's, not a cluster's).
            let per_process = s.metric.starts_with("pglb_config_");
            let by_cluster = s.matchers.iter().any(|(l, op, v)| l == "cluster" && op == "=~" && v == "$cluster");
            assert!(per_process || by_cluster, "{title}: `{}` lacks cluster=~\"$cluster\" in `{expr}`", s.metric);
            used.insert(s.metric);
        }
    }
    for topic in [
        "pglb_backend_role",
        "pglb_backend_state",
        "pglb_split_brain",
        "pglb_listener_eligible_backends",
        "pglb_connections_active",
        "pglb_bytes_total",
        "pglb_health_check_duration_seconds_bucket",
        "pglb_backend_replication_lag_bytes",
        "pglb_backend_replication_lag_seconds",
        "pglb_config_reloads_total",
        "pglb_clients_held",
        "pglb_clients_queued",
        "pglb_client_wait_seconds_bucket",
    ] {
        assert!(used.contains(topic), "the dashboard shows no `{topic}`");
    }
}

/// The query with Grafana's variables replaced by what they expand to.
fn expand(expr: &str) -> String {
    let out = expr
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
        .replace("$instance", ".+")
        .replace("$cluster", ".+");
    assert!(!out.contains('$'), "unexpected variable in `{expr}`");
    out
}

#[test]
fn every_query_parses_as_promql() {
    let Some(promtool) = which("promtool") else {
        pglb_tests::skip("promtool not found (apt-get install prometheus)");
        return;
    };
    // promtool has no parse command: check the queries as recording rules.
    let dash = dashboard();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in queries(&dash).iter().enumerate() {
        let quoted = serde_json::to_string(&expand(expr)).expect("quote");
        rules += &format!("      - record: dashboard:query_{i}\n        expr: {quoted}\n");
    }
    let file = std::env::temp_dir().join(format!("pglb-dashboard-rules-{}.yml", std::process::id()));
    std::fs::write(&file, rules).expect("write rules");
    let out = Command::new(promtool).args(["check", "rules"]).arg(&file).output().expect("run promtool");
    let _ = std::fs::remove_file(&file);
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn dashboard_reads_only_series_pglb_exports() {
    let dash = dashboard();
    let cluster = shared_cluster();
    let yaml = Yaml::for_cluster(&cluster)
        .listener("rw", "role: primary")
        .listener("ro", "role: replica\n    fallback: primary");
    let pglb = Pglb::start(&yaml);
    // Right away: every series is registered at start-up, before any event.
    let exported = promql::Exported::parse(&pglb.metrics());
    let mut problems = Vec::new();
    let variable = instance_variable_selector(&dash);
    for expr in queries(&dash).into_iter().map(|(_, e)| e).chain([variable]) {
        for selector in promql::selectors(&expr) {
            problems.extend(exported.check(&selector, &expr));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Instant-query results as `(backend, value)`, sorted.
fn by_backend(result: &Value) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = result
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let backend = s["metric"]["backend"].as_str().unwrap_or("?").to_owned();
            (backend, s["value"][1].as_str().unwrap_or("?").to_owned())
        })
        .collect();
    out.sort();
    out
}

#[test]
fn dashboard_queries_evaluate_on_prometheus_scraping_pglb() {
    let Some(bin) = which("prometheus") else {
        pglb_tests::skip("the prometheus server is not installed (apt-get install prometheus)");
        return;
    };
    let dash = dashboard();
    let (_cluster, _pglb, prom) = pglb_tests::prom::scraping_pglb(&bin, &[]);
    // Enough samples for rate() over the 1m that $__rate_interval becomes.
    wait_until("a few scrapes of pglb", Duration::from_secs(20), || {
        let result = prom.query(r#"count_over_time(up{job="pglb"}[1m]) >= 3"#)?;
        match result.as_array().map(Vec::len) {
            Some(1) => Ok(()),
            _ => Err(format!("{result}")),
        }
    });
    // Every query runs (vector matching errors only show on real series).
    for (title, expr) in queries(&dash) {
        if let Err(e) = prom.query(&expand(&expr)) {
            panic!("{title}: `{expr}` fails: {e}");
        }
    }
    // The topology panels show what pglb sees: pg0 primary, pg1/pg2 replicas.
    let panel_query = |title: &str| {
        let (_, expr) =
            queries(&dash).into_iter().find(|(t, _)| t == title).unwrap_or_else(|| panic!("no panel `{title}`"));
        expand(&expr)
    };
    for (title, want) in [("Role per backend", ["2", "1", "1"]), ("State per backend", ["0", "0", "0"])] {
        let expr = panel_query(title);
        let want: Vec<(String, String)> =
            ["pg0", "pg1", "pg2"].iter().zip(want).map(|(b, v)| (b.to_string(), v.to_owned())).collect();
        wait_until(title, Duration::from_secs(20), || {
            let got = by_backend(&prom.query(&expr)?);
            match got == want {
                true => Ok(()),
                false => Err(format!("{got:?}")),
            }
        });
    }
}

use pglb_tests::prom::{promql, which};
