//! What a verifier knows of kiln-auth's access-token revocations (`ListRevocations`).
//!
//! Access JWTs are verified locally, so on its own a revoked session's access token
//! would work until its `exp`. kiln-auth records a revocation for every Logout, replayed
//! refresh token, DeleteUser, UpdateUser, RevokeUserSessions and ChangePassword; the
//! [`SuiteAuthenticator`](crate::authn::SuiteAuthenticator) polls them and checks every
//! token against this in-memory view: two hash look-ups, no call per request.
//!
//! The view forgets a revocation once no token it affects can still be valid (kiln-auth
//! says how long that is), so its size is bounded by the revocations of one token
//! lifetime.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use kiln_proto::auth as pb;

fn millis(t: &prost_types::Timestamp) -> u64 {
    SystemTime::try_from(*t)
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The user-wide revocations of one user.
#[derive(Debug, Default, Clone)]
struct UserRevocation {
    /// Tokens issued before this stamp are revoked, whatever their session.
    all_before: u64,
    /// Tokens issued before the stamp are revoked unless they are of the session
    /// (ChangePassword keeps the caller's session).
    except: Vec<(u64, String)>,
}

/// The revocations a verifier has learnt, and where to continue.
#[derive(Debug, Default)]
pub(crate) struct RevocationView {
    users: HashMap<String, UserRevocation>,
    /// Revoked sessions and the stamp of their revocation (for forgetting).
    sessions: HashMap<String, u64>,
    /// The `cursor` to send next.
    pub cursor: i64,
}

impl RevocationView {
    /// Whether a token of `user`, session `sid`, issued at stamp `iat_ms` is revoked.
    pub fn revokes(&self, user: &str, sid: Option<&str>, iat_ms: u64) -> bool {
        if sid.is_some_and(|sid| self.sessions.contains_key(sid)) {
            return true;
        }
        let Some(r) = self.users.get(user) else {
            return false;
        };
        iat_ms < r.all_before
            || r.except
                .iter()
                .any(|(before, keep)| iat_ms < *before && sid != Some(keep.as_str()))
    }

    /// Applies one page of `ListRevocations`; returns the users with a new user-wide
    /// revocation (their cached API-key answers must go too).
    pub fn apply(&mut self, page: &pb::ListRevocationsResponse) -> Vec<String> {
        if page.reset {
            *self = Self::default();
        }
        let mut users = Vec::new();
        for r in &page.revocations {
            let stamp = r.not_before.as_ref().map_or(u64::MAX, millis);
            if !r.session_id.is_empty() {
                self.sessions.insert(r.session_id.clone(), stamp);
                continue;
            }
            let entry = self.users.entry(r.user_id.clone()).or_default();
            if r.keep_session_id.is_empty() {
                entry.all_before = entry.all_before.max(stamp);
            } else {
                entry.except.push((stamp, r.keep_session_id.clone()));
            }
            let all_before = entry.all_before;
            entry.except.retain(|(before, _)| *before > all_before);
            users.push(r.user_id.clone());
        }
        self.cursor = page.cursor;
        if let (Some(now), Some(retention)) = (&page.server_time, &page.retention) {
            let retention_ms = u64::try_from(retention.seconds).unwrap_or(0) * 1000;
            let horizon = millis(now).saturating_sub(retention_ms);
            self.forget_before(horizon);
        }
        users
    }

    /// Forgets revocations older than `horizon`: every token they affect has expired.
    fn forget_before(&mut self, horizon: u64) {
        self.sessions.retain(|_, stamp| *stamp >= horizon);
        self.users.retain(|_, r| {
            r.except.retain(|(before, _)| *before >= horizon);
            r.all_before >= horizon || !r.except.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(ms: u64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp::from(
            UNIX_EPOCH + std::time::Duration::from_millis(ms),
        ))
    }

    fn revocation(user: &str, sid: &str, before: u64, keep: &str) -> pb::TokenRevocation {
        pb::TokenRevocation {
            user_id: user.into(),
            session_id: sid.into(),
            not_before: ts(before),
            keep_session_id: keep.into(),
        }
    }

    #[test]
    fn user_session_and_keep_revocations_apply_exactly() {
        let mut view = RevocationView::default();
        view.apply(&pb::ListRevocationsResponse {
            revocations: vec![
                revocation("u1", "", 1000, ""),
                revocation("u2", "s-gone", 1000, ""),
                revocation("u3", "", 2000, "s-keep"),
            ],
            cursor: 3,
            ..Default::default()
        });
        assert_eq!(view.cursor, 3);
        assert!(view.revokes("u1", Some("s"), 999));
        assert!(!view.revokes("u1", Some("s"), 1001));
        assert!(view.revokes("u2", Some("s-gone"), 5000));
        assert!(!view.revokes("u2", Some("s-other"), 5));
        assert!(view.revokes("u3", Some("s-other"), 1999));
        assert!(!view.revokes("u3", Some("s-keep"), 1999));
        assert!(!view.revokes("nobody", Some("s"), 0));
    }

    #[test]
    fn old_revocations_are_forgotten_and_a_reset_starts_over() {
        let mut view = RevocationView::default();
        view.apply(&pb::ListRevocationsResponse {
            revocations: vec![
                revocation("u1", "", 1000, ""),
                revocation("u2", "s", 1000, ""),
            ],
            cursor: 2,
            ..Default::default()
        });
        view.apply(&pb::ListRevocationsResponse {
            cursor: 2,
            server_time: ts(100_000),
            retention: Some(prost_types::Duration {
                seconds: 10,
                nanos: 0,
            }),
            ..Default::default()
        });
        assert!(!view.revokes("u1", None, 0));
        assert!(!view.revokes("u2", Some("s"), 0));
        view.apply(&pb::ListRevocationsResponse {
            revocations: vec![revocation("u1", "", 1000, "")],
            cursor: 2,
            ..Default::default()
        });
        view.apply(&pb::ListRevocationsResponse {
            reset: true,
            cursor: 0,
            ..Default::default()
        });
        assert!(!view.revokes("u1", None, 0));
    }
}
