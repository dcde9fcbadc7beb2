//! Connecting to a kiln endpoint: TLS with a given CA, an optional client certificate
//! (workload identity for service-to-service calls), a bearer token and the caller's
//! W3C trace context on every call. Services give the CA and their certificate as files
//! ([`ClientConfig::tls_files`]), which are re-read when they change (see
//! [`crate::reloading_client`]).

use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::Error;
use crate::reloading_client::{self, ClientTlsFiles};

/// A channel that attaches the bearer token (if any) and the trace context to every
/// request. Every kiln client — the CLI, a service's JWKS and API-key calls to kiln-auth,
/// the agent's calls to kiln-build — goes through one, so every call propagates its
/// trace.
pub type KilnChannel = InterceptedService<Channel, BearerInterceptor>;

/// Adds `authorization: Bearer <token>` and the current span's `traceparent`,
/// `tracestate` and `baggage` to outgoing requests. Interceptors run in the caller's
/// task when the call is made, so "the current span" is the caller's.
#[derive(Clone, Default)]
pub struct BearerInterceptor(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for BearerInterceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "BearerInterceptor(token)"
        } else {
            "BearerInterceptor(none)"
        })
    }
}

impl Interceptor for BearerInterceptor {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        kiln_telemetry::inject_current(request.metadata_mut());
        Ok(request)
    }
}

/// How to reach a kiln endpoint.
#[derive(Clone, Default)]
pub struct ClientConfig {
    /// `https://host:port`.
    pub endpoint: String,
    /// PEM of the CA that signed the server certificate.
    pub ca_pem: Option<String>,
    /// PEM certificate and key to present (workload identity).
    pub identity: Option<(String, String)>,
    /// Bearer token: an access JWT or an API key.
    pub token: Option<String>,
    /// Connect timeout. Default: 5 s.
    pub connect_timeout: Option<Duration>,
    /// CA and client certificate from files that are followed as they change; when set,
    /// `ca_pem` and `identity` are not used.
    pub tls_files: Option<ClientTlsFiles>,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("endpoint", &self.endpoint)
            .field("client_certificate", &self.identity.is_some())
            .field("tls_files", &self.tls_files)
            .field("token", &self.token.is_some())
            .finish_non_exhaustive()
    }
}

impl ClientConfig {
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            ..Self::default()
        }
    }

    pub fn ca_pem(mut self, pem: impl Into<String>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    pub fn identity(mut self, cert_pem: impl Into<String>, key_pem: impl Into<String>) -> Self {
        self.identity = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// Takes the CA and client certificate from files, reloaded when they change.
    pub fn tls_files(mut self, files: ClientTlsFiles) -> Self {
        self.tls_files = Some(files);
        self
    }

    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    fn endpoint(&self) -> Result<Endpoint, Error> {
        self.endpoint_with(self.ca_pem.as_deref(), self.identity.as_ref())
    }

    /// The endpoint with this TLS material (PEM): fixed, or as the files hold it now.
    pub(crate) fn endpoint_with(
        &self,
        ca_pem: Option<&str>,
        identity: Option<&(String, String)>,
    ) -> Result<Endpoint, Error> {
        let mut endpoint = Endpoint::from_shared(self.endpoint.clone())
            .map_err(|e| Error::Client(format!("endpoint {:?}: {e}", self.endpoint)))?
            .connect_timeout(self.connect_timeout.unwrap_or(Duration::from_secs(5)))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        if self.endpoint.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = ca_pem {
                tls = tls.ca_certificate(Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = identity {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| Error::Client(format!("TLS settings: {e}")))?;
        }
        Ok(endpoint)
    }

    fn interceptor(&self) -> Result<BearerInterceptor, Error> {
        let value = match &self.token {
            Some(token) => Some(
                format!("Bearer {token}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| Error::Client("the token is not printable ASCII".into()))?,
            ),
            None => None,
        };
        Ok(BearerInterceptor(value))
    }

    /// Connects now; fails if the endpoint cannot be reached or the handshake fails.
    pub async fn connect(&self) -> Result<KilnChannel, Error> {
        let channel = match &self.tls_files {
            Some(files) => reloading_client::connect(self, files).await?,
            None => self.endpoint()?.connect().await.map_err(Error::Transport)?,
        };
        Ok(InterceptedService::new(channel, self.interceptor()?))
    }

    /// A channel that connects on first use (and reconnects as needed).
    pub fn connect_lazy(&self) -> Result<KilnChannel, Error> {
        let channel = match &self.tls_files {
            Some(files) => reloading_client::connect_lazy(self, files)?,
            None => self.endpoint()?.connect_lazy(),
        };
        Ok(InterceptedService::new(channel, self.interceptor()?))
    }
}
