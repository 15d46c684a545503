//! deploy/grafana: the dashboard is valid JSON that Grafana can import, is
//! laid out without overlaps, filters every query by the `instance`
//! variable, its PromQL parses, every series it reads is one a running pglb
//! exports, and on a real Prometheus scraping pglb every query runs and the
//! topology panels show the cluster's roles.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use pglb_cluster::free_port;
use pglb_tests::{http, shared_cluster, wait_until, Pglb, Yaml};
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
            used.insert(s.metric);
        }
    }
    for topic in [
        "pglb_backend_role",
        "pglb_backend_up",
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
        .replace("$instance", ".+");
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
    let cluster = shared_cluster();
    let yaml = Yaml::for_cluster(&cluster)
        .listener("rw", "role: primary")
        .listener("ro", "role: replica\n    fallback: primary");
    let pglb = Pglb::start(&yaml);
    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: pglb\n    \
         static_configs:\n      - targets: ['{}']\n",
        pglb.admin
    );
    let prom = Prometheus::start(&bin, &config, &[]);
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
    for (title, want) in [("Role per backend", ["2", "1", "1"]), ("Health per backend", ["1", "1", "1"])] {
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

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).chain([PathBuf::from("/usr/bin")]).map(|dir| dir.join(program)).find(|p| p.is_file())
}

