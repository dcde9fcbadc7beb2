//! gRPC health throughput: kiln's listener (full layer chain, TLS) against a Python
//! grpcio server answering the same RPC over TLS with the same certificate, driven by the
//! same Rust load client with the same concurrency. Budget (DESIGN §6): kiln ≥ 5× grpcio.
//!
//! `cargo run --release -p kiln-bench --bin health_throughput [seconds] [clients]`
//! (needs grpcio: `make tools` installs it into .tools/python).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use kiln_rpc::client::ClientConfig;
use kiln_rpc::pki::ensure_dev_pki;
use kiln_rpc::{KilnServer, ServerSettings};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// Health checks per second from `clients` concurrent connections for `duration`.
async fn throughput(endpoint: &str, ca: &str, clients: usize, duration: Duration) -> f64 {
    let config = ClientConfig::new(endpoint).ca_pem(ca);
    kiln_bench::calls_per_second(config, clients, duration, |channel| async move {
        HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .map(|_| ())
    })
    .await
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(5);
    let clients: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(16);
    let duration = Duration::from_secs(seconds);
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = ensure_dev_pki(dir.path(), "kiln.local", &["auth"]).expect("pki");
    let ca = std::fs::read_to_string(pki.ca_cert()).expect("ca");

    let kiln = KilnServer::new(ServerSettings::new(
        "127.0.0.1:0".parse().expect("addr"),
        pki.server_tls(),
    ))
    .add_service(any_kiln_service(dir.path()).await)
    .bind()
    .await
    .expect("binds");
    let kiln_url = format!("https://{}", kiln.local_addr());
    tokio::spawn(kiln.serve_until(std::future::pending()));

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut python = Command::new("python3")
        .arg(root.join("bench/peers/health_server.py"))
        .arg(pki.server_cert())
        .arg(pki.server_key())
        .env("PYTHONPATH", root.join(".tools/python"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 starts");
    let mut port = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(python.stdout.take().expect("stdout")),
        &mut port,
    )
    .expect("port");
    let python_url = match port.trim().parse::<u16>() {
        Ok(p) => format!("https://127.0.0.1:{p}"),
        Err(_) => {
            let _ = python.kill();
            eprintln!("the Python peer did not start (is grpcio installed? run `make tools`)");
            std::process::exit(2);
        }
    };

    println!(
        "gRPC health throughput, {clients} concurrent clients, {seconds} s per case, best of 2"
    );
    let mut best = (0.0f64, 0.0f64);
    for _ in 0..2 {
        best.0 = best
            .0
            .max(throughput(&kiln_url, &ca, clients, duration).await);
        best.1 = best
            .1
            .max(throughput(&python_url, &ca, clients, duration).await);
    }
    println!("   kiln (full layer chain): {:>8.0}/s", best.0);
    println!("   Python grpcio:           {:>8.0}/s", best.1);
    println!("   kiln / grpcio = {:.1}×  (budget ≥ 5×)", best.0 / best.1);
    let _ = python.kill();
    let _ = python.wait();
}

/// Any kiln service will do: health is answered by the listener itself. The agent opens
/// with nothing but a data directory (its clients are never connected here).
async fn any_kiln_service(
    dir: &Path,
) -> kiln_proto::agent::agent_service_server::AgentServiceServer<kiln_agent::AgentApi> {
    let unconnected = kiln_agent::ChannelSlot::default;
    let agent = kiln_agent::AgentApi::open(
        kiln_agent::AgentConfig::new(dir.join("agent")),
        std::sync::Arc::new(kiln_agent::GrpcBuildClient::new(unconnected())),
        std::sync::Arc::new(kiln_agent::GrpcDelegator::new(unconnected())),
    )
    .await
    .expect("the agent opens");
    kiln_agent::service(agent)
}
