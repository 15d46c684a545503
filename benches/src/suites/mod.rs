//! The suites, and what every suite needs first: binaries, fd limits, and
//! the health-check user on a fresh cluster.

mod checks;
mod failover;
mod memory;
mod pressure;
mod results;
mod throughput;

use std::time::Duration;

use anyhow::{Context, Result};
use pglb_cluster::Cluster;

use crate::cli::{Command, Common, USAGE};
use crate::targets::Bins;
use crate::{haproxy, pglb, sys};

pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Help => {
            println!("{USAGE}");
            Ok(())
        }
        Command::Throughput(opts, common) => throughput::run(&opts, &prepare(common)?),
        Command::Failover(opts, common) => failover::run(&opts, &prepare(common)?),
        Command::Checks(opts, common) => checks::run(&opts, &prepare(common)?),
        Command::Pressure(opts, common) => pressure::run(&opts, &pglb::binary(common.build)?),
    }
}

fn prepare(common: Common) -> Result<Bins> {
    let (soft, hard) = sys::raise_nofile().context("cannot raise the open-files limit")?;
    eprintln!("open-files limit: {soft} (hard {hard}); pglb inherits it");
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build of pglb-bench; run it with `cargo run --release`");
    }
    Ok(Bins { haproxy: haproxy::ensure_installed()?, pglb: pglb::binary(common.build)? })
}

/// `CREATE ROLE pglb_check LOGIN` on the primary (node 0), replicated to
/// every replica before this returns.
fn create_check_user(cluster: &Cluster) -> Result<()> {
    let primary = cluster.nodes.first().context("a cluster without nodes")?;
    primary.sql("CREATE ROLE pglb_check LOGIN").context("cannot create the health-check user")?;
    for node in &cluster.nodes[1..] {
        node.wait_for("SELECT count(*) FROM pg_roles WHERE rolname = 'pglb_check'", "1", Duration::from_secs(30))
            .with_context(|| format!("the check user did not reach {}", node.name))?;
    }
    Ok(())
}
