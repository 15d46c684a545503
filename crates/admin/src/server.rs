//! The hyper server and its routes.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::CONTENT_TYPE;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use pglb_routing::RoutingTable;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What the admin endpoint reads.
pub struct AdminState {
    pub table: Arc<ArcSwap<RoutingTable>>,
    pub metrics: PrometheusHandle,
    /// Set once shutdown begins: `/health` turns 503.
    pub draining: AtomicBool,
}

/// Serves admin requests on `listener` until `shutdown` fires.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!(error = %err, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            if let Err(err) = conn.await {
                tracing::debug!(error = %err, "admin connection ended with an error");
            }
        });
    }
}

fn route(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => reply(StatusCode::OK, "text/plain; version=0.0.4", state.metrics.render()),
        (&Method::GET, "/health") => {
            if state.draining.load(Ordering::Relaxed) {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "shutting down\n".into())
            } else {
                reply(StatusCode::OK, "text/plain", "ok\n".into())
            }
        }
        (&Method::GET, "/status") => {
            let table = state.table.load();
            reply(StatusCode::OK, "application/json", crate::status_json(&table))
        }
        (_, "/metrics" | "/health" | "/status") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "application/json",
            "{\"error\":\"method not allowed: use GET\"}\n".into(),
        ),
        (_, path) => reply(
            StatusCode::NOT_FOUND,
            "application/json",
            format!("{{\"error\":\"no such endpoint: {}\",\"endpoints\":[\"/metrics\",\"/health\",\"/status\"]}}\n", path.escape_default()),
        ),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}
