//! `kiln build logs ID`: a build's output as it was logged, like `docker logs`.
//!
//! Without `--follow` it prints what the build's log holds now (up to the build's
//! `last_sequence` at the start) and ends; with `--follow` it goes on until the build
//! ends, riding out a lost connection like `watch`. Step output goes to stdout and
//! stderr as the step wrote it (`--stream` keeps one); nothing else is printed, so the
//! output pipes cleanly. `--timestamps` starts each line with the time its first byte
//! was logged (RFC 3339, UTC, milliseconds); `--tail N` starts at the last N lines.
//! Unlike `watch`, it exits 0 whatever the build's result, and it never moves the saved
//! position of `watch`.

use std::collections::{HashMap, VecDeque};
use std::io::Write;

use anyhow::anyhow;
use kiln_proto::build as pb;
use kiln_proto::build::build_event::Event;
use kiln_proto::build::build_service_client::BuildServiceClient;
use kiln_rpc::client::KilnChannel;
use serde_json::json;

use super::reconnect::{Backoff, is_connection_lost};
use super::rpc_error;
use crate::context::Context;
use crate::output::{OutputFormat, print_json};

#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// The build's id.
    build_id: String,
    /// Keep printing new output until the build ends.
    #[arg(long, short = 'f')]
    follow: bool,
    /// Start each line with the time it was logged (RFC 3339, UTC).
    #[arg(long, short = 't')]
    timestamps: bool,
    /// Only the last N lines of what is logged so far (then, with --follow, new ones).
    #[arg(long, value_name = "N")]
    tail: Option<usize>,
    /// Only this stream: stdout or stderr. Default: both, each to its own.
    #[arg(long, value_enum)]
    stream: Option<StreamChoice>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
enum StreamChoice {
    Stdout,
    Stderr,
}

impl StreamChoice {
    fn of(output: &pb::Output) -> Self {
        if output.stream == pb::OutputStream::Stderr as i32 {
            Self::Stderr
        } else {
            Self::Stdout
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }
}

/// A stream of one step: output is split into lines per (step, stream).
type StreamKey = (u32, StreamChoice);

/// A piece of output with the time of its first byte.
#[derive(Debug, Clone)]
struct Piece {
    key: StreamKey,
    time: Option<prost_types::Timestamp>,
    data: Vec<u8>,
}

pub async fn run(
    ctx: &Context,
    client: &mut BuildServiceClient<KilnChannel>,
    args: LogsArgs,
) -> anyhow::Result<i32> {
    let build = client
        .get_build(pb::GetBuildRequest {
            build_id: args.build_id.clone(),
        })
        .await
        .map_err(|s| rpc_error(ctx, s))?
        .into_inner();
    // What "now" means without --follow; with --tail, where the history ends.
    let logged_so_far = build.last_sequence;
    let mut printer = Printer::new(ctx.output, args.timestamps);
    let mut tail = args.tail.map(Tail::new);
    if tail.is_some() && logged_so_far == 0 {
        // Nothing is logged yet: there is no history to take the tail of.
        tail = None;
    }
    let mut after = 0;
    let mut backoff = Backoff::default();
    'watch: loop {
        let mut stream = match client
            .watch_build(pb::WatchBuildRequest {
                build_id: build.id.clone(),
                after_sequence: after,
            })
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) if args.follow && is_connection_lost(&status) => {
                wait_or_give_up(ctx, &build.id, &mut backoff, status).await?;
                continue;
            }
            Err(status) => return Err(rpc_error(ctx, status)),
        };
        loop {
            let event = match stream.message().await {
                Ok(Some(event)) => event,
                Ok(None) => break 'watch,
                Err(status) if args.follow && is_connection_lost(&status) => {
                    wait_or_give_up(ctx, &build.id, &mut backoff, status).await?;
                    continue 'watch;
                }
                Err(status) => return Err(rpc_error(ctx, status)),
            };
            backoff.reset();
            if matches!(event.event, Some(Event::Heartbeat(_))) {
                continue;
            }
            after = event.sequence;
            if let Some(Event::Output(output)) = &event.event {
                let choice = StreamChoice::of(output);
                if args.stream.is_none_or(|wanted| wanted == choice) {
                    let piece = Piece {
                        key: (output.step_index, choice),
                        time: event.time,
                        data: output.data.to_vec(),
                    };
                    match &mut tail {
                        Some(tail) => tail.push(piece),
                        None => printer.print(&piece)?,
                    }
                }
            }
            if event.sequence >= logged_so_far {
                if let Some(tail) = tail.take() {
                    for line in tail.lines() {
                        printer.print(&line)?;
                    }
                }
                if !args.follow {
                    break 'watch;
                }
            }
        }
    }
    if let Some(tail) = tail.take() {
        // The log ended before `logged_so_far` (it cannot, but never drop output).
        for line in tail.lines() {
            printer.print(&line)?;
        }
    }
    printer.finish()?;
    Ok(0)
}

