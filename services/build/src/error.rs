//! The crate's one error type and its mapping to gRPC statuses.
//!
//! Client errors are [`ApiError`]s built where the problem is found (they carry the
//! field violations and the stable reason); everything else (SQL, I/O, the sandbox) is
//! logged with its cause and answered as INTERNAL without detail, so that no SQL error
//! or server path ever reaches a client.

use std::time::Duration;

use kiln_rpc::{ApiError, FieldViolation};
use tonic::{Code, Status};

/// Stable reasons of kiln-build (ErrorInfo.reason), in addition to kiln-rpc's.
pub mod reason {
    pub const INVALID_PATH: &str = "INVALID_PATH";
    pub const WORKSPACE_TOO_LARGE: &str = "WORKSPACE_TOO_LARGE";
    pub const WORKSPACE_BUSY: &str = "WORKSPACE_BUSY";
    pub const NOT_A_REGULAR_FILE: &str = "NOT_A_REGULAR_FILE";
    pub const INVALID_ARCHIVE: &str = "INVALID_ARCHIVE";
    pub const PROGRAM_NOT_ALLOWED: &str = "PROGRAM_NOT_ALLOWED";
    pub const ENV_NOT_ALLOWED: &str = "ENV_NOT_ALLOWED";
    pub const LIMIT_TOO_HIGH: &str = "LIMIT_TOO_HIGH";
    pub const INVALID_COMMAND: &str = "INVALID_COMMAND";
    pub const QUEUE_FULL: &str = "QUEUE_FULL";
    pub const REQUEST_ID_REUSED: &str = "REQUEST_ID_REUSED";
    pub const OUT_OF_RANGE: &str = "OUT_OF_RANGE";
    pub const SHUTTING_DOWN: &str = "SHUTTING_DOWN";
    pub const UPLOAD_TIMED_OUT: &str = "UPLOAD_TIMED_OUT";
    pub const WORKSPACE_NAME_TAKEN: &str = "WORKSPACE_NAME_TAKEN";
}

/// Everything that can fail in kiln-build.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// An answer for the client, complete with code, reason and details.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The caller has too many queued builds.
    #[error("queue full: {message}")]
    QueueFull {
        message: String,
        retry_after: Duration,
    },
    #[error("store: {0}")]
    Store(#[from] sqlx::Error),
    #[error("store migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("sandbox: {0}")]
    Sandbox(#[from] kiln_sandbox::Error),
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    #[error("configuration: {0}")]
    Config(String),
    /// Another process uses the data directory.
    #[error(transparent)]
    DataDirLocked(#[from] kiln_store::LockError),
}

pub type Result<T, E = BuildError> = std::result::Result<T, E>;

impl BuildError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// The client-facing error, if this is one (tests and callers match on it).
    pub fn api(&self) -> Option<&ApiError> {
        match self {
            Self::Api(e) => Some(e),
            _ => None,
        }
    }
}

/// INVALID_ARGUMENT (or `code`) with one reason and the given field violations.
pub(crate) fn invalid(reason: &'static str, violations: Vec<FieldViolation>) -> ApiError {
    invalid_with_code(Code::InvalidArgument, reason, violations)
}

pub(crate) fn invalid_with_code(
    code: Code,
    reason: &'static str,
    violations: Vec<FieldViolation>,
) -> ApiError {
    let message = match violations.as_slice() {
        [one] => format!("invalid {}: {}", one.field, one.description),
        many => format!(
            "{} invalid fields: {}",
            many.len(),
            many.iter()
                .map(|v| v.field.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    violations
        .into_iter()
        .fold(ApiError::new(code, reason, message), |e, v| {
            e.with_violation(v.field, v.description)
        })
}

/// One violation, for the helpers above.
pub(crate) fn violation(
    field: impl Into<String>,
    description: impl Into<String>,
) -> FieldViolation {
    FieldViolation {
        field: field.into(),
        description: description.into(),
    }
}

pub(crate) fn busy(what: &str) -> ApiError {
    ApiError::failed_precondition(reason::WORKSPACE_BUSY, what.to_owned())
}

impl From<kiln_store::Error> for BuildError {
    fn from(err: kiln_store::Error) -> Self {
        match err {
            kiln_store::Error::Io { path, source } => Self::io(path.display().to_string(), source),
            kiln_store::Error::Sqlx(e) => Self::Store(e),
            kiln_store::Error::Migrate(e) => Self::Migrate(e),
            other @ kiln_store::Error::Schema(_) => Self::Config(other.to_string()),
        }
    }
}

impl From<BuildError> for ApiError {
    fn from(err: BuildError) -> Self {
        match err {
            BuildError::Api(e) => e,
            BuildError::QueueFull {
                message,
                retry_after,
            } => ApiError::new(Code::ResourceExhausted, reason::QUEUE_FULL, message)
                .with_retry_after(retry_after),
            // The database is down or restarting: retry later (the pool reconnects).
            BuildError::Store(ref e) if kiln_store::is_unavailable(e) => {
                ApiError::unavailable("the build store is unavailable; retry later")
            }
            other => ApiError::internal("serving a build request", &other),
        }
    }
}

impl From<BuildError> for Status {
    fn from(err: BuildError) -> Self {
        ApiError::from(err).into()
    }
}
