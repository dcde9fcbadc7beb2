//! RED metrics of every call, right after the request id so that refused calls count
//! too: requests by method and gRPC code, latency to the **end of the response body**
//! (a stream counts until its trailers, or until the client drops it — then its code is
//! `CANCELLED`), and calls in flight.
//!
//! Label values are bounded: the methods this listener serves (from its access policy)
//! plus health and reflection; any other path a client makes up is `unknown`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use futures::future::BoxFuture;
use http::{HeaderMap, Request, Response};
use kiln_metrics::{Counter, EncodeLabelSet, Family, Gauge, Histogram, Registry, Unit};
use tonic::body::Body;
use tower::{Layer, Service};

/// Long-lived and short infrastructure methods, labelled like the contract's.
const INFRASTRUCTURE_METHODS: &[&str] = &[
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// `service` (`kiln.build.v1.BuildService`) and `method` (`StartBuild`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct MethodLabels {
    pub service: Arc<String>,
    pub method: Arc<String>,
}

impl MethodLabels {
    pub(crate) fn of_path(path: &str) -> Self {
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("unknown", "unknown"));
        Self {
            service: Arc::new(service.to_owned()),
            method: Arc::new(method.to_owned()),
        }
    }

    fn unknown() -> Self {
        Self::of_path("/unknown/unknown")
    }
}

/// [`MethodLabels`] and the gRPC code (`OK`, `NOT_FOUND`, …).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CodeLabels {
    pub service: Arc<String>,
    pub method: Arc<String>,
    pub code: &'static str,
}

/// The RPC metric families of one listener.
#[derive(Debug, Clone)]
pub struct RpcMetrics {
    requests: Family<CodeLabels, Counter>,
    duration: Family<MethodLabels, Histogram>,
    in_flight: Family<MethodLabels, Gauge>,
    /// Calls refused by the rate limit (also counted in `requests` as RESOURCE_EXHAUSTED,
    /// with message-size refusals).
    pub(crate) rate_limited: Family<MethodLabels, Counter>,
}

impl RpcMetrics {
    /// Registers the families under `kiln_rpc_…`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(kiln_metrics::latency_histogram),
            in_flight: Family::default(),
            rate_limited: Family::default(),
        };
        let rpc = registry.sub_registry_with_prefix("rpc");
        rpc.register(
            "requests",
            "Finished calls by method and gRPC code (errors are every code but OK)",
            metrics.requests.clone(),
        );
        rpc.register_with_unit(
            "request_duration",
            "Time from the request's arrival to the end of the response body (streams included)",
            Unit::Seconds,
            metrics.duration.clone(),
        );
        rpc.register(
            "in_flight_requests",
            "Calls whose response has not ended",
            metrics.in_flight.clone(),
        );
        rpc.register(
            "rate_limited",
            "Calls refused by the rate limit",
            metrics.rate_limited.clone(),
        );
        metrics
    }
}

/// Measures every call; see the module documentation.
#[derive(Debug, Clone)]
pub struct MetricsLayer {
    /// The series of each known path, looked up once per call by path.
    known: Arc<HashMap<String, Arc<MethodSeries>>>,
    unknown: Arc<MethodSeries>,
}

impl MetricsLayer {
    /// `served`: the paths of the kiln RPCs on this listener.
    pub fn new<'a>(metrics: RpcMetrics, served: impl IntoIterator<Item = &'a str>) -> Self {
        let series = |labels: MethodLabels| Arc::new(MethodSeries::new(&metrics, labels));
        let known = served
            .into_iter()
            .chain(INFRASTRUCTURE_METHODS.iter().copied())
            .map(|path| (path.to_owned(), series(MethodLabels::of_path(path))))
            .collect();
        Self {
            known: Arc::new(known),
            unknown: series(MethodLabels::unknown()),
        }
    }

    fn series(&self, path: &str) -> Arc<MethodSeries> {
        self.known.get(path).unwrap_or(&self.unknown).clone()
    }
}

