//! Sandbox spawn overhead: spawn→exit of `true` and submit→first byte of `echo`, for a
//! plain tokio spawn, kiln tier B, kiln tier A and bubblewrap with equivalent isolation.
//!
//! `cargo run --release -p kiln-bench --bin sandbox_spawn [iterations]`

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use kiln_bench::{ms, percentile};
use kiln_sandbox::{CommandSpec, Sandbox, SandboxConfig, Tier};
use tokio::io::AsyncReadExt;
use tokio::process::Command;

const PATH: &str = "/usr/local/bin:/usr/bin:/bin";

#[derive(Debug, Clone, Copy)]
enum Case {
    Plain,
    Kiln(Tier),
    Bwrap,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::Plain => "plain tokio::process",
            Case::Kiln(Tier::A) => "kiln tier A",
            Case::Kiln(_) => "kiln tier B",
            Case::Bwrap => "bwrap (unshare-all)",
        }
    }
}

/// bwrap arguments for the same view kiln tier A builds.
fn bwrap_args(ws: &Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        "--uid",
        "1000",
        "--gid",
        "1000",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
        "--clearenv",
        "--setenv",
        "PATH",
        PATH,
    ]
    .into_iter()
    .map(String::from)
    .collect();
    for bind in kiln_sandbox::default_read_only_binds() {
        let src = &bind.source;
        let Ok(meta) = std::fs::symlink_metadata(src) else {
            continue;
        };
        let src = src.to_string_lossy().into_owned();
        if meta.file_type().is_symlink() {
            if let Ok(target) = std::fs::read_link(&src) {
                args.extend([
                    "--symlink".into(),
                    target.to_string_lossy().into_owned(),
                    src,
                ]);
            }
        } else {
            args.extend(["--ro-bind".into(), src.clone(), src]);
        }
    }
    args.extend([
        "--bind".into(),
        ws.to_string_lossy().into_owned(),
        "/workspace".into(),
        "--chdir".into(),
        "/workspace".into(),
    ]);
    args
}

async fn run_once(case: Case, sandbox: Option<&Sandbox>, ws: &Path, echo: bool) -> Duration {
    let argv: &[&str] = if echo { &["echo", "x"] } else { &["true"] };
    let start = Instant::now();
    match case {
        Case::Kiln(_) => {
            let sandbox = sandbox.expect("sandbox for kiln cases");
            let spec = CommandSpec::new(argv.iter().copied(), ws).env("PATH", PATH);
            let mut child = sandbox.spawn(spec).await.expect("spawn");
            if echo {
                let mut rx = child.take_output().expect("output");
                let first = rx.recv().await.expect("a first byte");
                let t = start.elapsed();
                assert_eq!(first.data, b"x\n");
                drop(rx);
                child.wait().await;
                t
            } else {
                let o = child.wait().await;
                assert!(o.success(), "{o:?}");
                start.elapsed()
            }
        }
        Case::Plain | Case::Bwrap => {
            let mut cmd = match case {
                Case::Plain => {
                    let mut c = Command::new(argv[0]);
                    c.env_clear().env("PATH", PATH).current_dir(ws);
                    c
                }
                _ => {
                    let mut c = Command::new("bwrap");
                    c.args(bwrap_args(ws));
                    c
                }
            };
            if matches!(case, Case::Bwrap) {
                cmd.args(argv);
            } else {
                cmd.args(&argv[1..]);
            }
            cmd.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            let mut child = cmd.spawn().expect("spawn");
            let mut out = child.stdout.take().expect("stdout");
            let t = if echo {
                let mut b = [0u8; 1];
                out.read_exact(&mut b).await.expect("first byte");
                start.elapsed()
            } else {
                Duration::ZERO
            };
            let status = child.wait().await.expect("wait");
            assert!(status.success(), "{case:?} failed: {status}");
            if echo { t } else { start.elapsed() }
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let iterations: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let ws = tempfile::tempdir().expect("workspace");
    let bwrap = which("bwrap");
    if bwrap.is_none() {
        println!("NOTE: bubblewrap (bwrap) is not installed: the bwrap peer is skipped.");
        println!("      Install it with `apt-get install -y bubblewrap` to compare.");
    }
    let mut cases = vec![(Case::Plain, None)];
    for tier in [Tier::B, Tier::A] {
        // KILN_BENCH_NO_CGROUPS=1 measures what the cgroup setup costs.
        let config = SandboxConfig {
            force_tier: Some(tier),
            use_cgroups: std::env::var_os("KILN_BENCH_NO_CGROUPS").is_none(),
            ..SandboxConfig::default()
        };
        match Sandbox::new(config) {
            Ok(s) => {
                s.prepare_workspace(ws.path()).expect("prepare");
                cases.push((Case::Kiln(tier), Some(s)));
            }
            Err(e) => println!("NOTE: kiln tier {tier} unavailable: {e}"),
        }
    }
    if bwrap.is_some() {
        cases.push((Case::Bwrap, None));
    }
    println!("sandbox spawn benchmark: {iterations} iterations per case, after 10 warm-up runs\n");
    let mut results = Vec::new();
    for echo in [false, true] {
        let what = if echo {
            "submit -> first byte of `echo x`"
        } else {
            "spawn -> exit of `true`"
        };
        println!("{what}");
        println!("  {:<24} {:>9} {:>9}", "case", "p50 ms", "p90 ms");
        for (case, sandbox) in &cases {
            for _ in 0..10 {
                run_once(*case, sandbox.as_ref(), ws.path(), echo).await;
            }
            let mut times = Vec::with_capacity(iterations);
            for _ in 0..iterations {
                times.push(run_once(*case, sandbox.as_ref(), ws.path(), echo).await);
            }
            times.sort();
            let (p50, p90) = (percentile(&times, 0.5), percentile(&times, 0.9));
            println!("  {:<24} {:>9.3} {:>9.3}", case.name(), ms(p50), ms(p90));
            results.push((echo, case.name(), p50));
        }
        let p50_of = |name: &str| {
            results
                .iter()
                .find(|(e, n, _)| *e == echo && *n == name)
                .map(|(_, _, d)| *d)
        };
        let plain = p50_of(Case::Plain.name());
        let bw = p50_of(Case::Bwrap.name());
        for (case, _) in &cases {
            let Some(p) = p50_of(case.name()) else {
                continue;
            };
            let vs = |base: Option<Duration>| {
                base.map(|b| format!("{:.2}x", ms(p) / ms(b)))
                    .unwrap_or_else(|| "n/a".into())
            };
            println!(
                "  ratio p50 {:<24} vs plain {:>7}  vs bwrap {:>7}  (+{:.3} ms over plain)",
                case.name(),
                vs(plain),
                vs(bw),
                plain.map(|b| ms(p) - ms(b)).unwrap_or(0.0)
            );
        }
        println!();
    }
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}
