//! Logging and the metrics recorder.

use std::io::IsTerminal;

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use pglb_config::LogFormat;
use tracing_subscriber::EnvFilter;

/// Logs to stderr as text or JSON lines; `RUST_LOG` overrides the default
/// `info` level. Colour only when stderr is a terminal (and `NO_COLOR` is
/// unset): a log file or a pipe gets plain text.
/// Every line carries the process id (`pid=` after the time; `"pid"` in
/// JSON): during an upgrade the old and the new process write to one log.
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(colour);
    let _ = match format {
        LogFormat::Text => builder.with_timer(TimeAndPid).with_writer(std::io::stderr).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_writer(|| JsonWithPid).try_init(),
    };
}

/// The default UTC time, then `pid=N`.
struct TimeAndPid;

impl tracing_subscriber::fmt::time::FormatTime for TimeAndPid {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        tracing_subscriber::fmt::time::SystemTime.format_time(w)?;
        write!(w, " pid={}", std::process::id())
    }
}

/// stderr, with `"pid":N` first in every JSON object (the formatter writes
/// each event whole, in one call).
struct JsonWithPid;

impl std::io::Write for JsonWithPid {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let mut err = std::io::stderr().lock();
        match buf.strip_prefix(b"{") {
            Some(rest) => {
                write!(err, "{{\"pid\":{},", std::process::id())?;
                err.write_all(rest)
            }
            None => err.write_all(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Installs the Prometheus recorder and describes every metric.
pub fn init_metrics() -> anyhow::Result<PrometheusHandle> {
    let buckets = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
        .context("cannot configure histogram buckets")?
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    pglb_control::describe_metrics();
    pglb_health::describe_metrics();
    pglb_patroni::describe_metrics();
    pglb_proxy::describe_metrics();
    pglb_store::describe_metrics();
    pglb_admin::policy::describe();
    metrics::describe_counter!(
        "pglb_config_reloads_total",
        "Config reloads on SIGHUP, by result (success, failure); the start is not counted."
    );
    metrics::describe_gauge!(
        "pglb_config_last_reload_success_timestamp_seconds",
        metrics::Unit::Seconds,
        "Unix time of the last successful config load."
    );
    Ok(handle)
}
