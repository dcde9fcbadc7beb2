//! Following one build's event log to its end: printing each event once (the program's
//! output as it came, or NDJSON), saving how far this terminal got as it goes, riding
//! out a lost connection (said once, resumed from the last sequence seen, with backoff,
//! for up to [`RESUME_FOR`]), and Ctrl-C (cancel, then detach; or only detach for
//! `watch`).

use std::time::{Duration, Instant};

use anyhow::anyhow;
use kiln_proto::build as pb;
use kiln_proto::build::build_event::Event;
use kiln_proto::build::build_service_client::BuildServiceClient;
use kiln_rpc::client::KilnChannel;
use serde_json::json;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tonic::Streaming;

use super::build_view;
use super::progress::Progress;
use super::reconnect::{Backoff, RESUME_FOR, is_connection_lost};
use super::rpc_error;
use super::terminal::{ProgressMode, Stream, Terminal};
use crate::context::Context;
use crate::human;
use crate::output::{OutputFormat, build_event_json, build_state_name};

/// The exit code when the user detaches (a second Ctrl-C in `run`, Ctrl-C in `watch`):
/// the build has not ended, so no build result applies. EX_TEMPFAIL of sysexits.h:
/// "try again later" — with `kiln build watch ID`.
pub const DETACHED: i32 = 75;

/// How often the position is saved while events arrive.
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// What Ctrl-C means while following a build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnInterrupt {
    /// `run`: the first cancels the build, the second detaches.
    CancelThenDetach,
    /// `watch`: stop watching; the build goes on.
    Detach,
}

/// What the first Ctrl-C achieved, so the second can say what is true.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cancel {
    NotAsked,
    /// SIGTERM went to the running step; SIGKILL follows after this.
    Signalled(Option<Duration>),
    /// The server refused or could not be reached: the build goes on.
    Failed,
}

/// "2 s", "0.5 s".
pub fn seconds(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// Follows one build's events to its end, printing as it goes.
pub struct Follower<'a> {
    ctx: &'a Context,
    build_id: String,
    /// The last sequence printed.
    after: u64,
    saved: u64,
    saved_at: Instant,
    total_steps: Option<usize>,
    on_interrupt: OnInterrupt,
    /// The grace the Ctrl-C cancel asks for; `None`: the server's.
    grace: Option<Duration>,
    cancel: Cancel,
    failed_step: Option<pb::StepFinished>,
    /// How long the build ran by the server's clock (started_at to finished_at), for the
    /// summary; fetched when Finished arrives. Not the time this terminal watched: a
    /// `watch` may join late or replay a build that ended long ago.
    ran_for: Option<Duration>,
    /// `None` with `-o json`.
    terminal: Option<Terminal>,
    interrupts: Signal,
}

/// Why a stream stopped before Finished.
enum Stop {
    /// The connection broke, or the server closed the stream early: resume.
    Lost,
    /// The server refused: report it.
    Refused(tonic::Status),
}

