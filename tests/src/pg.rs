//! A real client library (tokio-postgres) for tests that need more than psql.

use futures_util::StreamExt;
use sha2::{Digest, Sha256};

/// Connects as `postgres` to 127.0.0.1:`port` without TLS; the connection
/// runs on the current runtime.
pub async fn connect(port: u16) -> tokio_postgres::Client {
    let conn = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=disable");
    let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

/// SHA-256 and byte count of everything a `COPY ... TO STDOUT` returns.
pub async fn copy_out_digest(client: &tokio_postgres::Client, sql: &str) -> (Vec<u8>, usize) {
    let stream = client.copy_out(sql).await.expect("copy out");
    futures_util::pin_mut!(stream);
    let (mut hash, mut bytes) = (Sha256::new(), 0);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("copy out chunk");
        bytes += chunk.len();
        hash.update(&chunk);
    }
    (hash.finalize().to_vec(), bytes)
}
