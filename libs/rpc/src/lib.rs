//! kiln-rpc: what every kiln service and client shares on the wire.
//!
//! - [`server`]: one listener with TLS, the layer chain, health, reflection (v1 and
//!   v1alpha), keepalive, message limits and graceful shutdown;
//! - [`layer`]: the layer chain, one tower layer per concern (request id, access
//!   policy, rate limit, authentication, authorization, message size);
//! - [`authn`], [`token`]: access-token verification against the JWKS and the revocations
//!   kiln-auth publishes, API-key resolution;
//! - [`ratelimit`], [`slots`]: rate limits by verified identity (else peer address), and
//!   bounded connections per peer and unauthenticated long-lived streams;
//! - [`audit`]: the one audit record type every service writes (target `audit`);
//! - [`error`]: [`ApiError`], the gRPC error with rich details every handler returns;
//! - [`remote`]: [`RemoteError`], the same details decoded from a `Status` a client got;
//! - [`id_prefix`]: ids given by a unique prefix (docker-style), one rule for every service;
//! - [`identity`]: peers, workload identities, principals, roles;
//! - [`mesh`]: mesh mode, the caller's identity as the sidecar forwards it;
//! - [`tls`], [`pki`]: certificates from files (reloaded on change) and a development PKI;
//! - [`client`], [`reloading_client`]: connecting to a kiln endpoint with a CA, client
//!   certificate and token; certificates from files are followed as they rotate.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub mod access;
pub mod audit;
pub mod authn;
pub mod client;
pub mod error;
pub mod id_prefix;
pub mod idempotency;
pub mod identity;
pub mod incoming;
pub mod layer;
pub mod limit;
pub mod mesh;
pub mod pki;
pub mod ratelimit;
pub mod readiness;
pub mod reloading_client;
pub mod remote;
pub(crate) mod revocation;
pub mod server;
pub mod slots;
pub mod tls;
pub mod token;

pub use access::Access;
pub use error::{ApiError, FieldViolation};
pub use identity::{Principal, Role, principal};
pub use layer::RequestId;
pub use remote::RemoteError;
pub use server::{KilnServer, ServerSettings, shutdown_signal};

/// Failures of setting up servers and clients (configuration, files, sockets).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("TLS file {path}: {message}")]
    Tls { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Pki(String),
    #[error("invalid setting {field}: {message}")]
    Config {
        field: &'static str,
        message: String,
    },
    #[error(transparent)]
    Descriptor(#[from] access::DescriptorError),
    #[error("reflection service: {0}")]
    Reflection(String),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("client: {0}")]
    Client(String),
}

impl Error {
    pub(crate) fn tls(path: &Path, message: impl std::fmt::Display) -> Self {
        Self::Tls {
            path: path.to_path_buf(),
            message: message.to_string(),
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        match err {
            Error::Transport(_) => {
                ApiError::unavailable(format!("a kiln service is unreachable: {err}"))
            }
            other => ApiError::internal("setting up a connection", &other),
        }
    }
}
