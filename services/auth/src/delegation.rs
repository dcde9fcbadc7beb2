//! ExchangeToken: delegated tokens for agent tasks (RFC 8693 token-exchange semantics).
//!
//! An agent task outlives the user's 15-minute access token and a restart, and the agent
//! must not keep the user's JWT. So the agent (and only the agent: its workload
//! certificate, checked by the layer for the trust domain and here for the service
//! name) exchanges the user's current credential for a **delegated token**:
//!
//! - `sub` the user, `role` the user's current role capped at `user` (an admin's task
//!   builds like a user's; a viewer's exchange is refused, because a task builds);
//! - `act: {sub: <the agent's SPIFFE id>}`, `task`, optional `workspace`;
//! - `aud` a service audience ([`BUILD_AUDIENCE`]), so verifiers accept it only at
//!   kiln-build (the layer refuses it everywhere else, kiln-auth included);
//! - `sid` a delegation id of its own, recorded in the `delegations` table, so one
//!   delegation can be revoked like a session (revoking the API key it came from does);
//! - `iat_ms` from the same [`Stamps`](crate::revocations) as every other token and
//!   taken with the write connection held, so a user-wide revocation (demotion, disable,
//!   delete, password change, RevokeUserSessions, Logout of all sessions) ends it at
//!   every verifier within the revocation bound, exactly like an access token;
//! - `exp` now + the requested lifetime, capped at `delegation_max_lifetime` (default
//!   2 h) and at an API key's own expiry.
//!
//! The subject token is verified here as a call would be verified, but against the store
//! rather than a polled view: signature and expiry (with this service's clock), the
//! revocations table, the user still enabled; an API key through
//! `authenticate_api_key`. A delegated token is never a subject (no chains of
//! delegation). Logging out of the one session the subject token came from does not end
//! the delegation: the task is meant to outlive that session.

use std::time::{Duration, SystemTime};

use kiln_proto::auth as pb;
use kiln_rpc::identity::{BearerToken, WorkloadId};
use kiln_rpc::token::{AccessClaims, ActorClaim, BUILD_AUDIENCE, TokenVerifier};
use kiln_rpc::{FieldViolation, Principal, Role};
use sqlx::{AnyConnection, Row};

use crate::api_keys::KEY_PREFIX;
use crate::audit::{self, Actor, Event};
use crate::convert::{positive_duration, role_to_pb, timestamp};
use crate::error::{AuthError, Result, reason};
use crate::store::millis;
use crate::users;
use crate::{Caller, Inner};

/// Longest task or workspace id accepted.
const MAX_ID_BYTES: usize = 128;

/// The user's credential, as verified.
struct Subject {
    user_id: String,
    role: Role,
    /// `access_token` or `api_key`, for the audit trail.
    kind: &'static str,
    /// A JWT's session and stamp, for the revocation check.
    session: Option<(String, i64)>,
    /// An API key's id and expiry.
    api_key: Option<(String, Option<SystemTime>)>,
}

/// A request that passed validation.
struct Wanted {
    task_id: String,
    workspace_id: Option<String>,
    lifetime: Duration,
}

fn invalid_subject(why: &str) -> AuthError {
    AuthError::Unauthenticated {
        reason: reason::INVALID_SUBJECT_TOKEN,
        message: format!("the subject token was refused: {why}; the user must log in again"),
    }
}

fn too_low() -> AuthError {
    AuthError::PermissionDenied {
        reason: reason::DELEGATION_ROLE_TOO_LOW,
        message: "a viewer cannot delegate: an agent task starts builds, which needs the \
                  user role"
            .into(),
    }
}

