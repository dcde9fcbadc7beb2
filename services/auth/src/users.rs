//! Users: the stored row, look-ups, and the admin RPCs (create, get, list, update,
//! delete, revoke sessions).

use std::time::SystemTime;

use kiln_proto::auth as pb;
use kiln_rpc::Role;
use kiln_store::Sql;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use crate::audit::{self, Actor, Event};
use crate::convert::{self, opt_timestamp, role_from_pb, role_to_pb, timestamp};
use crate::error::{AuthError, Result, reason};
use crate::password::{check_new_password, normalize_username};
use crate::store::{flag, from_millis, millis};
use crate::{Caller, Inner, paging};

/// A user as stored.
#[derive(Debug, Clone)]
pub struct UserRow {
    pub id: String,
    pub username: String,
    pub password_hash: String,
    pub role: Role,
    pub disabled: bool,
    pub created_at: i64,
    pub updated_at: i64,
    pub password_changed_at: i64,
    pub last_login_at: Option<i64>,
}

impl UserRow {
    fn from_row(row: &AnyRow) -> Result<Self> {
        Ok(Self {
            id: row.try_get("id")?,
            username: row.try_get("username")?,
            password_hash: row.try_get("password_hash")?,
            role: convert::stored_role(row.try_get("role")?)?,
            disabled: row.try_get::<i64, _>("disabled")? != 0,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
            password_changed_at: row.try_get("password_changed_at")?,
            last_login_at: row.try_get("last_login_at")?,
        })
    }

    pub fn to_pb(&self) -> pb::User {
        pb::User {
            id: self.id.clone(),
            username: self.username.clone(),
            role: role_to_pb(self.role) as i32,
            disabled: self.disabled,
            created_at: Some(timestamp(from_millis(self.created_at))),
            updated_at: Some(timestamp(from_millis(self.updated_at))),
            password_changed_at: Some(timestamp(from_millis(self.password_changed_at))),
            last_login_at: opt_timestamp(self.last_login_at.map(from_millis)),
        }
    }
}

pub async fn by_id(conn: impl sqlx::AnyExecutor<'_>, id: &str) -> Result<Option<UserRow>> {
    let row = sqlx::query("SELECT * FROM users WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(UserRow::from_row).transpose()
}

pub async fn by_username(
    conn: impl sqlx::AnyExecutor<'_>,
    username: &str,
) -> Result<Option<UserRow>> {
    let row = sqlx::query("SELECT * FROM users WHERE username = $1")
        .bind(username)
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(UserRow::from_row).transpose()
}

pub async fn count(conn: impl sqlx::AnyExecutor<'_>) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT COUNT(*) FROM users")
        .fetch_one(conn)
        .await?)
}

/// Inserts a user whose password is already hashed. A taken username answers
/// ALREADY_EXISTS (USERNAME_TAKEN).
pub async fn insert(
    conn: impl sqlx::AnyExecutor<'_>,
    username: &str,
    password_hash: &str,
    role: Role,
    request_id: Option<&str>,
    now: SystemTime,
) -> Result<UserRow> {
    let id = uuid::Uuid::new_v4().to_string();
    let now = millis(now);
    let result = sqlx::query(
        "INSERT INTO users (id, username, password_hash, role, disabled, created_at, \
         updated_at, password_changed_at, last_login_at, create_request_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL, $9)",
    )
    .bind(&id)
    .bind(username)
    .bind(password_hash)
    .bind(role.as_str())
    .bind(flag(false))
    .bind(now)
    .bind(now)
    .bind(now)
    .bind(request_id)
    .execute(conn)
    .await;
    match result {
        Ok(_) => Ok(UserRow {
            id,
            username: username.to_owned(),
            password_hash: password_hash.to_owned(),
            role,
            disabled: false,
            created_at: now,
            updated_at: now,
            password_changed_at: now,
            last_login_at: None,
        }),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(AuthError::AlreadyExists {
            reason: reason::USERNAME_TAKEN,
            message: format!("the username {username:?} is taken"),
        }),
        Err(e) => Err(e.into()),
    }
}

