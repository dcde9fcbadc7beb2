//! The other end of [`ApiError`]: a `Status` a kiln server answered, decoded back into
//! kiln's vocabulary (code, stable reason, field violations, retry delay, metadata).
//!
//! One decoder for every client — the CLI's error lines and a service calling another
//! (the agent calling kiln-build) read the same fields the same way, instead of each
//! picking `ErrorInfo`, `BadRequest` and `RetryInfo` out of the details by hand.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::error::FieldViolation;

/// A failed RPC as the server described it. A `Status` without rich details (from a
/// proxy, or a transport failure made up by the client) decodes with an empty reason and
/// no violations, metadata or retry delay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteError {
    pub code: Code,
    /// The `ErrorInfo.reason` (e.g. `INVALID_ARGUMENT`, `PROVIDER_UNAVAILABLE`); empty
    /// when the server sent none.
    pub reason: String,
    /// The status message, for people.
    pub message: String,
    /// The `BadRequest` field violations, in the order the server sent them.
    pub violations: Vec<FieldViolation>,
    /// The `RetryInfo` delay: when the server says to come back.
    pub retry_after: Option<Duration>,
    /// The `ErrorInfo.metadata` (e.g. `resource` of a NOT_FOUND).
    pub metadata: BTreeMap<String, String>,
}

impl RemoteError {
    pub fn from_status(status: &Status) -> Self {
        let details = status.get_error_details();
        let (reason, metadata) = match details.error_info() {
            Some(info) => (
                info.reason.clone(),
                info.metadata
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ),
            None => (String::new(), BTreeMap::new()),
        };
        let violations = details
            .bad_request()
            .map(|bad| {
                bad.field_violations
                    .iter()
                    .map(|v| FieldViolation {
                        field: v.field.clone(),
                        description: v.description.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            code: status.code(),
            reason,
            message: status.message().to_owned(),
            violations,
            retry_after: details.retry_info().and_then(|r| r.retry_delay),
            metadata,
        }
    }

    /// Whether the same request may succeed if sent again later: the server is
    /// unavailable (shutting down, a dependency down), a transaction was aborted, or the
    /// server said when to retry (RetryInfo, e.g. RESOURCE_EXHAUSTED of a rate limit).
    /// RESOURCE_EXHAUSTED without RetryInfo (a message too large) is not: it would fail
    /// the same way.
    pub fn is_retryable(&self) -> bool {
        matches!(self.code, Code::Unavailable | Code::Aborted) || self.retry_after.is_some()
    }

    /// Whether the server gave this stable reason; programs match on reasons, never on
    /// messages.
    pub fn has_reason(&self, reason: &str) -> bool {
        self.reason == reason
    }

    /// The message, or the code's name when the server sent an empty one.
    pub fn summary(&self) -> String {
        if self.message.is_empty() {
            format!("{:?}", self.code)
        } else {
            self.message.clone()
        }
    }
}

impl From<&Status> for RemoteError {
    fn from(status: &Status) -> Self {
        Self::from_status(status)
    }
}

impl From<Status> for RemoteError {
    fn from(status: Status) -> Self {
        Self::from_status(&status)
    }
}

/// `message (REASON)`, then the field violations the message does not already say.
impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary())?;
        if !self.reason.is_empty() {
            write!(f, " ({})", self.reason)?;
        }
        for v in &self.violations {
            if !self.message.contains(&v.description) {
                write!(f, "; {}: {}", v.field, v.description)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for RemoteError {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{ApiError, reason};

    #[test]
    fn api_error_round_trips_through_a_status() {
        let sent = ApiError::new(Code::ResourceExhausted, "TOO_MANY_TASKS", "3 tasks running")
            .with_violation("prompt", "too long")
            .with_violation("labels[k]", "bad value")
            .with_retry_after(Duration::from_millis(2500))
            .with_metadata("limit", "3")
            .with_metadata("running", "3");
        let decoded = RemoteError::from_status(&Status::from(sent));
        assert_eq!(decoded.code, Code::ResourceExhausted);
        assert_eq!(decoded.reason, "TOO_MANY_TASKS");
        assert_eq!(decoded.message, "3 tasks running");
        assert_eq!(
            decoded.violations,
            vec![
                FieldViolation {
                    field: "prompt".into(),
                    description: "too long".into()
                },
                FieldViolation {
                    field: "labels[k]".into(),
                    description: "bad value".into()
                },
            ]
        );
        assert_eq!(decoded.retry_after, Some(Duration::from_millis(2500)));
        assert_eq!(
            decoded.metadata,
            BTreeMap::from([
                ("limit".to_owned(), "3".to_owned()),
                ("running".to_owned(), "3".to_owned())
            ])
        );
        assert!(decoded.is_retryable());
    }

    #[test]
    fn a_plain_status_decodes_without_details() {
        let decoded = RemoteError::from(Status::unavailable("connection refused"));
        assert_eq!(decoded.code, Code::Unavailable);
        assert_eq!(decoded.reason, "");
        assert!(decoded.violations.is_empty() && decoded.metadata.is_empty());
        assert_eq!(decoded.retry_after, None);
        assert!(decoded.is_retryable());
        assert_eq!(decoded.to_string(), "connection refused");
    }

    #[test]
    fn retryable_only_when_trying_again_can_help() {
        let too_large: RemoteError = Status::from(ApiError::new(
            Code::ResourceExhausted,
            reason::MESSAGE_TOO_LARGE,
            "request too large",
        ))
        .into();
        assert!(
            !too_large.is_retryable(),
            "the same request fails the same way"
        );
        let rate_limited: RemoteError =
            Status::from(ApiError::rate_limited("slow down", Duration::from_secs(1))).into();
        assert!(rate_limited.is_retryable());
        let invalid: RemoteError = Status::from(ApiError::invalid_field("steps", "empty")).into();
        assert!(!invalid.is_retryable());
        assert!(invalid.has_reason(reason::INVALID_ARGUMENT));
    }

    #[test]
    fn display_names_the_reason_and_unsaid_violations() {
        let one: RemoteError = Status::from(ApiError::invalid_field("steps", "empty")).into();
        assert_eq!(one.to_string(), "invalid steps: empty (INVALID_ARGUMENT)");
        let two: RemoteError = Status::from(
            ApiError::invalid_fields(vec![
                FieldViolation {
                    field: "a".into(),
                    description: "x".into(),
                },
                FieldViolation {
                    field: "b".into(),
                    description: "y".into(),
                },
            ])
            .expect("two"),
        )
        .into();
        assert_eq!(
            two.to_string(),
            "2 invalid fields: a, b (INVALID_ARGUMENT); a: x; b: y"
        );
        let empty = RemoteError::from(Status::new(Code::Internal, ""));
        assert_eq!(empty.to_string(), "Internal");
    }
}
