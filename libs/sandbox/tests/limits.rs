//! Resource attacks: fork bomb, memory bomb, busy loop, sleep, daemons, CPU time.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::*;
use kiln_sandbox::{Control, Limits, Reason, Sandbox, Tier};

/// Pids of live host processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) || name == std::process::id().to_string() {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline"))
            && String::from_utf8_lossy(&cmdline).contains(marker)
        {
            found.push(name);
        }
    }
    found
}

/// A marker no other test shares: under plain `cargo test` the tier A and tier B
/// variants run at once in this process, and a marker made of the pid alone made each see
/// the other's live processes as "survivors". Digits only, since one becomes a `sleep`
/// argument.
fn marker(tag: &str, tier: Tier) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let tier = match tier {
        Tier::A => 1,
        _ => 2,
    };
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{tag}{}{tier}{n:03}", std::process::id())
}

fn short(limits: Limits) -> Limits {
    Limits {
        wall_timeout: Duration::from_secs(2),
        ..limits
    }
}

async fn fork_bomb_contained(s: &Sandbox, tier: Tier) {
    let ws = Workspace::new(s);
    let m = marker("kilnbomb", tier);
    let script = format!("b() {{ b | b & }}; b; wait # {m}");
    let limits = short(Limits {
        processes: Some(64),
        ..Limits::default()
    });
    let (o, _, _) = run(s, sh(&ws, &script).limits(limits)).await;
    assert!(
        matches!(o.reason, Reason::TimedOut | Reason::Exited),
        "{o:?}"
    );
    assert!(o.wall_time < Duration::from_secs(10), "{o:?}");
    assert!(!o.enforced_by(Control::Processes).is_empty(), "{o:?}");
    assert_eq!(processes_with(&m), Vec::<String>::new(), "bomb survivors");
    // The host (and this test) can still start processes.
    assert!(
        std::process::Command::new("true")
            .status()
            .unwrap()
            .success()
    );
}

async fn memory_bomb_hits_memory_limit(s: &Sandbox, _tier: Tier) {
    let ws = Workspace::new(s);
    let code = "a = []\nwhile True:\n    a.append(b'x' * (8 << 20))\n";
    let limits = Limits {
        memory_bytes: Some(64 << 20),
        wall_timeout: Duration::from_secs(30),
        ..Limits::default()
    };
    let (o, _, err) = run(s, py(&ws, code).limits(limits)).await;
    assert_eq!(o.reason, Reason::MemoryLimit, "{o:?} {err}");
    assert!(o.peak_memory_bytes <= 64 << 20, "{o:?}");
}

async fn busy_loop_times_out(s: &Sandbox, _tier: Tier) {
    let ws = Workspace::new(s);
    let (o, _, err) = run(
        s,
        py(&ws, "while True: pass").limits(short(Limits::default())),
    )
    .await;
    assert_eq!(o.reason, Reason::TimedOut, "{o:?} {err}");
    assert_eq!(o.status.signal(), Some(libc_sigterm()), "{o:?}");
    assert!(o.wall_time < Duration::from_secs(5), "{o:?}");
    assert!(o.cpu_time > Duration::from_millis(500), "{o:?}");
}

fn libc_sigterm() -> i32 {
    15
}

async fn sleep_and_daemon_killed_on_timeout(s: &Sandbox, tier: Tier) {
    let ws = Workspace::new(s);
    let m = marker("99", tier);
    // A daemon that double-forks and leaves the session and process group, then a
    // main process that outlives the timeout.
    let script = format!(
        "(setsid sh -c 'echo started > daemon.txt; exec sleep {m}1' &) ; \
         while [ ! -s daemon.txt ]; do :; done; echo ready; exec sleep {m}2"
    );
    let (o, out, err) = run(s, sh(&ws, &script).limits(short(Limits::default()))).await;
    assert_eq!(o.reason, Reason::TimedOut, "{o:?} {err}");
    assert_eq!(out, "ready\n");
    assert!(ws.join("daemon.txt").exists());
    assert_eq!(processes_with(&m), Vec::<String>::new(), "survivors: {o:?}");
}

async fn cpu_time_limit(s: &Sandbox, _tier: Tier) {
    let ws = Workspace::new(s);
    let limits = Limits {
        cpu_time: Some(Duration::from_secs(1)),
        wall_timeout: Duration::from_secs(30),
        ..Limits::default()
    };
    let (o, _, err) = run(s, py(&ws, "while True: pass").limits(limits)).await;
    assert_eq!(o.reason, Reason::TimedOut, "{o:?} {err}");
    assert!(o.wall_time < Duration::from_secs(10), "{o:?}");
}

async fn output_limit(s: &Sandbox, _tier: Tier) {
    let ws = Workspace::new(s);
    let limits = Limits {
        output_bytes: Some(100_000),
        ..Limits::default()
    };
    let code = "import sys\nwhile True:\n    sys.stdout.write('z' * 65536)\n";
    let (o, out, err) = run(s, py(&ws, code).limits(limits)).await;
    assert_eq!(o.reason, Reason::OutputLimit, "{o:?} {err}");
    assert_eq!(out.len() + err.len(), 100_000);
    assert_eq!(o.stdout_bytes + o.stderr_bytes, 100_000);
    assert!(o.message.unwrap().contains("output limit"));
}

both_tiers!(
    fork_bomb_contained,
    memory_bomb_hits_memory_limit,
    busy_loop_times_out,
    sleep_and_daemon_killed_on_timeout,
    cpu_time_limit,
    output_limit,
);
