//! Health that means something: a service is SERVING only while what it cannot work
//! without (its store, the sandbox) is usable.
//!
//! Each service registers [`Readiness`] checks; the server runs them every
//! `ServerSettings::health_check_interval` and sets the service's `grpc.health.v1`
//! status, and the overall status ("") is SERVING only when every service is. A load
//! balancer or Kubernetes probe thus stops sending traffic to a replica whose disk or
//! database broke, and sends it again once it recovers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// Longest a single check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Something a service needs in order to serve.
pub trait Readiness: Send + Sync + 'static {
    /// What is checked, for logs (e.g. "build store").
    fn name(&self) -> &str;
    /// `Ok` when usable; `Err(why)` otherwise (logged, never sent to clients).
    fn check(&self) -> BoxFuture<'_, Result<(), String>>;
}

/// Checks per service name.
pub(crate) type Checks = BTreeMap<&'static str, Vec<Arc<dyn Readiness>>>;

/// Runs the checks forever (the caller aborts the task at shutdown).
pub(crate) async fn watch(
    health: HealthReporter,
    services: Vec<&'static str>,
    checks: Checks,
    every: Duration,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: BTreeMap<&str, bool> = services.iter().map(|s| (*s, true)).collect();
    let mut overall = true;
    loop {
        ticker.tick().await;
        for (service, service_checks) in &checks {
            let mut ready = true;
            for check in service_checks {
                let result = match tokio::time::timeout(CHECK_TIMEOUT, check.check()).await {
                    Ok(result) => result,
                    Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
                };
                if let Err(why) = result {
                    ready = false;
                    if last.get(service) != Some(&false) {
                        tracing::error!(service, check = check.name(), %why, "not ready: NOT_SERVING");
                    }
                }
            }
            if last.insert(service, ready) != Some(ready) {
                if ready {
                    tracing::info!(service, "ready again: SERVING");
                }
                health.set_service_status(*service, status(ready)).await;
            }
        }
        // Only changes are published: a watcher of the health stream sees each
        // transition once, not a repeat every interval.
        let ready = last.values().all(|r| *r);
        if ready != overall {
            overall = ready;
            health.set_service_status("", status(ready)).await;
        }
    }
}

fn status(ready: bool) -> ServingStatus {
    if ready {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// A [`Readiness`] from a name and an async closure.
pub fn check_fn<F>(name: impl Into<String>, check: F) -> Arc<dyn Readiness>
where
    F: Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync + 'static,
{
    struct FnCheck<F> {
        name: String,
        check: F,
    }
    impl<F> Readiness for FnCheck<F>
    where
        F: Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync + 'static,
    {
        fn name(&self) -> &str {
            &self.name
        }
        fn check(&self) -> BoxFuture<'_, Result<(), String>> {
            (self.check)()
        }
    }
    Arc::new(FnCheck {
        name: name.into(),
        check,
    })
}
