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

/// Runs a COPY of `rows` generated rows (~50 bytes each) out through `via`
/// and through `direct`: the bytes must match. Returns their count.
pub async fn copy_out_matches(via: &tokio_postgres::Client, direct: &tokio_postgres::Client, rows: u64) -> usize {
    let out = format!("COPY (SELECT i, repeat(md5(i::text), 6) FROM generate_series(1, {rows}) i) TO STDOUT");
    let (through, n) = copy_out_digest(via, &out).await;
    let (straight, m) = copy_out_digest(direct, &out).await;
    assert_eq!(n, m, "COPY OUT byte count through the balancer");
    assert_eq!(through, straight, "COPY OUT through the balancer differs from direct");
    n
}

/// Sends `rows` generated rows (~300 bytes each) through `via` with COPY
/// FROM STDIN into a new unlogged `table`, reads them back through `direct`:
/// byte count and SHA-256 must match. Drops the table; returns the bytes.
pub async fn copy_in_round_trip(
    via: &tokio_postgres::Client,
    direct: &tokio_postgres::Client,
    table: &str,
    rows: u32,
) -> usize {
    use futures_util::SinkExt;
    via.batch_execute(&format!("DROP TABLE IF EXISTS {table}; CREATE UNLOGGED TABLE {table} (id int, payload text)"))
        .await
        .expect("create table");
    let sink = via.copy_in::<_, bytes::Bytes>(&format!("COPY {table} FROM STDIN")).await.expect("copy in");
    futures_util::pin_mut!(sink);
    let (mut sent, mut sent_bytes, mut chunk) = (Sha256::new(), 0usize, Vec::with_capacity(1 << 20));
    for id in 0..rows {
        let payload: String = (0..290u32).map(|k| char::from(b'a' + ((id.wrapping_mul(31) + k) % 26) as u8)).collect();
        chunk.extend_from_slice(format!("{id}\t{payload}\n").as_bytes());
        if chunk.len() > (1 << 20) || id + 1 == rows {
            sent.update(&chunk);
            sent_bytes += chunk.len();
            sink.send(bytes::Bytes::from(std::mem::take(&mut chunk))).await.expect("copy data");
        }
    }
    assert_eq!(sink.finish().await.expect("finish copy"), u64::from(rows));
    let (got, bytes) = copy_out_digest(direct, &format!("COPY (SELECT * FROM {table} ORDER BY id) TO STDOUT")).await;
    assert_eq!(bytes, sent_bytes, "COPY IN byte count");
    assert_eq!(got, sent.finalize().to_vec(), "COPY IN through the balancer changed the data");
    direct.batch_execute(&format!("DROP TABLE {table}")).await.expect("drop");
    sent_bytes
}
