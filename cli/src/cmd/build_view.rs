//! Builds as people read them: the `kiln build list` table (ID, STATE, AGE, DURATION,
//! OWNER when it tells something, COMMAND) and the `kiln build get` view (times in local
//! time with their age, durations, exit codes and signals, owner, labels, limits).

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use kiln_proto::auth as auth_pb;
use kiln_proto::auth::auth_service_client::AuthServiceClient;
use kiln_proto::build as pb;

use crate::context::Context;
use crate::human;
use crate::output::build_state_name;

/// Who is asking, as far as listing builds is concerned.
#[derive(Debug, Clone, Default)]
pub struct Viewer {
    pub user_id: String,
    pub username: String,
    pub admin: bool,
}

impl Viewer {
    /// The caller, from WhoAmI; `None` if that fails (the table then shows owner ids
    /// whenever owners differ from one another).
    pub async fn of(ctx: &Context) -> Option<Self> {
        let mut auth = AuthServiceClient::new(ctx.authenticated().await.ok()?);
        let principal = auth
            .who_am_i(auth_pb::WhoAmIRequest::default())
            .await
            .ok()?
            .into_inner()
            .principal?;
        Some(Self {
            admin: principal.role == auth_pb::Role::Admin as i32,
            user_id: principal.user_id,
            username: principal.username,
        })
    }
}

/// Whether the OWNER column says anything: for an admin always (an admin sees everyone's
/// builds), otherwise only when a build is not the caller's own.
pub fn shows_owner(viewer: Option<&Viewer>, builds: &[pb::Build]) -> bool {
    match viewer {
        Some(v) if v.admin => true,
        Some(v) => builds.iter().any(|b| b.owner != v.user_id),
        None => {
            builds
                .iter()
                .map(|b| b.owner.as_str())
                .collect::<BTreeSet<_>>()
                .len()
                > 1
        }
    }
}

/// Usernames of `owners` (user ids): the caller's own, and for an admin everyone's
/// (GetUser is an admin RPC). An owner that cannot be looked up (deleted, or the caller
/// is no admin) is left out and shown by its id.
pub async fn owner_names(
    ctx: &Context,
    viewer: Option<&Viewer>,
    owners: impl IntoIterator<Item = String>,
) -> HashMap<String, String> {
    let mut names = HashMap::new();
    let Some(viewer) = viewer else {
        return names;
    };
    names.insert(viewer.user_id.clone(), viewer.username.clone());
    if !viewer.admin {
        return names;
    }
    let Ok(channel) = ctx.authenticated().await else {
        return names;
    };
    let mut auth = AuthServiceClient::new(channel);
    for owner in owners.into_iter().collect::<BTreeSet<_>>() {
        if names.contains_key(&owner) {
            continue;
        }
        let user = auth
            .get_user(auth_pb::GetUserRequest {
                user_id: owner.clone(),
            })
            .await
            .ok()
            .map(tonic::Response::into_inner);
        if let Some(user) = user {
            names.insert(owner, user.username);
        }
    }
    names
}

/// The `kiln build list` table. `owners` is `Some` (user id → name, ids where no name
/// is known) when the OWNER column is shown.
pub fn table(
    builds: &[pb::Build],
    owners: Option<&HashMap<String, String>>,
    now: SystemTime,
) -> String {
    let rows: Vec<[String; 6]> = builds
        .iter()
        .map(|b| {
            [
                b.id.clone(),
                build_state_name(b.state),
                b.created_at
                    .as_ref()
                    .and_then(|t| SystemTime::try_from(*t).ok())
                    .map_or_else(|| human::NONE.to_owned(), |t| human::ago_at(t, now)),
                run_time(b, now).map_or_else(|| human::NONE.to_owned(), human::duration),
                owners.map_or_else(String::new, |names| owner_text(&b.owner, names)),
                command_text(b, 60),
            ]
        })
        .collect();
    let header = ["ID", "STATE", "AGE", "DURATION", "OWNER", "COMMAND"];
    let width = |i: usize| {
        rows.iter()
            .map(|r| r[i].chars().count())
            .chain([header[i].len()])
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..header.len()).map(width).collect();
    let mut out = String::new();
    let mut line = |cells: [&str; 6]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i == 4 && owners.is_none() {
                continue;
            }
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(header);
    for r in &rows {
        line([&r[0], &r[1], &r[2], &r[3], &r[4], &r[5]]);
    }
    out
}

/// How long the build ran: start to finish, or start to now while it runs; `None` while
/// queued (or for a build that never started).
pub fn run_time(b: &pb::Build, now: SystemTime) -> Option<Duration> {
    let start = SystemTime::try_from(b.started_at?).ok()?;
    let end = match b.finished_at {
        Some(t) => SystemTime::try_from(t).ok()?,
        None => now,
    };
    end.duration_since(start).ok()
}

fn owner_text(owner: &str, names: &HashMap<String, String>) -> String {
    names
        .get(owner)
        .cloned()
        .unwrap_or_else(|| owner.to_owned())
}

