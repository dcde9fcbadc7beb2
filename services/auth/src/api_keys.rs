//! API keys: `kiln_<id>_<secret>`, for programs.
//!
//! The id (32 hex digits) finds the row; the secret (256 random bits, 43 base64url
//! characters) is stored only as its SHA-256 digest and compared in constant time. The
//! secret is returned once, by CreateApiKey. A key's role is capped at its owner's
//! current role on every use, so demoting a user demotes its keys at once.

use std::time::SystemTime;

use kiln_proto::auth as pb;
use kiln_rpc::{Principal, Role};
use kiln_store::Sql;
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::audit::{self, Actor, Event};
use crate::convert::{self, opt_timestamp, role_from_pb, role_to_pb, timestamp};
use crate::error::{AuthError, Result, reason};
use crate::secret::{constant_time_eq, digest, random_token};
use crate::store::{from_millis, millis};
use crate::{Caller, Inner, paging, users};

/// Every key starts with this.
pub const KEY_PREFIX: &str = "kiln_";
/// The longest key AuthenticateApiKey reads.
const MAX_KEY_BYTES: usize = 256;
/// The longest key name.
const MAX_NAME_BYTES: usize = 128;
/// `last_used_at` is written at most this often per key, to keep reads from writing.
const LAST_USED_RESOLUTION_MS: i64 = 60_000;

/// A key as stored.
#[derive(Debug, Clone)]
struct KeyRow {
    id: String,
    user_id: String,
    name: String,
    prefix: String,
    secret_hash: String,
    role: Role,
    created_at: i64,
    expires_at: Option<i64>,
    last_used_at: Option<i64>,
    revoked_at: Option<i64>,
}

impl KeyRow {
    fn from_row(row: &AnyRow) -> Result<Self> {
        Ok(Self {
            id: row.try_get("id")?,
            user_id: row.try_get("user_id")?,
            name: row.try_get("name")?,
            prefix: row.try_get("prefix")?,
            secret_hash: row.try_get("secret_hash")?,
            role: convert::stored_role(row.try_get("role")?)?,
            created_at: row.try_get("created_at")?,
            expires_at: row.try_get("expires_at")?,
            last_used_at: row.try_get("last_used_at")?,
            revoked_at: row.try_get("revoked_at")?,
        })
    }

    fn to_pb(&self) -> pb::ApiKey {
        pb::ApiKey {
            id: self.id.clone(),
            name: self.name.clone(),
            prefix: self.prefix.clone(),
            user_id: self.user_id.clone(),
            role: role_to_pb(self.role) as i32,
            created_at: Some(timestamp(from_millis(self.created_at))),
            expires_at: opt_timestamp(self.expires_at.map(from_millis)),
            last_used_at: opt_timestamp(self.last_used_at.map(from_millis)),
            revoked_at: opt_timestamp(self.revoked_at.map(from_millis)),
        }
    }
}

async fn key_by_id(conn: impl sqlx::AnyExecutor<'_>, id: &str) -> Result<Option<KeyRow>> {
    let row = sqlx::query("SELECT * FROM api_keys WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(KeyRow::from_row).transpose()
}

/// Revokes every unrevoked key of `user_id`; returns how many.
pub async fn revoke_all(
    conn: impl sqlx::AnyExecutor<'_>,
    user_id: &str,
    now: SystemTime,
) -> Result<u32> {
    let done = sqlx::query(
        "UPDATE api_keys SET revoked_at = $1 WHERE user_id = $2 AND revoked_at IS NULL",
    )
    .bind(millis(now))
    .bind(user_id)
    .execute(conn)
    .await?;
    Ok(u32::try_from(done.rows_affected()).unwrap_or(u32::MAX))
}

/// Splits `kiln_<id>_<secret>`; `None` for anything else.
fn parse_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let id_ok = id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit());
    (id_ok && !secret.is_empty()).then_some((id, secret))
}

impl Inner {
    /// The user whose keys the caller names: itself, or anyone for an admin. A non-admin
    /// naming another user is refused whether or not that user exists.
    fn key_owner<'a>(&self, principal: &'a Principal, user_id: Option<&'a str>) -> Result<&'a str> {
        match user_id {
            None => Ok(&principal.subject),
            Some("") => Err(AuthError::invalid("user_id", "must not be empty when set")),
            Some(id) if id == principal.subject => Ok(id),
            Some(id) if principal.role == Some(Role::Admin) => Ok(id),
            Some(_) => Err(AuthError::PermissionDenied {
                reason: reason::NOT_ADMIN,
                message: "only an admin may manage another user's API keys".into(),
            }),
        }
    }

