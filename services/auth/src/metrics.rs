//! kiln-auth's metrics (`kiln_auth_…`): logins by outcome. A lockout is a login refused
//! by the throttle (`outcome="locked_out"`), counted per attempt.

use kiln_metrics::{Counter, EncodeLabelSet, Family, Registry};

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LoginLabels {
    outcome: &'static str,
}

/// How a Login call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LoginOutcome {
    Success,
    /// Unknown user, wrong password or a disabled account (one answer for all three).
    Failure,
    /// Refused by the throttle before the password was checked.
    LockedOut,
}

/// The metric families; they count from the start, registered or not.
#[derive(Debug, Clone, Default)]
pub(crate) struct AuthMetrics {
    logins: Family<LoginLabels, Counter>,
}

impl AuthMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.sub_registry_with_prefix("auth").register(
            "logins",
            "Login calls by outcome (success, failure, locked_out)",
            self.logins.clone(),
        );
    }

    pub fn login(&self, outcome: LoginOutcome) {
        let outcome = match outcome {
            LoginOutcome::Success => "success",
            LoginOutcome::Failure => "failure",
            LoginOutcome::LockedOut => "locked_out",
        };
        self.logins.get_or_create(&LoginLabels { outcome }).inc();
    }
}
