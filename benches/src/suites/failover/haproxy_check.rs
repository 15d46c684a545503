//! HAProxy configured the way operators do without Patroni: an external
//! check that asks each server `pg_is_in_recovery()` with psql.

use pglb_cluster::Node;

use crate::haproxy;

/// The external check HAProxy runs per server (`$3` address, `$4` port):
/// healthy only while the server is a primary.
const CHECK_SCRIPT: &str = "#!/bin/sh
r=$(PGCONNECT_TIMEOUT=2 psql -X -At -h \"$3\" -p \"$4\" -U pglb_check -d postgres \\
    -c 'SELECT pg_is_in_recovery()' 2>/dev/null)
[ \"$r\" = f ]
";

/// A `listen rw` over `nodes`, each checked every second, fall 2, rise 2.
pub fn config(port: u16, nodes: &[Node]) -> haproxy::Config {
    let mut lines = vec![
        "option external-check".to_owned(),
        "external-check path \"/usr/bin:/bin\"".into(),
        "external-check command {dir}/pg-is-primary.sh".into(),
        "default-server inter 1s fall 2 rise 2 on-marked-down shutdown-sessions".into(),
    ];
    lines.extend(nodes.iter().map(|n| format!("server {} {} check", n.name, n.address())));
    haproxy::Config {
        maxconn: 1000,
        global: vec!["insecure-fork-wanted".into(), "external-check".into()],
        defaults: vec!["timeout check 1s".into()],
        listens: vec![haproxy::Listen { name: "rw", port, lines }],
        scripts: vec![("pg-is-primary.sh", CHECK_SCRIPT.to_owned())],
    }
}