async fn wait_or_give_up(
    ctx: &Context,
    build_id: &str,
    backoff: &mut Backoff,
    status: tonic::Status,
) -> anyhow::Result<()> {
    let first = !backoff.in_outage();
    match backoff.failed() {
        Some(delay) => {
            if first {
                eprintln!(
                    "kiln: connection lost; build {build_id} continues — reconnecting to follow its logs"
                );
            }
            tokio::time::sleep(delay).await;
            Ok(())
        }
        None => Err(anyhow!(
            "{}\nhint: build {build_id} continues; `kiln build logs {build_id} --follow` picks it up again",
            rpc_error(ctx, status)
        )),
    }
}

/// The last N lines of the history: complete lines per stream, plus each stream's
/// unfinished line at the end.
struct Tail {
    keep: usize,
    lines: VecDeque<Piece>,
    partial: HashMap<StreamKey, Piece>,
}

impl Tail {
    fn new(keep: usize) -> Self {
        Self {
            keep,
            lines: VecDeque::new(),
            partial: HashMap::new(),
        }
    }

    fn push(&mut self, piece: Piece) {
        for segment in piece.data.split_inclusive(|b| *b == b'\n') {
            let line = self.partial.entry(piece.key).or_insert_with(|| Piece {
                key: piece.key,
                time: piece.time,
                data: Vec::new(),
            });
            line.data.extend_from_slice(segment);
            if segment.ends_with(b"\n") {
                let done = self.partial.remove(&piece.key).expect("just inserted");
                self.keep_line(done);
            }
        }
    }

    fn keep_line(&mut self, line: Piece) {
        if self.keep == 0 {
            return;
        }
        if self.lines.len() == self.keep {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    /// The lines to print, oldest first; unfinished lines last (they continue live).
    fn lines(mut self) -> Vec<Piece> {
        let mut partial: Vec<Piece> = self.partial.drain().map(|(_, p)| p).collect();
        partial.sort_by_key(|p| p.key);
        for line in partial {
            self.keep_line(line);
        }
        self.lines.into()
    }
}

/// Writes pieces to stdout/stderr, a timestamp at the start of each line when asked.
struct Printer {
    format: OutputFormat,
    timestamps: bool,
    /// Streams whose last byte printed was not a newline.
    mid_line: HashMap<StreamKey, bool>,
}

impl Printer {
    fn new(format: OutputFormat, timestamps: bool) -> Self {
        Self {
            format,
            timestamps,
            mid_line: HashMap::new(),
        }
    }

    fn print(&mut self, piece: &Piece) -> std::io::Result<()> {
        if self.format == OutputFormat::Json {
            // One object a piece, as `build run -o json` prints its output events.
            print_json(&json!({
                "type": "output",
                "step_index": piece.key.0,
                "stream": piece.key.1.name(),
                "time": crate::output::time(piece.time.as_ref()),
                "data": String::from_utf8_lossy(&piece.data),
            }));
            return Ok(());
        }
        let mut out: Box<dyn Write> = match piece.key.1 {
            StreamChoice::Stdout => Box::new(std::io::stdout().lock()),
            StreamChoice::Stderr => Box::new(std::io::stderr().lock()),
        };
        let mid_line = self.mid_line.entry(piece.key).or_insert(false);
        for segment in piece.data.split_inclusive(|b| *b == b'\n') {
            if self.timestamps && !*mid_line {
                write!(out, "{} ", rfc3339_millis(piece.time.as_ref()))?;
            }
            out.write_all(segment)?;
            *mid_line = !segment.ends_with(b"\n");
        }
        out.flush()
    }

    fn finish(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()?;
        std::io::stderr().flush()
    }
}

/// `2026-12-02T01:50:23.123Z`: sortable, and precise enough to line up two streams.
fn rfc3339_millis(t: Option<&prost_types::Timestamp>) -> String {
    let Some(t) = t else {
        return "-".to_owned();
    };
    let nanos = i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos);
    let Ok(at) = time::OffsetDateTime::from_unix_timestamp_nanos(nanos) else {
        return t.seconds.to_string();
    };
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    at.format(&format).unwrap_or_else(|_| t.seconds.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(stream: StreamChoice, text: &str) -> Piece {
        Piece {
            key: (0, stream),
            time: None,
            data: text.as_bytes().to_vec(),
        }
    }

    fn texts(lines: Vec<Piece>) -> Vec<String> {
        lines
            .into_iter()
            .map(|p| String::from_utf8(p.data).unwrap())
            .collect()
    }

    #[test]
    fn the_tail_counts_lines_across_chunks_and_keeps_an_unfinished_one() {
        let mut tail = Tail::new(2);
        tail.push(piece(StreamChoice::Stdout, "a\nb"));
        tail.push(piece(StreamChoice::Stdout, "c\nd\ne"));
        assert_eq!(texts(tail.lines()), ["d\n", "e"]);
    }

    #[test]
    fn tail_zero_prints_nothing_of_the_history() {
        let mut tail = Tail::new(0);
        tail.push(piece(StreamChoice::Stderr, "x\ny\n"));
        assert!(tail.lines().is_empty());
    }

    #[test]
    fn timestamps_are_utc_with_milliseconds() {
        let t = prost_types::Timestamp {
            seconds: 1_796_176_223,
            nanos: 123_456_789,
        };
        assert_eq!(rfc3339_millis(Some(&t)), "2026-12-02T01:50:23.123Z");
    }
}
