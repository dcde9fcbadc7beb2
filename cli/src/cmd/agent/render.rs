//! A task's events for people: what `kiln agent run|watch` prints on a terminal.
//!
//! Pure: it writes into any two writers (stdout and stderr in the CLI, `Vec<u8>` in the
//! tests), and whether it may colour is decided once, from the terminal and NO_COLOR,
//! by [`Style::detect`].
//!
//! What goes where: the narrative (phases, the model's text, files, findings, build
//! steps, usage, the result) and a build's stdout go to `out`; a build's stderr goes to
//! `err`, as `kiln build run` does, so `2>/dev/null` hides the compiler and keeps the
//! story.

use std::ffi::OsStr;
use std::io::{self, Write};

use kiln_proto::agent as pb;
use kiln_proto::agent::task_event::Event;
use kiln_proto::build as build_pb;
use kiln_proto::build::build_event::Event as BuildEvent;

use crate::output::{build_state_name, phase_name, severity_name};

const BOLD: &str = "\x1b[1m";
const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

/// Whether escape codes may be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Style {
    pub color: bool,
}

impl Style {
    /// Colour only on a terminal, and only when NO_COLOR is unset or empty
    /// (<https://no-color.org>).
    pub fn detect(is_terminal: bool, no_color: Option<&OsStr>) -> Self {
        Self {
            color: is_terminal && no_color.is_none_or(OsStr::is_empty),
        }
    }

    fn bold<'a>(&self) -> (&'a str, &'a str) {
        if self.color { (BOLD, RESET) } else { ("", "") }
    }

    fn dim<'a>(&self) -> (&'a str, &'a str) {
        if self.color { (DIM, RESET) } else { ("", "") }
    }
}

/// Writes events as they come. Keeps only what is needed to place line breaks: the
/// model's text and a build's output arrive in pieces that need not end with a newline.
#[derive(Debug)]
pub struct Renderer<O: Write, E: Write> {
    out: O,
    err: E,
    style: Style,
    /// The last byte written to `out` was not a newline.
    mid_line: bool,
    /// The model call whose text is being printed: (phase, call_index).
    open_call: Option<(i32, u32)>,
}

impl<O: Write, E: Write> Renderer<O, E> {
    pub fn new(out: O, err: E, style: Style) -> Self {
        Self {
            out,
            err,
            style,
            mid_line: false,
            open_call: None,
        }
    }

    #[cfg(test)]
    pub fn into_parts(self) -> (O, E) {
        (self.out, self.err)
    }

    /// Prints one event and flushes, so a slow model's text shows as it streams.
    pub fn event(&mut self, event: &pb::TaskEvent) -> io::Result<()> {
        match &event.event {
            Some(Event::ModelOutput(m)) => self.model_output(m)?,
            Some(Event::Heartbeat(_)) | None => {}
            Some(other) => {
                self.end_call()?;
                match other {
                    Event::PhaseChanged(p) => self.phase_changed(p)?,
                    Event::FilesWritten(f) => self.files_written(f)?,
                    Event::Findings(f) => self.findings(f)?,
                    Event::BuildEvent(b) => self.build_event(b)?,
                    Event::Usage(u) => self.usage(u)?,
                    Event::Result(r) => self.result(r)?,
                    Event::ModelOutput(_) | Event::Heartbeat(_) => {}
                }
            }
        }
        self.out.flush()?;
        self.err.flush()
    }

    /// Starts a fresh line on `out` if the last write left one open.
    fn line_start(&mut self) -> io::Result<()> {
        if self.mid_line {
            self.out.write_all(b"\n")?;
            self.mid_line = false;
        }
        Ok(())
    }

    fn line(&mut self, text: &str) -> io::Result<()> {
        self.line_start()?;
        writeln!(self.out, "{text}")
    }

    /// A model call ended (its usage came, or something else happened): its text ends
    /// with a newline.
    fn end_call(&mut self) -> io::Result<()> {
        self.open_call = None;
        self.line_start()
    }

