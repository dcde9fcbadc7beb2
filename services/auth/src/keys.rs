//! Signing keys: the current Ed25519 key, the retired ones still needed, rotation.
//!
//! Where the keys live: in the `signing_keys` table of `auth.db` (PKCS#8 DER, base64).
//! The file is 0600 inside the 0700 data directory, the same protection as the password
//! hashes next to it; whoever can read it owns the suite anyway. A retired key's row is
//! deleted once it cannot verify any unexpired token.
//!
//! Rotation: a new key is generated and becomes current at once; the old key is marked
//! retired and stays in the JWKS until `retired_at + lifetime + leeway`, when the last
//! token it signed has expired everywhere; `lifetime` is the longest a signed token
//! lives (the access TTL, or the delegation maximum when that is longer: a delegated
//! token must verify until its own `exp`, not only for 15 minutes after a rotation). Verifiers refetch the JWKS when they meet an
//! unknown `kid`, so tokens of the new key verify immediately. Rotation happens on a
//! schedule ([`AuthConfig::key_rotation_interval`](crate::AuthConfig)) and on demand with
//! [`AuthApi::rotate_signing_key`](crate::AuthApi::rotate_signing_key).

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use kiln_rpc::token::{AccessClaims, Jwks, LEEWAY_SECS, PublicJwk, SigningKey};
use sqlx::Row;

use crate::error::{AuthError, Result};
use crate::store::{Store, duration_millis, from_millis, millis};

#[derive(Debug)]
struct Retired {
    jwk: PublicJwk,
    retired_at: SystemTime,
}

#[derive(Debug)]
struct State {
    current: Arc<SigningKey>,
    created_at: SystemTime,
    /// Newest first.
    retired: Vec<Retired>,
}

/// The signing keys in memory, mirrored from the store.
#[derive(Debug)]
pub struct KeyRing {
    state: RwLock<State>,
    /// How long a retired key stays published.
    keep_retired: Duration,
    /// Serialises rotations (scheduled and on demand).
    rotating: tokio::sync::Mutex<()>,
}

impl KeyRing {
    /// Loads the keys of the store, creating the first one on an empty store.
    /// `max_lifetime` is the longest any signed token lives.
    pub async fn load(store: &Store, now: SystemTime, max_lifetime: Duration) -> Result<Self> {
        let keep_retired = max_lifetime + Duration::from_secs(LEEWAY_SECS);
        let rows = sqlx::query(
            "SELECT kid, pkcs8, created_at, retired_at FROM signing_keys \
             ORDER BY created_at DESC, kid DESC",
        )
        .fetch_all(&store.write)
        .await?;
        let mut current = None;
        let mut retired = Vec::new();
        for row in rows {
            let kid: String = row.try_get("kid")?;
            let pkcs8: String = row.try_get("pkcs8")?;
            let der = STANDARD
                .decode(pkcs8)
                .map_err(|e| AuthError::Corrupt(format!("signing key {kid}: {e}")))?;
            let key = SigningKey::from_pkcs8(kid, &der)?;
            match row.try_get::<Option<i64>, _>("retired_at")? {
                None if current.is_none() => {
                    current = Some((key, from_millis(row.try_get("created_at")?)));
                }
                // A second unretired key can only come from an interrupted rotation;
                // treat it as retired now.
                None => retired.push(Retired {
                    jwk: key.public_jwk(),
                    retired_at: now,
                }),
                Some(at) => retired.push(Retired {
                    jwk: key.public_jwk(),
                    retired_at: from_millis(at),
                }),
            }
        }
        let (current, created_at) = match current {
            Some(found) => found,
            None => (insert_new_key(&store.write, now).await?, now),
        };
        Ok(Self {
            state: RwLock::new(State {
                current: Arc::new(current),
                created_at,
                retired,
            }),
            keep_retired,
            rotating: tokio::sync::Mutex::new(()),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Signs access-token claims with the current key.
    pub fn sign(&self, claims: &AccessClaims) -> Result<String> {
        let key = Arc::clone(&self.read().current);
        Ok(key.sign(claims)?)
    }

    /// The current key's id.
    pub fn current_kid(&self) -> String {
        self.read().current.kid.clone()
    }

    /// How long the current key has been in use at `now`.
    pub fn current_age(&self, now: SystemTime) -> Duration {
        now.duration_since(self.read().created_at)
            .unwrap_or_default()
    }

    /// The published keys at `now`: the current one first, then retired keys that may
    /// still verify an unexpired token.
    pub fn jwks(&self, now: SystemTime) -> Jwks {
        let state = self.read();
        let mut keys = vec![state.current.public_jwk()];
        keys.extend(
            state
                .retired
                .iter()
                .filter(|r| r.retired_at + self.keep_retired > now)
                .map(|r| r.jwk.clone()),
        );
        Jwks { keys }
    }

    /// Replaces the current key with a new one and returns the new `kid`. Deletes keys
    /// retired long enough that no unexpired token can name them.
    pub async fn rotate(&self, store: &Store, now: SystemTime) -> Result<String> {
        let _guard = self.rotating.lock().await;
        let old = Arc::clone(&self.read().current);
        let mut tx = store.begin().await?;
        sqlx::query("UPDATE signing_keys SET retired_at = $1 WHERE retired_at IS NULL")
            .bind(millis(now))
            .execute(&mut *tx)
            .await?;
        let key = insert_new_key(&mut *tx, now).await?;
        let kid = key.kid.clone();
        sqlx::query("DELETE FROM signing_keys WHERE retired_at IS NOT NULL AND retired_at < $1")
            .bind(millis(now) - duration_millis(self.keep_retired))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        state.retired.insert(
            0,
            Retired {
                jwk: old.public_jwk(),
                retired_at: now,
            },
        );
        let keep = self.keep_retired;
        state.retired.retain(|r| r.retired_at + keep > now);
        state.current = Arc::new(key);
        state.created_at = now;
        kiln_rpc::audit::AuditRecord::new("auth", "signing_key.rotate")
            .target("signing_key", &kid)
            .detail("retired", old.kid.as_str())
            .emit();
        Ok(kid)
    }

    /// Rotates when the current key is older than `interval`; returns whether it did.
    pub async fn rotate_if_due(
        &self,
        store: &Store,
        now: SystemTime,
        interval: Duration,
    ) -> Result<bool> {
        if self.current_age(now) < interval {
            return Ok(false);
        }
        self.rotate(store, now).await?;
        Ok(true)
    }
}

async fn insert_new_key(conn: impl sqlx::AnyExecutor<'_>, now: SystemTime) -> Result<SigningKey> {
    let kid = uuid::Uuid::new_v4().simple().to_string();
    let (key, der) = SigningKey::generate(kid.clone())?;
    sqlx::query(
        "INSERT INTO signing_keys (kid, pkcs8, created_at, retired_at) VALUES ($1, $2, $3, NULL)",
    )
    .bind(&kid)
    .bind(STANDARD.encode(der))
    .bind(millis(now))
    .execute(conn)
    .await?;
    Ok(key)
}
