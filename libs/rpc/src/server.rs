//! Serving kiln services: one listener, TLS, the layer chain, health, reflection,
//! keepalive, message limits and graceful shutdown — the same for every service and for
//! `kiln up`, which puts all three on one listener.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use kiln_metrics::{EncodeLabelSet, Family, Gauge, Registry, Unit};
use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tower::Service;
use tower::util::MapRequestLayer;

use crate::Error;
use crate::access::AccessPolicy;
use crate::identity::{Authenticator, NoTokenVerification};
use crate::incoming::{mesh_incoming_limited, tls_incoming_limited};
use crate::layer::{
    AccessLayer, AdmissionLayer, Authenticate, Authorize, MessageSizeLayer, MetricsLayer,
    RateLimitCheck, RateLimitStage, RequestIdLayer, RpcMetrics,
};
use crate::limit::MAX_MESSAGE_BYTES_CEILING;
use crate::mesh::apply_forwarded_identity;
use crate::ratelimit::{RateLimit, RateLimiter};
use crate::readiness::{Checks, Readiness};
use crate::slots::PeerSlots;
use crate::tls::{ReloadingServerConfig, TlsFiles};

/// Settings of one listener. Every default is stated on its field.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Address to listen on. `kiln up` default: 127.0.0.1:7443.
    pub listen: SocketAddr,
    /// Server certificate, key and the trust bundle for client certificates. Not used in
    /// mesh mode.
    pub tls: TlsFiles,
    /// Mesh mode: serve plaintext gRPC on a loopback address behind a sidecar (Envoy)
    /// that does the mTLS, and take each caller's workload identity from the sidecar's
    /// `x-forwarded-client-cert` header (see [`crate::mesh`]). Refused on any address
    /// but loopback. `tls`, `require_client_cert` and `tls_reload_interval` are then
    /// the sidecar's business. Default: false.
    pub mesh: bool,
    /// Refuse handshakes without a client certificate. Default: false (end users
    /// authenticate with tokens; SERVICE RPCs still need a workload certificate).
    pub require_client_cert: bool,
    /// Trust domain of workload identities accepted for SERVICE RPCs. Default: kiln.local.
    pub trust_domain: String,
    /// Largest request message accepted, in bytes. Default: 4 MiB; at most 64 MiB.
    pub max_message_bytes: usize,
    /// How long in-flight calls and streams may run on after a shutdown signal.
    /// Default: 30 s.
    pub shutdown_grace: Duration,
    /// HTTP/2 PING interval on idle connections. Default: 30 s.
    pub keepalive_interval: Duration,
    /// How long to wait for a PING ack before closing. Default: 10 s.
    pub keepalive_timeout: Duration,
    /// How often the TLS files are checked for changes. Default: 10 s.
    pub tls_reload_interval: Duration,
    /// Requests per caller and method; `None` turns rate limiting off. Default: 200/s,
    /// burst 400.
    pub rate_limit: Option<RateLimit>,
    /// How often the services' readiness checks (store, sandbox) run. Default: 5 s.
    pub health_check_interval: Duration,
    /// HTTP/2 streams one connection may have open at once (SETTINGS_MAX_CONCURRENT_
    /// STREAMS); clients queue further calls. Default: 100.
    pub max_concurrent_streams: u32,
    /// Connections one peer address may hold open; further sockets are closed at
    /// accept. Default: 256.
    pub max_connections_per_peer: usize,
    /// Unauthenticated long-lived streams (Health/Watch, reflection) one peer address
    /// may hold open; more are refused with RESOURCE_EXHAUSTED, `TOO_MANY_STREAMS`.
    /// Default: 16.
    pub max_open_streams_per_peer: usize,
    /// The same over all peers. Default: 1024.
    pub max_open_streams: usize,
}

impl ServerSettings {
    pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
    pub const DEFAULT_TRUST_DOMAIN: &str = "kiln.local";