    fn model_output(&mut self, m: &pb::ModelOutput) -> io::Result<()> {
        let call = (m.phase, m.call_index);
        if self.open_call != Some(call) {
            self.end_call()?;
            self.open_call = Some(call);
        }
        if m.delta.is_empty() {
            return Ok(());
        }
        // Dim per delta, not per call: anything printed in between stays plain.
        let (on, off) = self.style.dim();
        write!(self.out, "{on}{}{off}", m.delta)?;
        self.mid_line = !m.delta.ends_with('\n');
        Ok(())
    }

    fn phase_changed(&mut self, p: &pb::PhaseChanged) -> io::Result<()> {
        let (on, off) = self.style.bold();
        let mut text = format!("{on}▸ {}{off}", phase_name(p.phase));
        if p.iteration > 0 {
            text.push_str(&format!(" (iteration {})", p.iteration));
        }
        if let Some(first) = p.message.lines().find(|l| !l.trim().is_empty()) {
            // One line per phase, whatever the server's note holds (a model's summary
            // can run over several).
            let more = p.message.trim().lines().nth(1).is_some();
            text.push_str(&format!(
                " — {}{}",
                first.trim(),
                if more { " …" } else { "" }
            ));
        }
        self.line(&text)
    }

    fn files_written(&mut self, f: &pb::FilesWritten) -> io::Result<()> {
        for file in &f.files {
            let text = if file.deleted {
                format!("  deleted {}  −{}", file.path, file.lines_removed)
            } else {
                format!(
                    "  wrote {}  {}  +{} −{}{}",
                    file.path,
                    crate::human::size(file.size_bytes),
                    file.lines_added,
                    file.lines_removed,
                    if file.created { "  new" } else { "" }
                )
            };
            self.line(&text)?;
        }
        Ok(())
    }

    fn findings(&mut self, f: &pb::Findings) -> io::Result<()> {
        for finding in &f.findings {
            let place = match (finding.path.as_str(), finding.line) {
                ("", _) => String::new(),
                (path, Some(line)) => format!(" {path}:{line}"),
                (path, None) => format!(" {path}"),
            };
            let text = format!(
                "  {} {}{place}: {}",
                severity_name(finding.severity).to_lowercase(),
                finding.rule,
                finding.message
            );
            self.line(&text)?;
        }
        Ok(())
    }

    fn build_event(&mut self, relayed: &pb::RelayedBuildEvent) -> io::Result<()> {
        let Some(event) = relayed.event.as_ref().and_then(|e| e.event.as_ref()) else {
            return Ok(());
        };
        let build = &relayed.build_id;
        match event {
            BuildEvent::Output(o) if o.stream == build_pb::OutputStream::Stderr as i32 => {
                self.err.write_all(&o.data)?;
            }
            BuildEvent::Output(o) => {
                if !o.data.is_empty() {
                    self.out.write_all(&o.data)?;
                    self.mid_line = !o.data.ends_with(b"\n");
                }
            }
            BuildEvent::Queued(q) => {
                self.line(&format!("  build {build} queued (#{})", q.position))?
            }
            BuildEvent::Started(_) => self.line(&format!("  build {build} started"))?,
            BuildEvent::StepStarted(s) => {
                let (on, off) = self.style.bold();
                self.line(&format!("{on}▶ {}{off}", s.argv.join(" ")))?;
            }
            BuildEvent::StepFinished(f) => self.line(&step_finished(f))?,
            BuildEvent::Finished(f) => {
                let message = if f.message.is_empty() {
                    String::new()
                } else {
                    format!(": {}", f.message)
                };
                self.line(&format!(
                    "  build {build} {}{message}",
                    build_state_name(f.state)
                ))?;
            }
            BuildEvent::Heartbeat(_) => {}
        }
        Ok(())
    }

    fn usage(&mut self, u: &pb::ModelUsage) -> io::Result<()> {
        let call = u.call.unwrap_or_default();
        let total = u.total.unwrap_or_default();
        let seconds = u
            .duration
            .map(|d| d.seconds as f64 + f64::from(d.nanos) / 1e9)
            .unwrap_or(0.0);
        let (on, off) = self.style.dim();
        self.line(&format!(
            "{on}  · model call {} ({}): {} prompt + {} completion tokens in {seconds:.1} s; task total {} tokens{off}",
            u.call_index + 1,
            phase_name(u.phase),
            call.prompt_tokens,
            call.completion_tokens,
            total.prompt_tokens + total.completion_tokens,
        ))
    }

