//! The first admin: created on an empty store so that a fresh suite can be logged into.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::time::SystemTime;

use kiln_rpc::Role;

use crate::audit::{self, Actor, Event};
use crate::error::{AuthError, Result};
use crate::password::{PasswordHasher, check_new_password};
use crate::secret::random_token;
use crate::store::Store;
use crate::users;

/// The bootstrap admin's username.
pub const ADMIN_USERNAME: &str = "admin";
/// Where a generated admin password is written, inside the data directory.
pub const ADMIN_PASSWORD_FILE: &str = "admin-password";

/// Creates `admin` if the store has no user at all. The password is `configured`
/// (from `KILN_ADMIN_PASSWORD` or `--admin-password-file`) when set; otherwise it is generated and written to
/// `<data_dir>/admin-password` with mode 0600, and the log names the file (never the
/// password). A store that has users is left alone, so restarts keep the same admin.
pub async fn ensure_admin(
    store: &Store,
    hasher: &PasswordHasher,
    data_dir: &Path,
    configured: Option<&str>,
    now: SystemTime,
) -> Result<()> {
    if users::count(&store.write).await? > 0 {
        return Ok(());
    }
    let (password, generated) = match configured {
        Some(pw) => {
            check_new_password("admin_password", pw, ADMIN_USERNAME).map_err(|e| {
                AuthError::Config(format!(
                    "the admin password (KILN_ADMIN_PASSWORD or --admin-password-file): {e}"
                ))
            })?;
            (pw.to_owned(), false)
        }
        None => (random_token(24), true),
    };
    let hash = hasher.hash(&password).await?;
    let admin =
        match users::insert(&store.write, ADMIN_USERNAME, &hash, Role::Admin, None, now).await {
            Ok(admin) => admin,
            // Another replica on the same Postgres database made the first admin between
            // our count and our insert: its admin (and its password) stand.
            Err(AuthError::AlreadyExists { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
    if generated {
        // On Postgres nothing else has created the data directory.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .map_err(|e| AuthError::io(data_dir, e))?;
        let path = data_dir.join(ADMIN_PASSWORD_FILE);
        write_private(&path, &password)?;
        tracing::warn!(
            path = %path.display(),
            "created the first kiln user `admin`; its generated password is in this file \
             (mode 0600). Log in, change the password, then delete the file"
        );
    } else {
        tracing::warn!("created the first kiln user `admin` with the configured password");
    }
    let event = Event::new(Actor::named("", "bootstrap"), "user.create", "local")
        .target("user", &admin.id)
        .detail("username", ADMIN_USERNAME)
        .detail("role", Role::Admin.as_str())
        .detail("bootstrap", "true");
    audit::record(store, now, event).await;
    Ok(())
}

/// Writes `secret` to a new 0600 file, replacing a stale one from an earlier store.
fn write_private(path: &Path, secret: &str) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(AuthError::io(path, e)),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| AuthError::io(path, e))?;
    writeln!(file, "{secret}").map_err(|e| AuthError::io(path, e))?;
    file.sync_all().map_err(|e| AuthError::io(path, e))
}
