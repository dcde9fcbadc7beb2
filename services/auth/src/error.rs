//! The auth crate's one error type, and how it reaches clients.
//!
//! Every failure of a handler is an [`AuthError`]. Client-facing variants carry a stable
//! reason from [`reason`]; store, file and hashing failures become INTERNAL with the
//! cause logged, never sent (no SQL, no server paths in messages).

use std::path::PathBuf;
use std::time::Duration;

use kiln_rpc::error::FieldViolation;
use kiln_rpc::token::TokenError;
use kiln_rpc::{ApiError, error::reason as common};
use tonic::{Code, Status};

/// Reasons specific to kiln-auth (the ErrorInfo `reason`). Stable: clients match on them.
pub mod reason {
    /// Unknown user, wrong password or disabled account: deliberately one answer.
    pub const INVALID_CREDENTIALS: &str = "INVALID_CREDENTIALS";
    /// Too many failed logins for the account or from the peer; see RetryInfo.
    pub const LOGIN_THROTTLED: &str = "LOGIN_THROTTLED";
    /// A rotated refresh token was presented again after the grace window; its session
    /// is revoked.
    pub const REFRESH_TOKEN_REUSED: &str = "REFRESH_TOKEN_REUSED";
    /// Unknown, expired or revoked refresh token, or a disabled user.
    pub const INVALID_REFRESH_TOKEN: &str = "INVALID_REFRESH_TOKEN";
    /// Unknown, revoked or expired API key, or a key of a disabled user.
    pub const INVALID_API_KEY: &str = "INVALID_API_KEY";
    /// A password that breaks the password rules (sent with a field violation).
    pub const WEAK_PASSWORD: &str = "WEAK_PASSWORD";
    /// CreateUser with a username that exists.
    pub const USERNAME_TAKEN: &str = "USERNAME_TAKEN";
    /// An API key may not have a higher role than its owner (or than the caller).
    pub const API_KEY_ROLE_TOO_HIGH: &str = "API_KEY_ROLE_TOO_HIGH";
    /// Only an admin may act on another user.
    pub const NOT_ADMIN: &str = "NOT_ADMIN";
    /// Logout of the calling session by a caller that has none (an API key).
    pub const NO_SESSION: &str = "NO_SESSION";
    /// The change would leave no enabled admin.
    pub const LAST_ADMIN: &str = "LAST_ADMIN";
    /// An admin tried to delete their own account.
    pub const CANNOT_DELETE_SELF: &str = "CANNOT_DELETE_SELF";
    /// ExchangeToken called by a workload that may not act for users (only the agent).
    pub const ACTOR_NOT_ALLOWED: &str = "ACTOR_NOT_ALLOWED";
    /// ExchangeToken's subject token is missing, invalid, expired, revoked, of a
    /// disabled or deleted user, or itself a delegated token.
    pub const INVALID_SUBJECT_TOKEN: &str = "INVALID_SUBJECT_TOKEN";
    /// ExchangeToken for a viewer: a delegated task builds, which a viewer may not.
    pub const DELEGATION_ROLE_TOO_LOW: &str = "DELEGATION_ROLE_TOO_LOW";
}

