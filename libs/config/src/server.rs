//! The `[server]` section every kiln process shares: the listener, its identity, and
//! where the other services are.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration;

/// The listener and the process around it. Every default is stated on its field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on (port 0 picks a free port). Default `127.0.0.1:7443`; a
    /// pod sets `0.0.0.0:7443`.
    pub listen: SocketAddr,
    /// Where the state lives: `<data_dir>/<service>/` for each service (and, for `kiln
    /// up`, the development PKI in `<data_dir>/pki/`). Default: the user's data
    /// directory, e.g. `~/.local/share/kiln`.
    pub data_dir: Option<PathBuf>,
    /// Trust domain of workload identities, `spiffe://<trust_domain>/service/<name>`.
    /// Default `kiln.local`.
    pub trust_domain: String,
    /// Largest request message accepted, in bytes (at most 64 MiB). Default 4 MiB.
    pub max_message_bytes: usize,
    /// How long in-flight calls may run on after SIGTERM. Default 30 s.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// Refuse TLS clients that present no certificate. Default `false` (end users
    /// authenticate with tokens; SERVICE RPCs need a workload certificate anyway).
    pub require_client_cert: bool,
    /// Requests per second per caller and method; 0 turns rate limiting off. Default 200.
    pub rate_limit_per_second: u32,
    /// Requests a caller may make at once before the rate applies. Default 400.
    pub rate_limit_burst: u32,
    /// How long a service trusts kiln-auth's answer about an API key: a revoked key
    /// keeps working at most this long. Default 30 s.
    #[serde(with = "duration")]
    pub api_key_cache: Duration,
    /// This process's certificate, key and trust bundle (per-service binaries; `kiln up`
    /// makes its own development PKI and refuses this). Default: none.
    pub tls: Option<TlsPaths>,
    /// Where the other services are (per-service binaries). Default: none.
    pub endpoints: Endpoints,
    /// Serve Prometheus metrics here (plain HTTP, `GET /metrics`), apart from the gRPC
    /// listener. Default: none (off).
    pub metrics_listen: Option<SocketAddr>,
    /// Mesh mode (per-service binaries): plaintext gRPC on a loopback `listen` behind a
    /// sidecar that does the mTLS, the caller's workload identity taken from the
    /// sidecar's `x-forwarded-client-cert`; calls to the other services go plaintext to
    /// the sidecar's outbound listeners (`[server.endpoints]` = `http://127.0.0.1:PORT`)
    /// and `[server.tls]` is not used. Refused on a non-loopback `listen`. Default `false`.
    pub mesh: bool,
}

impl ServerConfig {
    /// `data_dir`, or its default: `<the user's data directory>/kiln`, `./.kiln` where
    /// the platform has none.
    pub fn effective_data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| {
            dirs::data_dir().map_or_else(|| PathBuf::from(".kiln"), |d| d.join("kiln"))
        })
    }

    pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::LOCALHOST,
        7443,
    ));
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: Self::DEFAULT_LISTEN,
            data_dir: None,
            trust_domain: "kiln.local".into(),
            max_message_bytes: 4 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(30),
            require_client_cert: false,
            rate_limit_per_second: 200,
            rate_limit_burst: 400,
            api_key_cache: Duration::from_secs(30),
            tls: None,
            endpoints: Endpoints::default(),
            metrics_listen: None,
            mesh: false,
        }
    }
}

/// Certificate files as cert-manager (`tls.crt`, `tls.key`, `ca.crt`) or a SPIFFE helper
/// writes them. The certificate is both the server certificate (its DNS names are what
/// clients dial) and the workload identity presented on outgoing calls (its URI SAN is
/// `spiffe://<trust_domain>/service/<name>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPaths {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM trust bundle: the CAs of servers called and of client certificates accepted.
    pub ca: PathBuf,
}

/// The other services' addresses, `https://host:port`. A service that calls none
/// (kiln-auth, which verifies tokens itself) needs none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Endpoints {
    /// kiln-auth (JWKS, revocations, API keys, delegated tokens): every service but
    /// kiln-auth itself needs it. Default: none.
    pub auth: Option<String>,
    /// kiln-build: kiln-agent needs it. Default: none.
    pub build: Option<String>,
}

/// The `[telemetry]` section: where traces go. Metrics have `[server] metrics_listen`,
/// logs `KILN_LOG` and `--log-format`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP gRPC endpoint of a collector, e.g. `http://127.0.0.1:4317`. Default: none (no
    /// trace export). `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_ENDPOINT`
    /// and `--otlp-endpoint` override it.
    pub otlp_endpoint: Option<String>,
}
