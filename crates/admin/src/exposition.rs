//! `/metrics` without the series of backends and listeners that are gone.
//!
//! The recorder cannot delete a series, so a backend or listener removed
//! by a reload would keep exporting its last values (and an alert on
//! `pglb_backend_up{backend="pg9"} == 0` would fire for a node that no
//! longer exists). The endpoint leaves out every sample whose `backend` or
//! `listener` label names something that is neither in the live config
//! nor holding a session (an `on_ineligible: keep` session may outlive its
//! backend's removal); the series come back if the name does.

use std::collections::HashSet;

/// What may still show in `/metrics`: the configured clusters, and per
/// cluster the backends and listeners configured or holding a session.
#[derive(Debug, Default)]
pub struct Live {
    pub clusters: HashSet<String>,
    pub backends: HashSet<(String, String)>,
    pub listeners: HashSet<(String, String)>,
}

/// `text` (Prometheus exposition) without the samples of clusters,
/// backends and listeners outside `live`. Comment lines stay.
pub fn without_removed(text: &str, live: &Live) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let gone = !line.starts_with('#')
            && label(line, "cluster").is_some_and(|cluster| {
                !live.clusters.contains(&cluster)
                    || label(line, "backend").is_some_and(|b| !live.backends.contains(&(cluster.clone(), b)))
                    || label(line, "listener").is_some_and(|l| !live.listeners.contains(&(cluster.clone(), l)))
            });
        if !gone {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The value of label `name` in a sample line, unescaped.
fn label(line: &str, name: &str) -> Option<String> {
    let labels = &line[line.find('{')? + 1..];
    let mut rest = labels;
    loop {
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()? {
                    (_, 'n') => value.push('\n'),
                    (_, c) => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        if key.trim_start_matches([',', ' ']) == name {
            return Some(value);
        }
        rest = &after[end + 1..];
        if rest.starts_with('}') {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP pglb_backend_up 1 while the backend is in service.
# TYPE pglb_backend_up gauge
pglb_backend_up{cluster=\"a\",backend=\"pg1\"} 1
pglb_backend_up{cluster=\"a\",backend=\"pg9\"} 0
pglb_backend_up{cluster=\"b\",backend=\"pg9\"} 1
pglb_backend_up{cluster=\"gone\",backend=\"pg1\"} 1
pglb_connections_total{cluster=\"a\",listener=\"rw\",backend=\"pg1\"} 4
pglb_connections_total{cluster=\"a\",listener=\"old\",backend=\"pg1\"} 2
pglb_split_brain{cluster=\"a\"} 0
pglb_split_brain{cluster=\"gone\"} 0
pglb_pending_connections 0
pglb_backend_up{cluster=\"a\",backend=\"a\\\"b\"} 1
";

    #[test]
    fn drops_only_samples_of_names_that_are_gone() {
        let pair = |c: &str, n: &str| (c.to_owned(), n.to_owned());
        let live = Live {
            clusters: HashSet::from(["a".to_owned(), "b".to_owned()]),
            backends: HashSet::from([pair("a", "pg1"), pair("a", "a\"b"), pair("b", "pg9")]),
            listeners: HashSet::from([pair("a", "rw")]),
        };
        let out = without_removed(TEXT, &live);
        assert!(out.contains("# TYPE pglb_backend_up gauge"));
        assert!(out.contains("pglb_backend_up{cluster=\"a\",backend=\"pg1\"} 1"));
        assert!(!out.contains("cluster=\"a\",backend=\"pg9\""), "{out}");
        assert!(out.contains("cluster=\"b\",backend=\"pg9\""), "a name is gone per cluster: {out}");
        assert!(!out.contains("gone"), "a removed cluster's series: {out}");
        assert!(out.contains("listener=\"rw\""));
        assert!(!out.contains("listener=\"old\""), "{out}");
        assert!(out.contains("pglb_split_brain{cluster=\"a\"} 0") && out.contains("pglb_pending_connections 0"));
        assert!(out.contains("backend=\"a\\\"b\""), "an escaped quote in a name: {out}");
    }

    #[test]
    fn reads_labels() {
        let line = "m{listener=\"rw\",backend=\"pg1\"} 4";
        assert_eq!(label(line, "backend").as_deref(), Some("pg1"));
        assert_eq!(label(line, "listener").as_deref(), Some("rw"));
        assert_eq!(label(line, "role"), None);
        assert_eq!(label("m 1", "backend"), None);
    }
}