/// At most `max` bytes of `s`, cut at a character boundary (for the audit trail).
fn clip(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

fn check_id(field: &str, value: &str, violations: &mut Vec<FieldViolation>) {
    let bad = |description: &str| FieldViolation {
        field: field.into(),
        description: description.into(),
    };
    if value.is_empty() || value.len() > MAX_ID_BYTES {
        violations.push(bad("must be 1 to 128 bytes"));
    } else if value.chars().any(char::is_control) {
        violations.push(bad("must not contain control characters"));
    }
}

impl Inner {
    pub(crate) async fn exchange_token(
        &self,
        caller: &Caller,
        req: pb::ExchangeTokenRequest,
    ) -> Result<pb::ExchangeTokenResponse> {
        let actor = caller.workload()?;
        let mut event = Event::new(Actor::of(actor), "token.exchange", &caller.peer)
            .detail("task_id", clip(&req.task_id, MAX_ID_BYTES))
            .detail("audience", clip(&req.audience, MAX_ID_BYTES));
        if let Some(w) = &req.workspace_id {
            event = event.detail("workspace_id", clip(w, MAX_ID_BYTES));
        }
        let result = self.exchange(actor, &req, &mut event).await;
        let now = self.now();
        match &result {
            Ok(granted) => {
                let expires_at = granted.expires_at.map_or(0, |t| t.seconds).to_string();
                event = event.detail("expires_at_unix", expires_at);
            }
            Err(e) => event = event.failed(e.reason()),
        }
        audit::record(&self.store, now, event).await;
        result
    }

    async fn exchange(
        &self,
        actor: &Principal,
        req: &pb::ExchangeTokenRequest,
        event: &mut Event,
    ) -> Result<pb::ExchangeTokenResponse> {
        let actor_allowed = WorkloadId::parse(&actor.subject)
            .is_some_and(|id| self.config.token_exchange_actors.contains(&id.service));
        if !actor_allowed {
            return Err(AuthError::PermissionDenied {
                reason: reason::ACTOR_NOT_ALLOWED,
                message: format!("{} may not act on behalf of users", actor.subject),
            });
        }
        let wanted = self.validate_exchange(req)?;
        let now = self.now();
        let subject = self.verify_subject(&req.subject_token, now).await?;
        event
            .details
            .insert("subject_user_id".into(), subject.user_id.clone());
        event
            .details
            .insert("subject_token".into(), subject.kind.into());
        if subject.role < Role::User {
            return Err(too_low());
        }
        let delegation_id = uuid::Uuid::new_v4().to_string();
        let mut exp = crate::unix_secs(now) + wanted.lifetime.as_secs().max(1);
        if let Some((_, Some(key_expiry))) = &subject.api_key {
            exp = exp.min(crate::unix_secs(*key_expiry));
        }
        let mut tx = self.store.begin().await?;
        // The first write, so that what follows sees every committed demotion and the
        // stamp orders this token after it (see `revocations`).
        sqlx::query("DELETE FROM delegations WHERE expires_at < $1")
            .bind(millis(now))
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO delegations (id, user_id, actor, audience, task_id, workspace_id, \
             api_key_id, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&delegation_id)
        .bind(&subject.user_id)
        .bind(&actor.subject)
        .bind(BUILD_AUDIENCE)
        .bind(&wanted.task_id)
        .bind(&wanted.workspace_id)
        .bind(subject.api_key.as_ref().map(|(id, _)| id.as_str()))
        .bind(millis(now))
        .bind(i64::try_from(exp.saturating_mul(1000)).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await?;
        let user = users::by_id(&mut *tx, &subject.user_id)
            .await?
            .filter(|u| !u.disabled)
            .ok_or_else(|| invalid_subject("the user is disabled or deleted"))?;
        self.still_valid(&mut tx, &subject).await?;
        let role = subject.role.min(user.role);
        if role < Role::User {
            return Err(too_low());
        }
        let stamp = self.stamps.next(now);
        tx.commit().await?;
        // A task builds like a user: an admin's delegation is not an admin token.
        let role = role.min(Role::User);
        let iat = crate::unix_secs(now);
        let claims = AccessClaims {
            iss: self.config.issuer.clone(),
            aud: BUILD_AUDIENCE.to_owned(),
            sub: user.id.clone(),
            name: user.username.clone(),
            role: role.as_str().to_owned(),
            sid: delegation_id.clone(),
            jti: uuid::Uuid::new_v4().to_string(),
            iat,
            iat_ms: u64::try_from(stamp).unwrap_or(0),
            nbf: iat,
            exp,
            act: Some(ActorClaim {
                sub: actor.subject.clone(),
            }),
            task: Some(wanted.task_id.clone()),
            workspace: wanted.workspace_id.clone(),
        };
        let access_token = self.keys.sign(&claims)?;
        let expires_at = timestamp(SystemTime::UNIX_EPOCH + Duration::from_secs(exp));
        event.target = format!("user/{}", user.id);
        for (key, value) in [
            ("subject_username", user.username.as_str()),
            ("delegation_id", delegation_id.as_str()),
            ("role", role.as_str()),
        ] {
            event.details.insert(key.into(), value.into());
        }
        Ok(pb::ExchangeTokenResponse {
            access_token,
            expires_at: Some(expires_at),
            principal: Some(pb::Principal {
                user_id: user.id,
                username: user.username,
                role: role_to_pb(role) as i32,
                auth_method: pb::AuthMethod::AccessToken as i32,
                expires_at: Some(expires_at),
                session_id: delegation_id,
                api_key_id: String::new(),
                actor: actor.subject.clone(),
            }),
        })
    }

    fn validate_exchange(&self, req: &pb::ExchangeTokenRequest) -> Result<Wanted> {
        let mut violations = Vec::new();
        if req.subject_token.is_empty() || req.subject_token.len() > BearerToken::MAX_HEADER_BYTES {
            violations.push(FieldViolation {
                field: "subject_token".into(),
                description: "must be 1 to 8192 bytes".into(),
            });
        }
        if req.audience != BUILD_AUDIENCE {
            violations.push(FieldViolation {
                field: "audience".into(),
                description: format!("must be {BUILD_AUDIENCE:?}, the only delegated audience"),
            });
        }
        check_id("task_id", &req.task_id, &mut violations);
        if let Some(w) = &req.workspace_id {
            check_id("workspace_id", w, &mut violations);
        }
        let max = self.config.delegation_max_lifetime;
        let lifetime = match &req.lifetime {
            None => max,
            Some(d) => match positive_duration(d, "lifetime") {
                Ok(d) => d.min(max),
                Err(AuthError::InvalidArgument(mut v)) => {
                    violations.append(&mut v);
                    max
                }
                Err(e) => return Err(e),
            },
        };
        if !violations.is_empty() {
            return Err(AuthError::InvalidArgument(violations));
        }
        Ok(Wanted {
            task_id: req.task_id.clone(),
            workspace_id: req.workspace_id.clone(),
            lifetime,
        })
    }

    /// Verifies the user's credential as a call would: an API key through the store, a
    /// JWT against the current keys and this service's clock (revocations are checked
    /// in the transaction, [`Inner::still_valid`]).
    async fn verify_subject(&self, token: &str, now: SystemTime) -> Result<Subject> {
        if token.starts_with(KEY_PREFIX) {
            let principal = match self.authenticate_api_key(token).await {
                Ok(response) => response.principal.unwrap_or_default(),
                Err(AuthError::InvalidApiKey | AuthError::InvalidArgument(_)) => {
                    return Err(invalid_subject(
                        "the API key is invalid, expired or revoked",
                    ));
                }
                Err(e) => return Err(e),
            };
            let role = crate::convert::role_from_pb(principal.role, "role")?
                .ok_or_else(|| AuthError::Corrupt("an API key without a role".into()))?;
            let expiry = principal
                .expires_at
                .and_then(|t| SystemTime::try_from(t).ok());
            return Ok(Subject {
                user_id: principal.user_id,
                role,
                kind: "api_key",
                session: None,
                api_key: Some((principal.api_key_id, expiry)),
            });
        }
        let verifier = TokenVerifier::new(
            &self.keys.jwks(now),
            &self.config.issuer,
            &self.config.audience,
        );
        let claims = verifier
            .verify(token)
            .map_err(|e| invalid_subject(&e.to_string()))?;
        if claims.act.is_some() {
            return Err(invalid_subject(
                "a delegated token cannot be exchanged again",
            ));
        }
        if claims.exp <= crate::unix_secs(now) {
            return Err(invalid_subject("the token has expired"));
        }
        let role = Role::parse(&claims.role).ok_or_else(|| invalid_subject("unknown role"))?;
        Ok(Subject {
            user_id: claims.sub,
            role,
            kind: "access_token",
            session: Some((claims.sid, i64::try_from(claims.iat_ms).unwrap_or(i64::MAX))),
            api_key: None,
        })
    }

    /// Inside the exchange's transaction: the subject token is not revoked (a JWT: the
    /// same rule verifiers apply; an API key: not revoked or expired since it was read).
    async fn still_valid(&self, conn: &mut AnyConnection, subject: &Subject) -> Result<()> {
        if let Some((sid, iat_ms)) = &subject.session {
            let revoked = sqlx::query(
                "SELECT 1 FROM token_revocations WHERE session_id = $1 OR (user_id = $2 \
                 AND session_id IS NULL AND not_before > $3 \
                 AND (keep_session_id IS NULL OR keep_session_id != $1)) LIMIT 1",
            )
            .bind(sid)
            .bind(&subject.user_id)
            .bind(iat_ms)
            .fetch_optional(&mut *conn)
            .await?
            .is_some();
            if revoked {
                return Err(invalid_subject("the token was revoked"));
            }
        }
        if let Some((key_id, _)) = &subject.api_key {
            let now = millis(self.now());
            let live = sqlx::query("SELECT revoked_at, expires_at FROM api_keys WHERE id = $1")
                .bind(key_id)
                .fetch_optional(&mut *conn)
                .await?
                .map(|row| -> Result<bool> {
                    let revoked: Option<i64> = row.try_get("revoked_at")?;
                    let expires: Option<i64> = row.try_get("expires_at")?;
                    Ok(revoked.is_none() && expires.is_none_or(|at| at > now))
                })
                .transpose()?
                .unwrap_or(false);
            if !live {
                return Err(invalid_subject(
                    "the API key is invalid, expired or revoked",
                ));
            }
        }
        Ok(())
    }

    /// Ends the unexpired delegations minted from API key `key_id` (of `user_id`), in the
    /// transaction that revokes the key.
    pub(crate) async fn revoke_key_delegations(
        &self,
        conn: &mut AnyConnection,
        user_id: &str,
        key_id: &str,
        now: SystemTime,
    ) -> Result<()> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM delegations WHERE api_key_id = $1 AND expires_at >= $2",
        )
        .bind(key_id)
        .bind(millis(now))
        .fetch_all(&mut *conn)
        .await?;
        for id in ids {
            self.revoke_session_tokens(conn, user_id, &id, now).await?;
        }
        Ok(())
    }
}
