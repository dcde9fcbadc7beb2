//! Riding out a lost connection while following an event stream (a build's, a task's):
//! which failures mean "the connection is gone, resume" rather than "the server said no",
//! and how long to wait between attempts. Shared by `kiln build` and `kiln agent`.

use std::time::{Duration, Instant};

use kiln_rpc::RemoteError;

/// How long a lost connection is retried before giving up (the build or task goes on).
pub const RESUME_FOR: Duration = Duration::from_secs(120);

/// A status made up by the transport (no kiln reason) or one the server says to retry
/// means the connection is lost; a kiln error with a reason is the server's answer.
pub fn is_connection_lost(status: &tonic::Status) -> bool {
    let err = RemoteError::from_status(status);
    let transport = err.reason.is_empty()
        && matches!(
            err.code,
            tonic::Code::Unknown | tonic::Code::Internal | tonic::Code::Cancelled
        );
    err.is_retryable() || transport
}

/// The retry schedule of one outage: 0.2 s doubling to 5 s (quick after a blip, gentle
/// while a server restarts), for at most [`RESUME_FOR`].
#[derive(Debug, Default)]
pub struct Backoff {
    since: Option<Instant>,
    attempt: u32,
}

impl Backoff {
    /// Records a failed attempt: `None` once the outage has lasted longer than
    /// [`RESUME_FOR`], else how long to wait before the next attempt.
    pub fn failed(&mut self) -> Option<Duration> {
        let since = *self.since.get_or_insert_with(Instant::now);
        if since.elapsed() > RESUME_FOR {
            return None;
        }
        let delay = Duration::from_millis(200 << self.attempt.min(5)).min(Duration::from_secs(5));
        self.attempt += 1;
        Some(delay)
    }

    /// True between the first failure of an outage and the next success.
    pub fn in_outage(&self) -> bool {
        self.since.is_some()
    }

    /// The connection works again: the next failure starts a new outage.
    pub fn reset(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_failures_resume_and_server_answers_do_not() {
        assert!(is_connection_lost(&tonic::Status::unavailable("refused")));
        assert!(is_connection_lost(&tonic::Status::unknown(
            "h2 protocol error"
        )));
        let not_found: tonic::Status = kiln_rpc::ApiError::not_found("build", "b").into();
        assert!(!is_connection_lost(&not_found));
    }

    #[test]
    fn the_delay_doubles_up_to_five_seconds() {
        let mut backoff = Backoff::default();
        let delays: Vec<u64> = (0..7)
            .map(|_| backoff.failed().expect("within the window").as_millis() as u64)
            .collect();
        assert_eq!(delays, [200, 400, 800, 1600, 3200, 5000, 5000]);
        assert!(backoff.in_outage());
        backoff.reset();
        assert_eq!(backoff.failed(), Some(Duration::from_millis(200)));
    }
}
