//! etcd's v3 JSON gateway (`/v3/kv/range`, `/v3/kv/txn`, `/v3/watch`,
//! `/v3/auth/authenticate`) over pglb's HTTP client: no gRPC stack, no
//! `protoc`. Endpoints are tried in order from the last one that answered;
//! a member without a leader counts as not answering (reads are
//! linearizable, watches ask for a leader).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hyper::body::Bytes;
use pglb_config::{EtcdConfig, PatroniUrl, SecretSource};
use pglb_patroni::{Client, ClientError};
use serde_json::{json, Value};

/// Why the store gave no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// No endpoint answered (or none had a leader).
    #[error("no etcd endpoint answered: {0}")]
    Unreachable(String),
    /// An endpoint answered with a refusal: authentication, permission.
    #[error("etcd refused: {0}")]
    Refused(String),
    #[error("cannot set up the etcd client: {0}")]
    Setup(String),
}

/// A key and its value as the store holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

/// The outcome of a compare-and-swap write.
#[derive(Debug)]
pub enum Swap {
    /// Written; the store's revision after it.
    Done(i64),
    /// The key's revision was not the expected one: what it holds now.
    Conflict(Option<Kv>),
}

pub struct Gateway {
    client: Client,
    endpoints: Vec<PatroniUrl>,
    current: AtomicUsize,
    user: Option<String>,
    password: Option<SecretSource>,
    /// Per endpoint: etcd's simple tokens are valid on the member that
    /// issued them only.
    tokens: Mutex<Vec<Option<String>>>,
}

/// What one endpoint said.
enum Said {
    Answer(Value),
    /// Try the next endpoint.
    Next(String),
    /// The token expired or is unknown here: authenticate again.
    Reauth,
    Refused(String),
}

impl Gateway {
    pub fn new(config: &EtcdConfig) -> Result<Self, StoreError> {
        let client = Client::with(
            config.cafile.as_deref(),
            config.certfile.as_deref(),
            config.keyfile.as_deref(),
            config.timeout,
        )
        .map_err(|e| StoreError::Setup(e.to_string()))?;
        Ok(Self {
            client,
            endpoints: config.endpoints.clone(),
            current: AtomicUsize::new(0),
            user: config.user.clone(),
            password: config.password.clone(),
            tokens: Mutex::new(vec![None; config.endpoints.len()]),
        })
    }

    /// The endpoint last used.
    pub fn endpoint(&self) -> String {
        let i = self.current.load(Ordering::Relaxed);
        self.endpoints.get(i).map(ToString::to_string).unwrap_or_default()
    }

    /// Every key under `prefix`, read linearizably: the store's revision
    /// and the keys.
    pub async fn range(&self, prefix: &str) -> Result<(i64, Vec<Kv>), StoreError> {
        let body = json!({"key": b64(prefix), "range_end": b64(&prefix_end(prefix))});
        let answer = self.post("/v3/kv/range", &body).await?;
        Ok((revision(&answer), kvs(&answer["kvs"])))
    }

    /// Writes `value` at `key` if its `mod_revision` is still `base` (0:
    /// the key does not exist).
    pub async fn swap(&self, key: &str, value: &[u8], base: i64) -> Result<Swap, StoreError> {
        let body = json!({
            "compare": [{"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": base.to_string()}],
            "success": [{"request_put": {"key": b64(key), "value": B64.encode(value)}}],
            "failure": [{"request_range": {"key": b64(key)}}],
        });
        let answer = self.post("/v3/kv/txn", &body).await?;
        if answer["succeeded"].as_bool().unwrap_or(false) {
            return Ok(Swap::Done(revision(&answer)));
        }
        let current = answer["responses"]
            .as_array()
            .and_then(|r| r.first())
            .map(|r| kvs(&r["response_range"]["kvs"]))
            .and_then(|mut kvs| kvs.pop());
        Ok(Swap::Conflict(current))
    }

    /// Opens a watch of `prefix` from `start` (a revision), with progress
    /// notifications, on a member that has a leader: the streaming reply.
    pub async fn watch(&self, prefix: &str, start: i64) -> Result<hyper::Response<hyper::body::Incoming>, StoreError> {
        let body = json!({"create_request": {
            "key": b64(prefix),
            "range_end": b64(&prefix_end(prefix)),
            "start_revision": start.to_string(),
            "progress_notify": true,
        }});
        let mut last = String::new();
        for i in self.order() {
            let url = &self.endpoints[i];
            let Some(request) = self.request(i, "/v3/watch").await? else { continue };
            match self.client.stream(url, request, Bytes::from(body.to_string())).await {
                Ok(reply) if reply.status().is_success() => {
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(reply);
                }
                Ok(reply) if reply.status().as_u16() == 401 => {
                    self.forget_token(i);
                    last = format!("{url}: {}", reply.status());
                }
                Ok(reply) => last = format!("{url}: {}", reply.status()),
                Err(e) => last = e.to_string(),
            }
        }
        Err(StoreError::Unreachable(last))
    }

    /// Endpoints from the one that last answered.
    fn order(&self) -> Vec<usize> {
        let n = self.endpoints.len();
        let first = self.current.load(Ordering::Relaxed);
        (0..n).map(|k| (first + k) % n).collect()
    }

