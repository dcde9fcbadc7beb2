//! Following one task's event log to its result: printing each event once (as text or
//! NDJSON), resuming a lost connection from the last sequence seen, and Ctrl-C (cancel,
//! then detach; or only detach for `watch`).

use std::io::IsTerminal;

use anyhow::anyhow;
use kiln_proto::agent as pb;
use kiln_proto::agent::agent_service_client::AgentServiceClient;
use kiln_proto::agent::task_event::Event;
use kiln_rpc::client::KilnChannel;
use serde_json::json;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tonic::Streaming;

use super::render::{Renderer, Style, exit_code};
use crate::cmd::progress::Progress;
use crate::cmd::reconnect::{Backoff, is_connection_lost};
use crate::cmd::rpc_error;
use crate::context::Context;
use crate::output::{OutputFormat, phase_name, task_event_json};

pub use crate::cmd::reconnect::RESUME_FOR;

/// What Ctrl-C means while following a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnInterrupt {
    /// `run`: the first cancels the task, the second detaches.
    CancelThenDetach,
    /// `watch`: stop watching; the task goes on.
    Detach,
}

/// Why a stream stopped before the result.
enum Stop {
    /// The connection broke: resume.
    Lost,
    /// The server closed the stream before the result: resume, unless the task has
    /// ended (a log without its result must not keep us waiting).
    Closed,
    /// The server refused: report it.
    Refused(tonic::Status),
}

/// Follows one task's event log to its result, printing as it goes.
pub struct Follower<'a> {
    ctx: &'a Context,
    task_id: &'a str,
    /// The last sequence printed.
    after: u64,
    on_interrupt: OnInterrupt,
    cancel_requested: bool,
    renderer: Option<Renderer<std::io::Stdout, std::io::Stderr>>,
    /// Taken by `follow` while it runs.
    interrupts: Option<Signal>,
}

impl<'a> Follower<'a> {
    pub fn new(
        ctx: &'a Context,
        task_id: &'a str,
        after: u64,
        on_interrupt: OnInterrupt,
    ) -> anyhow::Result<Self> {
        let renderer = (ctx.output == OutputFormat::Text).then(|| {
            let style = Style::detect(
                std::io::stdout().is_terminal(),
                std::env::var_os("NO_COLOR").as_deref(),
            );
            Renderer::new(std::io::stdout(), std::io::stderr(), style)
        });
        Ok(Self {
            ctx,
            task_id,
            after,
            on_interrupt,
            cancel_requested: false,
            renderer,
            // One listener for the whole run: a Ctrl-C while an event is being printed is
            // kept for the next poll, not lost.
            interrupts: Some(signal(SignalKind::interrupt())?),
        })
    }

    /// Prints events until the result (returns the exit code for it) or until the user
    /// detaches. `first` is the stream RunTask opened; later ones come from WatchTask.
    pub async fn follow(
        &mut self,
        client: &mut AgentServiceClient<KilnChannel>,
        first: Option<Streaming<pb::TaskEvent>>,
    ) -> anyhow::Result<i32> {
        let mut interrupts = match self.interrupts.take() {
            Some(interrupts) => interrupts,
            None => signal(SignalKind::interrupt())?,
        };
        let mut stream = first;
        let mut backoff = Backoff::default();
        loop {
            let stop = match stream.take() {
                Some(mut s) => match self.drain(client, &mut s, &mut interrupts).await? {
                    Drained::Ended(code) => return Ok(code),
                    Drained::Stopped(stop, progressed) => {
                        if progressed {
                            backoff.reset();
                        }
                        stop
                    }
                },
                None => match self.watch(client).await {
                    Ok(s) => {
                        stream = Some(s);
                        continue;
                    }
                    Err(stop) => stop,
                },
            };
            match stop {
                Stop::Refused(status) => {
                    self.save();
                    return Err(rpc_error(self.ctx, status));
                }
                Stop::Closed => {
                    if let Some(code) = self.ended(client).await {
                        return Ok(code);
                    }
                }
                Stop::Lost => {}
            }
            if !backoff.in_outage() {
                eprintln!(
                    "kiln: connection lost; task {id} continues — kiln agent watch {id}",
                    id = self.task_id
                );
            }
            let Some(delay) = backoff.failed() else {
                self.save();
                return Err(anyhow!(
                    "could not reach kiln at {} for {} s; task {id} continues — follow it with `kiln agent watch {id}`",
                    self.ctx.endpoint,
                    RESUME_FOR.as_secs(),
                    id = self.task_id
                ));
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = interrupts.recv() => {
                    if let Some(code) = self.interrupted(client).await {
                        return Ok(code);
                    }
                }
            }
        }
    }

    async fn watch(
        &self,
        client: &mut AgentServiceClient<KilnChannel>,
    ) -> Result<Streaming<pb::TaskEvent>, Stop> {
        client
            .watch_task(pb::WatchTaskRequest {
                task_id: self.task_id.to_owned(),
                after_sequence: self.after,
            })
            .await
            .map(tonic::Response::into_inner)
            .map_err(classify)
    }