    fn result(&mut self, r: &pb::TaskResult) -> io::Result<()> {
        let (on, off) = self.style.bold();
        let reason = if r.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.reason)
        };
        let message = if r.message.is_empty() {
            String::new()
        } else {
            format!(": {}", r.message)
        };
        self.line(&format!(
            "{on}task {}{reason}{off}{message}",
            phase_name(r.phase)
        ))?;
        let usage = r.usage.unwrap_or_default();
        let mut facts = vec![format!("workspace {}", or_none(&r.workspace_id))];
        facts.push(format!("build {}", or_none(&r.build_id)));
        facts.push(format!(
            "{} iteration{}",
            r.iterations,
            if r.iterations == 1 { "" } else { "s" }
        ));
        facts.push(format!(
            "{} prompt + {} completion tokens in {} model call{}",
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.model_calls,
            if usage.model_calls == 1 { "" } else { "s" }
        ));
        self.line(&format!("  {}", facts.join(" · ")))
    }
}

fn or_none(id: &str) -> &str {
    if id.is_empty() { "none" } else { id }
}

fn step_finished(f: &build_pb::StepFinished) -> String {
    let outcome = match (f.signal, f.exit_code) {
        (Some(signal), _) => format!("killed by signal {signal}"),
        (None, Some(code)) => format!("exit {code}"),
        (None, None) => build_pb::StepFinishedReason::try_from(f.reason)
            .unwrap_or_default()
            .as_str_name()
            .trim_start_matches("STEP_FINISHED_REASON_")
            .to_lowercase(),
    };
    let seconds = f
        .duration
        .map(|d| format!(", {:.1} s", d.seconds as f64 + f64::from(d.nanos) / 1e9))
        .unwrap_or_default();
    let message = if f.message.is_empty() {
        String::new()
    } else {
        format!(": {}", f.message)
    };
    format!("  step {} {outcome}{seconds}{message}", f.step_index + 1)
}

