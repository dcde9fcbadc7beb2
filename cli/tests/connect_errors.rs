//! Each way a connection can fail at TLS gets its own one-line message naming the cause
//! (issue 11, item 3), never "transport error … is the suite running?".

mod common;

use std::process::Output;

use common::{Cli, Suite};
use kiln_rpc::pki::{CertificateAuthority, DevPki, write_file};
use kiln_rpc::{KilnServer, ServerSettings};

/// `kiln build list` with `KILN_TOKEN` set (so it goes straight to connecting) against
/// `endpoint`, trusting `ca`.
fn list_builds(cli: &Cli<'_>, endpoint: &str, ca: &std::path::Path) -> Output {
    cli.command(&["build", "list"])
        .env("KILN_ENDPOINT", endpoint)
        .env("KILN_CA", ca)
        .env("KILN_TOKEN", "kiln_not_a_real_key")
        .output()
        .expect("kiln runs")
}

fn failure(output: &Output) -> String {
    assert!(
        !output.status.success(),
        "expected a failure, got: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !stderr.contains("transport error") && !stderr.contains("is the suite running"),
        "the cause must be named, not a generic transport error: {stderr}"
    );
    stderr
}

#[test]
fn a_certificate_from_another_ca_names_the_ca_file() {
    let suite = Suite::start();
    let cli = Cli::new(&suite);
    let other = tempfile::tempdir().expect("tempdir");
    let ca = other.path().join("other-ca.pem");
    let stranger = CertificateAuthority::new("someone else's CA").expect("ca");
    std::fs::write(&ca, stranger.cert_pem()).expect("write");
    let stderr = failure(&list_builds(&cli, &suite.endpoint, &ca));
    assert!(
        stderr.contains(&format!(
            "the server's certificate is not signed by CA {}",
            ca.display()
        )),
        "{stderr}"
    );
}

#[test]
fn a_missing_or_non_pem_ca_file_is_named_before_connecting() {
    let suite = Suite::start();
    let cli = Cli::new(&suite);
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope.pem");
    let stderr = failure(&list_builds(&cli, &suite.endpoint, &missing));
    assert!(
        stderr.contains(&format!("the CA file {} does not exist", missing.display())),
        "{stderr}"
    );

    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "this is not a certificate\n").expect("write");
    let stderr = failure(&list_builds(&cli, &suite.endpoint, &junk));
    assert!(
        stderr.contains(&format!(
            "the CA file {} is not a PEM certificate",
            junk.display()
        )),
        "{stderr}"
    );
}

#[test]
fn plain_http_to_the_tls_port_says_use_https() {
    let suite = Suite::start();
    let cli = Cli::new(&suite);
    let plain = format!("http://{}", suite.addr);
    let stderr = failure(&list_builds(&cli, &plain, &suite.pki().ca_cert()));
    assert!(
        stderr.contains("the server speaks TLS, but http:// sends plain HTTP/2"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("use https://{}", suite.addr)),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_name_says_which_name() {
    // A real kiln listener whose certificate is valid only for kiln.example, reached as
    // 127.0.0.1: the CA is right, the name is not.
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = DevPki {
        dir: dir.path().join("pki"),
    };
    std::fs::create_dir_all(&pki.dir).expect("pki dir");
    let ca = CertificateAuthority::new("test CA").expect("ca");
    write_file(&pki.ca_cert(), ca.cert_pem(), false).expect("write");
    let server_cert = ca.issue_server(&["kiln.example"]).expect("cert");
    write_file(&pki.server_cert(), &server_cert.cert_pem, false).expect("write");
    write_file(&pki.server_key(), &server_cert.key_pem, true).expect("write");
    let settings = ServerSettings::new("127.0.0.1:0".parse().expect("addr"), pki.server_tls());
    let server = KilnServer::new(settings).bind().await.expect("binds");
    let endpoint = format!("https://{}", server.local_addr());
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.serve_until(async {
        let _ = stopped.await;
    }));

    let config = tempfile::tempdir().expect("tempdir");
    let ca_file = pki.ca_cert();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["health", "--endpoint", &endpoint, "--ca"])
            .arg(&ca_file)
            .env("KILN_CONFIG_DIR", config.path())
            .env_remove("KILN_TOKEN")
            .output()
            .expect("kiln runs")
    })
    .await
    .expect("joined");
    let stderr = failure(&output);
    assert!(
        stderr.contains("the server's certificate is not valid for the name \"127.0.0.1\""),
        "{stderr}"
    );
}
