//! Wake-ups for watchers of builds that another replica runs. On Postgres every append
//! sends `NOTIFY kiln_build_events, '<build id>'` in its transaction; each process
//! listens, and wakes the watchers of that build here, which then read the store at once
//! instead of at their next poll (`kiln_eventlog`'s `wait_for_append`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::Notify;

/// The channel of append announcements; the payload is the build id.
pub(super) const CHANNEL: &str = "kiln_build_events";

/// Watchers waiting for appends, by build id.
#[derive(Debug, Default)]
pub struct Appended {
    waiters: Mutex<HashMap<String, Weak<Notify>>>,
}

impl Appended {
    /// Listens on the database at `url` (a `postgres://` URL) for as long as the
    /// returned value lives.
    pub fn start(url: String) -> Arc<Self> {
        let appended = Arc::new(Self::default());
        tokio::spawn(listen(url, Arc::downgrade(&appended)));
        appended
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Weak<Notify>>> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for an append to `build_id`, at most `timeout`.
    pub async fn wait(&self, build_id: &str, timeout: Duration) {
        let notify = {
            let mut waiters = self.lock();
            match waiters.get(build_id).and_then(Weak::upgrade) {
                Some(n) => n,
                None => {
                    let n = Arc::new(Notify::new());
                    waiters.insert(build_id.to_owned(), Arc::downgrade(&n));
                    n
                }
            }
        };
        let _ = tokio::time::timeout(timeout, notify.notified()).await;
    }

    fn wake(&self, build_id: &str) {
        let mut waiters = self.lock();
        match waiters.get(build_id).map(Weak::upgrade) {
            Some(Some(n)) => n.notify_waiters(),
            // Nobody waits any more: forget the build.
            Some(None) => {
                waiters.remove(build_id);
            }
            None => {}
        }
    }
}

/// Receives announcements until `appended` is dropped. `recv` reconnects by itself;
/// what is announced meanwhile is lost, and the watchers' poll covers it.
async fn listen(url: String, appended: Weak<Appended>) {
    loop {
        match PgListener::connect(&url).await {
            Ok(mut listener) => match listener.listen(CHANNEL).await {
                Ok(()) => loop {
                    match listener.recv().await {
                        Ok(n) => match appended.upgrade() {
                            Some(a) => a.wake(n.payload()),
                            None => return,
                        },
                        Err(e) => {
                            tracing::warn!(error = %e, "build events: listening failed; reconnecting");
                            break;
                        }
                    }
                },
                Err(e) => tracing::warn!(error = %e, "build events: LISTEN failed"),
            },
            Err(e) => tracing::warn!(error = %e, "build events: cannot connect to listen"),
        }
        if appended.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
