//! Sessions: login, access tokens, refresh-token rotation with reuse detection, logout
//! and password changes.
//!
//! A session is a family of refresh tokens. Each refresh marks the presented token
//! rotated and issues a successor; the tokens are opaque 256-bit random strings stored
//! only as SHA-256 digests. A rotated token presented again is either a concurrent
//! refresh (within `refresh_reuse_grace` of its rotation: answered with another
//! successor in the same session) or a stolen token replayed (the whole session is
//! revoked, so the thief's and the owner's newest tokens both stop working).

use std::time::{Duration, SystemTime};

use kiln_proto::auth as pb;
use kiln_rpc::token::AccessClaims;
use sqlx::Row;

use crate::audit::{self, Actor, Event};
use crate::convert::{role_to_pb, timestamp};
use crate::error::{AuthError, Result, reason};
use crate::metrics::LoginOutcome;
use crate::password::{MAX_PASSWORD_BYTES, MAX_USERNAME_BYTES, check_new_password};
use crate::secret::{digest, random_token};
use crate::store::{duration_millis, from_millis, millis};
use crate::users::{self, UserRow};
use crate::{Caller, Inner};

/// The longest refresh token accepted (ours are 43 characters).
const MAX_REFRESH_TOKEN_BYTES: usize = 1024;

/// The tokens of a login or refresh.
struct Issued {
    access_token: String,
    access_expires_at: SystemTime,
    refresh_token: String,
    refresh_expires_at: SystemTime,
    principal: pb::Principal,
}

impl Inner {
    pub(crate) async fn login(
        &self,
        caller: &Caller,
        req: pb::LoginRequest,
    ) -> Result<pb::LoginResponse> {
        validate_login(&req)?;
        // Throttle on the folded name so that `Alice` and `alice` share one counter.
        let account = req.username.to_ascii_lowercase();
        let now = self.now();
        let reservation = match self
            .throttle
            .reserve(&self.store, &account, caller.ip, now)
            .await?
        {
            Ok(reservation) => reservation,
            Err(retry_after) => {
                let event = Event::new(
                    Actor::named("", &req.username),
                    "login.locked_out",
                    &caller.peer,
                )
                .failed(reason::LOGIN_THROTTLED);
                // Aggregated: an unauthenticated flood must not grow the store per attempt.
                let peer = caller
                    .ip
                    .map_or_else(|| "unknown".to_owned(), |ip| ip.to_string());
                self.refusals.record(&self.store, now, &peer, event).await;
                self.metrics.login(LoginOutcome::LockedOut);
                return Err(AuthError::LoginThrottled { retry_after });
            }
        };
        let user = users::by_username(&self.store.read, &req.username).await?;
        // Unknown users are checked against a dummy hash: same work, same answer.
        let verified = self
            .hasher
            .verify(
                &req.password,
                user.as_ref().map(|u| u.password_hash.as_str()),
            )
            .await?;
        let now = self.now();
        let user = match user {
            Some(user) if verified && !user.disabled => user,
            user => {
                reservation.failed(now).await?;
                let mut event = Event::new(
                    Actor::named(user.as_ref().map_or("", |u| u.id.as_str()), &req.username),
                    "login",
                    &caller.peer,
                )
                .failed(reason::INVALID_CREDENTIALS);
                if user.as_ref().is_some_and(|u| u.disabled) {
                    event = event.detail("disabled", "true");
                }
                audit::record(&self.store, now, event).await;
                self.metrics.login(LoginOutcome::Failure);
                return Err(AuthError::InvalidCredentials);
            }
        };
        reservation.succeeded().await?;
        let issued = self.start_session(&user, &caller.peer, now).await?;
        let event = Event::new(
            Actor::named(&user.id, &user.username),
            "login",
            &caller.peer,
        )
        .detail("session_id", &issued.principal.session_id);
        audit::record(&self.store, now, event).await;
        self.metrics.login(LoginOutcome::Success);
        Ok(pb::LoginResponse {
            access_token: issued.access_token,
            refresh_token: issued.refresh_token,
            access_expires_at: Some(timestamp(issued.access_expires_at)),
            refresh_expires_at: Some(timestamp(issued.refresh_expires_at)),
            principal: Some(pb::Principal {
                auth_method: pb::AuthMethod::Password as i32,
                ..issued.principal
            }),
        })
    }

