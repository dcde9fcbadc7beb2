//! Wake-ups for watchers of logs that another replica writes. On Postgres a service's
//! append sends `NOTIFY <channel>, '<log id>'` in its transaction (see [`notify`]); each
//! process listens, and wakes the watchers of that log here, which then read the store
//! at once instead of at their next poll (`kiln_eventlog`'s `wait_for_append`).
//! kiln-build's builds and kiln-agent's tasks use it, each on its own channel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::Notify;

/// Watchers waiting for appends, by log id.
#[derive(Debug, Default)]
pub struct Appended {
    waiters: Mutex<HashMap<String, Weak<Notify>>>,
}

impl Appended {
    /// Listens on `channel` of the database at `url` (a `postgres://` URL) for as long
    /// as the returned value lives.
    pub fn start(url: String, channel: &'static str) -> Arc<Self> {
        let appended = Arc::new(Self::default());
        tokio::spawn(listen(url, channel, Arc::downgrade(&appended)));
        appended
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Weak<Notify>>> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for an append to `log_id`, at most `timeout`.
    pub async fn wait(&self, log_id: &str, timeout: Duration) {
        let notify = {
            let mut waiters = self.lock();
            match waiters.get(log_id).and_then(Weak::upgrade) {
                Some(n) => n,
                None => {
                    let n = Arc::new(Notify::new());
                    waiters.insert(log_id.to_owned(), Arc::downgrade(&n));
                    n
                }
            }
        };
        let _ = tokio::time::timeout(timeout, notify.notified()).await;
    }

    fn wake(&self, log_id: &str) {
        let mut waiters = self.lock();
        match waiters.get(log_id).map(Weak::upgrade) {
            Some(Some(n)) => n.notify_waiters(),
            // Nobody waits any more: forget the log.
            Some(None) => {
                waiters.remove(log_id);
            }
            None => {}
        }
    }
}

/// Announces an append to `log_id` on `channel`, delivered when `tx` commits (so a
/// woken watcher finds the events). Wrapped in a count: `pg_notify` returns `void`,
/// which `Any` cannot decode.
pub async fn notify(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    channel: &str,
    log_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT count(*) FROM (SELECT pg_notify($1, $2)) AS announced")
        .bind(channel.to_owned())
        .bind(log_id.to_owned())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Receives announcements until `appended` is dropped. `recv` reconnects by itself;
/// what is announced meanwhile is lost, and the watchers' poll covers it.
async fn listen(url: String, channel: &'static str, appended: Weak<Appended>) {
    loop {
        match PgListener::connect(&url).await {
            Ok(mut listener) => match listener.listen(channel).await {
                Ok(()) => loop {
                    match listener.recv().await {
                        Ok(n) => match appended.upgrade() {
                            Some(a) => a.wake(n.payload()),
                            None => return,
                        },
                        Err(e) => {
                            tracing::warn!(error = %e, channel, "listening for appends failed; reconnecting");
                            break;
                        }
                    }
                },
                Err(e) => tracing::warn!(error = %e, channel, "LISTEN for appends failed"),
            },
            Err(e) => tracing::warn!(error = %e, channel, "cannot connect to listen for appends"),
        }
        if appended.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Sends the payload of every notification `listener` receives to `tx`, until `tx` is
/// closed. `recv` reconnects by itself after an error; what was sent meanwhile is lost,
/// which the receiver's polling must cover. `what` names the listener in the log.
pub async fn forward_notifications(
    mut listener: PgListener,
    tx: tokio::sync::mpsc::Sender<String>,
    what: &'static str,
) {
    loop {
        match listener.recv().await {
            Ok(n) => {
                if tx.send(n.payload().to_owned()).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "{what}: listening failed; reconnecting");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}
