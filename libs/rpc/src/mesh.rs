//! Mesh mode: the caller's workload identity as forwarded by the sidecar.
//!
//! In mesh mode kiln serves plaintext gRPC on loopback and a sidecar (Envoy) in front of
//! it does the mTLS. The sidecar tells who the caller is in `x-forwarded-client-cert`
//! (XFCC), one request at a time: it multiplexes many callers over one upstream
//! connection, so the identity is read per request, never per connection.
//!
//! What is believed, and when:
//! - only when the listener is in mesh mode *and* the connection comes from loopback
//!   ([`PeerInfo::mesh_sidecar`], set at accept): anything else cannot be the sidecar;
//! - only the last XFCC element: a proxy appends its own element to what it received, so
//!   the last one is the nearest proxy's, our sidecar's. Earlier ones were written by
//!   hops our sidecar did not verify (with Envoy's `SANITIZE_SET` there is only one);
//! - only a `URI=` value of kiln's shape (`spiffe://<domain>/service/<name>`), and only
//!   one distinct such value: a certificate naming two kiln workloads names none;
//! - the caller's address likewise from the last `x-forwarded-for` entry, which the
//!   sidecar appends (`use_remote_address: true`), so that rate limits and per-peer
//!   limits apply per caller, not to the sidecar as a whole.
//!
//! The header is removed from every request, in mesh mode or not, believed or not, so
//! that nothing downstream can read a caller-written copy by mistake.

use std::net::{IpAddr, SocketAddr};

use http::Request;

use crate::identity::{PeerInfo, WorkloadId};

/// Envoy's forwarded client certificate header.
pub const XFCC_HEADER: &str = "x-forwarded-client-cert";

/// Longest XFCC header parsed (a forwarded `Cert=` of a large chain fits easily).
const MAX_XFCC_BYTES: usize = 64 * 1024;

/// What the sidecar says about the client certificate of one request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ForwardedCert {
    /// The kiln workload identity of the certificate's URI SAN, if it has exactly one.
    pub workload: Option<WorkloadId>,
    /// The certificate's SHA-256 (the `Hash=` key), hex.
    pub hash: Option<String>,
}

/// Puts the forwarded identity of `request` into its [`PeerInfo`] when the request came
/// from the mesh sidecar, and strips the forwarded headers it must not pass on.
/// `mesh` is whether the listener is in mesh mode.
pub fn apply_forwarded_identity<B>(mesh: bool, mut request: Request<B>) -> Request<B> {
    let headers = request.headers_mut();
    // More than one XFCC header line: a sidecar writes one; refuse to guess.
    let duplicate = headers.get_all(XFCC_HEADER).iter().count() > 1;
    let xfcc = headers.remove(XFCC_HEADER); // every line of it
    let peer = request.extensions().get::<PeerInfo>().cloned();
    let Some(mut peer) = peer.filter(|p| mesh && p.mesh_sidecar) else {
        if xfcc.is_some() {
            tracing::debug!(
                "x-forwarded-client-cert from a peer that is not the mesh sidecar: ignored"
            );
        }
        return request;
    };
    let forwarded = match (&xfcc, duplicate) {
        (Some(value), false) => value
            .to_str()
            .ok()
            .filter(|v| v.len() <= MAX_XFCC_BYTES)
            .and_then(parse_last_element),
        (Some(_), true) => {
            tracing::warn!("several x-forwarded-client-cert headers: none is believed");
            None
        }
        (None, _) => None,
    };
    // The connection's own (TLS) fields say nothing about this caller.
    peer.client_certificate = forwarded.is_some();
    peer.workload = forwarded.and_then(|f| f.workload);
    peer.certificate_serial = None;
    if let Some(addr) = last_forwarded_for(request.headers()) {
        peer.remote_addr = Some(SocketAddr::new(addr, 0));
    }
    request.extensions_mut().insert(peer);
    request
}