    /// Defaults for everything but the address and the TLS files.
    pub fn new(listen: SocketAddr, tls: TlsFiles) -> Self {
        Self {
            listen,
            tls,
            mesh: false,
            require_client_cert: false,
            trust_domain: Self::DEFAULT_TRUST_DOMAIN.to_owned(),
            max_message_bytes: Self::DEFAULT_MAX_MESSAGE_BYTES,
            shutdown_grace: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            tls_reload_interval: Duration::from_secs(10),
            rate_limit: Some(RateLimit::default()),
            health_check_interval: Duration::from_secs(5),
            max_concurrent_streams: 100,
            max_connections_per_peer: 256,
            max_open_streams_per_peer: 16,
            max_open_streams: 1024,
        }
    }

    fn validate(&self) -> Result<(), Error> {
        if self.max_message_bytes == 0 || self.max_message_bytes > MAX_MESSAGE_BYTES_CEILING {
            return Err(Error::Config {
                field: "max_message_bytes",
                message: format!("must be between 1 and {MAX_MESSAGE_BYTES_CEILING}"),
            });
        }
        if self.mesh && !self.listen.ip().is_loopback() {
            return Err(Error::Config {
                field: "mesh",
                message: format!(
                    "mesh mode serves plaintext and believes the identity its sidecar forwards, \
                     so it listens on loopback only (127.0.0.1 or ::1), not on {}",
                    self.listen
                ),
            });
        }
        if self.trust_domain.is_empty() {
            return Err(Error::Config {
                field: "trust_domain",
                message: "must not be empty".into(),
            });
        }
        Ok(())
    }
}

/// A listener being put together: add services, then [`KilnServer::bind`].
pub struct KilnServer {
    settings: ServerSettings,
    routes: RoutesBuilder,
    services: Vec<&'static str>,
    authenticator: Arc<dyn Authenticator>,
    readiness: Checks,
    /// Set by [`KilnServer::with_metrics`].
    metrics: Option<ListenerMetrics>,
}

/// What a listener with a registry measures.
#[derive(Debug, Clone)]
struct ListenerMetrics {
    rpc: RpcMetrics,
    /// Expiry of the server certificate and of the client CA bundle's first certificate.
    certificate_expiry: Family<CertificateLabels, Gauge>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CertificateLabels {
    /// `server` or `client_ca`.
    certificate: &'static str,
}

impl std::fmt::Debug for KilnServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KilnServer")
            .field("settings", &self.settings)
            .field("services", &self.services)
            .finish_non_exhaustive()
    }
}

impl KilnServer {
    pub fn new(settings: ServerSettings) -> Self {
        Self {
            settings,
            routes: RoutesBuilder::default(),
            services: Vec::new(),
            authenticator: Arc::new(NoTokenVerification),
            readiness: Checks::new(),
            metrics: None,
        }
    }

    /// Measures this listener's calls (`kiln_rpc_…`) and the expiry of its certificates
    /// (`kiln_tls_certificate_expiry_timestamp_seconds`) into `registry`.
    pub fn with_metrics(mut self, registry: &mut Registry) -> Self {
        let certificate_expiry = Family::<CertificateLabels, Gauge>::default();
        registry.sub_registry_with_prefix("tls").register_with_unit(
            "certificate_expiry_timestamp",
            "When the listener's certificates expire (Unix time); re-read when the files change",
            Unit::Seconds,
            certificate_expiry.clone(),
        );
        self.metrics = Some(ListenerMetrics {
            rpc: RpcMetrics::register(registry),
            certificate_expiry,
        });
        self
    }

    /// Makes `service`'s health (and the overall health) NOT_SERVING while `check`
    /// fails; see [`Readiness`].
    pub fn with_readiness(mut self, service: &'static str, check: Arc<dyn Readiness>) -> Self {
        self.readiness.entry(service).or_default().push(check);
        self
    }

    /// Plugs in token verification (default: [`NoTokenVerification`]).
    pub fn with_authenticator(mut self, authenticator: Arc<dyn Authenticator>) -> Self {
        self.authenticator = authenticator;
        self
    }

