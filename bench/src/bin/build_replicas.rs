//! kiln-build on several replicas sharing one Postgres database and one data directory,
//! against one replica on SQLite (what `kiln up` runs), in the same run:
//!
//! 1. Throughput: 120 builds of `true` from 4 users, all submitted at once (spread over
//!    the replicas), until every one has finished: builds per second, and the queue's
//!    start latency (server `started_at − created_at`, p50/p95) under that load.
//! 2. Idle start latency: 20 builds one after another on an empty queue, StartBuild sent
//!    → the Started event received (RunBuild), p50/p95.
//! 3. Cross-replica watch latency (3 replicas): a build prints a line every 50 ms; one
//!    watcher per replica; for each line, how much later it reached each watcher than
//!    the first watcher to get it (the one on the running replica follows memory, the
//!    others the store), p50/p95/max.
//!
//! Every variant has 2 running slots per replica (this machine's cores), 2 per user. On
//! one machine, more replicas add coordination, not cores: the ratios show what the
//! shared queue costs, not how it scales across machines.
//!
//! Postgres: `KILN_TEST_POSTGRES_URL`, or a throwaway cluster (initdb + pg_ctl).
//! `cargo run --release -p kiln-bench --bin build_replicas`

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use kiln_bench::{ms, percentile};
use kiln_build::{BuildApi, BuildConfig};
use kiln_proto::build as pb;
use kiln_proto::build::build_event::Event;
use kiln_proto::build::build_service_client::BuildServiceClient;
use kiln_rpc::client::{ClientConfig, KilnChannel};
use kiln_rpc::identity::{AuthMethod, Authenticator, BearerToken, PeerInfo};
use kiln_rpc::pki::ensure_dev_pki;
use kiln_rpc::{ApiError, KilnServer, Principal, Role, ServerSettings};

type Client = BuildServiceClient<KilnChannel>;

const USERS: [&str; 4] = ["ann", "bob", "cid", "dee"];
const THROUGHPUT_BUILDS: usize = 120;
const IDLE_BUILDS: usize = 20;
const LINES: usize = 40;

/// Bearer `<name>` → a user `<name>`: the benchmark measures the queue, not auth.
#[derive(Debug)]
struct NameIsUser;

impl Authenticator for NameIsUser {
    fn authenticate<'a>(
        &'a self,
        token: &'a BearerToken,
        _peer: &'a PeerInfo,
    ) -> BoxFuture<'a, Result<Principal, ApiError>> {
        Box::pin(async move {
            Ok(Principal {
                subject: token.as_str().to_owned(),
                username: token.as_str().to_owned(),
                role: Some(Role::User),
                auth_method: AuthMethod::Token,
                expires_at: None,
                session_id: None,
                api_key_id: None,
                actor: None,
                scope: None,
            })
        })
    }
}

