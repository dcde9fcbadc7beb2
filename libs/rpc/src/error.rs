//! The error vocabulary every kiln handler answers with.
//!
//! [`ApiError`] carries a gRPC code, a message for people, a stable UPPER_SNAKE reason for
//! programs (sent as `google.rpc.ErrorInfo{reason, domain: "kiln.dev"}`), and where it
//! applies `google.rpc.BadRequest` field violations and `google.rpc.RetryInfo`. Each crate
//! keeps its own error type and converts it into an `ApiError` at the handler boundary.
//!
//! Messages never contain stack traces, SQL errors or server file paths: an internal
//! failure is logged with its cause and the client only sees "internal error".

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `ErrorInfo.domain` of every kiln error.
pub const ERROR_DOMAIN: &str = "kiln.dev";

/// Stable reasons shared with clients. Programs match on these, never on messages.
pub mod reason {
    /// Input failed validation; see the BadRequest field violations.
    pub const INVALID_ARGUMENT: &str = "INVALID_ARGUMENT";
    /// The named resource does not exist (or belongs to someone else).
    pub const NOT_FOUND: &str = "NOT_FOUND";
    /// The resource (or the request_id) already exists with other parameters.
    pub const ALREADY_EXISTS: &str = "ALREADY_EXISTS";
    /// The RPC needs a token and none was sent.
    pub const MISSING_CREDENTIALS: &str = "MISSING_CREDENTIALS";
    /// The `authorization` header is not `Bearer <token>` of a sane size.
    pub const MALFORMED_CREDENTIALS: &str = "MALFORMED_CREDENTIALS";
    /// The token was not accepted (bad signature, expired, revoked, unknown key…).
    pub const INVALID_TOKEN: &str = "INVALID_TOKEN";
    /// The token was revoked (logout, a password or role change, the user disabled or
    /// deleted, its sessions revoked): log in again.
    pub const TOKEN_REVOKED: &str = "TOKEN_REVOKED";
    /// A delegated token was presented at a service it was not minted for (its `aud`
    /// names another service).
    pub const TOKEN_AUDIENCE_MISMATCH: &str = "TOKEN_AUDIENCE_MISMATCH";
    /// A delegated token asked for something outside its scope (e.g. a token limited to
    /// one workspace creating another).
    pub const DELEGATION_SCOPE_EXCEEDED: &str = "DELEGATION_SCOPE_EXCEEDED";
    /// Too many unauthenticated long-lived streams (Health/Watch, reflection) are open
    /// from this address, or over all.
    pub const TOO_MANY_STREAMS: &str = "TOO_MANY_STREAMS";
    /// This server cannot verify tokens yet (no identity provider configured).
    pub const TOKEN_VERIFICATION_UNAVAILABLE: &str = "TOKEN_VERIFICATION_UNAVAILABLE";
    /// The caller is authenticated but its role is too low for the RPC.
    pub const INSUFFICIENT_ROLE: &str = "INSUFFICIENT_ROLE";
    /// The RPC is for kiln services only and needs a workload certificate.
    pub const WORKLOAD_IDENTITY_REQUIRED: &str = "WORKLOAD_IDENTITY_REQUIRED";
    /// The RPC declares no access level, so nobody may call it (deny by default).
    pub const ACCESS_NOT_DECLARED: &str = "ACCESS_NOT_DECLARED";
    /// No such RPC on this server.
    pub const UNKNOWN_METHOD: &str = "UNKNOWN_METHOD";
    /// The RPC exists in the contract but this server does not implement it yet.
    pub const NOT_IMPLEMENTED: &str = "NOT_IMPLEMENTED";
    /// A request message is larger than the server accepts.
    pub const MESSAGE_TOO_LARGE: &str = "MESSAGE_TOO_LARGE";
    /// Too many requests; see RetryInfo.
    pub const RATE_LIMITED: &str = "RATE_LIMITED";
    /// The operation cannot run in the resource's current state.
    pub const FAILED_PRECONDITION: &str = "FAILED_PRECONDITION";
    /// The server is shutting down or a dependency is down; retry later.
    pub const UNAVAILABLE: &str = "UNAVAILABLE";
    /// Something broke on the server; the log has the cause, keyed by request id.
    pub const INTERNAL: &str = "INTERNAL";
}

/// One field that failed validation: `field` is the request path (`files[2].path`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

/// A gRPC error with kiln's rich details. Convert with `Status::from(err)` or `?` in a
/// handler returning `Result<_, Status>`.
#[derive(Debug, Clone)]
pub struct ApiError {
    code: Code,
    reason: &'static str,
    message: String,
    violations: Vec<FieldViolation>,
    retry_after: Option<Duration>,
    metadata: BTreeMap<String, String>,
}

