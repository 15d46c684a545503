//! One watch of the prefix, as a stream of messages for the agent. The
//! gateway streams one JSON object per watch response; they may be split
//! or joined across HTTP chunks.

use std::sync::Arc;

use http_body_util::BodyExt;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::gateway::{kvs, number, revision, Gateway, Kv};

/// What the watch says.
#[derive(Debug)]
pub enum Heard {
    /// Keys put (deletions are not changes pglb makes; they are ignored).
    Changes(Vec<Kv>),
    /// The watch is up, or a progress notification: nothing changed up to
    /// this revision.
    Progress(i64),
    /// The watch ended: why, and the compaction revision if it was
    /// compacted past where it started.
    Ended { why: String, compacted: Option<i64> },
}

/// Watches `prefix` from revision `start` until the stream ends; every
/// message goes to `to`, the last being [`Heard::Ended`].
pub async fn run(gateway: Arc<Gateway>, prefix: String, start: i64, to: mpsc::Sender<Heard>) {
    let ended = match gateway.watch(&prefix, start).await {
        Ok(reply) => follow(reply.into_body(), &to).await,
        Err(e) => Heard::Ended { why: e.to_string(), compacted: None },
    };
    let _ = to.send(ended).await;
}

async fn follow(mut body: hyper::body::Incoming, to: &mpsc::Sender<Heard>) -> Heard {
    let mut buffer: Vec<u8> = Vec::new();
    loop {
        let frame = match body.frame().await {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return Heard::Ended { why: format!("the watch stream broke: {e}"), compacted: None },
            None => return Heard::Ended { why: "the watch stream ended".into(), compacted: None },
        };
        let Ok(data) = frame.into_data() else { continue };
        buffer.extend_from_slice(&data);
        if buffer.len() > 64 << 20 {
            return Heard::Ended { why: "a watch message over 64 MiB".into(), compacted: None };
        }
        let (messages, used) = split(&buffer);
        buffer.drain(..used);
        for message in messages {
            let heard = understand(&message);
            let last = matches!(heard, Heard::Ended { .. });
            if last {
                return heard;
            }
            if to.send(heard).await.is_err() {
                return Heard::Ended { why: "the agent stopped".into(), compacted: None };
            }
        }
    }
}

/// The whole JSON values at the start of `buffer`, and how many bytes they
/// took; a value cut off at the end waits for more.
fn split(buffer: &[u8]) -> (Vec<Value>, usize) {
    let mut stream = serde_json::Deserializer::from_slice(buffer).into_iter::<Value>();
    let mut values = Vec::new();
    let mut used = 0;
    loop {
        match stream.next() {
            Some(Ok(value)) => {
                values.push(value);
                used = stream.byte_offset();
            }
            Some(Err(e)) if e.is_eof() => break,
            // Garbage: skip it all (the agent re-reads the store anyway).
            Some(Err(_)) => {
                used = buffer.len();
                break;
            }
            None => {
                used = buffer.len();
                break;
            }
        }
    }
    (values, used)
}

fn understand(message: &Value) -> Heard {
    if let Some(error) = message.get("error") {
        let why = error["message"].as_str().or(error.as_str()).unwrap_or("an error").to_owned();
        return Heard::Ended { why: format!("etcd ended the watch: {why}"), compacted: None };
    }
    let result = &message["result"];
    let compacted = number(&result["compact_revision"]);
    if result["canceled"].as_bool().unwrap_or(false) || compacted > 0 {
        let why = result["cancel_reason"].as_str().unwrap_or("canceled by etcd").to_owned();
        return Heard::Ended { why, compacted: (compacted > 0).then_some(compacted) };
    }
    let events = result["events"].as_array().map(Vec::as_slice).unwrap_or_default();
    // PUT is proto3's default and left out; DELETE is named.
    let puts: Vec<Value> =
        events.iter().filter(|e| e["type"].as_str() != Some("DELETE")).map(|e| e["kv"].clone()).collect();
    if puts.is_empty() {
        return Heard::Progress(revision(result));
    }
    Heard::Changes(kvs(&Value::Array(puts)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_split_across_chunks_are_read_whole() {
        let one = br#"{"result":{"header":{"revision":"5"},"created":true}}"#;
        let two = br#"{"result":{"header":{"revision":"6"},"events":[{"kv":{"key":"L3BnbGIvMS90aW1lbGluZQ==","value":"e30=","mod_revision":"6"}}]}}"#;
        let mut all = one.to_vec();
        all.extend_from_slice(b"\n");
        all.extend_from_slice(&two[..20]);
        let (values, used) = split(&all);
        assert_eq!(values.len(), 1);
        assert!(matches!(understand(&values[0]), Heard::Progress(5)));
        let mut rest = all[used..].to_vec();
        rest.extend_from_slice(&two[20..]);
        let (values, used) = split(&rest);
        assert_eq!((values.len(), used), (1, rest.len()));
        match understand(&values[0]) {
            Heard::Changes(kvs) => assert_eq!((kvs[0].key.as_str(), kvs[0].mod_revision), ("/pglb/1/timeline", 6)),
            other => panic!("{other:?}"),
        }
        let compacted = serde_json::json!({"result": {"canceled": true, "compact_revision": "40"}});
        assert!(matches!(understand(&compacted), Heard::Ended { compacted: Some(40), .. }));
        let no_leader = serde_json::json!({"error": {"grpc_code": 14, "message": "etcdserver: no leader"}});
        assert!(matches!(understand(&no_leader), Heard::Ended { compacted: None, .. }));
    }
}
