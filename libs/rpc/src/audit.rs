//! Audit records: one event type for every service's security-relevant actions (logins,
//! key and user changes, admin actions, build starts and cancels), written as a
//! `tracing` event with target `audit` and a fixed set of fields — the stable schema
//! below, version [`SCHEMA_VERSION`]. In JSON logs each record is one line, so a log
//! shipper can route them by `target == "audit"`. kiln-auth also keeps its records in
//! its store for `ListAuditEvents`.
//!
//! | field | value |
//! |---|---|
//! | `audit_schema` | [`SCHEMA_VERSION`] |
//! | `service` | `auth`, `build`, `agent` |
//! | `action` | e.g. `login`, `api_key.create`, `build.start`, `build.cancel` |
//! | `outcome` | `success` or `failure` |
//! | `reason` | the ErrorInfo reason of a failure, else empty |
//! | `actor_user_id`, `actor_username` | who acted (empty when unknown) |
//! | `actor_method` | `token`, `api_key`, `workload` or empty |
//! | `actor_workload` | for a delegated call, the workload acting for the user |
//! | `target_resource` | `<kind>/<id>` or empty |
//! | `peer` | the caller's address |
//! | `request_id` | the call's `x-request-id` |
//! | `details` | a JSON object of strings |
//!
//! Records never hold a password, token or key secret.

use std::collections::BTreeMap;

use crate::identity::{AuthMethod, PeerInfo, Principal};
use crate::layer::RequestId;

/// The version of the field set above; bumped only when a field changes meaning.
pub const SCHEMA_VERSION: u32 = 1;

/// The `tracing` target of audit records.
pub const TARGET: &str = "audit";

/// One audited action.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditRecord {
    pub service: &'static str,
    pub action: &'static str,
    /// `None` on success; the ErrorInfo reason on failure.
    pub failure: Option<&'static str>,
    pub actor_user_id: String,
    pub actor_username: String,
    pub actor_method: &'static str,
    pub actor_workload: String,
    pub target_resource: String,
    pub peer: String,
    pub request_id: String,
    pub details: BTreeMap<String, String>,
}

impl AuditRecord {
    pub fn new(service: &'static str, action: &'static str) -> Self {
        Self {
            service,
            action,
            ..Self::default()
        }
    }

    /// The record of an action taken in a call: its principal, peer and request id.
    pub fn for_request<T>(
        service: &'static str,
        action: &'static str,
        request: &tonic::Request<T>,
    ) -> Self {
        let mut record = Self::new(service, action);
        let extensions = request.extensions();
        if let Some(principal) = extensions.get::<Principal>() {
            record = record.actor(principal);
        }
        if let Some(addr) = extensions.get::<PeerInfo>().and_then(|p| p.remote_addr) {
            record.peer = addr.to_string();
        }
        if let Some(id) = extensions.get::<RequestId>() {
            record.request_id = id.as_str().to_owned();
        }
        record
    }

    pub fn actor(mut self, principal: &Principal) -> Self {
        self.actor_user_id = principal.subject.clone();
        self.actor_username = principal.username.clone();
        self.actor_method = match principal.auth_method {
            AuthMethod::Token => "token",
            AuthMethod::ApiKey => "api_key",
            AuthMethod::Workload => "workload",
        };
        self.actor_workload = principal.actor.clone().unwrap_or_default();
        self
    }

    pub fn target(mut self, kind: &str, id: &str) -> Self {
        self.target_resource = format!("{kind}/{id}");
        self
    }

    pub fn detail(mut self, key: &str, value: impl Into<String>) -> Self {
        self.details.insert(key.to_owned(), value.into());
        self
    }

    pub fn failed(mut self, reason: &'static str) -> Self {
        self.failure = Some(reason);
        self
    }

    pub fn outcome(&self) -> &'static str {
        if self.failure.is_some() {
            "failure"
        } else {
            "success"
        }
    }

    /// Writes the record to the log (target [`TARGET`]).
    pub fn emit(&self) {
        let details = serde_json::to_string(&self.details).unwrap_or_else(|_| "{}".into());
        tracing::info!(
            target: "audit",
            audit_schema = SCHEMA_VERSION,
            service = self.service,
            action = self.action,
            outcome = self.outcome(),
            reason = self.failure.unwrap_or(""),
            actor_user_id = %self.actor_user_id,
            actor_username = %self.actor_username,
            actor_method = self.actor_method,
            actor_workload = %self.actor_workload,
            target_resource = %self.target_resource,
            peer = %self.peer,
            request_id = %self.request_id,
            details = %details,
            "audit: {} {} {}",
            self.service,
            self.action,
            self.outcome(),
        );
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_record_is_one_json_line_with_the_stable_fields_and_no_secret() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(move || writer.clone())
            .finish();
        let mut request = tonic::Request::new(());
        request.extensions_mut().insert(Principal {
            actor: Some("spiffe://kiln.local/service/agent".into()),
            auth_method: AuthMethod::Token,
            username: "alice".into(),
            subject: "u-1".into(),
            ..Principal::workload(&crate::identity::WorkloadId {
                trust_domain: "kiln.local".into(),
                service: "x".into(),
            })
        });
        tracing::subscriber::with_default(subscriber, || {
            AuditRecord::for_request("build", "build.cancel", &request)
                .target("build", "b-7")
                .detail("grace", "5s")
                .failed("NOT_FOUND")
                .emit();
        });
        let text = String::from_utf8(buffer.0.lock().expect("lock").clone()).expect("utf-8");
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        let line: serde_json::Value = serde_json::from_str(lines[0]).expect("JSON");
        assert_eq!(line["target"], "audit");
        let fields = &line["fields"];
        for (key, value) in [
            ("service", "build"),
            ("action", "build.cancel"),
            ("outcome", "failure"),
            ("reason", "NOT_FOUND"),
            ("actor_user_id", "u-1"),
            ("actor_username", "alice"),
            ("actor_method", "token"),
            ("actor_workload", "spiffe://kiln.local/service/agent"),
            ("target_resource", "build/b-7"),
            ("details", r#"{"grace":"5s"}"#),
        ] {
            assert_eq!(fields[key], value, "{key} in {line}");
        }
        assert_eq!(fields["audit_schema"], SCHEMA_VERSION);
    }
}