/// A Prometheus server on a loopback port with its own temp dir; killed
/// and removed on drop (its log printed if the test failed).
struct Prometheus {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Prometheus {
    /// Writes `config` and `files` to a temp dir and starts the server on it.
    fn start(bin: &Path, config: &str, files: &[(&str, String)]) -> Self {
        let port = free_port().expect("port");
        let dir = std::env::temp_dir().join(format!("pglb-prom-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("prometheus.yml"), config).expect("write config");
        for (name, text) in files {
            std::fs::write(dir.join(name), text).expect("write file");
        }
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = Command::new(bin)
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            // API times in UTC ("...Z"), which rfc3339_seconds reads.
            .env("TZ", "UTC")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn prometheus");
        let mut prom = Self { child, dir, addr };
        wait_until("Prometheus to be ready", Duration::from_secs(20), || {
            if let Ok(Some(status)) = prom.child.try_wait() {
                panic!("prometheus exited with {status}:\n{}", prom.log());
            }
            match http::get(prom.addr, "/-/ready") {
                Ok((200, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        });
        prom
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// `data` of a successful API answer.
    fn api(&self, path: &str) -> Result<serde_json::Value, String> {
        let (code, body) = http::get(self.addr, path)?;
        let json: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("{code} {e}: {body}"))?;
        match json["status"].as_str() {
            Some("success") => Ok(json["data"].clone()),
            _ => Err(format!("{path}: {code} {body}")),
        }
    }

    /// The result of an instant query.
    fn query(&self, promql: &str) -> Result<serde_json::Value, String> {
        Ok(self.api(&format!("/api/v1/query?query={}", url_encode(promql)))?["result"].clone())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- prometheus log ---\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A small PromQL reader: enough to find the series a query selects.
/// (The same module is in deploy_prometheus.rs.)
mod promql {
    use std::collections::{BTreeMap, BTreeSet};

    /// `metric{label op "value", ...}` as written in a query.
    #[derive(Debug, Clone)]
    pub struct Selector {
        pub metric: String,
        /// (label, operator, value)
        pub matchers: Vec<(String, String, String)>,
    }

    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "inf",
        "nan",
        // Aggregations, which may be followed by `by (...)` before `(`.
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    /// Keywords followed by a list of label names in parentheses.
    const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

    /// Every metric selector in `expr`.
    pub fn selectors(expr: &str) -> Vec<Selector> {
        let c: Vec<char> = expr.chars().collect();
        let mut out = Vec::new();
        let mut i = 0;
        while i < c.len() {
            match c[i] {
                '"' | '\'' | '`' => i = skip_string(&c, i),
                '[' => i = skip_past(&c, i, ']'),
                '{' => {
                    // A selector without a name, e.g. {__name__="x"}.
                    let (_, end) = matchers(&c, i);
                    i = end;
                }
                ch if ch.is_ascii_digit() || ch == '.' => {
                    while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '.') {
                        i += 1;
                    }
                }
                ch if ch.is_ascii_alphabetic() || ch == '_' || ch == ':' => {
                    let start = i;
                    while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_' || c[i] == ':') {
                        i += 1;
                    }
                    let word: String = c[start..i].iter().collect();
                    let mut j = i;
                    while j < c.len() && c[j].is_whitespace() {
                        j += 1;
                    }
                    let next = c.get(j).copied();
                    if LABEL_LISTS.contains(&word.as_str()) && next == Some('(') {
                        i = skip_past(&c, j, ')');
                    } else if next == Some('(') || KEYWORDS.contains(&word.as_str()) {
                        // A function call or an operator keyword.
                    } else if next == Some('{') {
                        let (m, end) = matchers(&c, j);
                        out.push(Selector { metric: word, matchers: m });
                        i = end;
                    } else {
                        out.push(Selector { metric: word, matchers: Vec::new() });
                    }
                }
                _ => i += 1,
            }
        }
        out
    }

    fn skip_string(c: &[char], open: usize) -> usize {
        let quote = c[open];
        let mut i = open + 1;
        while i < c.len() && c[i] != quote {
            i += if c[i] == '\\' && quote != '`' { 2 } else { 1 };
        }
        i + 1
    }

    fn skip_past(c: &[char], from: usize, close: char) -> usize {
        let mut i = from;
        while i < c.len() && c[i] != close {
            i += 1;
        }
        i + 1
    }

    /// Parses `{a="x", b!~"y"}` starting at `{`; returns the matchers and
    /// the index after `}`.
    fn matchers(c: &[char], open: usize) -> (Vec<(String, String, String)>, usize) {
        let mut out = Vec::new();
        let mut i = open + 1;
        loop {
            while i < c.len() && (c[i].is_whitespace() || c[i] == ',') {
                i += 1;
            }
            if i >= c.len() || c[i] == '}' {
                return (out, i + 1);
            }
            let start = i;
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            let label: String = c[start..i].iter().collect();
            while i < c.len() && c[i].is_whitespace() {
                i += 1;
            }
            let op_start = i;
            while i < c.len() && "=!~".contains(c[i]) {
                i += 1;
            }
            let op: String = c[op_start..i].iter().collect();
            while i < c.len() && c[i].is_whitespace() {
                i += 1;
            }
            let end = skip_string(c, i);
            let value: String = c[i + 1..end - 1].iter().collect();
            out.push((label, op, value));
            i = end;
        }
    }

    /// The series of one /metrics scrape: name → label sets.
    pub struct Exported(BTreeMap<String, Vec<BTreeMap<String, String>>>);

    impl Exported {
        pub fn parse(text: &str) -> Self {
            let mut series: BTreeMap<String, Vec<BTreeMap<String, String>>> = BTreeMap::new();
            for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
                let name_end = line.find(['{', ' ']).unwrap_or(line.len());
                let name = line[..name_end].to_owned();
                let mut labels = BTreeMap::new();
                if line[name_end..].starts_with('{') {
                    let c: Vec<char> = line[name_end..].chars().collect();
                    for (k, _, v) in matchers(&c, 0).0 {
                        labels.insert(k, v);
                    }
                }
                series.entry(name).or_default().push(labels);
            }
            Self(series)
        }

        /// Problems with `selector`: an unknown metric, a label it does not
        /// have, or an `=` value none of its series has. `instance` and
        /// `job` are added by Prometheus at scrape time.
        pub fn check(&self, selector: &Selector, expr: &str) -> Vec<String> {
            let Some(series) = self.0.get(&selector.metric) else {
                return vec![format!("`{}` is not exported by pglb (in `{expr}`)", selector.metric)];
            };
            let mut problems = Vec::new();
            for (label, op, value) in &selector.matchers {
                if label == "instance" || label == "job" {
                    continue;
                }
                let values: BTreeSet<&String> = series.iter().filter_map(|s| s.get(label)).collect();
                if values.is_empty() {
                    problems.push(format!("`{}` has no label `{label}` (in `{expr}`)", selector.metric));
                } else if op == "=" && !values.contains(value) {
                    problems.push(format!(
                        "`{}` has no series with {label}=\"{value}\", only {values:?} (in `{expr}`)",
                        selector.metric
                    ));
                }
            }
            problems
        }
    }
}
