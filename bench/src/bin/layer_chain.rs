//! What kiln's layer chain costs, and what token verification and login cost.
//!
//! 1. Unary RPC throughput over the same TLS listener code: a bare tonic server vs the
//!    full kiln chain (request id, access policy, rate limit, JWT authentication from a
//!    cached verifier, authorization, size limit), without and with metrics (the RPC
//!    metrics layer counting into a registry). Budget (DESIGN §6): chain ≥ 85 % of bare.
//!    Then **telemetry on** (case 4, last, because it installs the process's subscriber):
//!    kiln-telemetry's `init` exporting spans over OTLP to a local `rotel` collector
//!    (`.tools/bin/rotel`, `make tools`; the case is skipped, saying so, without it),
//!    the chain with metrics against bare tonic again, in the same run.
//! 2. Access-token verification per call: cold (signature + claims every time) and
//!    cached (what a hot client pays), EdDSA vs ES256.
//! 3. Login's cost: one Argon2id verification with the OWASP parameters kiln uses.
//!
//! `cargo run --release -p kiln-bench --bin layer_chain [seconds-per-case] [telemetry]`
//! (`telemetry` runs case 4 alone; `alone:<bare|chain|metered|telemetry>[:<clients>]`
//! in its place measures one listener only, e.g. under `perf record`.)

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use kiln_proto::auth as pb;
use kiln_proto::auth::auth_service_client::AuthServiceClient;
use kiln_rpc::authn::{AuthnConfig, SuiteAuthenticator};
use kiln_rpc::client::ClientConfig;
use kiln_rpc::identity::{Authenticator, BearerToken, PeerInfo};
use kiln_rpc::incoming::tls_incoming;
use kiln_rpc::pki::ensure_dev_pki;
use kiln_rpc::tls::ReloadingServerConfig;
use kiln_rpc::token::{AccessClaims, Jwks, SigningKey, TokenVerifier, unix_now};
use kiln_rpc::{KilnServer, ServerSettings};
use tonic::body::Body;
use tonic::server::{NamedService, UnaryService};

/// A two-RPC stand-in for kiln-auth: WhoAmI (the measured call; VIEWER in the contract)
/// and GetJwks (so the chain's authenticator can fetch keys from it).
#[derive(Clone)]
struct BenchAuth {
    jwks_json: Arc<String>,
}

impl NamedService for BenchAuth {
    const NAME: &'static str = "kiln.auth.v1.AuthService";
}

struct WhoAmI;
impl UnaryService<pb::WhoAmIRequest> for WhoAmI {
    type Response = pb::WhoAmIResponse;
    type Future = BoxFuture<'static, Result<tonic::Response<Self::Response>, tonic::Status>>;
    fn call(&mut self, request: tonic::Request<pb::WhoAmIRequest>) -> Self::Future {
        let username = request
            .extensions()
            .get::<kiln_rpc::Principal>()
            .map(|p| p.username.clone())
            .unwrap_or_default();
        Box::pin(async move {
            Ok(tonic::Response::new(pb::WhoAmIResponse {
                principal: Some(pb::Principal {
                    username,
                    ..Default::default()
                }),
            }))
        })
    }
}

struct GetJwks(Arc<String>);
impl UnaryService<pb::GetJwksRequest> for GetJwks {
    type Response = pb::GetJwksResponse;
    type Future = BoxFuture<'static, Result<tonic::Response<Self::Response>, tonic::Status>>;
    fn call(&mut self, _request: tonic::Request<pb::GetJwksRequest>) -> Self::Future {
        let jwks_json = (*self.0).clone();
        Box::pin(async move {
            Ok(tonic::Response::new(pb::GetJwksResponse {
                jwks_json,
                ..Default::default()
            }))
        })
    }
}

/// No revocations: the chain's verifier polls this (as it polls kiln-auth) and refuses
/// tokens while it cannot, so the bench serves an empty, current answer.
struct ListRevocations;
impl UnaryService<pb::ListRevocationsRequest> for ListRevocations {
    type Response = pb::ListRevocationsResponse;
    type Future = BoxFuture<'static, Result<tonic::Response<Self::Response>, tonic::Status>>;
    fn call(&mut self, request: tonic::Request<pb::ListRevocationsRequest>) -> Self::Future {
        let cursor = request.get_ref().after;
        Box::pin(async move {
            Ok(tonic::Response::new(pb::ListRevocationsResponse {
                cursor,
                server_time: Some(std::time::SystemTime::now().into()),
                retention: Some(prost_types::Duration {
                    seconds: 3600,
                    nanos: 0,
                }),
                ..Default::default()
            }))
        })
    }
}

