//! Access-token revocations, published to every verifier through `ListRevocations`.
//!
//! Access JWTs are verified locally by every service (libs/rpc `authn`), so revoking a
//! session in this store alone would leave its access tokens working until they expire.
//! Every operation that must end tokens therefore records a revocation in the same
//! transaction as the change itself:
//!
//! - Logout of one session, and a replayed refresh token: the session (every token with
//!   that `sid`);
//! - DeleteUser, UpdateUser (role, disable, password reset), RevokeUserSessions and
//!   Logout of all sessions: every token of the user issued before the revocation;
//! - ChangePassword: the same, except the caller's own session.
//!
//! Verifiers poll `ListRevocations` about once a second (see libs/rpc `authn` for the
//! bound and what happens when kiln-auth is unreachable).
//!
//! "Issued before" must be exact: a token issued just after a demotion must work and one
//! issued just before must not, even within one millisecond or under a manual clock.
//! Tokens carry an `iat_ms` claim and user-wide revocations a `not_before` taken from
//! the same strictly increasing [`Stamps`], and both are taken while the one write
//! connection is held (after the transaction's first write), so their order is the
//! order of the transactions: a login whose transaction ran before a demotion has a
//! smaller stamp, and one that ran after it read the new role.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use kiln_proto::auth as pb;
use sqlx::{AnyConnection, Row};

use crate::Inner;
use crate::convert::timestamp;
use crate::error::Result;
use crate::store::{Store, duration_millis, from_millis, millis};

/// Most revocations one `ListRevocations` answer carries.
const MAX_PAGE: i64 = 1000;

/// How long past the longest token lifetime a revocation is kept: covers the verifiers'
/// `exp` leeway and clock skew between kiln-auth and the services.
const RETENTION_MARGIN: Duration = Duration::from_secs(60);

/// A strictly increasing millisecond stamp: never below the clock, never the same twice.
#[derive(Debug)]
pub(crate) struct Stamps {
    last: Mutex<i64>,
}

impl Stamps {
    /// Starts above every stamp already given out, so that after a restart (or with a
    /// clock that went back) a new revocation still covers every earlier token: above
    /// the stored revocations, and above the newest refresh token and delegation
    /// (written with each access and delegated token; their time is the clock, which a
    /// token's stamp exceeds only by the few milliseconds of stamps taken within one,
    /// hence the margin).
    pub async fn load(store: &Store) -> Result<Self> {
        const MARGIN_MS: i64 = 1000;
        let revoked: Option<i64> =
            sqlx::query_scalar("SELECT MAX(not_before) FROM token_revocations")
                .fetch_one(&store.read)
                .await?;
        let issued: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(t) FROM (SELECT MAX(created_at) AS t FROM refresh_tokens \
             UNION ALL SELECT MAX(created_at) AS t FROM delegations) AS issued",
        )
        .fetch_one(&store.read)
        .await?;
        let last = revoked
            .unwrap_or(0)
            .max(issued.map_or(0, |t| t.saturating_add(MARGIN_MS)));
        Ok(Self {
            last: Mutex::new(last),
        })
    }

    pub fn next(&self, now: SystemTime) -> i64 {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        *last = millis(now).max(*last + 1);
        *last
    }
}

impl Inner {
    /// How long a revocation stays relevant: as long as the longest token it may end
    /// can live. Delegated tokens live longer than access tokens; if revocations were
    /// forgotten after the access TTL, a demoted user's delegation would come back to
    /// life at every verifier.
    fn revocation_retention(&self) -> Duration {
        self.config.max_token_lifetime() + RETENTION_MARGIN
    }

    /// Revokes every token of `user_id` issued before now, except those of `keep`.
    /// Call after the transaction's first write (see the module doc).
    pub(crate) async fn revoke_user_tokens(
        &self,
        conn: &mut AnyConnection,
        user_id: &str,
        keep: Option<&str>,
        now: SystemTime,
    ) -> Result<()> {
        let not_before = self.stamps.next(now);
        self.insert_revocation(conn, user_id, None, not_before, keep, now)
            .await
    }