/// The exit code for a task's final phase: 0 DONE, 130 CANCELLED, 1 for FAILED (and
/// anything else a newer server might send).
pub fn exit_code(phase: i32) -> i32 {
    match pb::Phase::try_from(phase).unwrap_or_default() {
        pb::Phase::Done => 0,
        pb::Phase::Cancelled => 130,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(sequence: u64, event: Event) -> pb::TaskEvent {
        pb::TaskEvent {
            sequence,
            time: None,
            event: Some(event),
        }
    }

    fn render(style: Style, events: &[Event]) -> (String, String) {
        let mut r = Renderer::new(Vec::new(), Vec::new(), style);
        for (i, e) in events.iter().enumerate() {
            r.event(&event(i as u64 + 1, e.clone())).expect("writes");
        }
        let (out, err) = r.into_parts();
        (
            String::from_utf8(out).expect("utf-8"),
            String::from_utf8(err).expect("utf-8"),
        )
    }

    const PLAIN: Style = Style { color: false };
    const COLOR: Style = Style { color: true };

    fn delta(call_index: u32, text: &str) -> Event {
        Event::ModelOutput(pb::ModelOutput {
            phase: pb::Phase::Generate as i32,
            call_index,
            delta: text.into(),
        })
    }

    fn usage(call_index: u32) -> Event {
        Event::Usage(pb::ModelUsage {
            phase: pb::Phase::Generate as i32,
            call_index,
            call: Some(pb::Usage {
                prompt_tokens: 800,
                completion_tokens: 200,
                model_calls: 1,
            }),
            total: Some(pb::Usage {
                prompt_tokens: 1500,
                completion_tokens: 500,
                model_calls: 2,
            }),
            duration: Some(prost_types::Duration {
                seconds: 4,
                nanos: 250_000_000,
            }),
        })
    }

    fn relayed(event: BuildEvent) -> Event {
        Event::BuildEvent(pb::RelayedBuildEvent {
            build_id: "b-1".into(),
            iteration: 0,
            event: Some(build_pb::BuildEvent {
                sequence: 1,
                time: None,
                event: Some(event),
            }),
        })
    }

    #[test]
    fn style_colours_only_a_terminal_without_no_color() {
        assert!(Style::detect(true, None).color);
        assert!(
            Style::detect(true, Some(OsStr::new(""))).color,
            "empty NO_COLOR is unset"
        );
        assert!(!Style::detect(true, Some(OsStr::new("1"))).color);
        assert!(!Style::detect(false, None).color);
    }

    #[test]
    fn a_phase_change_is_one_line_with_its_message() {
        let phase = Event::PhaseChanged(pb::PhaseChanged {
            previous_phase: pb::Phase::Build as i32,
            phase: pb::Phase::Fix as i32,
            iteration: 1,
            message: "fixing 2 errors in src/main.rs".into(),
        });
        let (out, err) = render(PLAIN, std::slice::from_ref(&phase));
        assert_eq!(
            out,
            "▸ FIX (iteration 1) — fixing 2 errors in src/main.rs\n"
        );
        assert_eq!(err, "");
        let (out, _) = render(COLOR, &[phase]);
        assert_eq!(
            out,
            "\x1b[1m▸ FIX\x1b[0m (iteration 1) — fixing 2 errors in src/main.rs\n"
        );
    }

    #[test]
    fn a_phase_note_over_several_lines_stays_one_line() {
        let phase = Event::PhaseChanged(pb::PhaseChanged {
            phase: pb::Phase::Generate as i32,
            message: "\n=== FILE: calc.py ===\ndef add(a, b):\n".into(),
            ..Default::default()
        });
        let (out, _) = render(PLAIN, &[phase]);
        assert_eq!(out, "▸ GENERATE — === FILE: calc.py === …\n");
    }

    #[test]
    fn model_text_is_dimmed_on_a_terminal_and_ends_with_its_call() {
        let events = [
            delta(0, "def add(a, b):"),
            delta(0, " return a + b"),
            usage(0),
        ];
        let (out, _) = render(COLOR, &events);
        assert!(
            out.starts_with("\x1b[2mdef add(a, b):\x1b[0m\x1b[2m return a + b\x1b[0m\n"),
            "{out:?}"
        );
        let (out, _) = render(PLAIN, &events);
        assert!(
            !out.contains('\x1b'),
            "no escape codes without a terminal: {out:?}"
        );
        let mut lines = out.lines();
        assert_eq!(lines.next(), Some("def add(a, b): return a + b"));
        assert_eq!(
            lines.next(),
            Some(
                "  · model call 1 (GENERATE): 800 prompt + 200 completion tokens in 4.2 s; task total 2000 tokens"
            )
        );
    }

    #[test]
    fn a_new_call_or_another_event_breaks_the_model_line() {
        let phase = Event::PhaseChanged(pb::PhaseChanged {
            phase: pb::Phase::Validate as i32,
            ..Default::default()
        });
        let (out, _) = render(PLAIN, &[delta(0, "first"), delta(1, "second"), phase]);
        assert_eq!(out, "first\nsecond\n▸ VALIDATE\n");
        let (out, _) = render(PLAIN, &[delta(0, "ends itself\n"), usage(0)]);
        assert!(out.starts_with("ends itself\n  · model call"), "{out:?}");
    }

    #[test]
    fn written_files_show_size_diff_counts_and_new() {
        let files = Event::FilesWritten(pb::FilesWritten {
            files: vec![
                pb::WrittenFile {
                    path: "main.py".into(),
                    size_bytes: 1300,
                    lines_added: 40,
                    lines_removed: 0,
                    created: true,
                    deleted: false,
                },
                pb::WrittenFile {
                    path: "old.py".into(),
                    deleted: true,
                    lines_removed: 7,
                    ..Default::default()
                },
                pb::WrittenFile {
                    path: "util.py".into(),
                    size_bytes: 90,
                    lines_added: 2,
                    lines_removed: 1,
                    ..Default::default()
                },
            ],
        });
        let (out, _) = render(PLAIN, &[files]);
        assert_eq!(
            out,
            "  wrote main.py  1.3 KiB  +40 −0  new\n  deleted old.py  −7\n  wrote util.py  90 B  +2 −1\n"
        );
    }

    #[test]
    fn findings_show_severity_rule_place_and_message() {
        let findings = Event::Findings(pb::Findings {
            iteration: 0,
            findings: vec![
                pb::Finding {
                    severity: pb::Severity::Error as i32,
                    rule: "COMMAND_NOT_ALLOWED".into(),
                    path: String::new(),
                    line: None,
                    message: "curl is not on the allowlist".into(),
                },
                pb::Finding {
                    severity: pb::Severity::Warning as i32,
                    rule: "SECRET".into(),
                    path: "config.py".into(),
                    line: Some(3),
                    message: "looks like an API key".into(),
                },
            ],
        });
        let (out, _) = render(PLAIN, &[findings]);
        assert_eq!(
            out,
            "  error COMMAND_NOT_ALLOWED: curl is not on the allowlist\n  warning SECRET config.py:3: looks like an API key\n"
        );
    }

    #[test]
    fn relayed_build_output_goes_to_the_matching_stream() {
        let events = [
            relayed(BuildEvent::StepStarted(build_pb::StepStarted {
                step_index: 0,
                argv: vec!["python3".into(), "-m".into(), "pytest".into()],
            })),
            relayed(BuildEvent::Output(build_pb::Output {
                step_index: 0,
                stream: build_pb::OutputStream::Stdout as i32,
                offset: 0,
                data: bytes::Bytes::from_static(b"2 passed"),
            })),
            relayed(BuildEvent::Output(build_pb::Output {
                step_index: 0,
                stream: build_pb::OutputStream::Stderr as i32,
                offset: 0,
                data: bytes::Bytes::from_static(b"warning: slow\n"),
            })),
            relayed(BuildEvent::StepFinished(build_pb::StepFinished {
                step_index: 0,
                exit_code: Some(0),
                succeeded: true,
                duration: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 500_000_000,
                }),
                ..Default::default()
            })),
            relayed(BuildEvent::Finished(build_pb::Finished {
                state: build_pb::BuildState::Succeeded as i32,
                message: String::new(),
            })),
        ];
        let (out, err) = render(PLAIN, &events);
        assert_eq!(
            out,
            "▶ python3 -m pytest\n2 passed\n  step 1 exit 0, 1.5 s\n  build b-1 SUCCEEDED\n"
        );
        assert_eq!(err, "warning: slow\n");
    }

    #[test]
    fn the_result_names_phase_reason_ids_iterations_and_tokens() {
        let result = Event::Result(pb::TaskResult {
            phase: pb::Phase::Failed as i32,
            message: "the same error twice: main.py:3: SyntaxError".into(),
            reason: "STUCK".into(),
            workspace_id: "w-1".into(),
            build_id: "b-2".into(),
            iterations: 2,
            usage: Some(pb::Usage {
                prompt_tokens: 5000,
                completion_tokens: 1200,
                model_calls: 4,
            }),
        });
        let (out, _) = render(PLAIN, &[result]);
        assert_eq!(
            out,
            "task FAILED (STUCK): the same error twice: main.py:3: SyntaxError\n  workspace w-1 · build b-2 · 2 iterations · 5000 prompt + 1200 completion tokens in 4 model calls\n"
        );
    }

    #[test]
    fn heartbeats_print_nothing() {
        let (out, err) = render(COLOR, &[Event::Heartbeat(pb::Heartbeat {})]);
        assert_eq!((out.as_str(), err.as_str()), ("", ""));
    }

    #[test]
    fn exit_codes_follow_the_final_phase() {
        assert_eq!(exit_code(pb::Phase::Done as i32), 0);
        assert_eq!(exit_code(pb::Phase::Failed as i32), 1);
        assert_eq!(exit_code(pb::Phase::Cancelled as i32), 130);
        assert_eq!(exit_code(99), 1);
    }
}