    /// Adds a generated tonic service; its RPCs get the access levels of the contract,
    /// and health reports it by its full name.
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.routes.add_service(service);
        self.services.push(S::NAME);
        self
    }

    /// Validates the settings, loads TLS and binds the socket (port 0 picks a free one).
    pub async fn bind(self) -> Result<BoundServer, Error> {
        self.settings.validate()?;
        let tls = if self.settings.mesh {
            None
        } else {
            Some(ReloadingServerConfig::load(
                self.settings.tls.clone(),
                self.settings.require_client_cert,
            )?)
        };
        let listener = TcpListener::bind(self.settings.listen)
            .await
            .map_err(|source| Error::Bind {
                addr: self.settings.listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| Error::Bind {
            addr: self.settings.listen,
            source,
        })?;
        let policy =
            AccessPolicy::from_descriptor_set(kiln_proto::FILE_DESCRIPTOR_SET, &self.services)?;
        Ok(BoundServer {
            inner: self,
            listener,
            local_addr,
            tls,
            policy,
        })
    }
}

/// A listener bound to its address, ready to serve.
pub struct BoundServer {
    inner: KilnServer,
    listener: TcpListener,
    local_addr: SocketAddr,
    /// `None` in mesh mode.
    tls: Option<Arc<ReloadingServerConfig>>,
    policy: AccessPolicy,
}

impl std::fmt::Debug for BoundServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundServer")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl BoundServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Full names of the services on this listener.
    pub fn services(&self) -> &[&'static str] {
        &self.inner.services
    }

    /// Plugs in token verification once the address is known (an authenticator that
    /// talks to this very listener, as in `kiln up`, needs it).
    pub fn set_authenticator(&mut self, authenticator: Arc<dyn Authenticator>) {
        self.inner.authenticator = authenticator;
    }

    /// Serves until `shutdown` completes, then: health NOT_SERVING, no new connections,
    /// in-flight calls get `shutdown_grace` to finish, and the rest are dropped.
    pub async fn serve_until(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let KilnServer {
            settings,
            mut routes,
            services,
            authenticator,
            readiness,
            metrics,
        } = self.inner;
        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, &services, ServingStatus::Serving).await;
        let readiness_task = AbortOnDrop(tokio::spawn(crate::readiness::watch(
            health.clone(),
            services.clone(),
            readiness,
            settings.health_check_interval,
        )));
        routes.add_service(health_service);
        // grpcurl 1.8 speaks only v1alpha reflection, newer clients v1: serve both. The
        // google.rpc types are served too, so that generic clients can decode the error
        // details (ErrorInfo, BadRequest, RetryInfo) of kiln's errors.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(kiln_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        };
        routes.add_service(
            reflection()
                .build_v1()
                .map_err(|e| Error::Reflection(e.to_string()))?,
        );
        routes.add_service(
            reflection()
                .build_v1alpha()
                .map_err(|e| Error::Reflection(e.to_string()))?,
        );

        // The layer chain, outermost first (crate::layer says what each one does).
        let rate_limiter = settings
            .rate_limit
            .map(|limit| Arc::new(RateLimiter::new(limit)));
        let _forget = rate_limiter.as_ref().map(|limiter| {
            AbortOnDrop(crate::layer::rate_limit::spawn_housekeeping(
                limiter,
                Duration::from_secs(60),
            ))
        });
        let rate_limit = |stage| {
            tower::util::option_layer(rate_limiter.clone().map(|limiter| {
                let check = RateLimitCheck::new(limiter, stage);
                AdmissionLayer::new(match &metrics {
                    Some(m) => check.with_metrics(&m.rpc),
                    None => check,
                })
            }))
        };
        let metrics_layer = metrics
            .as_ref()
            .map(|m| MetricsLayer::new(m.rpc.clone(), self.policy.paths()));
        // In mesh mode the sidecar holds the certificates; kiln has none to watch.
        let _certificate_watch = metrics.as_ref().filter(|_| !settings.mesh).map(|m| {
            AbortOnDrop(watch_certificate_expiry(
                settings.tls.clone(),
                m.certificate_expiry.clone(),
                settings.tls_reload_interval,
            ))
        });
        let layers = tower::ServiceBuilder::new()
            .layer(RequestIdLayer)
            .layer(tower::util::option_layer(metrics_layer))
            .layer(AccessLayer::new(
                self.policy,
                PeerSlots::new(
                    settings.max_open_streams_per_peer,
                    settings.max_open_streams,
                ),
            ))
            .layer(rate_limit(RateLimitStage::BeforeAuthentication))
            .layer(AdmissionLayer::new(Authenticate::new(
                authenticator,
                settings.trust_domain.clone(),
            )))
            .layer(rate_limit(RateLimitStage::AfterAuthentication))
            .layer(AdmissionLayer::new(Authorize))
            .layer(MessageSizeLayer::new(settings.max_message_bytes))
            .into_inner();
        let connections = PeerSlots::new(settings.max_connections_per_peer, usize::MAX);
        let (incoming, _tls_watch) = match self.tls {
            Some(tls) => (
                tls_incoming_limited(self.listener, tls.clone(), connections),
                Some(AbortOnDrop(tls.watch(settings.tls_reload_interval))),
            ),
            None => (mesh_incoming_limited(self.listener, connections), None),
        };
        let mesh = settings.mesh;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = Server::builder()
            .http2_keepalive_interval(Some(settings.keepalive_interval))
            .http2_keepalive_timeout(Some(settings.keepalive_timeout))
            .max_concurrent_streams(Some(settings.max_concurrent_streams))
            // Outside the trace context: the forwarded identity (mesh mode) is in place before anything
            // reads the peer, and the header never reaches a handler.
            .layer(MapRequestLayer::new(move |request| {
                apply_forwarded_identity::<Body>(mesh, request)
            }))
            // Outermost but for the mesh identity, so that the chain's span (request id, authentication with its
            // calls to kiln-auth) and the handler are part of the caller's trace.
            .layer(kiln_telemetry::TraceContextLayer)
            .layer(layers)
            .add_routes(routes.routes())
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            });
        tokio::pin!(server);
        tracing::info!(addr = %self.local_addr, services = ?services, mesh, "serving");
        tokio::select! {
            result = &mut server => return result.map_err(Error::from),
            () = shutdown => {}
        }
        tracing::info!(grace = ?settings.shutdown_grace, "shutting down: NOT_SERVING, letting in-flight calls finish");
        drop(readiness_task); // from now on health says NOT_SERVING, whatever the checks say
        set_health(&health, &services, ServingStatus::NotServing).await;
        let _ = stop_tx.send(());
        match tokio::time::timeout(settings.shutdown_grace, server).await {
            Ok(result) => result.map_err(Error::from),
            Err(_) => {
                tracing::warn!("shutdown grace period over; dropping the remaining connections");
                Ok(())
            }
        }
    }
}