    async fn start_session(&self, user: &UserRow, peer: &str, now: SystemTime) -> Result<Issued> {
        let session_id = uuid::Uuid::new_v4().to_string();
        let absolute = now + self.config.refresh_absolute_ttl;
        let mut tx = self.store.begin().await?;
        sqlx::query(
            "INSERT INTO sessions (id, user_id, created_at, absolute_expires_at, revoked_at, \
             revoked_reason, peer) VALUES ($1, $2, $3, $4, NULL, NULL, $5)",
        )
        .bind(&session_id)
        .bind(&user.id)
        .bind(millis(now))
        .bind(millis(absolute))
        .bind(peer)
        .execute(&mut *tx)
        .await?;
        // The user as of now, with the write connection held: the password was checked
        // against `user` (read before hashing), and a concurrent password change,
        // disable, delete or demotion must win over this login, not be undone by it.
        let user = users::by_id(&mut *tx, &user.id)
            .await?
            .filter(|u| !u.disabled && u.password_hash == user.password_hash)
            .ok_or(AuthError::InvalidCredentials)?;
        let stamp = self.stamps.next(now);
        sqlx::query("UPDATE users SET last_login_at = $1 WHERE id = $2")
            .bind(millis(now))
            .bind(&user.id)
            .execute(&mut *tx)
            .await?;
        let (refresh_token, refresh_expires_at) = self
            .insert_refresh(&mut tx, &session_id, absolute, now)
            .await?;
        tx.commit().await?;
        self.issue(
            &user,
            &session_id,
            refresh_token,
            refresh_expires_at,
            now,
            stamp,
        )
    }

    /// Stores a new refresh token of `session_id`, living the idle lifetime but never
    /// past the session's absolute expiry.
    async fn insert_refresh(
        &self,
        conn: &mut sqlx::AnyConnection,
        session_id: &str,
        absolute: SystemTime,
        now: SystemTime,
    ) -> Result<(String, SystemTime)> {
        let token = random_token(32);
        let expires_at = (now + self.config.refresh_idle_ttl).min(absolute);
        sqlx::query(
            "INSERT INTO refresh_tokens (token_hash, session_id, created_at, expires_at, rotated_at) \
             VALUES ($1, $2, $3, $4, NULL)",
        )
        .bind(digest(&token))
        .bind(session_id)
        .bind(millis(now))
        .bind(millis(expires_at))
        .execute(conn)
        .await?;
        Ok((token, expires_at))
    }

    /// Signs an access token for `user` in `session_id` and packs the response parts.
    fn issue(
        &self,
        user: &UserRow,
        session_id: &str,
        refresh_token: String,
        refresh_expires_at: SystemTime,
        now: SystemTime,
        stamp: i64,
    ) -> Result<Issued> {
        let iat = crate::unix_secs(now);
        let exp = iat + self.config.access_ttl.as_secs().max(1);
        let claims = AccessClaims {
            iss: self.config.issuer.clone(),
            aud: self.config.audience.clone(),
            sub: user.id.clone(),
            name: user.username.clone(),
            role: user.role.as_str().to_owned(),
            sid: session_id.to_owned(),
            jti: uuid::Uuid::new_v4().to_string(),
            iat,
            iat_ms: u64::try_from(stamp).unwrap_or(0),
            nbf: iat,
            exp,
            ..AccessClaims::default()
        };
        let access_token = self.keys.sign(&claims)?;
        let access_expires_at = SystemTime::UNIX_EPOCH + Duration::from_secs(exp);
        Ok(Issued {
            access_token,
            access_expires_at,
            refresh_token,
            refresh_expires_at,
            principal: pb::Principal {
                user_id: user.id.clone(),
                username: user.username.clone(),
                role: role_to_pb(user.role) as i32,
                auth_method: pb::AuthMethod::AccessToken as i32,
                expires_at: Some(timestamp(access_expires_at)),
                session_id: session_id.to_owned(),
                api_key_id: String::new(),
                actor: String::new(),
            },
        })
    }

