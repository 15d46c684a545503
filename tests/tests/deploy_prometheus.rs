//! deploy/prometheus: promtool accepts the scrape config and the rules, the
//! rules' unit tests pass and cover every alert, every series the rules
//! read is one a running pglb exports, and a real Prometheus scraping pglb
//! evaluates them all without error.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use pglb_cluster::free_port;
use pglb_tests::{http, shared_cluster, wait_until, Pglb, Yaml};

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

/// The PromQL of every `expr:` in a rules file (inline or a block scalar).
fn rule_exprs(text: &str) -> Vec<String> {
    let mut exprs = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(value) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let value = value.trim();
        if !value.starts_with(['>', '|']) {
            exprs.push(value.trim_matches(['"', '\'']).to_owned());
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let mut block = Vec::new();
        while let Some(next) = lines.peek() {
            let deeper = next.len() - next.trim_start().len() > indent;
            if !(deeper || next.trim().is_empty()) {
                break;
            }
            block.push(next.trim());
            lines.next();
        }
        exprs.push(block.join(" "));
    }
    exprs
}

#[test]
fn rules_read_only_series_pglb_exports() {
    let exprs = rule_exprs(&read("pglb-rules.yml"));
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
            // `up` is Prometheus' own series for every scrape target.
            if selector.metric != "up" {
                problems.extend(exported.check(&selector, expr));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    println!("rules read {} series: {used:?}", used.len());
}

/// `prometheus.yml` made to scrape only the given pglb, every second, and
/// evaluate rules every second; the example hosts are removed.
fn scrape_config_for(admin: SocketAddr) -> String {
    let example = read("prometheus.yml");
    let targets = "          - 10.0.0.3:9631   # pglb host A\n          - 10.0.0.4:9631   # pglb host B\n";
    assert!(example.contains(targets), "prometheus.yml targets changed");
    let config = example
        .replace(targets, &format!("          - {admin}\n"))
        .replace("scrape_interval: 15s", "scrape_interval: 1s")
        .replace("scrape_interval: 5s", "scrape_interval: 1s")
        .replace("scrape_timeout: 4s", "scrape_timeout: 1s")
        .replace("evaluation_interval: 15s", "evaluation_interval: 1s");
    // Nothing but this machine's loopback is ever scraped.
    assert!(!config.contains("10.0.0."), "{config}");
    config
}

#[test]
fn rules_evaluate_without_errors_on_prometheus_scraping_pglb() {
    let Some(bin) = which("prometheus") else {
        pglb_tests::skip("the prometheus server is not installed (apt-get install prometheus)");
        return;
    };
    let cluster = shared_cluster();
    let yaml = Yaml::for_cluster(&cluster)
        .listener("rw", "role: primary")
        .listener("ro", "role: replica\n    fallback: primary");
    let pglb = Pglb::start(&yaml);
    let prom = Prometheus::start(&bin, &scrape_config_for(pglb.admin), &[("pglb-rules.yml", read("pglb-rules.yml"))]);
    wait_until("Prometheus to scrape pglb", Duration::from_secs(20), || {
        let result = prom.query(r#"up{job="pglb"} == 1"#)?;
        match result.as_array().map(Vec::len) {
            Some(1) => Ok(()),
            _ => Err(format!("{result}")),
        }
    });
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
/// (The same module is in deploy_grafana.rs.)
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

    #[test]
    fn selectors_skip_functions_keywords_labels_and_strings() {
        let found = selectors(
            r#"histogram_quantile(0.95, sum by (instance, le) (rate(a_bucket{x="y", z!~"w|v"}[5m]))) > 1
               and on (instance) b == 1 unless c{k="}"} offset 5m or up"#,
        );
        let names: Vec<&str> = found.iter().map(|s| s.metric.as_str()).collect();
        assert_eq!(names, ["a_bucket", "b", "c", "up"]);
        assert_eq!(found[0].matchers.len(), 2);
        assert_eq!(found[0].matchers[1], ("z".into(), "!~".into(), "w|v".into()));
        assert_eq!(found[2].matchers[0].2, "}");
    }
}