/// Revokes the user's unrevoked sessions, except `keep`; returns how many.
pub async fn revoke_sessions(
    conn: impl sqlx::AnyExecutor<'_>,
    user_id: &str,
    keep: Option<&str>,
    why: &str,
    now: SystemTime,
) -> Result<u32> {
    let done = sqlx::query(
        "UPDATE sessions SET revoked_at = $1, revoked_reason = $2 \
         WHERE user_id = $3 AND revoked_at IS NULL AND id <> $4",
    )
    .bind(millis(now))
    .bind(why)
    .bind(user_id)
    .bind(keep.unwrap_or(""))
    .execute(conn)
    .await?;
    Ok(u32::try_from(done.rows_affected()).unwrap_or(u32::MAX))
}

async fn enabled_admins(conn: &mut AnyConnection) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE role = $1 AND disabled = $2")
            .bind(Role::Admin.as_str())
            .bind(flag(false))
            .fetch_one(conn)
            .await?,
    )
}

fn last_admin() -> AuthError {
    AuthError::FailedPrecondition {
        reason: reason::LAST_ADMIN,
        message: "the suite needs at least one enabled admin".into(),
    }
}

impl Inner {
    pub(crate) async fn create_user(
        &self,
        caller: &Caller,
        req: pb::CreateUserRequest,
    ) -> Result<pb::User> {
        let actor = caller.admin()?;
        // Validate every field first, so that one answer lists everything wrong.
        let request_id = convert::request_id(&req.request_id);
        let username = normalize_username("username", &req.username);
        let role = role_from_pb(req.role, "role");
        let name_for_rules = username.as_deref().unwrap_or(&req.username);
        let password = check_new_password("password", &req.password, name_for_rules);
        let mut violations = Vec::new();
        collect(&mut violations, &request_id);
        collect(&mut violations, &username);
        collect(&mut violations, &role);
        if let Err(e) = password {
            return Err(merge(violations, e));
        }
        if !violations.is_empty() {
            return Err(AuthError::InvalidArgument(violations));
        }
        let request_id = request_id?;
        let (username, role) = (username?, role?.unwrap_or(Role::User));
        if let Some(id) = &request_id
            && let Some(user) = self.user_by_request(id).await?
        {
            return Ok(user);
        }
        let hash = self.hasher.hash(&req.password).await?;
        let now = self.now();
        let event = Event::new(Actor::of(actor), "user.create", &caller.peer)
            .detail("username", &username)
            .detail("role", role.as_str());
        match insert(
            &self.store.write,
            &username,
            &hash,
            role,
            request_id.as_deref(),
            now,
        )
        .await
        {
            Ok(user) => {
                audit::record(&self.store, now, event.target("user", &user.id)).await;
                Ok(user.to_pb())
            }
            Err(e) => {
                // A retry that raced this one created the user first: answer as a retry.
                if let (AuthError::AlreadyExists { .. }, Some(id)) = (&e, &request_id)
                    && let Some(user) = self.user_by_request(id).await?
                {
                    return Ok(user);
                }
                audit::record(&self.store, now, event.failed(e.reason())).await;
                Err(e)
            }
        }
    }

    /// The user an earlier CreateUser with this request id created. Read from the writer,
    /// which sees every commit.
    async fn user_by_request(&self, request_id: &str) -> Result<Option<pb::User>> {
        let row = sqlx::query("SELECT * FROM users WHERE create_request_id = $1")
            .bind(request_id)
            .fetch_optional(&self.store.write)
            .await?;
        row.map(|row| Ok(UserRow::from_row(&row)?.to_pb()))
            .transpose()
    }

    pub(crate) async fn get_user(&self, caller: &Caller, user_id: &str) -> Result<pb::User> {
        caller.admin()?;
        non_empty("user_id", user_id)?;
        by_id(&self.store.read, user_id)
            .await?
            .map(|u| u.to_pb())
            .ok_or_else(|| AuthError::not_found("user", user_id))
    }

