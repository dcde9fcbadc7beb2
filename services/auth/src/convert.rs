//! Conversions between the wire types of `kiln.auth.v1` and the crate's own.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_proto::auth as pb;
use kiln_rpc::Role;
use kiln_rpc::identity::AuthMethod;

use crate::error::{AuthError, Result};

pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

pub fn opt_timestamp(t: Option<SystemTime>) -> Option<prost_types::Timestamp> {
    t.map(timestamp)
}

/// A request timestamp as store milliseconds; `field` names it in the violation.
pub fn timestamp_millis(t: &prost_types::Timestamp, field: &str) -> Result<i64> {
    let t = SystemTime::try_from(*t)
        .map_err(|_| AuthError::invalid(field, "is not a valid timestamp"))?;
    let d = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| AuthError::invalid(field, "must not be before 1970"))?;
    i64::try_from(d.as_millis()).map_err(|_| AuthError::invalid(field, "is too far in the future"))
}

/// A positive request duration; `field` names it in the violation.
pub fn positive_duration(d: &prost_types::Duration, field: &str) -> Result<Duration> {
    let d = Duration::try_from(*d).map_err(|_| AuthError::invalid(field, "must be positive"))?;
    if d.is_zero() {
        return Err(AuthError::invalid(field, "must be positive"));
    }
    // Ten years is plenty for a key and keeps the arithmetic far from overflow.
    if d > Duration::from_secs(10 * 365 * 24 * 3600) {
        return Err(AuthError::invalid(field, "must be at most 10 years"));
    }
    Ok(d)
}

pub fn role_to_pb(role: Role) -> pb::Role {
    match role {
        Role::Viewer => pb::Role::Viewer,
        Role::User => pb::Role::User,
        Role::Admin => pb::Role::Admin,
    }
}

/// The role of a request field: `Ok(None)` for ROLE_UNSPECIFIED, an error for a number
/// outside the enum.
pub fn role_from_pb(value: i32, field: &str) -> Result<Option<Role>> {
    match pb::Role::try_from(value) {
        Ok(pb::Role::Unspecified) => Ok(None),
        Ok(pb::Role::Viewer) => Ok(Some(Role::Viewer)),
        Ok(pb::Role::User) => Ok(Some(Role::User)),
        Ok(pb::Role::Admin) => Ok(Some(Role::Admin)),
        Err(_) => Err(AuthError::invalid(field, "is not a known role")),
    }
}

/// A role stored as text.
pub fn stored_role(text: &str) -> Result<Role> {
    Role::parse(text).ok_or_else(|| AuthError::Corrupt(format!("unknown stored role {text:?}")))
}

pub fn auth_method(method: AuthMethod) -> pb::AuthMethod {
    match method {
        AuthMethod::Token => pb::AuthMethod::AccessToken,
        AuthMethod::ApiKey => pb::AuthMethod::ApiKey,
        AuthMethod::Workload => pb::AuthMethod::Unspecified,
    }
}

/// The wire form of the principal the layer authenticated.
pub fn principal_to_pb(p: &kiln_rpc::Principal) -> pb::Principal {
    pb::Principal {
        user_id: p.subject.clone(),
        username: p.username.clone(),
        role: p.role.map_or(pb::Role::Unspecified, role_to_pb) as i32,
        auth_method: auth_method(p.auth_method) as i32,
        expires_at: opt_timestamp(p.expires_at),
        session_id: p.session_id.clone().unwrap_or_default(),
        api_key_id: p.api_key_id.clone().unwrap_or_default(),
        actor: p.actor.clone().unwrap_or_default(),
    }
}

/// A client-chosen idempotency key: empty, or a UUID.
pub fn request_id(raw: &str) -> Result<Option<String>> {
    if raw.is_empty() {
        return Ok(None);
    }
    uuid::Uuid::parse_str(raw)
        .map(|u| Some(u.hyphenated().to_string()))
        .map_err(|_| AuthError::invalid("request_id", "must be a UUID"))
}
