//! Health-check metrics: how long checks take and why they fail.

/// Registers help text for the health-check metrics.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_histogram, Unit};
    describe_histogram!(
        "pglb_health_check_duration_seconds",
        Unit::Seconds,
        "Time of one health check: connect (if needed), login and query."
    );
    describe_counter!(
        "pglb_health_check_failures_total",
        "Health checks that failed, per backend and class (refused, reset, timeout, auth, tls...)."
    );
}