impl ApiError {
    /// The general constructor; prefer the named ones below.
    pub fn new(code: Code, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            violations: Vec::new(),
            retry_after: None,
            metadata: BTreeMap::new(),
        }
    }

    /// INVALID_ARGUMENT for a single field.
    pub fn invalid_field(field: impl Into<String>, description: impl Into<String>) -> Self {
        let field = field.into();
        let description = description.into();
        Self::new(
            Code::InvalidArgument,
            reason::INVALID_ARGUMENT,
            format!("invalid {field}: {description}"),
        )
        .with_violation(field, description)
    }

    /// INVALID_ARGUMENT for several fields at once; `None` when the list is empty, so a
    /// validator can collect everything wrong with a request and answer once.
    pub fn invalid_fields(violations: Vec<FieldViolation>) -> Option<Self> {
        let first = violations.first()?;
        let message = if violations.len() == 1 {
            format!("invalid {}: {}", first.field, first.description)
        } else {
            format!(
                "{} invalid fields: {}",
                violations.len(),
                violations
                    .iter()
                    .map(|v| v.field.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let mut err = Self::new(Code::InvalidArgument, reason::INVALID_ARGUMENT, message);
        err.violations = violations;
        Some(err)
    }

    /// NOT_FOUND for `kind` with `id`. Also the answer for another user's resource, so
    /// that existence does not leak.
    pub fn not_found(kind: &str, id: &str) -> Self {
        Self::new(
            Code::NotFound,
            reason::NOT_FOUND,
            format!("{kind} {id:?} not found"),
        )
        .with_metadata("resource", kind)
    }

    pub fn unauthenticated(reason: &'static str, message: impl Into<String>) -> Self {
        Self::new(Code::Unauthenticated, reason, message)
    }

    pub fn permission_denied(reason: &'static str, message: impl Into<String>) -> Self {
        Self::new(Code::PermissionDenied, reason, message)
    }

    pub fn failed_precondition(reason: &'static str, message: impl Into<String>) -> Self {
        Self::new(Code::FailedPrecondition, reason, message)
    }

    /// RESOURCE_EXHAUSTED with RetryInfo telling the client when to come back.
    pub fn rate_limited(message: impl Into<String>, retry_after: Duration) -> Self {
        Self::new(Code::ResourceExhausted, reason::RATE_LIMITED, message)
            .with_retry_after(retry_after)
    }

    /// UNIMPLEMENTED for an RPC of the contract that this server does not serve yet.
    pub fn not_implemented(rpc: &str, note: &str) -> Self {
        Self::new(
            Code::Unimplemented,
            reason::NOT_IMPLEMENTED,
            format!("{rpc} is part of the kiln v1 contract but is not implemented yet: {note}"),
        )
        .with_metadata("rpc", rpc)
    }

    /// INTERNAL: logs `cause` (which may hold paths or SQL) and tells the client only
    /// that something broke.
    pub fn internal(context: &str, cause: &dyn fmt::Display) -> Self {
        tracing::error!(%cause, "internal error: {context}");
        Self::new(
            Code::Internal,
            reason::INTERNAL,
            format!("internal error while {context}"),
        )
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(Code::Unavailable, reason::UNAVAILABLE, message)
    }

    /// Adds a BadRequest field violation.
    pub fn with_violation(
        mut self,
        field: impl Into<String>,
        description: impl Into<String>,
    ) -> Self {
        self.violations.push(FieldViolation {
            field: field.into(),
            description: description.into(),
        });
        self
    }

    /// Adds `google.rpc.RetryInfo`: when the client may try again.
    /// The RetryInfo delay, when the error has one.
    pub fn retry_delay(&self) -> Option<Duration> {
        self.retry_after
    }

    pub fn with_retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// Adds an `ErrorInfo.metadata` entry (e.g. the allowed programs).
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    pub fn code(&self) -> Code {
        self.code
    }

    pub fn reason(&self) -> &'static str {
        self.reason
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn violations(&self) -> &[FieldViolation] {
        &self.violations
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:?}): {}", self.reason, self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Self {
        let mut details = ErrorDetails::new();
        details.set_error_info(
            err.reason,
            ERROR_DOMAIN,
            err.metadata
                .into_iter()
                .collect::<std::collections::HashMap<_, _>>(),
        );
        for v in err.violations {
            details.add_bad_request_violation(v.field, v.description);
        }
        if let Some(delay) = err.retry_after {
            details.set_retry_info(Some(delay));
        }
        Status::with_error_details(err.code, err.message, details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_carries_reason_domain_and_field_violations() {
        let status: Status = ApiError::invalid_fields(vec![
            FieldViolation {
                field: "files[0].path".into(),
                description: "absolute path".into(),
            },
            FieldViolation {
                field: "steps".into(),
                description: "must not be empty".into(),
            },
        ])
        .expect("two violations")
        .into();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "2 invalid fields: files[0].path, steps");
        let details = status.get_error_details();
        let info = details.error_info().expect("error info");
        assert_eq!(info.reason, "INVALID_ARGUMENT");
        assert_eq!(info.domain, "kiln.dev");
        let bad = details.bad_request().expect("bad request");
        assert_eq!(bad.field_violations.len(), 2);
        assert_eq!(bad.field_violations[0].field, "files[0].path");
    }

    #[test]
    fn no_violations_means_no_error() {
        assert!(ApiError::invalid_fields(Vec::new()).is_none());
    }

    #[test]
    fn rate_limit_sends_retry_info() {
        let status: Status = ApiError::rate_limited("slow down", Duration::from_secs(3)).into();
        assert_eq!(status.code(), Code::ResourceExhausted);
        let details = status.get_error_details();
        let retry = details.retry_info().expect("retry info");
        assert_eq!(retry.retry_delay, Some(Duration::from_secs(3)));
    }

    #[test]
    fn internal_error_hides_its_cause() {
        let status: Status = ApiError::internal(
            "loading the build",
            &"no such table: builds at /var/lib/kiln/db",
        )
        .into();
        assert_eq!(status.code(), Code::Internal);
        assert!(
            !status.message().contains("/var/lib"),
            "{}",
            status.message()
        );
        assert!(!status.message().contains("table"), "{}", status.message());
    }
}
