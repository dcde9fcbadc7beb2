//! kiln-agent's one error type, mapped to gRPC codes at the handler boundary.
//!
//! Client errors are [`ApiError`]s built where the problem is found. Everything else is
//! internal: logged with its cause, answered as "internal error".

use kiln_rpc::ApiError;
use tonic::{Code, Status};

/// Stable reasons of kiln-agent (ErrorInfo.reason), in addition to kiln-rpc's.
pub mod reason {
    /// No LLM provider answered at the configured URL.
    pub const PROVIDER_UNAVAILABLE: &str = "PROVIDER_UNAVAILABLE";
    /// The named model is not offered by the provider.
    pub const MODEL_NOT_FOUND: &str = "MODEL_NOT_FOUND";
    /// The caller has too many unfinished tasks.
    pub const TOO_MANY_TASKS: &str = "TOO_MANY_TASKS";
    /// A step of the request is refused by the build policy.
    pub const PROGRAM_NOT_ALLOWED: &str = "PROGRAM_NOT_ALLOWED";
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A client error, sent as it is.
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("agent store: {0}")]
    Store(#[from] sqlx::Error),
    #[error("agent store migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("agent store: {0}")]
    Open(String),
    #[error("a stored task is unreadable: {0}")]
    Corrupt(String),
    #[error(transparent)]
    DataDirLocked(#[from] kiln_store::LockError),
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;

impl From<kiln_store::Error> for AgentError {
    fn from(err: kiln_store::Error) -> Self {
        match err {
            kiln_store::Error::Sqlx(e) => Self::Store(e),
            kiln_store::Error::Migrate(e) => Self::Migrate(e),
            other => Self::Open(other.to_string()),
        }
    }
}

impl From<AgentError> for ApiError {
    fn from(err: AgentError) -> Self {
        match err {
            AgentError::Api(e) => e,
            // The database is down or restarting: retry later (the pool reconnects).
            AgentError::Store(ref e) if kiln_store::is_unavailable(e) => {
                ApiError::unavailable("the agent store is unavailable; retry later")
            }
            other => ApiError::internal("serving an agent request", &other),
        }
    }
}

impl From<AgentError> for Status {
    fn from(err: AgentError) -> Self {
        ApiError::from(err).into()
    }
}

/// The gRPC answer for a provider that failed a synchronous call (ListModels, the
/// reachability check of StartTask), following the mapping documented on
/// [`kiln_llm::LlmError`].
pub fn provider_error(err: &kiln_llm::LlmError, url: &str) -> ApiError {
    use kiln_llm::LlmError as E;
    match err {
        E::Unreachable { .. } | E::Config(_) | E::Connection { .. } => {
            ApiError::failed_precondition(reason::PROVIDER_UNAVAILABLE, err.to_string())
                .with_metadata("provider_url", url)
        }
        E::Http { status, .. } if *status < 500 => {
            ApiError::failed_precondition(reason::PROVIDER_UNAVAILABLE, err.to_string())
                .with_metadata("provider_url", url)
        }
        E::Timeout { .. } => ApiError::new(
            Code::DeadlineExceeded,
            kiln_rpc::error::reason::UNAVAILABLE,
            err.to_string(),
        ),
        _ => ApiError::unavailable(err.to_string()),
    }
}
