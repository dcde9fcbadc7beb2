//! What a grpcurl user sees: reflection (grpcurl 1.8 speaks v1alpha), health, TLS with
//! the development CA.

mod common;

use std::process::{Command, Output};

use common::{Suite, grpcurl};

fn run(args: &[&str]) -> Output {
    Command::new(grpcurl())
        .args(args)
        .output()
        .expect("grpcurl runs")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "grpcurl failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn grpcurl_lists_every_service_over_tls_with_the_dev_ca() {
    let suite = Suite::start();
    let ca = suite.pki().ca_cert();
    let listed = stdout(&run(&[
        "-cacert",
        ca.to_str().expect("utf-8"),
        &suite.addr,
        "list",
    ]));
    for service in [
        "kiln.auth.v1.AuthService",
        "kiln.build.v1.BuildService",
        "kiln.agent.v1.AgentService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            listed.lines().any(|l| l == service),
            "{service} missing from:\n{listed}"
        );
    }
}

#[test]
fn grpcurl_describes_rpcs_and_their_messages() {
    let suite = Suite::start();
    let ca = suite.pki().ca_cert();
    let ca = ca.to_str().expect("utf-8");
    let described = stdout(&run(&[
        "-cacert",
        ca,
        &suite.addr,
        "describe",
        "kiln.build.v1.BuildService",
    ]));
    assert!(
        described.contains("rpc RunBuild ( .kiln.build.v1.StartBuildRequest ) returns ( stream .kiln.build.v1.BuildEvent )"),
        "{described}"
    );
    let message = stdout(&run(&[
        "-cacert",
        ca,
        &suite.addr,
        "describe",
        "kiln.auth.v1.LoginRequest",
    ]));
    assert!(message.contains("string username = 1;"), "{message}");
}

#[test]
fn grpcurl_health_check_is_serving_for_the_server_and_each_service() {
    let suite = Suite::start();
    let ca = suite.pki().ca_cert();
    let ca = ca.to_str().expect("utf-8");
    for service in [
        "",
        "kiln.auth.v1.AuthService",
        "kiln.build.v1.BuildService",
        "kiln.agent.v1.AgentService",
    ] {
        let body = format!(r#"{{"service":"{service}"}}"#);
        let out = stdout(&run(&[
            "-cacert",
            ca,
            "-d",
            &body,
            &suite.addr,
            "grpc.health.v1.Health/Check",
        ]));
        assert!(out.contains(r#""status": "SERVING""#), "{service:?}: {out}");
    }
}

#[test]
fn grpcurl_without_the_ca_refuses_the_server_certificate() {
    let suite = Suite::start();
    let output = run(&[&suite.addr, "list"]);
    assert!(
        !output.status.success(),
        "a self-made CA must not be trusted by default"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("certificate"), "{stderr}");
}

#[test]
fn grpcurl_shows_readable_error_details() {
    let suite = Suite::start();
    let ca = suite.pki().ca_cert();
    let output = run(&[
        "-cacert",
        ca.to_str().expect("utf-8"),
        &suite.addr,
        "kiln.auth.v1.AuthService/WhoAmI",
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("Code: Unauthenticated"), "{stderr}");
    // google.rpc types are served by reflection, so grpcurl decodes the ErrorInfo.
    assert!(
        stderr.contains(r#""reason":"MISSING_CREDENTIALS""#),
        "{stderr}"
    );
}