    /// Prints one stream's events until it ends, the task ends, or the user detaches.
    async fn drain(
        &mut self,
        client: &mut AgentServiceClient<KilnChannel>,
        stream: &mut Streaming<pb::TaskEvent>,
        interrupts: &mut Signal,
    ) -> anyhow::Result<Drained> {
        let mut progressed = false;
        loop {
            let message = tokio::select! {
                message = stream.message() => message,
                _ = interrupts.recv() => {
                    if let Some(code) = self.interrupted(client).await {
                        return Ok(Drained::Ended(code));
                    }
                    continue;
                }
            };
            let event = match message {
                Ok(Some(event)) => event,
                // The server closes the stream after the result; anything else is a cut.
                Ok(None) => return Ok(Drained::Stopped(Stop::Closed, progressed)),
                Err(status) => return Ok(Drained::Stopped(classify(status), progressed)),
            };
            progressed = true;
            // A heartbeat repeats the last stored sequence; a replay after a resume may
            // too. Neither is printed twice.
            if event.sequence <= self.after || matches!(event.event, Some(Event::Heartbeat(_))) {
                continue;
            }
            self.after = event.sequence;
            self.print(&event)?;
            if let Some(Event::Result(result)) = &event.event {
                Progress::TASKS.clear(self.ctx, self.task_id);
                return Ok(Drained::Ended(exit_code(result.phase)));
            }
        }
    }

    /// The exit code of the task if it has ended (said on stderr), from GetTask.
    async fn ended(&mut self, client: &mut AgentServiceClient<KilnChannel>) -> Option<i32> {
        let task = client
            .get_task(pb::GetTaskRequest {
                task_id: self.task_id.to_owned(),
            })
            .await
            .ok()?
            .into_inner();
        let phase = pb::Phase::try_from(task.phase).unwrap_or_default();
        if !matches!(
            phase,
            pb::Phase::Done | pb::Phase::Failed | pb::Phase::Cancelled
        ) {
            return None;
        }
        Progress::TASKS.clear(self.ctx, self.task_id);
        let message = if task.failure_message.is_empty() {
            String::new()
        } else {
            format!(": {}", task.failure_message)
        };
        eprintln!(
            "task {} {}{message} (its log ended without a result)",
            task.id,
            phase_name(task.phase)
        );
        Some(exit_code(task.phase))
    }

    fn print(&mut self, event: &pb::TaskEvent) -> anyhow::Result<()> {
        match &mut self.renderer {
            Some(renderer) => renderer.event(event)?,
            None => {
                let mut line = task_event_json(event);
                line["task_id"] = json!(self.task_id);
                crate::output::write_event(&mut std::io::stdout().lock(), &line)?;
            }
        }
        Ok(())
    }

    /// Ctrl-C: cancels once when running, else detaches; `Some(exit code)` to stop.
    async fn interrupted(&mut self, client: &mut AgentServiceClient<KilnChannel>) -> Option<i32> {
        let id = self.task_id;
        if self.on_interrupt == OnInterrupt::Detach {
            self.save();
            eprintln!("stopped watching; the task goes on. Resume with: kiln agent watch {id}");
            return Some(130);
        }
        if self.cancel_requested {
            self.save();
            eprintln!(
                "detached; task {id} was asked to cancel and ends on its own. Follow it with: kiln agent watch {id}"
            );
            return Some(130);
        }
        self.cancel_requested = true;
        eprintln!("cancelling task {id} (Ctrl-C again to detach)…");
        if let Err(status) = client
            .cancel_task(pb::CancelTaskRequest {
                task_id: id.to_owned(),
            })
            .await
        {
            eprintln!(
                "kiln: could not cancel: {}",
                crate::output::describe_status(&status, &self.ctx.endpoint)
            );
        }
        None
    }

    fn save(&self) {
        Progress::TASKS.save(self.ctx, self.task_id, self.after);
    }
}

enum Drained {
    /// The task ended, or the user detached: exit with this code.
    Ended(i32),
    /// The stream stopped; `true` when it delivered at least one event first.
    Stopped(Stop, bool),
}

/// Lost connections resume; the server's answers are reported.
fn classify(status: tonic::Status) -> Stop {
    if is_connection_lost(&status) {
        Stop::Lost
    } else {
        Stop::Refused(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_failures_resume_and_server_answers_do_not() {
        assert!(matches!(
            classify(tonic::Status::unavailable("refused")),
            Stop::Lost
        ));
        assert!(matches!(
            classify(tonic::Status::unknown("h2 protocol error")),
            Stop::Lost
        ));
        let not_found: tonic::Status = kiln_rpc::ApiError::not_found("task", "t").into();
        assert!(matches!(classify(not_found), Stop::Refused(_)));
    }
}