impl<'a> Follower<'a> {
    pub fn new(
        ctx: &'a Context,
        build_id: String,
        after: u64,
        progress: ProgressMode,
        on_interrupt: OnInterrupt,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            ctx,
            build_id,
            after,
            saved: after,
            saved_at: Instant::now(),
            total_steps: None,
            on_interrupt,
            grace: None,
            cancel: Cancel::NotAsked,
            failed_step: None,
            ran_for: None,
            terminal: (ctx.output == OutputFormat::Text).then(|| Terminal::detect(progress)),
            // One listener for the whole run: a Ctrl-C while an event is being printed
            // is kept for the next poll, not lost.
            interrupts: signal(SignalKind::interrupt())?,
        })
    }

    pub fn with_total_steps(mut self, total: usize) -> Self {
        self.total_steps = Some(total);
        self
    }

    pub fn with_grace(mut self, grace: Option<Duration>) -> Self {
        self.grace = grace;
        self
    }

    /// A line of kiln's own on stderr (through the terminal, so it never lands on top of
    /// the program's output or under the status line).
    pub fn say(&mut self, line: &str) -> std::io::Result<()> {
        match &mut self.terminal {
            Some(t) => t.say(line),
            None => {
                eprintln!("{line}");
                Ok(())
            }
        }
    }

    /// Prints events until Finished (returns the build's exit code) or until the user
    /// detaches. `first` is the stream RunBuild opened; later ones come from WatchBuild.
    pub async fn follow(
        &mut self,
        client: &mut BuildServiceClient<KilnChannel>,
        first: Option<Streaming<pb::BuildEvent>>,
    ) -> anyhow::Result<i32> {
        let mut stream = first;
        let mut backoff = Backoff::default();
        loop {
            let stop = match stream.take() {
                Some(mut s) => match self.drain(client, &mut s).await? {
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
            if let Stop::Refused(status) = stop {
                self.save();
                return Err(rpc_error(self.ctx, status));
            }
            if !backoff.in_outage() {
                let id = self.build_id.clone();
                self.save();
                self.say(&format!(
                    "kiln: connection lost; build {id} continues — kiln build watch {id}"
                ))?;
            }
            let Some(delay) = backoff.failed() else {
                self.save();
                return Err(anyhow!(
                    "could not reach kiln at {} for {} s; build {id} continues — follow it with `kiln build watch {id}`",
                    self.ctx.endpoint,
                    RESUME_FOR.as_secs(),
                    id = self.build_id
                ));
            };
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    () = &mut sleep => break,
                    _ = self.interrupts.recv() => {
                        if let Some(code) = self.interrupted(client).await? {
                            return Ok(code);
                        }
                    }
                }
            }
        }
    }

    async fn watch(
        &self,
        client: &mut BuildServiceClient<KilnChannel>,
    ) -> Result<Streaming<pb::BuildEvent>, Stop> {
        client
            .watch_build(pb::WatchBuildRequest {
                build_id: self.build_id.clone(),
                after_sequence: self.after,
            })
            .await
            .map(tonic::Response::into_inner)
            .map_err(classify)
    }

    /// Prints one stream's events until it ends, the build ends, or the user detaches.
    async fn drain(
        &mut self,
        client: &mut BuildServiceClient<KilnChannel>,
        stream: &mut Streaming<pb::BuildEvent>,
    ) -> anyhow::Result<Drained> {
        let mut progressed = false;
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        loop {
            let message = tokio::select! {
                message = stream.message() => message,
                _ = ticker.tick() => {
                    self.save_now_and_then();
                    if let Some(t) = &mut self.terminal {
                        t.draw()?;
                    }
                    continue;
                }
                _ = self.interrupts.recv() => {
                    if let Some(code) = self.interrupted(client).await? {
                        return Ok(Drained::Ended(code));
                    }
                    continue;
                }
            };
            let event = match message {
                Ok(Some(event)) => event,
                // The server closes the stream after Finished; anything else is a cut.
                Ok(None) => return Ok(Drained::Stopped(Stop::Lost, progressed)),
                Err(status) => return Ok(Drained::Stopped(classify(status), progressed)),
            };
            progressed = true;
            // A heartbeat repeats the last stored sequence; a replay after a resume may
            // too. Neither is printed twice.
            if event.sequence <= self.after || matches!(event.event, Some(Event::Heartbeat(_))) {
                continue;
            }
            self.after = event.sequence;
            if matches!(event.event, Some(Event::Finished(_))) && self.terminal.is_some() {
                self.ran_for = self.server_run_time(client).await;
            }
            if let Some(code) = self.print(&event)? {
                return Ok(Drained::Ended(code));
            }
        }
    }

    /// Prints one event; `Some(exit code)` for Finished.
    fn print(&mut self, event: &pb::BuildEvent) -> anyhow::Result<Option<i32>> {
        if let Some(Event::StepFinished(f)) = &event.event
            && !f.succeeded
            && self.failed_step.is_none()
        {
            self.failed_step = Some(f.clone());
        }
        let Some(terminal) = &mut self.terminal else {
            let mut line = build_event_json(event);
            line["build_id"] = json!(self.build_id);
            line["time"] = crate::output::time(event.time.as_ref());
            crate::output::write_event(&mut std::io::stdout().lock(), &line)?;
            return Ok(self.finished(event));
        };
        match &event.event {
            Some(Event::Output(out)) => {
                let stream = if out.stream == pb::OutputStream::Stderr as i32 {
                    Stream::Stderr
                } else {
                    Stream::Stdout
                };
                terminal.output(stream, &out.data)?;
            }
            Some(Event::Queued(q)) => terminal.state(format!("QUEUED #{}", q.position))?,
            Some(Event::Started(_)) => terminal.state("RUNNING".into())?,
            Some(Event::StepStarted(s)) => {
                terminal.step_started(s.step_index, self.total_steps, &s.argv)?;
            }
            Some(Event::StepFinished(f)) if !f.message.is_empty() => {
                terminal.say(&format!("kiln: step {}: {}", f.step_index + 1, f.message))?;
            }
            Some(Event::Finished(done)) => {
                let message = if done.message.is_empty() {
                    String::new()
                } else {
                    format!(": {}", done.message)
                };
                let took = self
                    .ran_for
                    .map_or_else(String::new, |d| format!(" ({})", human::duration(d)));
                let line = format!(
                    "build {} {}{message}{took}",
                    self.build_id,
                    build_state_name(done.state),
                );
                terminal.finish(&line)?;
            }
            _ => {}
        }
        Ok(self.finished(event))
    }

    /// How long the build ran, from the server's start and finish times; `None` when the
    /// build cannot be fetched (the summary then says no duration rather than a wrong one)
    /// or never started (cancelled while queued).
    async fn server_run_time(
        &self,
        client: &mut BuildServiceClient<KilnChannel>,
    ) -> Option<Duration> {
        let request = pb::GetBuildRequest {
            build_id: self.build_id.clone(),
        };
        let call = client.get_build(request);
        let build = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .ok()?
            .ok()?
            .into_inner();
        build_view::run_time(&build, std::time::SystemTime::now())
    }

    /// The exit code if `event` is Finished (and the saved position is dropped).
    fn finished(&mut self, event: &pb::BuildEvent) -> Option<i32> {
        let Some(Event::Finished(done)) = &event.event else {
            return None;
        };
        Progress::BUILDS.clear(self.ctx, &self.build_id);
        let state = pb::BuildState::try_from(done.state).unwrap_or_default();
        Some(exit_code(state, self.failed_step.as_ref()))
    }

    /// Ctrl-C: cancels once when running, else detaches; `Some(exit code)` to stop.
    async fn interrupted(
        &mut self,
        client: &mut BuildServiceClient<KilnChannel>,
    ) -> anyhow::Result<Option<i32>> {
        let id = self.build_id.clone();
        if self.on_interrupt == OnInterrupt::Detach {
            self.save();
            self.say(&format!(
                "stopped watching; build {id} goes on. Resume with: kiln build watch {id}"
            ))?;
            return Ok(Some(DETACHED));
        }
        match self.cancel.clone() {
            Cancel::NotAsked => {}
            Cancel::Signalled(kill_after) => {
                self.save();
                let kill = kill_after.map_or_else(String::new, |d| {
                    format!(
                        " (SIGTERM was sent; SIGKILL follows {} after it)",
                        seconds(d)
                    )
                });
                self.say(&format!(
                    "detached; build {id} was asked to cancel and ends on its own{kill}. Follow it with: kiln build watch {id}"
                ))?;
                return Ok(Some(DETACHED));
            }
            Cancel::Failed => {
                self.save();
                self.say(&format!(
                    "detached; build {id} was not cancelled and goes on. Cancel it with: kiln build cancel {id}"
                ))?;
                return Ok(Some(DETACHED));
            }
        }
        let request = pb::CancelBuildRequest {
            build_id: id.clone(),
            grace_period: self
                .grace
                .and_then(|g| prost_types::Duration::try_from(g).ok()),
        };
        match client.cancel_build(request).await {
            Ok(response) => {
                let kill_after = response
                    .into_inner()
                    .kill_after
                    .and_then(|d| Duration::try_from(d).ok());
                let what = kill_after.map_or_else(
                    || "cancelling".to_owned(),
                    |d| format!("SIGTERM sent, SIGKILL in {}", seconds(d)),
                );
                self.cancel = Cancel::Signalled(kill_after);
                self.say(&format!(
                    "cancel requested for build {id}: {what} (Ctrl-C again to detach)…"
                ))?;
            }
            Err(status) => {
                self.cancel = Cancel::Failed;
                self.say(&format!(
                    "kiln: could not cancel build {id}: {} (Ctrl-C again to detach)",
                    crate::output::describe_status(&status, &self.ctx.endpoint)
                ))?;
            }
        }
        Ok(None)
    }

    fn save(&mut self) {
        Progress::BUILDS.save(self.ctx, &self.build_id, self.after);
        self.saved = self.after;
        self.saved_at = Instant::now();
    }

    /// Saves the position at most every [`SAVE_EVERY`], so a killed CLI (or a closed
    /// terminal) loses at most that much.
    fn save_now_and_then(&mut self) {
        if self.after != self.saved && self.saved_at.elapsed() >= SAVE_EVERY {
            self.save();
        }
    }
}

enum Drained {
    /// The build ended, or the user detached: exit with this code.
    Ended(i32),
    /// The stream stopped; `true` when it delivered at least one event first.
    Stopped(Stop, bool),
}

fn classify(status: tonic::Status) -> Stop {
    if is_connection_lost(&status) {
        Stop::Lost
    } else {
        Stop::Refused(status)
    }
}

/// The exit code for a finished build.
pub fn exit_code(state: pb::BuildState, failed_step: Option<&pb::StepFinished>) -> i32 {
    match state {
        pb::BuildState::Succeeded => 0,
        pb::BuildState::Cancelled => 130,
        pb::BuildState::TimedOut => 124,
        _ => match failed_step {
            Some(step) if step.signal.is_some() => 128 + step.signal.unwrap_or(0),
            Some(step) => step.exit_code.filter(|c| *c != 0).unwrap_or(1),
            None => 1,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graces_read_as_seconds() {
        assert_eq!(seconds(Duration::from_secs(2)), "2 s");
        assert_eq!(seconds(Duration::from_millis(500)), "0.5 s");
    }
}