impl tower::Service<http::Request<Body>> for BenchAuth {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let jwks = self.jwks_json.clone();
        Box::pin(async move {
            use tonic::server::Grpc;
            use tonic_prost::ProstCodec;
            Ok(match request.uri().path() {
                "/kiln.auth.v1.AuthService/WhoAmI" => {
                    Grpc::new(ProstCodec::default())
                        .unary(WhoAmI, request)
                        .await
                }
                "/kiln.auth.v1.AuthService/GetJwks" => {
                    Grpc::new(ProstCodec::default())
                        .unary(GetJwks(jwks), request)
                        .await
                }
                "/kiln.auth.v1.AuthService/ListRevocations" => {
                    Grpc::new(ProstCodec::default())
                        .unary(ListRevocations, request)
                        .await
                }
                _ => tonic::Status::unimplemented("bench").into_http(),
            })
        })
    }
}

fn claims(role: &str) -> AccessClaims {
    let now = unix_now();
    AccessClaims {
        iss: "kiln".into(),
        aud: "kiln".into(),
        sub: "u-bench".into(),
        name: "bench".into(),
        role: role.into(),
        sid: "s-bench".into(),
        jti: "j-bench".into(),
        iat: now,
        iat_ms: now * 1000,
        nbf: now,
        exp: now + 3600,
        ..AccessClaims::default()
    }
}

/// Calls WhoAmI from `clients` concurrent connections for `duration`; returns calls/s.
async fn throughput(
    endpoint: &str,
    ca: &str,
    token: &str,
    clients: usize,
    duration: Duration,
) -> f64 {
    let config = ClientConfig::new(endpoint).ca_pem(ca).token(token);
    kiln_bench::calls_per_second(config, clients, duration, |channel| async move {
        AuthServiceClient::new(channel)
            .who_am_i(pb::WhoAmIRequest::default())
            .await
            .map(|_| ())
    })
    .await
}

/// Rounds of [`throughput`] against each of `urls` in turn (bare first), so that drift
/// in the machine's speed — large on a shared 2-core VM — hits every target alike.
/// Returns, per target, its median calls/s and its median ratio to `urls[0]` over the
/// rounds (each round's ratio is taken within that round).
async fn compare(
    urls: &[&str],
    ca: &str,
    token: &str,
    clients: usize,
    round: Duration,
) -> Vec<(f64, f64)> {
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); urls.len()];
    for _ in 0..ROUNDS {
        for (i, url) in urls.iter().enumerate() {
            rates[i].push(throughput(url, ca, token, clients, round).await);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    rates
        .iter()
        .map(|r| {
            let ratios = r.iter().zip(&rates[0]).map(|(x, bare)| x / bare).collect();
            (median(r.clone()), median(ratios))
        })
        .collect()
}

/// Rounds per comparison (odd, so the median is one of them).
const ROUNDS: usize = 5;

fn per_call<F: FnMut()>(iterations: u32, mut f: F) -> Duration {
    for _ in 0..iterations / 10 {
        f();
    }
    let started = Instant::now();
    for _ in 0..iterations {
        f();
    }
    started.elapsed() / iterations
}

/// A kiln listener with the full chain in front of `service`, authenticating against the
/// JWKS it serves; with metrics when given a registry. Returns its address.
async fn start_chain(
    pki: &kiln_rpc::pki::DevPki,
    ca: &str,
    service: BenchAuth,
    registry: Option<&mut kiln_metrics::Registry>,
) -> std::net::SocketAddr {
    let mut settings = ServerSettings::new("127.0.0.1:0".parse().expect("addr"), pki.server_tls());
    settings.rate_limit = None; // one client hammering one method is not abuse here
    let mut chain = KilnServer::new(settings);
    if let Some(registry) = registry {
        chain = chain.with_metrics(registry);
    }
    let mut chain = chain.add_service(service).bind().await.expect("bind");
    let addr = chain.local_addr();
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).expect("pki file");
    let authn = AuthnConfig::new(
        ClientConfig::new(format!("https://{addr}"))
            .ca_pem(ca.to_owned())
            .identity(
                read(pki.workload_cert("auth")),
                read(pki.workload_key("auth")),
            ),
    );
    chain.set_authenticator(Arc::new(SuiteAuthenticator::new(authn)));
    tokio::spawn(chain.serve_until(std::future::pending()));
    addr
}