/// One step as a command line.
fn step_text(step: &pb::Step) -> String {
    if step.argv.is_empty() {
        step.command.clone().unwrap_or_default()
    } else {
        step.argv.join(" ")
    }
}

/// The build's command for a table: its first step (cut to `chars` with `…`), and how
/// many more steps follow.
pub fn command_text(b: &pb::Build, chars: usize) -> String {
    let Some(first) = b.steps.first() else {
        return human::NONE.to_owned();
    };
    let mut text = step_text(first)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    if text.chars().count() > chars {
        text = text
            .chars()
            .take(chars.saturating_sub(1))
            .collect::<String>()
            + "…";
    }
    match b.steps.len() {
        1 => text,
        n => format!("{text} (+{} more)", n - 1),
    }
}

/// The `kiln build get` view. `owner` is the owner's username when known.
pub fn detail(b: &pb::Build, owner: Option<&str>, now: SystemTime) -> String {
    let mut out = String::new();
    let mut field = |name: &str, value: String| {
        let _ = writeln!(out, "  {:<10} {value}", format!("{name}:"));
    };
    let head = format!("build {} — {}", b.id, build_state_name(b.state));
    field("workspace", b.workspace_id.clone());
    field(
        "owner",
        match owner {
            Some(name) => format!("{name} ({})", b.owner),
            None => b.owner.clone(),
        },
    );
    field("labels", labels_text(&b.labels));
    field("created", human::local_time_and_age(b.created_at.as_ref()));
    if let Some(position) = b.queue_position {
        field("queued", format!("#{position} in the queue"));
    }
    if b.started_at.is_some() {
        field("started", human::local_time_and_age(b.started_at.as_ref()));
        field(
            "waited",
            human::between(b.created_at.as_ref(), b.started_at.as_ref()),
        );
    }
    if b.finished_at.is_some() {
        field(
            "finished",
            human::local_time_and_age(b.finished_at.as_ref()),
        );
    }
    if let Some(ran) = run_time(b, now) {
        let running = if b.finished_at.is_none() {
            " so far"
        } else {
            ""
        };
        field("duration", format!("{}{running}", human::duration(ran)));
    }
    if let Some(limits) = &b.limits {
        field("limits", limits_text(limits));
    }
    let mut text = format!("{head}\n{out}");
    for (i, step) in b.steps.iter().enumerate() {
        let _ = write!(text, "  step {}: {}", i + 1, step_text(step));
        match b.step_results.iter().find(|r| r.step_index as usize == i) {
            Some(r) => {
                let _ = writeln!(text, "\n    → {}", step_result_text(r));
            }
            None if b.current_step_index == Some(u32::try_from(i).unwrap_or(u32::MAX)) => {
                text.push_str("  (running)\n");
            }
            None => text.push('\n'),
        }
    }
    if !b.failure_message.is_empty() {
        let _ = writeln!(text, "  failure: {}", b.failure_message);
    }
    text
}

/// `exit 0 in 1.2 s, CPU 0.9 s, peak memory 24 MiB`, or `killed by signal 9 (SIGKILL)…`,
/// with the reason when it is not a plain exit.
pub fn step_result_text(r: &pb::StepFinished) -> String {
    let reason = pb::StepFinishedReason::try_from(r.reason).unwrap_or_default();
    let outcome = match (r.signal, r.exit_code) {
        (Some(sig), _) => format!("killed by signal {sig}{}", signal_name(sig)),
        (None, Some(code)) => format!("exit {code}"),
        (None, None) => "did not run".to_owned(),
    };
    let mut text = outcome;
    if !matches!(
        reason,
        pb::StepFinishedReason::Exited | pb::StepFinishedReason::Unspecified
    ) {
        let name = reason
            .as_str_name()
            .trim_start_matches("STEP_FINISHED_REASON_");
        let _ = write!(text, " ({name})");
    }
    let _ = write!(text, " in {}", human::proto_duration(r.duration.as_ref()));
    if r.cpu_time.is_some() {
        let _ = write!(text, ", CPU {}", human::proto_duration(r.cpu_time.as_ref()));
    }
    if r.peak_memory_bytes > 0 {
        let _ = write!(text, ", peak memory {}", human::size(r.peak_memory_bytes));
    }
    if !r.message.is_empty() {
        let _ = write!(text, ": {}", r.message);
    }
    text
}

/// ` (SIGKILL)` for the signals a build step usually dies of; empty for others.
fn signal_name(signal: i32) -> &'static str {
    match signal {
        1 => " (SIGHUP)",
        2 => " (SIGINT)",
        3 => " (SIGQUIT)",
        4 => " (SIGILL)",
        6 => " (SIGABRT)",
        7 => " (SIGBUS)",
        8 => " (SIGFPE)",
        9 => " (SIGKILL)",
        11 => " (SIGSEGV)",
        13 => " (SIGPIPE)",
        14 => " (SIGALRM)",
        15 => " (SIGTERM)",
        24 => " (SIGXCPU)",
        25 => " (SIGXFSZ)",
        _ => "",
    }
}

