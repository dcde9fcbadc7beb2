//! Naming why a connection to kiln failed. tonic reports every failed handshake as
//! "transport error"; the cause (a certificate signed by another CA, one issued for
//! another name, plain HTTP/2 sent to a TLS port…) is deeper in the error's source
//! chain. A user fixes each differently, so each gets its own line.

use std::error::Error as StdError;
use std::path::Path;

/// Every message in `err`'s source chain, outermost first.
fn chain(err: &(dyn StdError + 'static)) -> Vec<String> {
    let mut messages = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        messages.push(e.to_string());
        next = e.source();
    }
    messages
}

/// The host part of `endpoint` (`https://HOST:PORT/…`).
fn host(endpoint: &str) -> &str {
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    }
}

/// One line saying why connecting to `endpoint` failed, when the cause is one a user
/// can act on; `None` for anything else (the caller keeps its generic message).
/// `ca` is the CA file the client trusts, if one was given.
pub fn diagnose(
    err: &(dyn StdError + 'static),
    endpoint: &str,
    ca: Option<&Path>,
) -> Option<String> {
    let text = chain(err).join(": ");
    let has = |needle: &str| text.contains(needle);
    let plain = endpoint.starts_with("http://");
    if has("UnknownIssuer") || has("unknown issuer") || has("BadSignature") {
        return Some(match ca {
            Some(ca) => format!(
                "the server's certificate is not signed by CA {}\nhint: pass the CA that issued it with --ca (for `kiln up`: <data dir>/pki/ca.pem)",
                ca.display()
            ),
            None => "the server's certificate is not signed by a CA this client trusts\nhint: pass the CA that issued it with --ca (for `kiln up`: <data dir>/pki/ca.pem)".to_owned(),
        });
    }
    if has("NotValidForName") || has("not valid for name") {
        return Some(format!(
            "the server's certificate is not valid for the name {:?}\nhint: connect with a name the certificate was issued for (`kiln up`'s: localhost, 127.0.0.1, ::1)",
            host(endpoint)
        ));
    }
    if has("Expired") && has("certificate") {
        return Some(
            "the server's certificate has expired (or this machine's clock is wrong)".to_owned(),
        );
    }
    if has("Connection refused") {
        return Some(
            "connection refused: nothing listens there\nhint: is the suite running (`kiln up`)? check --endpoint".to_owned(),
        );
    }
    if plain
        && (has("h2 protocol error")
            || has("connection reset")
            || has("Connection reset")
            || has("broken pipe")
            || has("Broken pipe")
            || has("operation was canceled")
            || has("connection closed"))
    {
        return Some(format!(
            "the server speaks TLS, but http:// sends plain HTTP/2\nhint: use https://{}",
            endpoint.trim_start_matches("http://")
        ));
    }
    if !plain && (has("InvalidContentType") || has("corrupt message") || has("received corrupt")) {
        return Some(format!(
            "the server does not speak TLS\nhint: use http://{} if it serves plain HTTP/2",
            endpoint.trim_start_matches("https://")
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_is_taken_from_the_endpoint() {
        assert_eq!(host("https://kiln.example:7443"), "kiln.example");
        assert_eq!(host("https://[::1]:7443/x"), "::1");
        assert_eq!(host("http://127.0.0.1"), "127.0.0.1");
    }
}