struct Replica {
    endpoint: String,
    ca: String,
    api: BuildApi,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Replica {
    async fn client(&self, user: &str) -> Client {
        let channel = ClientConfig::new(&self.endpoint)
            .ca_pem(self.ca.clone())
            .token(user.to_owned())
            .connect()
            .await
            .expect("connect");
        Client::new(channel)
    }
}

async fn start_replicas(
    dir: &std::path::Path,
    database_url: Option<&kiln_store::DatabaseUrl>,
    n: usize,
) -> Vec<Replica> {
    let pki = ensure_dev_pki(&dir.join("pki"), "kiln.local", &["build"]).expect("pki");
    let mut replicas = Vec::new();
    for _ in 0..n {
        let mut config = BuildConfig::new(dir.join("build"));
        config.database_url = database_url.cloned();
        config.queue.max_running = 2;
        config.queue.max_running_per_user = 2;
        config.queue.max_queued_per_user = THROUGHPUT_BUILDS;
        let api = BuildApi::open(config).await.expect("build api");
        let mut settings =
            ServerSettings::new("127.0.0.1:0".parse().expect("addr"), pki.server_tls());
        settings.rate_limit = None;
        let server = KilnServer::new(settings)
            .with_authenticator(Arc::new(NameIsUser))
            .add_service(kiln_build::service(api.clone()))
            .bind()
            .await
            .expect("bind");
        let endpoint = format!("https://{}", server.local_addr());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(server.serve_until(async {
            let _ = stopped.await;
        }));
        replicas.push(Replica {
            endpoint,
            ca: std::fs::read_to_string(pki.ca_cert()).expect("ca"),
            api,
            _stop: stop,
        });
    }
    replicas
}

fn step(argv: &[&str]) -> pb::Step {
    pb::Step {
        argv: argv.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

async fn workspace(c: &mut Client) -> String {
    c.create_workspace(pb::CreateWorkspaceRequest::default())
        .await
        .expect("workspace")
        .into_inner()
        .id
}

async fn wait_finished(c: &mut Client, id: &str) -> pb::Build {
    let mut stream = c
        .watch_build(pb::WatchBuildRequest {
            build_id: id.into(),
            after_sequence: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    while let Some(e) = stream.message().await.expect("stream") {
        if let Some(Event::Finished(f)) = e.event {
            assert_eq!(f.state, pb::BuildState::Succeeded as i32, "{f:?}");
        }
    }
    c.get_build(pb::GetBuildRequest {
        build_id: id.into(),
    })
    .await
    .expect("get")
    .into_inner()
}

fn micros(t: Option<prost_types::Timestamp>) -> i64 {
    let t = t.expect("timestamp");
    t.seconds * 1_000_000 + i64::from(t.nanos) / 1000
}

struct Throughput {
    per_second: f64,
    start_p50: Duration,
    start_p95: Duration,
}

async fn throughput(replicas: &[Replica]) -> Throughput {
    // One workspace per user and replica slot, so builds do not wait for workspaces.
    let mut jobs = Vec::new();
    for (i, user) in USERS.iter().cycle().take(THROUGHPUT_BUILDS).enumerate() {
        let mut c = replicas[i % replicas.len()].client(user).await;
        let ws = workspace(&mut c).await;
        jobs.push((c, ws));
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (mut c, ws) in jobs {
        tasks.push(tokio::spawn(async move {
            let id = c
                .start_build(pb::StartBuildRequest {
                    workspace_id: ws,
                    steps: vec![step(&["true"])],
                    ..Default::default()
                })
                .await
                .expect("start")
                .into_inner()
                .id;
            wait_finished(&mut c, &id).await
        }));
    }
    let mut waits = Vec::new();
    for t in tasks {
        let b = t.await.expect("join");
        let waited = micros(b.started_at) - micros(b.created_at);
        waits.push(Duration::from_micros(
            u64::try_from(waited.max(0)).unwrap_or(0),
        ));
    }
    let took = started.elapsed();
    waits.sort();
    Throughput {
        per_second: THROUGHPUT_BUILDS as f64 / took.as_secs_f64(),
        start_p50: percentile(&waits, 0.5),
        start_p95: percentile(&waits, 0.95),
    }
}

async fn idle_start(replicas: &[Replica]) -> (Duration, Duration) {
    let mut c = replicas[0].client("ann").await;
    let ws = workspace(&mut c).await;
    let mut latencies = Vec::new();
    for _ in 0..IDLE_BUILDS {
        let sent = Instant::now();
        let mut stream = c
            .run_build(pb::StartBuildRequest {
                workspace_id: ws.clone(),
                steps: vec![step(&["true"])],
                ..Default::default()
            })
            .await
            .expect("run")
            .into_inner();
        let mut at = None;
        while let Some(e) = stream.message().await.expect("stream") {
            if matches!(e.event, Some(Event::Started(_))) && at.is_none() {
                at = Some(sent.elapsed());
            }
        }
        latencies.push(at.expect("a Started event"));
    }
    latencies.sort();
    (percentile(&latencies, 0.5), percentile(&latencies, 0.95))
}

async fn cross_replica_watch(replicas: &[Replica]) -> Vec<Duration> {
    let mut c = replicas[0].client("ann").await;
    let ws = workspace(&mut c).await;
    let code = format!(
        "import time\nfor i in range({LINES}):\n    print(f'line {{i}}', flush=True)\n    time.sleep(0.05)"
    );
    let id = c
        .start_build(pb::StartBuildRequest {
            workspace_id: ws,
            steps: vec![step(&["python3", "-c", &code])],
            ..Default::default()
        })
        .await
        .expect("start")
        .into_inner()
        .id;
    let mut watchers = Vec::new();
    for r in replicas {
        let mut c = r.client("ann").await;
        let id = id.clone();
        watchers.push(tokio::spawn(async move {
            let mut stream = c
                .watch_build(pb::WatchBuildRequest {
                    build_id: id,
                    after_sequence: 0,
                })
                .await
                .expect("watch")
                .into_inner();
            // When each byte offset of stdout arrived.
            let mut arrivals: Vec<(u64, Instant)> = Vec::new();
            while let Some(e) = stream.message().await.expect("stream") {
                if let Some(Event::Output(o)) = e.event {
                    arrivals.push((o.offset + o.data.len() as u64, Instant::now()));
                }
            }
            arrivals
        }));
    }
    let mut all = Vec::new();
    for w in watchers {
        all.push(w.await.expect("join"));
    }
    for (i, a) in all.iter().enumerate() {
        if let (Some(first), Some(last)) = (a.first(), a.last()) {
            println!(
                "  watcher on replica {i}: {} output events over {:.0} ms",
                a.len(),
                ms(last.1 - first.1)
            );
        }
    }
    // For each output end offset the first watcher got, how late each other watcher was
    // to have at least that many bytes.
    let mut lags = Vec::new();
    let offsets: Vec<u64> = all.iter().flatten().map(|(o, _)| *o).collect();
    for offset in offsets {
        let times: Vec<Instant> = all
            .iter()
            .filter_map(|a| a.iter().find(|(o, _)| *o >= offset).map(|(_, t)| *t))
            .collect();
        let first = *times.iter().min().expect("someone got it");
        lags.extend(times.iter().map(|t| *t - first).filter(|d| !d.is_zero()));
    }
    lags.sort();
    lags
}

async fn shut(replicas: Vec<Replica>) {
    for r in replicas {
        r.api.shutdown().await;
    }
}

#[tokio::main]
async fn main() {
    let server = match kiln_testkit::postgres() {
        Ok(s) => s,
        Err(why) => {
            eprintln!("build_replicas: no Postgres ({why}); `make postgres` installs it");
            return;
        }
    };
    println!(
        "kiln-build replicas: {THROUGHPUT_BUILDS} builds of `true` from 4 users; 2 slots per replica"
    );
    println!(
        "{:<24} {:>10} {:>10} {:>14} {:>14} {:>13} {:>13}",
        "variant", "builds/s", "ratio", "load start p50", "load start p95", "idle p50", "idle p95"
    );
    let mut baseline = None;
    let variants: [(&str, bool, usize); 4] = [
        ("1 replica, SQLite", false, 1),
        ("1 replica, Postgres", true, 1),
        ("2 replicas, Postgres", true, 2),
        ("3 replicas, Postgres", true, 3),
    ];
    for (name, postgres, n) in variants {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = if postgres {
            Some(server.fresh_database().await)
        } else {
            None
        };
        let replicas = start_replicas(dir.path(), url.as_ref(), n).await;
        let t = throughput(&replicas).await;
        let (idle50, idle95) = idle_start(&replicas).await;
        let base = *baseline.get_or_insert(t.per_second);
        println!(
            "{name:<24} {:>10.1} {:>10.2} {:>11.1} ms {:>11.1} ms {:>10.1} ms {:>10.1} ms",
            t.per_second,
            t.per_second / base,
            ms(t.start_p50),
            ms(t.start_p95),
            ms(idle50),
            ms(idle95)
        );
        if n == 3 {
            let lags = cross_replica_watch(&replicas).await;
            if lags.is_empty() {
                println!("cross-replica watch: every watcher got every line at once");
            } else {
                println!(
                    "cross-replica watch lag behind the first watcher ({} samples): p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms",
                    lags.len(),
                    ms(percentile(&lags, 0.5)),
                    ms(percentile(&lags, 0.95)),
                    ms(*lags.last().expect("samples"))
                );
            }
        }
        shut(replicas).await;
    }
}