    pub(crate) async fn refresh(
        &self,
        caller: &Caller,
        token: &str,
    ) -> Result<pb::RefreshResponse> {
        if token.is_empty() {
            return Err(AuthError::invalid("refresh_token", "must not be empty"));
        }
        if token.len() > MAX_REFRESH_TOKEN_BYTES {
            return Err(AuthError::invalid(
                "refresh_token",
                "must be at most 1024 bytes",
            ));
        }
        let hash = digest(token);
        let now = self.now();
        let at = millis(now);
        let mut tx = self.store.begin().await?;
        // Claim the token: exactly one refresh wins the rotation.
        let won = sqlx::query(
            "UPDATE refresh_tokens SET rotated_at = $1 \
             WHERE token_hash = $2 AND rotated_at IS NULL AND expires_at > $3",
        )
        .bind(at)
        .bind(&hash)
        .bind(at)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        let row = sqlx::query(
            "SELECT t.session_id, t.expires_at, t.rotated_at, s.user_id, \
             s.absolute_expires_at, s.revoked_at \
             FROM refresh_tokens t JOIN sessions s ON s.id = t.session_id \
             WHERE t.token_hash = $1",
        )
        .bind(&hash)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(AuthError::InvalidRefreshToken)?;
        let session_id: String = row.try_get("session_id")?;
        let user_id: String = row.try_get("user_id")?;
        let absolute: i64 = row.try_get("absolute_expires_at")?;
        let revoked = row.try_get::<Option<i64>, _>("revoked_at")?.is_some();
        let rotated_at: Option<i64> = row.try_get("rotated_at")?;
        if revoked || absolute <= at {
            tx.commit().await?;
            return Err(AuthError::InvalidRefreshToken);
        }
        if !won {
            let Some(rotated_at) = rotated_at else {
                // Not rotated, so it lost to expiry.
                return Err(AuthError::InvalidRefreshToken);
            };
            if at - rotated_at > duration_millis(self.config.refresh_reuse_grace) {
                sqlx::query(
                    "UPDATE sessions SET revoked_at = $1, revoked_reason = $2 \
                     WHERE id = $3 AND revoked_at IS NULL",
                )
                .bind(at)
                .bind("refresh.reuse_detected")
                .bind(&session_id)
                .execute(&mut *tx)
                .await?;
                // The thief may hold an access token of this session too.
                self.revoke_session_tokens(&mut tx, &user_id, &session_id, now)
                    .await?;
                tx.commit().await?;
                let event = Event::new(
                    Actor::named(&user_id, ""),
                    "refresh.reuse_detected",
                    &caller.peer,
                )
                .target("session", &session_id)
                .failed(reason::REFRESH_TOKEN_REUSED);
                audit::record(&self.store, now, event).await;
                return Err(AuthError::RefreshTokenReused);
            }
            // Inside the grace window: a concurrent refresh, answered in the same family.
        }
        let user = users::by_id(&mut *tx, &user_id)
            .await?
            .filter(|u| !u.disabled)
            .ok_or(AuthError::InvalidRefreshToken)?;
        // Taken with the write connection held (the UPDATE above), after reading the user.
        let stamp = self.stamps.next(now);
        let (refresh_token, refresh_expires_at) = self
            .insert_refresh(&mut tx, &session_id, from_millis(absolute), now)
            .await?;
        tx.commit().await?;
        let issued = self.issue(
            &user,
            &session_id,
            refresh_token,
            refresh_expires_at,
            now,
            stamp,
        )?;
        let mut event = Event::new(
            Actor::named(&user.id, &user.username),
            "refresh",
            &caller.peer,
        )
        .target("session", &session_id);
        if !won {
            event = event.detail("grace", "true");
        }
        audit::record(&self.store, now, event).await;
        Ok(pb::RefreshResponse {
            access_token: issued.access_token,
            refresh_token: issued.refresh_token,
            access_expires_at: Some(timestamp(issued.access_expires_at)),
            refresh_expires_at: Some(timestamp(issued.refresh_expires_at)),
            principal: Some(issued.principal),
        })
    }

