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

/// `text` (Prometheus exposition) without the samples of backends and
/// listeners outside `backends` / `listeners`. Comment lines stay.
pub fn without_removed(text: &str, backends: &HashSet<&str>, listeners: &HashSet<&str>) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let gone = !line.starts_with('#')
            && (label(line, "backend").is_some_and(|b| !backends.contains(b.as_str()))
                || label(line, "listener").is_some_and(|l| !listeners.contains(l.as_str())));
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
pglb_backend_up{backend=\"pg1\"} 1
pglb_backend_up{backend=\"pg9\"} 0
pglb_connections_total{listener=\"rw\",backend=\"pg1\"} 4
pglb_connections_total{listener=\"old\",backend=\"pg1\"} 2
pglb_split_brain 0
pglb_backend_up{backend=\"a\\\"b\"} 1
";

    #[test]
    fn drops_only_samples_of_names_that_are_gone() {
        let backends = HashSet::from(["pg1", "a\"b"]);
        let listeners = HashSet::from(["rw"]);
        let out = without_removed(TEXT, &backends, &listeners);
        assert!(out.contains("# TYPE pglb_backend_up gauge"));
        assert!(out.contains("pglb_backend_up{backend=\"pg1\"} 1"));
        assert!(!out.contains("pg9"), "{out}");
        assert!(out.contains("listener=\"rw\""));
        assert!(!out.contains("listener=\"old\""), "{out}");
        assert!(out.contains("pglb_split_brain 0"));
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