#[tokio::main]
async fn main() {
    let seconds: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let duration = Duration::from_secs(seconds);
    // As many seconds per target as the two best-of runs took before the rounds.
    let round = duration * 2 / ROUNDS as u32;
    let telemetry_only = std::env::args().nth(2).as_deref() == Some("telemetry");
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = ensure_dev_pki(dir.path(), "kiln.local", &["auth"]).expect("pki");
    let ca = std::fs::read_to_string(pki.ca_cert()).expect("ca");
    let (key, _) = SigningKey::generate("bench").expect("key");
    let jwks = Jwks {
        keys: vec![key.public_jwk()],
    };
    let service = BenchAuth {
        jwks_json: Arc::new(serde_json::to_string(&jwks).expect("json")),
    };
    let token = key.sign(&claims("user")).expect("token");

    // Bare: tonic with kiln's TLS acceptor, no layer.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let bare_addr = listener.local_addr().expect("addr");
    let tls = ReloadingServerConfig::load(pki.server_tls(), false).expect("tls");
    let bare = tonic::transport::Server::builder().add_service(service.clone());
    tokio::spawn(bare.serve_with_incoming(tls_incoming(listener, tls)));

    // Chain: the full kiln layer, authenticating against the JWKS of the same service;
    // once without and once with metrics (the RPC metrics layer and its registry).
    let chain_addr = start_chain(&pki, &ca, service.clone(), None).await;
    let mut registry = kiln_metrics::registry();
    let metered_addr = start_chain(&pki, &ca, service, Some(&mut registry)).await;

    // `layer_chain <s> alone:<bare|chain|metered|telemetry>[:<clients>]`: one listener only, for
    // profiling what it costs (`perf record` then sees only that listener's calls).
    if let Some(alone) = std::env::args()
        .nth(2)
        .and_then(|a| a.strip_prefix("alone:").map(str::to_owned))
    {
        let (target, clients) = alone.split_once(':').unwrap_or((&alone, "1"));
        let clients: usize = clients.parse().expect("clients is a number");
        let addr = match target {
            "bare" => bare_addr,
            "chain" => chain_addr,
            "metered" | "telemetry" => metered_addr,
            other => panic!("alone:{other}: expected bare, chain, metered or telemetry"),
        };
        // `telemetry`: the metered chain with spans exported to rotel, as in case 4.
        let _telemetry = match target {
            "telemetry" => {
                let binary = Rotel::binary().expect("rotel is installed (`make tools`)");
                Some(export_to_rotel(&binary).await)
            }
            _ => None,
        };
        let url = format!("https://{addr}");
        throughput(&url, &ca, &token, 1, Duration::from_millis(200)).await;
        let rate = throughput(&url, &ca, &token, clients, duration).await;
        println!("{target} alone, {clients} client(s): {rate:.0}/s");
        return;
    }
    if telemetry_only {
        // telemetry_on warms the metered chain's JWKS and token caches itself.
        println!(
            "kiln layer chain benchmark, case 4 only: {ROUNDS} rounds of {round:?} per target, median ratio"
        );
        let (bare_url, metered_url) = (
            format!("https://{bare_addr}"),
            format!("https://{metered_addr}"),
        );
        telemetry_on(&bare_url, &metered_url, &ca, &token, round).await;
        return;
    }
    println!(
        "kiln layer chain benchmark: {ROUNDS} rounds of {round:?} per target, interleaved; median calls/s and median ratio to bare tonic\n"
    );
    println!("1. unary WhoAmI over TLS, calls/s (higher is better)");
    for clients in [1usize, 16] {
        let bare_url = format!("https://{bare_addr}");
        let chain_url = format!("https://{chain_addr}");
        let metered_url = format!("https://{metered_addr}");
        // Warm the chains' JWKS and token caches before measuring.
        throughput(&chain_url, &ca, &token, 1, Duration::from_millis(200)).await;
        throughput(&metered_url, &ca, &token, 1, Duration::from_millis(200)).await;
        let [bare, chain, metered] = compare(
            &[&bare_url, &chain_url, &metered_url],
            &ca,
            &token,
            clients,
            round,
        )
        .await[..] else {
            unreachable!("three targets")
        };
        println!(
            "   {clients:>2} client(s): bare tonic {:>8.0}/s   kiln chain {:>8.0}/s ({:.2})   with metrics {:>8.0}/s ({:.2} of bare)",
            bare.0, chain.0, chain.1, metered.0, metered.1
        );
    }
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).expect("pki file");
    // The registry really counted the measured calls.
    let exposition = kiln_metrics::render(&registry);
    assert!(
        exposition.contains(r#"kiln_rpc_requests_total{service="kiln.auth.v1.AuthService",method="WhoAmI",code="OK"}"#),
        "the metered chain counted its calls"
    );

    println!("\n2. access-token verification, per call");
    let verifier = TokenVerifier::new(&jwks, "kiln", "kiln");
    let eddsa_cold = per_call(20_000, || {
        verifier.verify(&token).expect("valid");
    });
    // The workload identity lets it poll revocations (SERVICE), as every verifier must.
    let cached = SuiteAuthenticator::new(AuthnConfig::new(
        ClientConfig::new(format!("https://{chain_addr}"))
            .ca_pem(ca.clone())
            .identity(
                read(pki.workload_cert("auth")),
                read(pki.workload_key("auth")),
            ),
    ));
    let bearer =
        BearerToken::from_header(Some(&format!("Bearer {token}").parse().expect("header")))
            .expect("parses")
            .expect("present");
    let peer = PeerInfo::default();
    cached
        .authenticate(&bearer, &peer)
        .await
        .expect("first verification fetches the JWKS");
    let started = Instant::now();
    let n = 200_000u32;
    for _ in 0..n {
        cached.authenticate(&bearer, &peer).await.expect("cached");
    }
    let eddsa_cached = started.elapsed() / n;
    let es256_cold = es256_verify_cost();
    let rs256 = rs256_costs();
    println!(
        "   EdDSA (Ed25519), cold:   {:>8.1} µs",
        eddsa_cold.as_secs_f64() * 1e6
    );
    println!(
        "   ES256 (P-256), cold:     {:>8.1} µs",
        es256_cold.as_secs_f64() * 1e6
    );
    let eddsa_sign = per_call(2_000, || {
        key.sign(&claims("user")).expect("signed");
    });
    match rs256 {
        Some((verify, sign)) => println!(
            "   RS256 (2048), cold:      {:>8.1} µs   (signing: RS256 {:.0} µs, EdDSA {:.0} µs)",
            verify.as_secs_f64() * 1e6,
            sign.as_secs_f64() * 1e6,
            eddsa_sign.as_secs_f64() * 1e6
        ),
        None => println!("   RS256: skipped (no `openssl` to make an RSA key)"),
    }
    println!(
        "   EdDSA, cached verifier:  {:>8.2} µs   ({:.0}× cheaper than cold)",
        eddsa_cached.as_secs_f64() * 1e6,
        eddsa_cold.as_secs_f64() / eddsa_cached.as_secs_f64()
    );

    println!("\n3. login: one Argon2id verification (m=19456 KiB, t=2, p=1)");
    let argon = argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon2::Params::new(19_456, 2, 1, None).expect("params"),
    );
    use argon2::password_hash::{PasswordHasher as _, PasswordVerifier as _};
    let hash = argon
        .hash_password(b"correct horse battery")
        .expect("hash")
        .to_string();
    let login = per_call(20, || {
        argon
            .verify_password(b"correct horse battery", hash.as_str())
            .expect("verifies");
    });
    println!(
        "   {:.1} ms per login (hashing runs on a bounded blocking pool)",
        login.as_secs_f64() * 1e3
    );

    let bare_url = format!("https://{bare_addr}");
    let metered_url = format!("https://{metered_addr}");
    telemetry_on(&bare_url, &metered_url, &ca, &token, round).await;
}