    pub(crate) async fn list_users(
        &self,
        caller: &Caller,
        req: pb::ListUsersRequest,
    ) -> Result<pb::ListUsersResponse> {
        caller.admin()?;
        let size = paging::page_size(req.page_size)?;
        let role = req
            .role
            .map(|r| role_from_pb(r, "role"))
            .transpose()?
            .flatten();
        let cursor = paging::decode_token(&req.page_token, 1)?;
        let mut q: Sql = Sql::new("SELECT * FROM users WHERE 1 = 1");
        if let Some(role) = role {
            q.push(" AND role = ").bind(role.as_str());
        }
        if !req.include_disabled {
            q.push(" AND disabled = ").bind(flag(false));
        }
        if let Some(after) = cursor {
            q.push(" AND username > ").bind(after[0].clone());
        }
        q.push(" ORDER BY username LIMIT ")
            .bind(i64::from(size) + 1);
        let rows = q.build().fetch_all(&self.store.read).await?;
        let mut users = rows
            .iter()
            .map(UserRow::from_row)
            .collect::<Result<Vec<_>>>()?;
        let next_page_token =
            paging::next_token(&mut users, size, |u| paging::encode_token(&[&u.username]));
        Ok(pb::ListUsersResponse {
            users: users.iter().map(UserRow::to_pb).collect(),
            next_page_token,
        })
    }

    pub(crate) async fn update_user(
        &self,
        caller: &Caller,
        req: pb::UpdateUserRequest,
    ) -> Result<pb::User> {
        let actor = caller.admin()?;
        non_empty("user_id", &req.user_id)?;
        let role = req.role.map(|r| role_from_pb(r, "role")).transpose()?;
        let role = match role {
            Some(None) => return Err(AuthError::invalid("role", "must be a role")),
            Some(Some(r)) => Some(r),
            None => None,
        };
        let user = by_id(&self.store.read, &req.user_id)
            .await?
            .ok_or_else(|| AuthError::not_found("user", &req.user_id))?;
        let hash = match &req.password {
            Some(pw) => {
                check_new_password("password", pw, &user.username)?;
                Some(self.hasher.hash(pw).await?)
            }
            None => None,
        };
        if role.is_none() && req.disabled.is_none() && hash.is_none() {
            return Ok(user.to_pb());
        }
        let now = self.now();
        let mut tx = self.store.begin().await?;
        let user = by_id(&mut *tx, &req.user_id)
            .await?
            .ok_or_else(|| AuthError::not_found("user", &req.user_id))?;
        let new_role = role.unwrap_or(user.role);
        let new_disabled = req.disabled.unwrap_or(user.disabled);
        let loses_admin =
            user.role == Role::Admin && !user.disabled && (new_role != Role::Admin || new_disabled);
        if loses_admin && enabled_admins(&mut tx).await? <= 1 {
            return Err(last_admin());
        }
        let at = millis(now);
        let password_changed_at = if hash.is_some() {
            at
        } else {
            user.password_changed_at
        };
        sqlx::query(
            "UPDATE users SET role = $1, disabled = $2, updated_at = $3, password_hash = $4, \
             password_changed_at = $5 WHERE id = $6",
        )
        .bind(new_role.as_str())
        .bind(flag(new_disabled))
        .bind(at)
        .bind(hash.as_deref().unwrap_or(&user.password_hash))
        .bind(password_changed_at)
        .bind(&user.id)
        .execute(&mut *tx)
        .await?;
        let revoked = revoke_sessions(&mut *tx, &user.id, None, "user.update", now).await?;
        self.revoke_user_tokens(&mut tx, &user.id, None, now)
            .await?;
        let updated = by_id(&mut *tx, &user.id)
            .await?
            .ok_or_else(|| AuthError::not_found("user", &user.id))?;
        tx.commit().await?;
        let mut event = Event::new(Actor::of(actor), "user.update", &caller.peer)
            .target("user", &user.id)
            .detail("revoked_sessions", revoked.to_string());
        if let Some(r) = role {
            event = event.detail("role", r.as_str());
        }
        if let Some(d) = req.disabled {
            event = event.detail("disabled", d.to_string());
        }
        if hash.is_some() {
            event = event.detail("password_reset", "true");
        }
        audit::record(&self.store, now, event).await;
        Ok(updated.to_pb())
    }