/// The address the sidecar appended last to `x-forwarded-for`, if it parses.
fn last_forwarded_for(headers: &http::HeaderMap) -> Option<IpAddr> {
    let last_line = headers.get_all("x-forwarded-for").iter().next_back()?;
    last_line
        .to_str()
        .ok()?
        .rsplit(',')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// The certificate described by the last element of an XFCC value, or `None` when the
/// value is malformed or its last element describes no certificate.
pub fn parse_last_element(value: &str) -> Option<ForwardedCert> {
    let elements = split_unquoted(value, ',')?;
    let last = elements.last()?;
    let mut cert = ForwardedCert::default();
    let mut described = false;
    let mut workloads: Vec<WorkloadId> = Vec::new();
    for pair in split_unquoted(last, ';')? {
        if pair.trim().is_empty() {
            continue;
        }
        let (key, raw) = split_unquoted_once(pair, '=')?;
        let value = unquote(raw.trim())?;
        match key.trim().to_ascii_lowercase().as_str() {
            "uri" => {
                described = true;
                if let Some(id) = WorkloadId::parse(&value)
                    && !workloads.contains(&id)
                {
                    workloads.push(id);
                }
            }
            "hash" => {
                described = true;
                cert.hash = Some(value);
            }
            "cert" | "chain" | "subject" | "dns" => described = true,
            // `By` names the sidecar itself, not the caller.
            _ => {}
        }
    }
    if !described {
        return None;
    }
    cert.workload = match workloads.len() {
        1 => workloads.pop(),
        0 => None,
        _ => {
            tracing::warn!(
                count = workloads.len(),
                "forwarded client certificate names several kiln workloads: none is believed"
            );
            None
        }
    };
    Some(cert)
}

/// Splits on `sep` outside double quotes (where `\"` is a literal quote). `None` for an
/// unterminated quote.
fn split_unquoted(text: &str, sep: char) -> Option<Vec<&str>> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                parts.push(&text[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    if quoted {
        return None;
    }
    parts.push(&text[start..]);
    Some(parts)
}

fn split_unquoted_once(text: &str, sep: char) -> Option<(&str, &str)> {
    // The first separator outside quotes; a key is never quoted, so the first `=` is it.
    let (key, value) = text.split_once(sep)?;
    (!key.contains('"')).then_some((key, value))
}

/// `"a \"b\""` → `a "b"`; a bare value is taken as it is (it may not contain quotes).
fn unquote(value: &str) -> Option<String> {
    match value.strip_prefix('"') {
        Some(rest) => {
            let inner = rest.strip_suffix('"')?;
            let mut out = String::with_capacity(inner.len());
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => out.push(chars.next()?),
                    '"' => return None,
                    c => out.push(c),
                }
            }
            Some(out)
        }
        None => (!value.contains('"')).then(|| value.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(service: &str) -> Option<WorkloadId> {
        WorkloadId::parse(&format!("spiffe://kiln.local/service/{service}"))
    }

    #[test]
    fn envoys_own_example_and_kiln_identities_parse() {
        // The example of Envoy's documentation, and what SANITIZE_SET with uri: true sends.
        let doc = r#"By=http://frontend.lyft.com;Hash=468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688;Subject="/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client";URI=http://testclient.lyft.com"#;
        let cert = parse_last_element(doc).expect("parses");
        assert_eq!(cert.workload, None, "not a kiln identity");
        assert_eq!(
            cert.hash.as_deref(),
            Some("468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688")
        );
        let kiln =
            "By=spiffe://kiln.local/service/auth;Hash=ab;URI=spiffe://kiln.local/service/build";
        assert_eq!(
            parse_last_element(kiln).expect("parses").workload,
            id("build")
        );
    }

    #[test]
    fn only_the_last_element_counts() {
        // An element a client wrote itself, then the one our sidecar appended.
        let value = "Hash=00;URI=spiffe://kiln.local/service/agent,By=spiffe://kiln.local/service/auth;Hash=11;URI=spiffe://kiln.local/service/build";
        assert_eq!(
            parse_last_element(value).expect("parses").workload,
            id("build")
        );
        // The sidecar's element describes a caller without a certificate identity.
        let value = r#"URI=spiffe://kiln.local/service/agent,Hash=22;Subject="CN=alice, O=x""#;
        assert_eq!(parse_last_element(value).expect("parses").workload, None);
    }

    #[test]
    fn quoting_is_handled_as_envoy_writes_it() {
        // Separators inside quotes, and escaped quotes, do not split.
        let value =
            r#"Hash=33;Subject="CN=a \"quoted\", O=b;c=d";URI=spiffe://kiln.local/service/agent"#;
        let cert = parse_last_element(value).expect("parses");
        assert_eq!(cert.workload, id("agent"));
        // A URI in quotes is the same URI.
        let value = r#"Hash=44;URI="spiffe://kiln.local/service/agent""#;
        assert_eq!(
            parse_last_element(value).expect("parses").workload,
            id("agent")
        );
    }

    #[test]
    fn malformed_or_ambiguous_values_name_nobody() {
        for bad in [
            r#"Hash=1;URI="spiffe://kiln.local/service/agent"#, // unterminated quote
            r#"Hash=1;URI=spiffe://kiln.local/service/a"gent"#, // stray quote
            "URI",                                              // no value
            "",
            "By=spiffe://kiln.local/service/auth", // the sidecar only, no caller certificate
        ] {
            assert_eq!(
                parse_last_element(bad).and_then(|c| c.workload),
                None,
                "{bad}"
            );
        }
        // Two different kiln workloads in one certificate: neither.
        let two =
            "Hash=5;URI=spiffe://kiln.local/service/agent;URI=spiffe://kiln.local/service/build";
        assert_eq!(parse_last_element(two).expect("parses").workload, None);
        // The same one twice is still that one.
        let same =
            "Hash=5;URI=spiffe://kiln.local/service/agent;URI=spiffe://kiln.local/service/agent";
        assert_eq!(
            parse_last_element(same).expect("parses").workload,
            id("agent")
        );
    }

    fn request(peer: PeerInfo, headers: &[(&str, &str)]) -> Request<()> {
        let mut request = Request::new(());
        for (name, value) in headers {
            request.headers_mut().append(
                http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
                value.parse().expect("value"),
            );
        }
        request.extensions_mut().insert(peer);
        request
    }

    fn sidecar() -> PeerInfo {
        PeerInfo {
            remote_addr: Some("127.0.0.1:40000".parse().expect("addr")),
            mesh_sidecar: true,
            ..PeerInfo::default()
        }
    }

    const AGENT: &str = "Hash=1;URI=spiffe://kiln.local/service/agent";

    #[test]
    fn the_sidecars_header_is_believed_per_request_and_then_removed() {
        let out = apply_forwarded_identity(
            true,
            request(
                sidecar(),
                &[
                    (XFCC_HEADER, AGENT),
                    ("x-forwarded-for", "10.0.0.9, 10.1.2.3"),
                ],
            ),
        );
        let peer = out.extensions().get::<PeerInfo>().expect("peer");
        assert_eq!(peer.workload, id("agent"));
        assert!(peer.client_certificate);
        assert_eq!(peer.remote_addr, Some("10.1.2.3:0".parse().expect("addr")));
        assert!(out.headers().get(XFCC_HEADER).is_none(), "stripped");
        // The next request on the same connection, without the header: nobody.
        let out = apply_forwarded_identity(true, request(sidecar(), &[]));
        let peer = out.extensions().get::<PeerInfo>().expect("peer");
        assert_eq!(peer.workload, None);
        assert!(!peer.client_certificate);
    }

    #[test]
    fn the_header_is_ignored_and_stripped_off_the_mesh_or_from_elsewhere() {
        let tls_peer = PeerInfo {
            remote_addr: Some("127.0.0.1:40000".parse().expect("addr")),
            workload: id("build"),
            client_certificate: true,
            ..PeerInfo::default()
        };
        // Mesh mode off: the TLS identity stands, the header is dropped.
        let out =
            apply_forwarded_identity(false, request(tls_peer.clone(), &[(XFCC_HEADER, AGENT)]));
        assert_eq!(
            out.extensions().get::<PeerInfo>().expect("peer").workload,
            id("build")
        );
        assert!(out.headers().get(XFCC_HEADER).is_none());
        // Mesh mode on, but the connection is not from loopback.
        let remote = PeerInfo {
            remote_addr: Some("10.0.0.7:40000".parse().expect("addr")),
            mesh_sidecar: false,
            ..PeerInfo::default()
        };
        let out = apply_forwarded_identity(true, request(remote, &[(XFCC_HEADER, AGENT)]));
        assert_eq!(
            out.extensions().get::<PeerInfo>().expect("peer").workload,
            None
        );
        assert!(out.headers().get(XFCC_HEADER).is_none());
        // Two header lines: a sidecar writes one, so neither is believed.
        let out = apply_forwarded_identity(
            true,
            request(sidecar(), &[(XFCC_HEADER, AGENT), (XFCC_HEADER, AGENT)]),
        );
        assert_eq!(
            out.extensions().get::<PeerInfo>().expect("peer").workload,
            None
        );
    }
}
