//! Prometheus for the deploy kit's tests: a server on a loopback port, and a
//! small reader of the metric names a PromQL expression selects.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use pglb_cluster::free_port;

use crate::{http, wait_until};

pub use pglb_testkit::which;

/// The deploy kit's `prometheus.yml`, made to scrape only the pglb at
/// `admin` and to evaluate rules every second (the example hosts removed:
/// nothing but this machine's loopback is ever scraped).
pub fn deploy_scrape_config(admin: SocketAddr) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/prometheus/prometheus.yml");
    let example = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    let targets = "          - 10.0.0.3:9631   # pglb host A\n          - 10.0.0.4:9631   # pglb host B\n";
    assert!(example.contains(targets), "prometheus.yml targets changed");
    let config = example
        .replace(targets, &format!("          - {admin}\n"))
        .replace("scrape_interval: 15s", "scrape_interval: 1s")
        .replace("scrape_interval: 5s", "scrape_interval: 1s")
        .replace("scrape_timeout: 4s", "scrape_timeout: 1s")
        .replace("evaluation_interval: 15s", "evaluation_interval: 1s");
    assert!(!config.contains("10.0.0."), "{config}");
    config
}

/// A pglb (rw and ro listeners) on the binary's shared cluster, and the
/// Prometheus server `bin` scraping it with the deploy kit's config and
/// `files` (e.g. the rules) beside it, once it has scraped pglb.
pub fn scraping_pglb(bin: &Path, files: &[(&str, String)]) -> (crate::SharedCluster, crate::Pglb, Prometheus) {
    let cluster = crate::shared_cluster();
    let yaml = crate::Yaml::for_cluster(&cluster)
        .listener("rw", "role: primary")
        .listener("ro", "role: replica\n    fallback: primary");
    let pglb = crate::Pglb::start(&yaml);
    let prom = Prometheus::start(bin, &deploy_scrape_config(pglb.admin), files);
    wait_until("Prometheus to scrape pglb", std::time::Duration::from_secs(20), || {
        let result = prom.query(r#"up{job="pglb"} == 1"#)?;
        match result.as_array().map(Vec::len) {
            Some(1) => Ok(()),
            _ => Err(format!("{result}")),
        }
    });
    (cluster, pglb, prom)
}

/// A Prometheus server on a loopback port with its own temp dir; killed
/// and removed on drop (its log printed if the test failed).
pub struct Prometheus {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Prometheus {
    /// Writes `config` and `files` to a temp dir and starts the server on it.
    pub fn start(bin: &Path, config: &str, files: &[(&str, String)]) -> Self {
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

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// `data` of a successful API answer.
    pub fn api(&self, path: &str) -> Result<serde_json::Value, String> {
        let (code, body) = http::get(self.addr, path)?;
        let json: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("{code} {e}: {body}"))?;
        match json["status"].as_str() {
            Some("success") => Ok(json["data"].clone()),
            _ => Err(format!("{path}: {code} {body}")),
        }
    }

    /// The result of an instant query.
    pub fn query(&self, promql: &str) -> Result<serde_json::Value, String> {
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

pub fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A small PromQL reader: enough to find the series a query selects.
/// (The same module is in deploy_prometheus.rs.)
pub mod promql {
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

    pub fn skip_string(c: &[char], open: usize) -> usize {
        let quote = c[open];
        let mut i = open + 1;
        while i < c.len() && c[i] != quote {
            i += if c[i] == '\\' && quote != '`' { 2 } else { 1 };
        }
        i + 1
    }

    pub fn skip_past(c: &[char], from: usize, close: char) -> usize {
        let mut i = from;
        while i < c.len() && c[i] != close {
            i += 1;
        }
        i + 1
    }

    /// Parses `{a="x", b!~"y"}` starting at `{`; returns the matchers and
    /// the index after `}`.
    pub fn matchers(c: &[char], open: usize) -> (Vec<(String, String, String)>, usize) {
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

/// The PromQL of every `expr:` in a rules file (inline or a block scalar).
pub fn rule_exprs(text: &str) -> Vec<String> {
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