    pub(crate) async fn delete_user(&self, caller: &Caller, user_id: &str) -> Result<()> {
        let actor = caller.admin()?;
        non_empty("user_id", user_id)?;
        if actor.subject == user_id {
            return Err(AuthError::FailedPrecondition {
                reason: reason::CANNOT_DELETE_SELF,
                message: "an admin cannot delete their own account".into(),
            });
        }
        let now = self.now();
        let mut tx = self.store.begin().await?;
        let user = by_id(&mut *tx, user_id)
            .await?
            .ok_or_else(|| AuthError::not_found("user", user_id))?;
        if user.role == Role::Admin && !user.disabled && enabled_admins(&mut tx).await? <= 1 {
            return Err(last_admin());
        }
        // Sessions, refresh tokens and API keys go with the user (ON DELETE CASCADE).
        sqlx::query("DELETE FROM users WHERE id = $1")
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        self.revoke_user_tokens(&mut tx, user_id, None, now).await?;
        tx.commit().await?;
        let event = Event::new(Actor::of(actor), "user.delete", &caller.peer)
            .target("user", user_id)
            .detail("username", &user.username);
        audit::record(&self.store, now, event).await;
        Ok(())
    }

    pub(crate) async fn revoke_user_sessions(
        &self,
        caller: &Caller,
        req: pb::RevokeUserSessionsRequest,
    ) -> Result<pb::RevokeUserSessionsResponse> {
        let actor = caller.admin()?;
        non_empty("user_id", &req.user_id)?;
        let now = self.now();
        let mut tx = self.store.begin().await?;
        by_id(&mut *tx, &req.user_id)
            .await?
            .ok_or_else(|| AuthError::not_found("user", &req.user_id))?;
        let sessions = revoke_sessions(&mut *tx, &req.user_id, None, "admin", now).await?;
        self.revoke_user_tokens(&mut tx, &req.user_id, None, now)
            .await?;
        let keys = if req.revoke_api_keys {
            crate::api_keys::revoke_all(&mut *tx, &req.user_id, now).await?
        } else {
            0
        };
        tx.commit().await?;
        let event = Event::new(Actor::of(actor), "user.revoke_sessions", &caller.peer)
            .target("user", &req.user_id)
            .detail("revoked_sessions", sessions.to_string())
            .detail("revoked_api_keys", keys.to_string());
        audit::record(&self.store, now, event).await;
        Ok(pb::RevokeUserSessionsResponse {
            revoked_sessions: sessions,
            revoked_api_keys: keys,
        })
    }
}

/// INVALID_ARGUMENT when a required string field is empty.
pub fn non_empty(field: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(AuthError::invalid(field, "must not be empty"));
    }
    Ok(())
}

fn collect<T>(violations: &mut Vec<kiln_rpc::FieldViolation>, result: &Result<T>) {
    if let Err(AuthError::InvalidArgument(v)) = result {
        violations.extend(v.iter().cloned());
    }
}

/// Adds earlier violations to a password error; a lone weak password keeps its
/// WEAK_PASSWORD reason.
fn merge(mut violations: Vec<kiln_rpc::FieldViolation>, password: AuthError) -> AuthError {
    if violations.is_empty() {
        return password;
    }
    if let AuthError::WeakPassword { field, description } = password {
        violations.push(kiln_rpc::FieldViolation {
            field: field.into(),
            description,
        });
    }
    AuthError::InvalidArgument(violations)
}
