//! Passwords and usernames: the rules, and Argon2id on a bounded blocking pool.

use std::sync::Arc;

use argon2::password_hash::{PasswordHasher as _, PasswordVerifier as _};
use argon2::{Algorithm, Argon2, Params, Version};
use tokio::sync::Semaphore;

use crate::config::PasswordCost;
use crate::error::{AuthError, Result};

/// Shortest password, in characters (NIST SP 800-63B asks for at least 8; kiln asks 10).
pub const MIN_PASSWORD_CHARS: usize = 10;
/// Longest password, in bytes: long passphrases are welcome, megabyte ones are a denial
/// of service on the hash.
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// Longest username, in bytes.
pub const MAX_USERNAME_BYTES: usize = 64;

/// Checks a new password: at least [`MIN_PASSWORD_CHARS`] characters, at most
/// [`MAX_PASSWORD_BYTES`] bytes, not the username (ignoring case). `field` names the
/// request field in the violation.
pub fn check_new_password(field: &'static str, password: &str, username: &str) -> Result<()> {
    let weak = |description: String| AuthError::WeakPassword { field, description };
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(weak(format!(
            "must be at least {MIN_PASSWORD_CHARS} characters"
        )));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(weak(format!("must be at most {MAX_PASSWORD_BYTES} bytes")));
    }
    if password.to_lowercase() == username.to_lowercase() {
        return Err(weak("must not be the username".into()));
    }
    Ok(())
}

/// Normalises and checks a username: 1 to 64 characters of `a-z`, `0-9`, `.`, `_` and
/// `-`, starting with a letter; upper-case ASCII is folded to lower case. The set keeps
/// names safe in logs, paths and URLs and rules out look-alike Unicode.
pub fn normalize_username(field: &'static str, raw: &str) -> Result<String> {
    let name = raw.to_ascii_lowercase();
    let invalid = |d: &str| AuthError::invalid(field, d);
    if name.is_empty() {
        return Err(invalid("must not be empty"));
    }
    if name.len() > MAX_USERNAME_BYTES {
        return Err(invalid("must be at most 64 characters"));
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(invalid("must start with a letter"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    {
        return Err(invalid(
            "may contain only letters a-z, digits, '.', '_' and '-'",
        ));
    }
    Ok(name)
}

/// Hashes and verifies passwords with Argon2id off the async runtime. A semaphore
/// bounds how many hashes run at once (default: one per core): a burst of logins queues
/// for a permit instead of occupying every blocking thread and the memory of each hash
/// (19 MiB with the OWASP cost).
#[derive(Debug, Clone)]
pub struct PasswordHasher {
    params: Params,
    permits: Arc<Semaphore>,
    /// A hash of a random password, verified against when the user does not exist so
    /// that an unknown username costs the same time as a wrong password.
    dummy_hash: Arc<str>,
}

impl PasswordHasher {
    pub async fn new(cost: PasswordCost, concurrency: usize) -> Result<Self> {
        let params = Params::new(cost.memory_kib, cost.iterations, cost.parallelism, None)
            .map_err(|e| AuthError::Config(format!("argon2 parameters: {e}")))?;
        let mut hasher = Self {
            params,
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            dummy_hash: Arc::from(""),
        };
        let dummy = crate::secret::random_token(32);
        hasher.dummy_hash = Arc::from(hasher.hash(&dummy).await?);
        Ok(hasher)
    }

    fn argon2(params: Params) -> Argon2<'static> {
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
    }

    /// The PHC string (`$argon2id$v=19$m=…`) of `password` with a random salt.
    pub async fn hash(&self, password: &str) -> Result<String> {
        let params = self.params.clone();
        let password = password.to_owned();
        self.run(move || {
            Self::argon2(params)
                .hash_password(password.as_bytes())
                .map(|h| h.to_string())
                .map_err(|e| AuthError::Hashing(e.to_string()))
        })
        .await
    }

    /// Whether `password` matches the PHC string `hash`; with `None` it checks against
    /// the dummy hash and answers false, taking the same time.
    pub async fn verify(&self, password: &str, hash: Option<&str>) -> Result<bool> {
        let known = hash.is_some();
        let hash = hash.map_or_else(|| self.dummy_hash.to_string(), str::to_owned);
        let password = password.to_owned();
        let params = self.params.clone();
        let matches = self
            .run(move || {
                // The parameters in the PHC string win; `params` only fills the struct.
                Ok(Self::argon2(params)
                    .verify_password(password.as_bytes(), hash.as_str())
                    .is_ok())
            })
            .await?;
        Ok(known && matches)
    }

    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|e| AuthError::Hashing(e.to_string()))?;
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| AuthError::Hashing(e.to_string()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_are_folded_and_checked() {
        assert_eq!(
            normalize_username("u", "Alice.B-1_").expect("ok"),
            "alice.b-1_"
        );
        for bad in [
            "",
            "1abc",
            "_abc",
            "al ice",
            "alïce",
            "a/b",
            &"a".repeat(65),
        ] {
            assert!(normalize_username("u", bad).is_err(), "{bad:?}");
        }
        assert!(normalize_username("u", &"a".repeat(64)).is_ok());
    }

    #[tokio::test]
    async fn hashes_verify_and_dummy_never_matches() {
        let hasher = PasswordHasher::new(PasswordCost::INSECURE_FOR_TESTS, 2)
            .await
            .expect("hasher");
        let hash = hasher.hash("correct horse").await.expect("hash");
        assert!(hash.starts_with("$argon2id$v=19$m=8,t=1,p=1$"), "{hash}");
        assert!(
            hasher
                .verify("correct horse", Some(&hash))
                .await
                .expect("ok")
        );
        assert!(!hasher.verify("wrong horse", Some(&hash)).await.expect("ok"));
        assert!(!hasher.verify("correct horse", None).await.expect("ok"));
    }
}
