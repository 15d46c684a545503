//! The two balancers' configs for N backend entries over the three servers:
//! pglb with N/3 clusters (each holding every server once, as pglb allows
//! an address once per cluster), HAProxy with one `listen` of N servers.

use pglb_cluster::Node;

use crate::haproxy;
use crate::pglb::HEALTH;

/// The `listen` section's name.
pub const PROXY: &str = "checks";

/// An lb.yaml with `ports.len()` clusters `c1..`, each with one listener
/// `rw` (role primary) on its port and every node as a backend; health as
/// in the other suites (interval 1s), set once at the top level.
pub fn pglb_yaml(admin: u16, nodes: &[Node], ports: &[u16]) -> String {
    let mut out = format!("admin:\n  listen: 127.0.0.1:{admin}\nhealth:\n  {HEALTH}\nclusters:\n");
    for (c, port) in ports.iter().enumerate() {
        out += &format!(
            "  - name: c{}\n    listeners:\n      - {{name: rw, listen: 127.0.0.1:{port}, role: primary}}\n    backends:\n",
            c + 1
        );
        for node in nodes {
            out += &format!("      - {{name: {}, address: {}}}\n", node.name, node.address());
        }
    }
    out
}

/// One TCP `listen` with `n` servers `s0..` taking the nodes in turn, each
/// checked every second with `option pgsql-check` as user pglb_check:
/// HAProxy opens a new connection per check, sends a startup message and
/// closes once the server answers the authentication step.
pub fn haproxy_config(port: u16, nodes: &[Node], n: usize) -> haproxy::Config {
    let mut lines = vec!["balance roundrobin".to_owned(), "option pgsql-check user pglb_check".into()];
    lines.extend(
        nodes
            .iter()
            .cycle()
            .take(n)
            .enumerate()
            .map(|(i, node)| format!("server s{i} {} check inter 1s", node.address())),
    );
    haproxy::Config {
        maxconn: 100,
        global: Vec::new(),
        defaults: vec!["timeout check 1s".into()],
        listens: vec![haproxy::Listen { name: PROXY, port, lines }],
        scripts: Vec::new(),
    }
}