fn labels_text(labels: &HashMap<String, String>) -> String {
    let mut pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    if pairs.is_empty() {
        human::NONE.to_owned()
    } else {
        pairs.join(", ")
    }
}

fn limits_text(l: &pb::Limits) -> String {
    let mut parts = Vec::new();
    if l.wall_timeout.is_some() {
        parts.push(format!(
            "timeout {}",
            human::proto_duration(l.wall_timeout.as_ref())
        ));
    }
    if l.cpu_time.is_some() {
        parts.push(format!(
            "CPU {}",
            human::proto_duration(l.cpu_time.as_ref())
        ));
    }
    if let Some(m) = l.memory_bytes {
        parts.push(format!("memory {}", human::size(m)));
    }
    if let Some(o) = l.output_bytes {
        parts.push(format!("output {}", human::size(o)));
    }
    if let Some(d) = l.disk_bytes {
        parts.push(format!("disk {}", human::size(d)));
    }
    if let Some(p) = l.processes {
        parts.push(format!("{p} processes"));
    }
    if let Some(f) = l.open_files {
        parts.push(format!("{f} open files"));
    }
    if parts.is_empty() {
        human::NONE.to_owned()
    } else {
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp {
            seconds: secs,
            nanos: 0,
        })
    }

    fn build(id: &str, owner: &str) -> pb::Build {
        pb::Build {
            id: id.into(),
            owner: owner.into(),
            state: pb::BuildState::Succeeded as i32,
            steps: vec![pb::Step {
                command: Some("python3 -m unittest -v".into()),
                ..Default::default()
            }],
            created_at: at(1_000),
            started_at: at(1_001),
            finished_at: Some(prost_types::Timestamp {
                seconds: 1_002,
                nanos: 200_000_000,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_table_has_age_duration_and_command_and_owner_only_when_asked() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_180);
        let builds = [build("b-1", "u-1")];
        let table_text = table(&builds, None, now);
        assert_eq!(
            table_text,
            "ID   STATE      AGE        DURATION  COMMAND\n\
             b-1  SUCCEEDED  3 min ago  1.2 s     python3 -m unittest -v\n"
        );
        let names = HashMap::from([("u-1".to_owned(), "alice".to_owned())]);
        let with_owner = table(&builds, Some(&names), now);
        assert!(
            with_owner.starts_with("ID   STATE      AGE        DURATION  OWNER  COMMAND\n"),
            "{with_owner}"
        );
        assert!(with_owner.contains("  alice  python3"), "{with_owner}");
    }

    #[test]
    fn owners_show_for_admins_and_when_a_build_is_someone_elses() {
        let mine = [build("b-1", "me")];
        let mixed = [build("b-1", "me"), build("b-2", "you")];
        let user = Viewer {
            user_id: "me".into(),
            username: "alice".into(),
            admin: false,
        };
        let admin = Viewer {
            admin: true,
            ..user.clone()
        };
        assert!(!shows_owner(Some(&user), &mine));
        assert!(shows_owner(Some(&user), &mixed));
        assert!(shows_owner(Some(&admin), &mine));
        assert!(!shows_owner(None, &mine));
        assert!(shows_owner(None, &mixed));
    }

    #[test]
    fn long_commands_are_cut_and_more_steps_counted() {
        let mut b = build("b", "u");
        b.steps.push(pb::Step {
            argv: vec!["make".into()],
            ..Default::default()
        });
        assert_eq!(command_text(&b, 10), "python3 -… (+1 more)");
    }

    #[test]
    fn a_step_killed_by_a_signal_says_which() {
        let r = pb::StepFinished {
            signal: Some(9),
            reason: pb::StepFinishedReason::MemoryLimit as i32,
            duration: Some(prost_types::Duration {
                seconds: 2,
                nanos: 0,
            }),
            peak_memory_bytes: 256 << 20,
            ..Default::default()
        };
        assert_eq!(
            step_result_text(&r),
            "killed by signal 9 (SIGKILL) (MEMORY_LIMIT) in 2 s, peak memory 256 MiB"
        );
    }

    #[test]
    fn the_detail_view_has_times_durations_owner_and_labels() {
        let mut b = build("b-1", "u-1");
        b.labels.insert("team".into(), "a".into());
        b.step_results.push(pb::StepFinished {
            exit_code: Some(0),
            succeeded: true,
            duration: Some(prost_types::Duration {
                seconds: 1,
                nanos: 100_000_000,
            }),
            ..Default::default()
        });
        let text = detail(&b, Some("alice"), SystemTime::now());
        for want in [
            "build b-1 — SUCCEEDED\n",
            "  owner:     alice (u-1)\n",
            "  labels:    team=a\n",
            "  waited:    1 s\n",
            "  duration:  1.2 s\n",
            "  step 1: python3 -m unittest -v\n    → exit 0 in 1.1 s\n",
        ] {
            assert!(text.contains(want), "{want:?} in\n{text}");
        }
        assert!(text.contains("  created:   1970-01-01 "), "{text}");
    }
}
