//! What the benchmark programs share.

use std::future::Future;
use std::time::{Duration, Instant};

use kiln_rpc::client::{ClientConfig, KilnChannel};

/// Calls per second of `call`, made back to back from `clients` concurrent connections
/// (each its own TLS connection made from `config`) for `duration`. A failed call
/// aborts the benchmark: a ratio over errors would mean nothing.
pub async fn calls_per_second<F, Fut>(
    config: ClientConfig,
    clients: usize,
    duration: Duration,
    call: F,
) -> f64
where
    F: Fn(KilnChannel) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), tonic::Status>> + Send,
{
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (config, call) = (config.clone(), call.clone());
        tasks.push(tokio::spawn(async move {
            let channel = config.connect().await.expect("connects");
            let mut calls = 0u64;
            while Instant::now() < deadline {
                call(channel.clone()).await.expect("the call succeeds");
                calls += 1;
            }
            calls
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.expect("join");
    }
    total as f64 / duration.as_secs_f64()
}

/// The `p` quantile (0.0 to 1.0) of `sorted`, by nearest rank.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

/// `d` in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