/// What can go wrong in kiln-auth.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid request: {}", describe(.0))]
    InvalidArgument(Vec<FieldViolation>),
    #[error("invalid {field}: {description}")]
    WeakPassword {
        field: &'static str,
        description: String,
    },
    #[error("invalid username or password")]
    InvalidCredentials,
    #[error("too many failed logins; retry in {}s", .retry_after.as_secs().max(1))]
    LoginThrottled { retry_after: Duration },
    #[error("the refresh token is invalid, expired or revoked")]
    InvalidRefreshToken,
    #[error("the refresh token was already used; the session is revoked")]
    RefreshTokenReused,
    #[error("the API key is invalid, expired or revoked")]
    InvalidApiKey,
    #[error("{kind} {id:?} not found")]
    NotFound { kind: &'static str, id: String },
    #[error("{message}")]
    Unauthenticated {
        reason: &'static str,
        message: String,
    },
    #[error("{message}")]
    PermissionDenied {
        reason: &'static str,
        message: String,
    },
    #[error("{message}")]
    FailedPrecondition {
        reason: &'static str,
        message: String,
    },
    #[error("{message}")]
    AlreadyExists {
        reason: &'static str,
        message: String,
    },
    #[error("the caller is not authenticated")]
    MissingPrincipal,
    #[error("store: {0}")]
    Store(#[from] sqlx::Error),
    #[error("store migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("password hashing: {0}")]
    Hashing(String),
    #[error("signing key: {0}")]
    Token(#[from] TokenError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("stored data is inconsistent: {0}")]
    Corrupt(String),
}

fn describe(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

impl AuthError {
    /// INVALID_ARGUMENT for one field.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation {
            field: field.into(),
            description: description.into(),
        }])
    }

    pub fn not_found(kind: &'static str, id: &str) -> Self {
        Self::NotFound {
            kind,
            id: id.to_owned(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// The ErrorInfo reason a client sees for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidArgument(_) => common::INVALID_ARGUMENT,
            Self::WeakPassword { .. } => reason::WEAK_PASSWORD,
            Self::InvalidCredentials => reason::INVALID_CREDENTIALS,
            Self::LoginThrottled { .. } => reason::LOGIN_THROTTLED,
            Self::InvalidRefreshToken => reason::INVALID_REFRESH_TOKEN,
            Self::RefreshTokenReused => reason::REFRESH_TOKEN_REUSED,
            Self::InvalidApiKey => reason::INVALID_API_KEY,
            Self::NotFound { .. } => common::NOT_FOUND,
            Self::PermissionDenied { reason, .. }
            | Self::Unauthenticated { reason, .. }
            | Self::FailedPrecondition { reason, .. }
            | Self::AlreadyExists { reason, .. } => reason,
            Self::MissingPrincipal => common::MISSING_CREDENTIALS,
            Self::Store(e) if kiln_store::is_unavailable(e) => common::UNAVAILABLE,
            Self::Store(_)
            | Self::Migrate(_)
            | Self::Io { .. }
            | Self::Hashing(_)
            | Self::Token(_)
            | Self::Config(_)
            | Self::Corrupt(_) => common::INTERNAL,
        }
    }
}

impl From<kiln_store::Error> for AuthError {
    fn from(err: kiln_store::Error) -> Self {
        match err {
            kiln_store::Error::Io { path, source } => Self::io(path, source),
            kiln_store::Error::Sqlx(e) => Self::Store(e),
            kiln_store::Error::Migrate(e) => Self::Migrate(e),
            other @ kiln_store::Error::Schema(_) => Self::Config(other.to_string()),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        let reason = err.reason();
        match err {
            AuthError::InvalidArgument(violations) => ApiError::invalid_fields(violations)
                .unwrap_or_else(|| ApiError::invalid_field("request", "invalid")),
            AuthError::WeakPassword { field, description } => ApiError::new(
                Code::InvalidArgument,
                reason,
                format!("invalid {field}: {description}"),
            )
            .with_violation(field, description),
            AuthError::InvalidCredentials
            | AuthError::InvalidRefreshToken
            | AuthError::RefreshTokenReused
            | AuthError::InvalidApiKey
            | AuthError::MissingPrincipal => ApiError::unauthenticated(reason, err.to_string()),
            // Its own reason (not RATE_LIMITED), so clients can tell a locked account
            // from the per-method rate limit.
            AuthError::LoginThrottled { retry_after } => {
                ApiError::new(Code::ResourceExhausted, reason, err.to_string())
                    .with_retry_after(retry_after)
            }
            AuthError::NotFound { kind, id } => ApiError::not_found(kind, &id),
            AuthError::Unauthenticated { message, .. } => {
                ApiError::unauthenticated(reason, message)
            }
            AuthError::PermissionDenied { message, .. } => {
                ApiError::permission_denied(reason, message)
            }
            AuthError::FailedPrecondition { message, .. } => {
                ApiError::failed_precondition(reason, message)
            }
            AuthError::AlreadyExists { message, .. } => {
                ApiError::new(Code::AlreadyExists, reason, message)
            }
            // The database is down or restarting: a retry later can succeed, and the
            // pool reconnects by itself.
            AuthError::Store(ref e) if kiln_store::is_unavailable(e) => {
                ApiError::unavailable("the auth store is unavailable; retry later")
            }
            other => ApiError::internal("handling an auth request", &other),
        }
    }
}

impl From<AuthError> for Status {
    fn from(err: AuthError) -> Self {
        ApiError::from(err).into()
    }
}

pub type Result<T, E = AuthError> = std::result::Result<T, E>;