    pub(crate) async fn logout(&self, caller: &Caller, all_sessions: bool) -> Result<u32> {
        let principal = caller.user()?;
        let now = self.now();
        let mut tx = self.store.begin().await?;
        let revoked = if all_sessions {
            let revoked =
                users::revoke_sessions(&mut *tx, &principal.subject, None, "logout", now).await?;
            self.revoke_user_tokens(&mut tx, &principal.subject, None, now)
                .await?;
            revoked
        } else {
            let session = principal
                .session_id
                .as_deref()
                .ok_or(AuthError::FailedPrecondition {
                    reason: reason::NO_SESSION,
                    message:
                        "an API key has no session to log out; revoke the key with RevokeApiKey \
                          or set all_sessions"
                            .into(),
                })?;
            let done = sqlx::query(
                "UPDATE sessions SET revoked_at = $1, revoked_reason = $2 \
                 WHERE id = $3 AND user_id = $4 AND revoked_at IS NULL",
            )
            .bind(millis(now))
            .bind("logout")
            .bind(session)
            .bind(&principal.subject)
            .execute(&mut *tx)
            .await?;
            // Also when the session was already revoked: its access tokens must end.
            self.revoke_session_tokens(&mut tx, &principal.subject, session, now)
                .await?;
            u32::try_from(done.rows_affected()).unwrap_or(u32::MAX)
        };
        tx.commit().await?;
        let event = Event::new(Actor::of(principal), "logout", &caller.peer)
            .detail("all_sessions", all_sessions.to_string())
            .detail("revoked_sessions", revoked.to_string());
        audit::record(&self.store, now, event).await;
        Ok(revoked)
    }

    pub(crate) async fn change_password(
        &self,
        caller: &Caller,
        req: pb::ChangePasswordRequest,
    ) -> Result<u32> {
        let principal = caller.user()?;
        if req.old_password.is_empty() || req.old_password.len() > MAX_PASSWORD_BYTES {
            return Err(AuthError::invalid(
                "old_password",
                "must be 1 to 1024 bytes",
            ));
        }
        let user = users::by_id(&self.store.read, &principal.subject)
            .await?
            .ok_or(AuthError::InvalidCredentials)?;
        check_new_password("new_password", &req.new_password, &user.username)?;
        if req.new_password == req.old_password {
            return Err(AuthError::invalid(
                "new_password",
                "must differ from the current password",
            ));
        }
        let now = self.now();
        let reservation = self
            .throttle
            .reserve(&self.store, &user.username, caller.ip, now)
            .await?
            .map_err(|retry_after| AuthError::LoginThrottled { retry_after })?;
        let event = Event::new(Actor::of(principal), "password.change", &caller.peer)
            .target("user", &user.id);
        if !self
            .hasher
            .verify(&req.old_password, Some(&user.password_hash))
            .await?
        {
            let now = self.now();
            reservation.failed(now).await?;
            audit::record(&self.store, now, event.failed(reason::INVALID_CREDENTIALS)).await;
            return Err(AuthError::InvalidCredentials);
        }
        let hash = self.hasher.hash(&req.new_password).await?;
        let now = self.now();
        let mut tx = self.store.begin().await?;
        sqlx::query("UPDATE users SET password_hash = $1, password_changed_at = $2, updated_at = $3 WHERE id = $4")
            .bind(&hash)
            .bind(millis(now))
            .bind(millis(now))
            .bind(&user.id)
            .execute(&mut *tx)
            .await?;
        let keep = principal.session_id.as_deref();
        let revoked =
            users::revoke_sessions(&mut *tx, &user.id, keep, "password.change", now).await?;
        self.revoke_user_tokens(&mut tx, &user.id, keep, now)
            .await?;
        tx.commit().await?;
        audit::record(
            &self.store,
            now,
            event.detail("revoked_sessions", revoked.to_string()),
        )
        .await;
        Ok(revoked)
    }
}

fn validate_login(req: &pb::LoginRequest) -> Result<()> {
    let mut violations = Vec::new();
    let mut check = |field: &str, value: &str, max: usize| {
        if value.is_empty() {
            violations.push(kiln_rpc::FieldViolation {
                field: field.into(),
                description: "must not be empty".into(),
            });
        } else if value.len() > max {
            violations.push(kiln_rpc::FieldViolation {
                field: field.into(),
                description: format!("must be at most {max} bytes"),
            });
        }
    };
    check("username", &req.username, MAX_USERNAME_BYTES);
    check("password", &req.password, MAX_PASSWORD_BYTES);
    if violations.is_empty() {
        Ok(())
    } else {
        Err(AuthError::InvalidArgument(violations))
    }
}