    /// Revokes every token of one session.
    pub(crate) async fn revoke_session_tokens(
        &self,
        conn: &mut AnyConnection,
        user_id: &str,
        session_id: &str,
        now: SystemTime,
    ) -> Result<()> {
        let stamp = self.stamps.next(now);
        self.insert_revocation(conn, user_id, Some(session_id), stamp, None, now)
            .await
    }

    async fn insert_revocation(
        &self,
        conn: &mut AnyConnection,
        user_id: &str,
        session_id: Option<&str>,
        not_before: i64,
        keep: Option<&str>,
        now: SystemTime,
    ) -> Result<()> {
        // Old rows go first; the cursor (seq) keeps growing because the newest row is
        // never old. Bounded work: the index on created_at.
        let horizon = millis(now) - duration_millis(self.revocation_retention());
        sqlx::query(
            "DELETE FROM token_revocations WHERE created_at < $1 \
             AND seq < (SELECT MAX(seq) FROM token_revocations)",
        )
        .bind(horizon)
        .execute(&mut *conn)
        .await?;
        sqlx::query(
            "INSERT INTO token_revocations (seq, user_id, session_id, not_before, \
             keep_session_id, created_at) \
             SELECT COALESCE(MAX(seq), 0) + 1, $1, $2, $3, $4, $5 FROM token_revocations",
        )
        .bind(user_id)
        .bind(session_id)
        .bind(not_before)
        .bind(keep)
        .bind(millis(now))
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// One page of `ListRevocations`.
    pub(crate) async fn list_revocations(
        &self,
        req: pb::ListRevocationsRequest,
    ) -> Result<pb::ListRevocationsResponse> {
        let size = match req.page_size {
            n if n <= 0 => MAX_PAGE,
            n => i64::from(n).min(MAX_PAGE),
        };
        let now = self.now();
        let horizon = millis(now) - duration_millis(self.revocation_retention());
        let newest: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM token_revocations")
            .fetch_one(&self.store.read)
            .await?;
        let newest = newest.unwrap_or(0);
        // A cursor beyond the newest row comes from another store (replaced database):
        // start over, and say so, so the verifier forgets what it learnt from the old one.
        let reset = req.after > newest;
        let after = if reset { 0 } else { req.after.max(0) };
        let rows = sqlx::query(
            "SELECT seq, user_id, session_id, not_before, keep_session_id \
             FROM token_revocations WHERE seq > $1 AND created_at >= $2 ORDER BY seq LIMIT $3",
        )
        .bind(after)
        .bind(horizon)
        .bind(size + 1)
        .fetch_all(&self.store.read)
        .await?;
        let more = i64::try_from(rows.len()).unwrap_or(i64::MAX) > size;
        let mut cursor = after;
        let mut revocations = Vec::with_capacity(rows.len());
        for row in rows
            .iter()
            .take(usize::try_from(size).unwrap_or(usize::MAX))
        {
            cursor = row.try_get("seq")?;
            revocations.push(pb::TokenRevocation {
                user_id: row.try_get("user_id")?,
                session_id: row
                    .try_get::<Option<String>, _>("session_id")?
                    .unwrap_or_default(),
                not_before: Some(timestamp(from_millis(row.try_get("not_before")?))),
                keep_session_id: row
                    .try_get::<Option<String>, _>("keep_session_id")?
                    .unwrap_or_default(),
            });
        }
        if !more {
            // Nothing relevant past the page: jump to the newest row, which also skips
            // rows that are too old to matter.
            cursor = cursor.max(newest);
        }
        let retention = self.revocation_retention();
        Ok(pb::ListRevocationsResponse {
            revocations,
            cursor,
            more,
            reset,
            server_time: Some(timestamp(now)),
            retention: Some(prost_types::Duration {
                seconds: i64::try_from(retention.as_secs()).unwrap_or(i64::MAX),
                nanos: 0,
            }),
        })
    }
}