/// The series of one method, each taken from its family the first time it is needed
/// (so the exposition shows only methods that were called, and codes that occurred) and
/// kept: a call then costs atomic updates, not four label hashes and family locks.
#[derive(Debug)]
struct MethodSeries {
    metrics: RpcMetrics,
    labels: MethodLabels,
    in_flight: OnceLock<Gauge>,
    duration: OnceLock<Histogram>,
    /// By [`tonic::Code`] as a number (0–16).
    requests: [OnceLock<Counter>; 17],
}

impl MethodSeries {
    fn new(metrics: &RpcMetrics, labels: MethodLabels) -> Self {
        Self {
            metrics: metrics.clone(),
            labels,
            in_flight: OnceLock::new(),
            duration: OnceLock::new(),
            requests: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    fn in_flight(&self) -> &Gauge {
        self.in_flight
            .get_or_init(|| self.metrics.in_flight.get_or_create(&self.labels).clone())
    }

    fn duration(&self) -> &Histogram {
        self.duration
            .get_or_init(|| self.metrics.duration.get_or_create(&self.labels).clone())
    }

    fn requests(&self, code: tonic::Code) -> &Counter {
        self.requests[code as usize].get_or_init(|| {
            self.metrics
                .requests
                .get_or_create(&CodeLabels {
                    service: self.labels.service.clone(),
                    method: self.labels.method.clone(),
                    code: code_name(code),
                })
                .clone()
        })
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MetricsService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`MetricsLayer`] wraps around the rest of the chain.
#[derive(Debug, Clone)]
pub struct MetricsService<S> {
    inner: S,
    layer: MetricsLayer,
}

impl<S> Service<Request<Body>> for MetricsService<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let call = Call::start(self.layer.series(request.uri().path()));
        // The instance `poll_ready` made ready takes the call now (no copy of the rest of
        // the chain in the future).
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            let (parts, body) = response.into_parts();
            let mut call = call;
            call.code = grpc_code(&parts.headers);
            Ok(Response::from_parts(
                parts,
                Body::new(MeasuredBody {
                    inner: body,
                    call: Some(call),
                }),
            ))
        })
    }
}

/// One call being measured; recorded exactly once, when finished or dropped.
struct Call {
    series: Arc<MethodSeries>,
    started: Instant,
    /// From the headers (a trailers-only response) or the trailers.
    code: Option<tonic::Code>,
}