    pub(crate) async fn create_api_key(
        &self,
        caller: &Caller,
        req: pb::CreateApiKeyRequest,
    ) -> Result<pb::CreateApiKeyResponse> {
        let principal = caller.user()?;
        let mut violations = Vec::new();
        if req.name.is_empty() || req.name.len() > MAX_NAME_BYTES {
            violations.push(kiln_rpc::FieldViolation {
                field: "name".into(),
                description: format!("must be 1 to {MAX_NAME_BYTES} bytes"),
            });
        }
        let role = role_from_pb(req.role, "role");
        let ttl = req
            .ttl
            .as_ref()
            .map(|d| convert::positive_duration(d, "ttl"))
            .transpose();
        let request_id = convert::request_id(&req.request_id);
        for e in [
            role.as_ref().err(),
            ttl.as_ref().err(),
            request_id.as_ref().err(),
        ]
        .into_iter()
        .flatten()
        {
            if let AuthError::InvalidArgument(v) = e {
                violations.extend(v.iter().cloned());
            }
        }
        if !violations.is_empty() {
            return Err(AuthError::InvalidArgument(violations));
        }
        let (role, ttl, request_id) = (role?, ttl?, request_id?);
        let owner_id = self.key_owner(principal, req.user_id.as_deref())?;
        let owner = users::by_id(&self.store.read, owner_id)
            .await?
            .ok_or_else(|| AuthError::not_found("user", owner_id))?;
        if let Some(request_id) = &request_id
            && let Some(retried) = self.key_by_request(&principal.subject, request_id).await?
        {
            return Ok(retried);
        }
        // The cap is the owner's role, and for one's own key also the calling
        // credential's role: a viewer-scoped key must not mint an admin key.
        let mut cap = owner.role;
        if owner.id == principal.subject
            && let Some(caller_role) = principal.role
        {
            cap = cap.min(caller_role);
        }
        let role = role.unwrap_or(cap);
        let now = self.now();
        let event = Event::new(Actor::of(principal), "api_key.create", &caller.peer)
            .detail("owner", &owner.id)
            .detail("role", role.as_str());
        if role > cap {
            audit::record(
                &self.store,
                now,
                event.failed(reason::API_KEY_ROLE_TOO_HIGH),
            )
            .await;
            return Err(AuthError::PermissionDenied {
                reason: reason::API_KEY_ROLE_TOO_HIGH,
                message: format!("an API key's role may be at most {}", cap.as_str()),
            });
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        let key = format!("{KEY_PREFIX}{id}_{}", random_token(32));
        let row = KeyRow {
            prefix: key[..KEY_PREFIX.len() + 8].to_owned(),
            secret_hash: digest(&key[KEY_PREFIX.len() + id.len() + 1..]),
            id,
            user_id: owner.id.clone(),
            name: req.name,
            role,
            created_at: millis(now),
            expires_at: ttl.map(|ttl| millis(now + ttl)),
            last_used_at: None,
            revoked_at: None,
        };
        let inserted = sqlx::query(
            "INSERT INTO api_keys (id, user_id, name, prefix, secret_hash, role, created_at, \
             expires_at, last_used_at, revoked_at, created_by, request_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL, NULL, $9, $10)",
        )
        .bind(&row.id)
        .bind(&row.user_id)
        .bind(&row.name)
        .bind(&row.prefix)
        .bind(&row.secret_hash)
        .bind(row.role.as_str())
        .bind(row.created_at)
        .bind(row.expires_at)
        .bind(&principal.subject)
        .bind(&request_id)
        .execute(&self.store.write)
        .await;
        match inserted {
            Ok(_) => {}
            // A retry that raced this one stored the key first: answer as a retry does.
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() && request_id.is_some() => {
                let rid = request_id.as_deref().unwrap_or_default();
                if let Some(retried) = self.key_by_request(&principal.subject, rid).await? {
                    return Ok(retried);
                }
                return Err(sqlx::Error::Database(e).into());
            }
            Err(e) => return Err(e.into()),
        }
        audit::record(&self.store, now, event.target("api_key", &row.id)).await;
        Ok(pb::CreateApiKeyResponse {
            key,
            api_key: Some(row.to_pb()),
        })
    }

    /// The key an earlier call with this request id created, as a retry sees it: the
    /// secret is not shown again. Read from the writer, which sees every commit.
    async fn key_by_request(
        &self,
        created_by: &str,
        request_id: &str,
    ) -> Result<Option<pb::CreateApiKeyResponse>> {
        let row = sqlx::query("SELECT * FROM api_keys WHERE created_by = $1 AND request_id = $2")
            .bind(created_by)
            .bind(request_id)
            .fetch_optional(&self.store.write)
            .await?;
        row.map(|row| {
            Ok(pb::CreateApiKeyResponse {
                key: String::new(),
                api_key: Some(KeyRow::from_row(&row)?.to_pb()),
            })
        })
        .transpose()
    }

    pub(crate) async fn list_api_keys(
        &self,
        caller: &Caller,
        req: pb::ListApiKeysRequest,
    ) -> Result<pb::ListApiKeysResponse> {
        let principal = caller.user()?;
        let size = paging::page_size(req.page_size)?;
        let cursor = paging::decode_token(&req.page_token, 2)?;
        let owner = self.key_owner(principal, req.user_id.as_deref())?;
        let mut q: Sql = Sql::new("SELECT * FROM api_keys WHERE user_id = ");
        q.bind(owner.to_owned());
        if !req.include_revoked {
            q.push(" AND revoked_at IS NULL");
        }
        if let Some(cursor) = cursor {
            let created: i64 = cursor[0].parse().map_err(|_| {
                AuthError::invalid("page_token", "is not a token from a previous page")
            })?;
            q.push(" AND (created_at < ")
                .bind(created)
                .push(" OR (created_at = ")
                .bind(created)
                .push(" AND id < ")
                .bind(cursor[1].clone())
                .push("))");
        }
        q.push(" ORDER BY created_at DESC, id DESC LIMIT ")
            .bind(i64::from(size) + 1);
        let rows = q.build().fetch_all(&self.store.read).await?;
        let mut keys = rows
            .iter()
            .map(KeyRow::from_row)
            .collect::<Result<Vec<_>>>()?;
        let next_page_token = paging::next_token(&mut keys, size, |k| {
            paging::encode_token(&[&k.created_at.to_string(), &k.id])
        });
        Ok(pb::ListApiKeysResponse {
            api_keys: keys.iter().map(KeyRow::to_pb).collect(),
            next_page_token,
        })
    }

    pub(crate) async fn revoke_api_key(&self, caller: &Caller, id: &str) -> Result<pb::ApiKey> {
        let principal = caller.user()?;
        users::non_empty("api_key_id", id)?;
        let key = key_by_id(&self.store.read, id)
            .await?
            // Another user's key does not exist for a non-admin.
            .filter(|k| k.user_id == principal.subject || principal.role == Some(Role::Admin))
            .ok_or_else(|| AuthError::not_found("api key", id))?;
        if key.revoked_at.is_some() {
            return Ok(key.to_pb());
        }
        let now = self.now();
        let mut tx = self.store.begin().await?;
        sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(millis(now))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        // A delegated token minted from the key must not outlive it.
        self.revoke_key_delegations(&mut tx, &key.user_id, id, now)
            .await?;
        tx.commit().await?;
        let event = Event::new(Actor::of(principal), "api_key.revoke", &caller.peer)
            .target("api_key", id)
            .detail("owner", &key.user_id);
        audit::record(&self.store, now, event).await;
        let key = key_by_id(&self.store.write, id)
            .await?
            .ok_or_else(|| AuthError::not_found("api key", id))?;
        Ok(key.to_pb())
    }

    pub(crate) async fn authenticate_api_key(
        &self,
        key: &str,
    ) -> Result<pb::AuthenticateApiKeyResponse> {
        if key.is_empty() || key.len() > MAX_KEY_BYTES {
            return Err(AuthError::invalid("key", "must be 1 to 256 bytes"));
        }
        let (id, secret) = parse_key(key).ok_or(AuthError::InvalidApiKey)?;
        let row = key_by_id(&self.store.read, id)
            .await?
            .ok_or(AuthError::InvalidApiKey)?;
        if !constant_time_eq(digest(secret).as_bytes(), row.secret_hash.as_bytes()) {
            return Err(AuthError::InvalidApiKey);
        }
        let now = millis(self.now());
        if row.revoked_at.is_some() || row.expires_at.is_some_and(|at| at <= now) {
            return Err(AuthError::InvalidApiKey);
        }
        let owner = users::by_id(&self.store.read, &row.user_id)
            .await?
            .filter(|u| !u.disabled)
            .ok_or(AuthError::InvalidApiKey)?;
        if row
            .last_used_at
            .is_none_or(|at| now - at >= LAST_USED_RESOLUTION_MS)
        {
            sqlx::query("UPDATE api_keys SET last_used_at = $1 WHERE id = $2")
                .bind(now)
                .bind(id)
                .execute(&self.store.write)
                .await?;
        }
        let expires_at = opt_timestamp(row.expires_at.map(from_millis));
        Ok(pb::AuthenticateApiKeyResponse {
            principal: Some(pb::Principal {
                user_id: owner.id,
                username: owner.username,
                role: role_to_pb(row.role.min(owner.role)) as i32,
                auth_method: pb::AuthMethod::ApiKey as i32,
                expires_at,
                session_id: String::new(),
                api_key_id: row.id,
                actor: String::new(),
            }),
            expires_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_only_in_their_shape() {
        let id = "0123456789abcdef0123456789abcdef";
        assert_eq!(parse_key(&format!("kiln_{id}_a_b")), Some((id, "a_b")));
        for bad in [
            "kiln_",
            "kiln_abc_def",
            "kiln_abc",
            &format!("kiln_{id}_"),
            &format!("key_{id}_x"),
        ] {
            assert_eq!(parse_key(bad), None, "{bad}");
        }
    }
}