/// A rotel collector on loopback that accepts OTLP gRPC and drops what it gets
/// (`--exporter blackhole`): the export path is real up to the collector. Killed (it is
/// this process's own child) when dropped.
struct Rotel {
    child: std::process::Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl Rotel {
    fn binary() -> Option<std::path::PathBuf> {
        let path =
            std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.tools/bin/rotel"));
        path.exists().then_some(path)
    }

    async fn start(binary: &std::path::Path) -> Self {
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
        };
        let (grpc, http) = (free(), free());
        let dir = tempfile::tempdir().expect("tempdir");
        let child = std::process::Command::new(binary)
            .args(["start", "--otlp-grpc-endpoint", &grpc.to_string()])
            .args(["--otlp-http-endpoint", &http.to_string()])
            .args(["--exporter", "blackhole"])
            .arg("--pid-file")
            .arg(dir.path().join("rotel.pid"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("rotel starts");
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(grpc).await.is_err() {
            assert!(Instant::now() < deadline, "rotel did not listen on {grpc}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            child,
            endpoint: format!("http://{grpc}"),
            _dir: dir,
        }
    }
}

impl Drop for Rotel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts rotel and kiln-telemetry exporting every span to it, as a service runs it
/// (the batch processor's default queue; logs at WARN). Hold both while measuring.
async fn export_to_rotel(binary: &std::path::Path) -> (kiln_telemetry::TelemetryGuard, Rotel) {
    let rotel = Rotel::start(binary).await;
    let mut config = kiln_telemetry::TelemetryConfig::new("kiln-bench", env!("CARGO_PKG_VERSION"));
    config.otlp_endpoint = Some(rotel.endpoint.clone());
    config.default_log_level = "warn".into();
    (kiln_telemetry::init(&config).expect("telemetry"), rotel)
}

/// Case 4: the metered chain and bare tonic again, with kiln-telemetry exporting every
/// span over OTLP to rotel (the batch processor's default queue, as a service runs it).
async fn telemetry_on(bare_url: &str, metered_url: &str, ca: &str, token: &str, round: Duration) {
    println!("\n4. telemetry on: OTLP span export to a local rotel collector + metrics");
    let Some(binary) = Rotel::binary() else {
        println!("   skipped: rotel is not installed (`make tools` installs it into .tools/)");
        return;
    };
    let (mut telemetry, rotel) = export_to_rotel(&binary).await;
    for clients in [1usize, 16] {
        throughput(metered_url, ca, token, 1, Duration::from_millis(200)).await;
        let [bare, metered] =
            compare(&[bare_url, metered_url], ca, token, clients, round).await[..]
        else {
            unreachable!("two targets")
        };
        println!(
            "   {clients:>2} client(s): bare tonic {:>8.0}/s   chain + metrics + OTLP {:>8.0}/s ({:.2} of bare)",
            bare.0, metered.0, metered.1
        );
    }
    telemetry.shutdown();
    println!(
        "   spans exported {}, dropped {} (a full export queue drops spans rather than slow a call)",
        telemetry.exported_spans(),
        telemetry.dropped_spans()
    );
    drop(rotel);
}

/// Verification and signing cost of RS256 (key from the `openssl` command, which ring
/// cannot generate), or `None` without openssl.
fn rs256_costs() -> Option<(Duration, Duration)> {
    let dir = tempfile::tempdir().ok()?;
    let pem = dir.path().join("rsa.pem");
    let openssl = |args: &[&str]| {
        std::process::Command::new("openssl")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| o.stdout)
    };
    let pem_path = pem.to_str()?;
    openssl(&["genrsa", "-traditional", "-out", pem_path, "2048"])?;
    // PKCS#1 DER, which is what jsonwebtoken takes without its PEM feature.
    let private = openssl(&["rsa", "-in", pem_path, "-outform", "DER", "-traditional"])?;
    let public = openssl(&[
        "rsa",
        "-in",
        pem_path,
        "-RSAPublicKey_out",
        "-outform",
        "DER",
    ])?;
    let private = jsonwebtoken::EncodingKey::from_rsa_der(&private);
    let public = jsonwebtoken::DecodingKey::from_rsa_der(&public);
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    let token = jsonwebtoken::encode(&header, &claims("user"), &private).ok()?;
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&["kiln"]);
    let verify = per_call(5_000, || {
        jsonwebtoken::decode::<AccessClaims>(&token, &public, &validation).expect("valid");
    });
    let sign = per_call(200, || {
        jsonwebtoken::encode(&header, &claims("user"), &private).expect("signed");
    });
    Some((verify, sign))
}

/// Cold verification cost of an ES256 token with the same claims.
fn es256_verify_cost() -> Duration {
    use base64::Engine;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("p256 key");
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
        .expect("pair");
    let point = pair.public_key().as_ref(); // 0x04 || x || y
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let (x, y) = (b64.encode(&point[1..33]), b64.encode(&point[33..65]));
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &claims("user"),
        &jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref()),
    )
    .expect("es256 token");
    let key = jsonwebtoken::DecodingKey::from_ec_components(&x, &y).expect("decoding key");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_audience(&["kiln"]);
    per_call(5_000, || {
        jsonwebtoken::decode::<AccessClaims>(&token, &key, &validation).expect("valid");
    })
}