impl Call {
    fn start(series: Arc<MethodSeries>) -> Self {
        series.in_flight().inc();
        Self {
            series,
            started: Instant::now(),
            code: None,
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let series = &self.series;
        series.in_flight().dec();
        series
            .duration()
            .observe(self.started.elapsed().as_secs_f64());
        // No status by the end: the client went away (or the server reset the stream).
        series
            .requests(self.code.unwrap_or(tonic::Code::Cancelled))
            .inc();
    }
}

pin_project_lite::pin_project! {
    /// A response body that finishes its [`Call`] at its end (or when dropped).
    struct MeasuredBody<B> {
        #[pin]
        inner: B,
        call: Option<Call>,
    }
}

impl<B: http_body::Body> http_body::Body for MeasuredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(mut call) = this.call.take()
                {
                    call.code = grpc_code(trailers).or(call.code);
                    drop(call);
                }
            }
            Some(Err(_)) => {
                if let Some(mut call) = this.call.take() {
                    call.code = call.code.or(Some(tonic::Code::Unknown));
                }
            }
            None => {
                this.call.take();
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The `grpc-status` of a header map.
fn grpc_code(headers: &HeaderMap) -> Option<tonic::Code> {
    let value: i32 = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    Some(tonic::Code::from_i32(value))
}

/// `OK`, `INVALID_ARGUMENT`, …: the names of the gRPC specification.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    const GET_BUILD: &str = "/kiln.build.v1.BuildService/GetBuild";

    fn layer() -> (MetricsLayer, Registry) {
        let mut registry = kiln_metrics::registry();
        let metrics = RpcMetrics::register(&mut registry);
        (MetricsLayer::new(metrics, [GET_BUILD]), registry)
    }

    /// A handler streaming two messages and OK in the trailers, after `gate` opens.
    fn streaming(
        gate: Arc<tokio::sync::Notify>,
    ) -> impl Service<
        Request<Body>,
        Response = Response<Body>,
        Error = Infallible,
        Future = impl Send + 'static,
    > + Clone
    + Send
    + 'static {
        tower::service_fn(move |_: Request<Body>| {
            let gate = gate.clone();
            async move {
                let frames = async_stream_frames(gate);
                Ok::<_, Infallible>(Response::new(Body::new(http_body_util::StreamBody::new(
                    frames,
                ))))
            }
        })
    }

    fn async_stream_frames(
        gate: Arc<tokio::sync::Notify>,
    ) -> impl futures::Stream<Item = Result<http_body::Frame<Bytes>, tonic::Status>> + Send {
        futures::stream::unfold(0, move |step| {
            let gate = gate.clone();
            async move {
                let frame = match step {
                    0 => http_body::Frame::data(Bytes::from_static(b"one")),
                    1 => {
                        gate.notified().await;
                        http_body::Frame::data(Bytes::from_static(b"two"))
                    }
                    2 => {
                        let mut trailers = HeaderMap::new();
                        trailers.insert("grpc-status", "0".parse().expect("header"));
                        http_body::Frame::trailers(trailers)
                    }
                    _ => return None,
                };
                Some((Ok(frame), step + 1))
            }
        })
    }

    fn request(path: &str) -> Request<Body> {
        crate::layer::testing::request(path)
    }

    fn sample(registry: &Registry, needle: &str) -> Option<f64> {
        kiln_metrics::render(registry)
            .lines()
            .find(|l| l.starts_with(needle))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[tokio::test]
    async fn a_stream_is_in_flight_until_its_trailers_and_is_counted_with_their_code() {
        let (layer, registry) = layer();
        let gate = Arc::new(tokio::sync::Notify::new());
        let response = layer
            .layer(streaming(gate.clone()))
            .oneshot(request(GET_BUILD))
            .await
            .expect("infallible");
        let labels = r#"{service="kiln.build.v1.BuildService",method="GetBuild"}"#;
        assert_eq!(
            sample(&registry, &format!("kiln_rpc_in_flight_requests{labels}")),
            Some(1.0),
            "the headers are out, the body is not"
        );
        let mut body = response.into_body();
        let first = body.frame().await.expect("frame").expect("ok");
        assert!(first.is_data());
        assert_eq!(
            sample(&registry, "kiln_rpc_requests_total"),
            None,
            "not finished"
        );
        gate.notify_one();
        while body.frame().await.is_some() {}
        assert_eq!(
            sample(&registry, &format!("kiln_rpc_in_flight_requests{labels}")),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &registry,
                r#"kiln_rpc_requests_total{service="kiln.build.v1.BuildService",method="GetBuild",code="OK"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &registry,
                &format!("kiln_rpc_request_duration_seconds_count{labels}")
            ),
            Some(1.0)
        );
    }

    #[tokio::test]
    async fn refusals_count_by_code_dropped_streams_are_cancelled_and_made_up_paths_are_unknown() {
        let (layer, registry) = layer();
        let seen = crate::layer::testing::Seen::default();
        let refuse = tower::service_fn(|_: Request<Body>| async {
            Ok::<_, Infallible>(tonic::Status::permission_denied("no").into_http())
        });
        for path in ["/made.Up/Path1", "/made.Up/Path2"] {
            let _ = layer
                .layer(crate::layer::testing::handler(seen.clone()))
                .oneshot(request(path))
                .await;
        }
        let refused = layer
            .layer(refuse)
            .oneshot(request(GET_BUILD))
            .await
            .expect("ok");
        drop(refused);
        let gate = Arc::new(tokio::sync::Notify::new());
        let abandoned = layer
            .layer(streaming(gate))
            .oneshot(request(GET_BUILD))
            .await
            .expect("ok");
        drop(abandoned);
        let text = kiln_metrics::render(&registry);
        assert!(
            text.contains(
                r#"kiln_rpc_requests_total{service="unknown",method="unknown",code="OK"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"method="GetBuild",code="PERMISSION_DENIED"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"method="GetBuild",code="CANCELLED"} 1"#),
            "{text}"
        );
        assert!(!text.contains("Path1"), "no label per made-up path");
    }
}
