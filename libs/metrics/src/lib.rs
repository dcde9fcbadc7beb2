//! kiln-metrics: Prometheus metrics for every kiln component, with `prometheus-client`.
//!
//! There is no global registry. A binary makes one [`Registry`] (prefixed `kiln`), hands
//! `&mut` to each component's `register_metrics`, and serves it read-only with
//! [`serve`] on a listener of its own (`--metrics-listen`), apart from the gRPC port:
//! scrapes need no TLS client certificate or token, and a scrape storm cannot take
//! gRPC capacity. Tests make their own registry, so they run in parallel.
//!
//! Naming follows Prometheus conventions: `kiln_<component>_<what>_<unit>`, counters end
//! in `_total`, durations are seconds, sizes bytes; label values come from small fixed
//! sets (method names of the contract, gRPC codes, phases, reasons) — never a user,
//! build or task id.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
pub use prometheus_client::metrics::counter::Counter;
pub use prometheus_client::metrics::family::Family;
pub use prometheus_client::metrics::gauge::Gauge;
pub use prometheus_client::metrics::histogram::Histogram;
pub use prometheus_client::registry::{Registry, Unit};
pub use prometheus_client::{self, encoding::EncodeLabelSet, encoding::EncodeLabelValue};

/// The registry of one process, with every metric named `kiln_…`.
pub fn registry() -> Registry {
    Registry::with_prefix("kiln")
}

/// Buckets for request latencies, in seconds: 1 ms to 30 s.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ]
    .into_iter()
}

/// Buckets for long waits and runs (queue wait, build steps), in seconds: 10 ms to 1 h.
pub fn duration_buckets() -> impl Iterator<Item = f64> {
    [
        0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
    ]
    .into_iter()
}

/// A histogram of latencies (see [`latency_buckets`]).
pub fn latency_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

/// A histogram of long durations (see [`duration_buckets`]).
pub fn duration_histogram() -> Histogram {
    Histogram::new(duration_buckets())
}

/// The registry in the text exposition format (OpenMetrics, which Prometheus reads).
pub fn render(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail.
    encode(&mut text, registry).expect("encoding into a String");
    text
}

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Failures of the metrics listener.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The metrics listener, bound: `GET /metrics` answers the registry; anything else 404.
#[derive(Debug)]
pub struct MetricsListener {
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
}

impl MetricsListener {
    /// Binds `addr` (port 0 picks a free one).
    pub async fn bind(addr: SocketAddr, registry: Arc<Registry>) -> Result<Self, Error> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        Ok(Self { listener, registry })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound TCP listener has an address")
    }

    /// Serves scrapes until the task is aborted (the listener is dropped with it).
    pub fn spawn(self) -> tokio::task::JoinHandle<()> {
        let addr = self.local_addr();
        let registry = self.registry;
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let registry = registry.clone();
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
                        render(&registry),
                    )
                }
            }),
        );
        tokio::spawn(async move {
            tracing::info!(%addr, "serving metrics on http://{addr}/metrics");
            if let Err(e) = axum::serve(self.listener, app).await {
                tracing::error!(error = %e, "the metrics listener failed");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain HTTP/1.1 GET, as a scraper sends it: (status line, headers and body).
    async fn get(addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        response
    }

    #[tokio::test]
    async fn the_listener_serves_the_registry_and_nothing_else() {
        let mut registry = registry();
        let calls = Counter::<u64>::default();
        registry.register("demo_calls", "Calls of the demo", calls.clone());
        calls.inc_by(3);
        let listener =
            MetricsListener::bind("127.0.0.1:0".parse().expect("addr"), Arc::new(registry))
                .await
                .expect("bind");
        let addr = listener.local_addr();
        let task = listener.spawn();
        let response = get(addr, "/metrics").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(
            response
                .to_ascii_lowercase()
                .contains(&format!("content-type: {CONTENT_TYPE}")),
            "{response}"
        );
        assert!(response.contains("kiln_demo_calls_total 3"), "{response}");
        assert!(get(addr, "/").await.starts_with("HTTP/1.1 404"));
        task.abort();
    }
}
