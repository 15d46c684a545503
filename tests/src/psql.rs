//! Running psql against pglb or a node, as a user would.

use std::process::Command;

/// Runs `sql` with psql on 127.0.0.1:`port`; `Ok(stdout)` or `Err(stderr)`.
/// `env` adds libpq variables such as `PGSSLMODE`.
pub fn psql(port: u16, sql: &str, env: &[(&str, &str)]) -> Result<String, String> {
    let mut cmd = Command::new("psql");
    cmd.args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-XAtq", "-v", "ON_ERROR_STOP=1"])
        .arg("-p")
        .arg(port.to_string())
        .arg("-c")
        .arg(sql)
        .env("PGCONNECT_TIMEOUT", "10");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().map_err(|e| format!("cannot run psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// `SELECT inet_server_port(), pg_is_in_recovery()` through `port`.
pub fn where_am_i(port: u16) -> Result<(u16, bool), String> {
    let out = psql(port, "SELECT inet_server_port(), pg_is_in_recovery()", &[])?;
    let (p, r) = out.split_once('|').ok_or(format!("unexpected output `{out}`"))?;
    Ok((p.parse().map_err(|_| format!("bad port `{p}`"))?, r == "t"))
}
