//! One request to a Patroni REST API (or etcd's JSON gateway), over TCP
//! or TLS (with a client certificate for `restapi.verify_client`), bounded
//! in time and size.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::HOST;
use hyper::Request;
use hyper_util::rt::TokioIo;
use pglb_config::{PatroniConfig, PatroniUrl};
use rustls::crypto::ring;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// An answer larger than this is not Patroni's.
const MAX_BODY: usize = 4 << 20;

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answered: connection refused, timed out, reset before a reply.
    #[error("{url}: {detail}")]
    Unreachable { url: String, detail: String },
    /// Something answered, but not with what was asked.
    #[error("{url}{path}: {detail}")]
    Answer { url: String, path: String, detail: String },
    #[error("cannot set up TLS for Patroni's REST API: {0}")]
    Setup(String),
}

impl ClientError {
    pub fn unreachable(&self) -> bool {
        matches!(self, Self::Unreachable { .. })
    }
}

/// Reads Patroni's REST API with one cluster's settings; also the HTTP
/// client of etcd's JSON gateway (`pglb-store`), which needs the same:
/// TCP or TLS with a client certificate, bounded in time and size.
#[derive(Clone)]
pub struct Client {
    tls: Option<TlsConnector>,
    timeout: Duration,
}

impl Client {
    pub fn new(config: &PatroniConfig) -> Result<Self, ClientError> {
        Self::with(config.cafile.as_deref(), config.certfile.as_deref(), config.keyfile.as_deref(), config.timeout)
    }

    /// A client verifying `https` servers against `cafile`, presenting
    /// `certfile`/`keyfile` when given; `timeout` per request.
    pub fn with(
        cafile: Option<&std::path::Path>,
        certfile: Option<&std::path::Path>,
        keyfile: Option<&std::path::Path>,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let tls = match cafile {
            Some(cafile) => Some(connector(cafile, certfile, keyfile)?),
            None => None,
        };
        Ok(Self { tls, timeout })
    }

    /// `GET path` at `url`: the status and the body.
    pub async fn get(&self, url: &PatroniUrl, path: &str) -> Result<(u16, Bytes), ClientError> {
        self.call(url, Request::get(path), Bytes::new()).await
    }

    /// `request` (its method, path and headers) with `body` at `url`, bounded
    /// by the timeout from connect to the last byte: the status and the body.
    pub async fn call(
        &self,
        url: &PatroniUrl,
        request: hyper::http::request::Builder,
        body: Bytes,
    ) -> Result<(u16, Bytes), ClientError> {
        let path = request.uri_ref().map(|u| u.to_string()).unwrap_or_default();
        let exchange = async {
            let reply = self.open(url, request, body).await?;
            let status = reply.status().as_u16();
            let answer = |detail: String| ClientError::Answer { url: url.to_string(), path: path.clone(), detail };
            let body = Limited::new(reply.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| answer(format!("reading the body: {e}")))?
                .to_bytes();
            Ok((status, body))
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(self.late(url)),
        }
    }

    /// Sends `request` with `body` and returns the reply once its head
    /// arrived (within the timeout); the body is the caller's to read, for
    /// as long as it streams.
    pub async fn stream(
        &self,
        url: &PatroniUrl,
        request: hyper::http::request::Builder,
        body: Bytes,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        match tokio::time::timeout(self.timeout, self.open(url, request, body)).await {
            Ok(result) => result,
            Err(_) => Err(self.late(url)),
        }
    }

    fn late(&self, url: &PatroniUrl) -> ClientError {
        ClientError::Unreachable {
            url: url.to_string(),
            detail: format!("no answer within {}", pglb_config::format_duration(self.timeout)),
        }
    }

    async fn open(
        &self,
        url: &PatroniUrl,
        request: hyper::http::request::Builder,
        body: Bytes,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let unreachable = |detail: String| ClientError::Unreachable { url: url.to_string(), detail };
        let stream = TcpStream::connect(url.authority()).await.map_err(|e| unreachable(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        if !url.tls {
            return send(TokioIo::new(stream), url, request, body).await;
        }
        let Some(tls) = &self.tls else {
            return Err(ClientError::Setup(format!("{url} is https but no cafile is set")));
        };
        let name = ServerName::try_from(url.host.clone())
            .map_err(|e| ClientError::Setup(format!("{url}: not a server name: {e}")))?;
        let stream = tls.connect(name, stream).await.map_err(|e| unreachable(format!("TLS: {e}")))?;
        send(TokioIo::new(stream), url, request, body).await
    }
}

async fn send<S>(
    io: TokioIo<S>,
    url: &PatroniUrl,
    request: hyper::http::request::Builder,
    body: Bytes,
) -> Result<hyper::Response<hyper::body::Incoming>, ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let path = request.uri_ref().map(|u| u.to_string()).unwrap_or_default();
    let answer = |detail: String| ClientError::Answer { url: url.to_string(), path: path.clone(), detail };
    let unreachable = |detail: String| ClientError::Unreachable { url: url.to_string(), detail };
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(io).await.map_err(|e| unreachable(e.to_string()))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = request
        .header(HOST, url.authority())
        .header("user-agent", "pglb")
        .body(Full::new(body))
        .map_err(|e| answer(e.to_string()))?;
    // A connection accepted and then closed without a reply is the server
    // failing to serve the request (its handler raised), not silence.
    sender.send_request(request).await.map_err(|e| answer(format!("no reply: {e}")))
}

/// Verifies the API's certificate against `cafile` (name included), and
/// presents `certfile`/`keyfile` when given.
fn connector(
    cafile: &std::path::Path,
    certfile: Option<&std::path::Path>,
    keyfile: Option<&std::path::Path>,
) -> Result<TlsConnector, ClientError> {
    let setup =
        |what: &std::path::Path, e: &dyn std::fmt::Display| ClientError::Setup(format!("{}: {e}", what.display()));
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(cafile).map_err(|e| setup(cafile, &e))?;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.map_err(|e| setup(cafile, &e))?).map_err(|e| setup(cafile, &e))?;
    }
    if roots.is_empty() {
        return Err(setup(cafile, &"holds no certificate"));
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Setup(e.to_string()))?
        .with_root_certificates(roots);
    let config = match (certfile, keyfile) {
        (Some(certfile), Some(keyfile)) => {
            let pem = std::fs::read(certfile).map_err(|e| setup(certfile, &e))?;
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(&pem).collect::<Result<_, _>>().map_err(|e| setup(certfile, &e))?;
            let key = PrivateKeyDer::from_pem_file(keyfile).map_err(|e| setup(keyfile, &e))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| setup(certfile, &e))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(TlsConnector::from(Arc::new(config)))
}

/// The REST API address in a member's `api_url` (`http://host:8008/patroni`).
pub fn api_address(api_url: &str) -> Option<PatroniUrl> {
    let scheme_end = api_url.find("://")? + 3;
    let end = api_url[scheme_end..].find('/').map_or(api_url.len(), |i| scheme_end + i);
    PatroniUrl::parse(&api_url[..end])
}

#[cfg(test)]
mod tests {
    use super::api_address;

    #[test]
    fn a_members_api_url_gives_its_address() {
        let url = api_address("http://10.0.0.1:8008/patroni").expect("parses");
        assert_eq!((url.tls, url.host.as_str(), url.port), (false, "10.0.0.1", 8008));
        let url = api_address("https://[fd00::1]:8443/patroni").expect("parses");
        assert_eq!((url.tls, url.host.as_str(), url.port), (true, "fd00::1", 8443));
        assert!(api_address("10.0.0.1:8008").is_none());
    }
}