    /// A POST to `path` at endpoint `i` with the headers every call needs;
    /// `None` if authentication there failed for want of an answer.
    async fn request(&self, i: usize, path: &str) -> Result<Option<hyper::http::request::Builder>, StoreError> {
        let mut request = hyper::Request::post(path)
            .header("content-type", "application/json")
            // etcd's require-leader: a member cut off from its leader ends
            // the watch rather than leaving it silent.
            .header("grpc-metadata-hasleader", "true");
        if self.user.is_some() {
            match self.token(i).await {
                Ok(token) => request = request.header("authorization", token),
                Err(StoreError::Unreachable(_)) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        Ok(Some(request))
    }

    /// POSTs `body` to `path`, endpoint after endpoint.
    async fn post(&self, path: &str, body: &Value) -> Result<Value, StoreError> {
        let mut last = String::new();
        for i in self.order() {
            for _attempt in 0..2 {
                let Some(request) = self.request(i, path).await? else {
                    last = format!("{}: cannot authenticate", self.endpoints[i]);
                    break;
                };
                match self.say(i, request, body).await {
                    Said::Answer(answer) => {
                        self.current.store(i, Ordering::Relaxed);
                        return Ok(answer);
                    }
                    Said::Reauth => {
                        self.forget_token(i);
                        last = format!("{}: authentication expired", self.endpoints[i]);
                    }
                    Said::Next(why) => {
                        last = why;
                        break;
                    }
                    Said::Refused(why) => return Err(StoreError::Refused(why)),
                }
            }
        }
        Err(StoreError::Unreachable(last))
    }

    async fn say(&self, i: usize, request: hyper::http::request::Builder, body: &Value) -> Said {
        let url = &self.endpoints[i];
        let (status, reply) = match self.client.call(url, request, Bytes::from(body.to_string())).await {
            Ok(answer) => answer,
            Err(e @ ClientError::Setup(_)) => return Said::Refused(e.to_string()),
            Err(e) => return Said::Next(e.to_string()),
        };
        let answer: Value = serde_json::from_slice(&reply).unwrap_or(Value::Null);
        if status == 200 {
            return Said::Answer(answer);
        }
        let message = answer["message"].as_str().or(answer["error"].as_str()).unwrap_or("").to_owned();
        let code = answer["code"].as_i64().unwrap_or(-1);
        let why = format!("{url}: HTTP {status}: {message}");
        match code {
            // Unauthenticated, or a token this member does not know.
            16 => Said::Reauth,
            _ if message.contains("invalid auth token") => Said::Reauth,
            // Unavailable, deadline exceeded: no leader, a member stopping.
            14 | 4 => Said::Next(why),
            _ if status >= 500 => Said::Next(why),
            _ => Said::Refused(why),
        }
    }

    fn forget_token(&self, i: usize) {
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens[i] = None;
        }
    }

    /// The token for endpoint `i`, authenticating there if there is none.
    async fn token(&self, i: usize) -> Result<String, StoreError> {
        if let Some(token) = self.tokens.lock().ok().and_then(|t| t[i].clone()) {
            return Ok(token);
        }
        let (Some(user), Some(password)) = (&self.user, &self.password) else {
            return Err(StoreError::Setup("no etcd user".into()));
        };
        let password = password.read().map_err(|e| StoreError::Refused(format!("etcd password: {e}")))?;
        let body = json!({"name": user, "password": password.expose()});
        let request = hyper::Request::post("/v3/auth/authenticate").header("content-type", "application/json");
        let url = &self.endpoints[i];
        let (status, reply) = self
            .client
            .call(url, request, Bytes::from(body.to_string()))
            .await
            .map_err(|e| StoreError::Unreachable(e.to_string()))?;
        let answer: Value = serde_json::from_slice(&reply).unwrap_or(Value::Null);
        match answer["token"].as_str() {
            Some(token) if status == 200 => {
                if let Ok(mut tokens) = self.tokens.lock() {
                    tokens[i] = Some(token.to_owned());
                }
                Ok(token.to_owned())
            }
            _ if status >= 500 => Err(StoreError::Unreachable(format!("{url}: authenticate: HTTP {status}"))),
            _ => Err(StoreError::Refused(format!(
                "{url}: authenticating as `{user}`: HTTP {status}: {} (check shared_state.etcd.user and its password)",
                answer["message"].as_str().or(answer["error"].as_str()).unwrap_or("")
            ))),
        }
    }
}

pub(crate) fn b64(text: &str) -> String {
    B64.encode(text.as_bytes())
}

/// The end of the range of keys starting with `prefix` (the prefix with
/// its last byte plus one).
fn prefix_end(prefix: &str) -> String {
    let mut bytes = prefix.as_bytes().to_vec();
    if let Some(last) = bytes.last_mut() {
        *last += 1;
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A number the gateway may write as a string (int64 in proto3 JSON).
pub(crate) fn number(value: &Value) -> i64 {
    value.as_i64().or_else(|| value.as_str().and_then(|s| s.parse().ok())).unwrap_or(0)
}

pub(crate) fn revision(answer: &Value) -> i64 {
    number(&answer["header"]["revision"])
}

/// The key-values of a `kvs` array (keys and values are base64).
pub(crate) fn kvs(list: &Value) -> Vec<Kv> {
    let decode = |v: &Value| v.as_str().and_then(|s| B64.decode(s).ok()).unwrap_or_default();
    list.as_array()
        .map(|kvs| {
            kvs.iter()
                .map(|kv| Kv {
                    key: String::from_utf8_lossy(&decode(&kv["key"])).into_owned(),
                    value: decode(&kv["value"]),
                    mod_revision: number(&kv["mod_revision"]),
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_where_the_next_one_starts() {
        assert_eq!(prefix_end("/pglb/"), "/pglb0");
        let list = json!([{"key": b64("/pglb/1/timeline"), "value": B64.encode(b"{}"), "mod_revision": "12"}]);
        assert_eq!(kvs(&list), vec![Kv { key: "/pglb/1/timeline".into(), value: b"{}".to_vec(), mod_revision: 12 }]);
        assert_eq!(number(&json!(7)), 7);
        assert_eq!(number(&json!("9007199254740993")), 9_007_199_254_740_993);
    }
}