/// Sets the status of every service and of the server as a whole ("").
async fn set_health(health: &HealthReporter, services: &[&str], status: ServingStatus) {
    health.set_service_status("", status).await;
    for name in services {
        health.set_service_status(*name, status).await;
    }
}

/// Keeps the certificate-expiry gauges current: read now and at every TLS reload
/// interval (the files are reloaded on change, so the expiry changes with them).
fn watch_certificate_expiry(
    tls: TlsFiles,
    gauge: Family<CertificateLabels, Gauge>,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(every);
        loop {
            ticker.tick().await;
            for (certificate, path) in [("server", &tls.cert), ("client_ca", &tls.client_ca)] {
                match crate::tls::certificate_not_after(path) {
                    Ok(at) => {
                        gauge
                            .get_or_create(&CertificateLabels { certificate })
                            .set(at);
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot read a certificate's expiry"),
                }
            }
        }
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A future that completes on SIGINT or SIGTERM (what a terminal and Kubernetes send).
///
/// The handlers are installed when this is called, not when the future is first polled:
/// a signal that arrives between start-up and serving must stop the server cleanly
/// instead of killing it with the default action.
pub fn shutdown_signal() -> Result<impl Future<Output = ()> + Send + 'static, Error> {
    use tokio::signal::unix::{SignalKind, signal};
    let io = |source| Error::Io {
        path: "signal handler".into(),
        source,
    };
    let mut term = signal(SignalKind::terminate()).map_err(io)?;
    let mut int = signal(SignalKind::interrupt()).map_err(io)?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => tracing::info!("SIGINT received"),
            _ = term.recv() => tracing::info!("SIGTERM received"),
        }
    })
}
