//! Who is calling: the peer of the connection, the workload identity in its client
//! certificate, and the authenticated [`Principal`] the layer puts into request
//! extensions for handlers to read.

use std::fmt;
use std::net::SocketAddr;
use std::time::SystemTime;

use futures::future::BoxFuture;

use crate::access::Access;
use crate::error::{ApiError, reason};

/// A kiln service identity from a certificate URI SAN
/// `spiffe://<trust-domain>/service/<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadId {
    pub trust_domain: String,
    pub service: String,
}

impl WorkloadId {
    /// Parses a SPIFFE id of the form kiln uses; anything else is `None`.
    pub fn parse(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix("spiffe://")?;
        let (trust_domain, path) = rest.split_once('/')?;
        let service = path.strip_prefix("service/")?;
        let valid = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        };
        (valid(trust_domain) && valid(service)).then(|| Self {
            trust_domain: trust_domain.to_owned(),
            service: service.to_owned(),
        })
    }

    pub fn uri(&self) -> String {
        format!("spiffe://{}/service/{}", self.trust_domain, self.service)
    }
}

impl fmt::Display for WorkloadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

/// What the transport knows about the other end of a connection. Set once per
/// connection (the certificate is parsed at handshake, not per request) and available
/// in every request's extensions.
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    pub remote_addr: Option<SocketAddr>,
    /// A client certificate was presented and verified against the trust bundle.
    pub client_certificate: bool,
    /// The kiln workload identity in that certificate, if it has one.
    pub workload: Option<WorkloadId>,
    /// The serial number of that certificate (lowercase hex), to tell a rotated
    /// certificate from its predecessor in logs and tests.
    pub certificate_serial: Option<String>,
    /// Mesh mode: the connection comes from loopback, where the sidecar is, so the
    /// client certificate it forwards (`x-forwarded-client-cert`) is believed. Set per
    /// connection; [`crate::mesh`] then fills `workload` per request from the header.
    pub mesh_sidecar: bool,
}

/// A role of an end user (or an API key), ordered: viewer < user < admin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Viewer,
    User,
    Admin,
}

impl Role {
    /// Whether this role may call an RPC of `access` level (SERVICE is never a role's).
    pub fn satisfies(self, access: Access) -> bool {
        match access {
            Access::Public | Access::Viewer => true,
            Access::User => self >= Role::User,
            Access::Admin => self == Role::Admin,
            Access::Service => false,
        }
    }

    /// `viewer`, `user` or `admin`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "viewer" => Some(Self::Viewer),
            "user" => Some(Self::User),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::User => "user",
            Self::Admin => "admin",
        }
    }
}

/// How a principal proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// An access JWT issued by kiln-auth.
    Token,
    /// An API key (`kiln_…`).
    ApiKey,
    /// A kiln service's workload certificate.
    Workload,
}

/// The authenticated caller of one request. Handlers read it from the request
/// extensions with [`principal`]; they never parse tokens themselves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The user id (for services: the workload URI).
    pub subject: String,
    /// The user name (for services: the service name).
    pub username: String,
    /// `None` for a workload, which has no end-user role.
    pub role: Option<Role>,
    pub auth_method: AuthMethod,
    /// When the credential stops being valid, when known.
    pub expires_at: Option<SystemTime>,
    /// The session (JWT `sid`) for a token.
    pub session_id: Option<String>,
    /// The key id for an API key.
    pub api_key_id: Option<String>,
    /// For a delegated token: the workload acting on behalf of the user (its SPIFFE id,
    /// e.g. `spiffe://kiln.local/service/agent`). Audit lines name both.
    pub actor: Option<String>,
    /// For a delegated token: what it was minted for. `None` for every other credential.
    pub scope: Option<DelegationScope>,
}

/// What a delegated token is limited to (its `aud`, `task` and `workspace` claims).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelegationScope {
    /// The one service audience it is valid at, e.g. `kiln-build`.
    pub audience: String,
    /// The task it was minted for.
    pub task_id: String,
    /// The one workspace it may touch; `None`: any of the user's.
    pub workspace_id: Option<String>,
}

impl Principal {
    pub fn workload(id: &WorkloadId) -> Self {
        Self {
            subject: id.uri(),
            username: id.service.clone(),
            role: None,
            auth_method: AuthMethod::Workload,
            expires_at: None,
            session_id: None,
            api_key_id: None,
            actor: None,
            scope: None,
        }
    }

    /// Whether this credential may touch workspace `id` (and its builds): always, unless
    /// it is a delegated token scoped to another workspace.
    pub fn may_use_workspace(&self, id: &str) -> bool {
        self.scope
            .as_ref()
            .and_then(|s| s.workspace_id.as_deref())
            .is_none_or(|w| w == id)
    }

    /// `alice`, or `spiffe://…/service/agent on behalf of alice` for a delegation.
    pub fn describe(&self) -> String {
        match &self.actor {
            Some(actor) => format!("{actor} on behalf of {}", self.username),
            None => self.username.clone(),
        }
    }
}

/// Reads the principal the layer authenticated. Missing only for PUBLIC RPCs.
pub fn principal<T>(request: &tonic::Request<T>) -> Result<&Principal, ApiError> {
    request.extensions().get::<Principal>().ok_or_else(|| {
        ApiError::unauthenticated(reason::MISSING_CREDENTIALS, "this RPC needs a bearer token")
    })
}

/// A credential taken from the `authorization` header: `Bearer <token>` where the token
/// is an access JWT or an API key (`kiln_…`).
///
/// It keeps the header value (a reference-counted buffer) and where the token lies in
/// it, not a copy: this is parsed on every authenticated call.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken {
    header: http::HeaderValue,
    token: std::ops::Range<usize>,
}

impl BearerToken {
    /// Longest `authorization` header accepted; real tokens are well under 2 KiB.
    pub const MAX_HEADER_BYTES: usize = 8 * 1024;

    /// Parses the header value. `Ok(None)` when there is no header.
    pub fn from_header(value: Option<&http::HeaderValue>) -> Result<Option<Self>, ApiError> {
        let Some(value) = value else { return Ok(None) };
        let malformed = |why: &str| {
            ApiError::unauthenticated(
                reason::MALFORMED_CREDENTIALS,
                format!("the authorization header {why}; send `authorization: Bearer <token>`"),
            )
        };
        if value.len() > Self::MAX_HEADER_BYTES {
            return Err(malformed(&format!(
                "is longer than {} bytes",
                Self::MAX_HEADER_BYTES
            )));
        }
        let text = value
            .to_str()
            .map_err(|_| malformed("is not printable ASCII"))?;
        let (scheme, token) = text
            .split_once(' ')
            .ok_or_else(|| malformed("has no scheme"))?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(malformed("does not use the Bearer scheme"));
        }
        let token = token.trim();
        // `text` is ASCII (to_str above), so a byte scan is enough and cheaper than a
        // char one: this runs on every call.
        if token.is_empty() || token.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(malformed("has an empty or broken token"));
        }
        let start = token.as_ptr() as usize - text.as_ptr() as usize;
        Ok(Some(Self {
            header: value.clone(),
            token: start..start + token.len(),
        }))
    }

    pub fn as_str(&self) -> &str {
        // The header was checked to be ASCII, so this neither fails nor splits a char.
        self.header
            .to_str()
            .ok()
            .and_then(|text| text.get(self.token.clone()))
            .unwrap_or_default()
    }
}

impl fmt::Debug for BearerToken {
    // Never print a credential, not even in debug logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken(…)")
    }
}

/// The seam where token verification plugs in: JWTs against the JWKS, API keys through
/// kiln-auth. The layer calls it for every RPC above PUBLIC: [`Self::authenticate_now`]
/// first, [`Self::authenticate`] when that cannot decide.
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate<'a>(
        &'a self,
        token: &'a BearerToken,
        peer: &'a PeerInfo,
    ) -> BoxFuture<'a, Result<Principal, ApiError>>;

    /// The outcome when it needs no I/O — a token verified before, still cached, with
    /// revocations fresh — so that a hot client's calls are decided without a future;
    /// `None` (the default) sends the token to [`Self::authenticate`]. It must come to the
    /// same answer `authenticate` would.
    fn authenticate_now(
        &self,
        _token: &BearerToken,
        _peer: &PeerInfo,
    ) -> Option<Result<Principal, ApiError>> {
        None
    }
}

/// The authenticator of a server that has no identity provider: every token is refused
/// with a clear reason, never accepted.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoTokenVerification;

impl Authenticator for NoTokenVerification {
    fn authenticate<'a>(
        &'a self,
        _token: &'a BearerToken,
        _peer: &'a PeerInfo,
    ) -> BoxFuture<'a, Result<Principal, ApiError>> {
        Box::pin(async {
            Err(ApiError::unauthenticated(
                reason::TOKEN_VERIFICATION_UNAVAILABLE,
                "this server cannot verify tokens: no identity provider is configured",
            ))
        })
    }
}

// Ownership rules shared by every service: a USER reads and changes its own resources,
// a VIEWER reads everything, an ADMIN does everything. Another user's resource answers
// NOT_FOUND at the call site, so that existence does not leak.

/// Whether `p` may read a resource of `owner`: viewers and admins read everything.
pub fn can_read(p: &Principal, owner: &str) -> bool {
    match p.role {
        Some(Role::Viewer | Role::Admin) => true,
        Some(Role::User) => p.subject == owner,
        None => false,
    }
}

/// Whether `p` may change a resource of `owner`: admins change everything.
pub fn can_write(p: &Principal, owner: &str) -> bool {
    match p.role {
        Some(Role::Admin) => true,
        Some(Role::User) => p.subject == owner,
        _ => false,
    }
}

/// The owner filter of a List call: users see only their own.
pub fn owner_filter(p: &Principal, requested: Option<String>) -> Option<String> {
    match p.role {
        Some(Role::Viewer | Role::Admin) => requested,
        // Asking for someone else's: an owner no row has (subjects are never empty).
        _ => match requested {
            Some(r) if r != p.subject => Some(String::new()),
            _ => Some(p.subject.clone()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_ids_parse_only_the_kiln_shape() {
        let id = WorkloadId::parse("spiffe://kiln.local/service/build").expect("valid");
        assert_eq!(id.trust_domain, "kiln.local");
        assert_eq!(id.service, "build");
        assert_eq!(id.uri(), "spiffe://kiln.local/service/build");
        for bad in [
            "https://kiln.local/service/build",
            "spiffe://kiln.local/user/alice",
            "spiffe://kiln.local/service/",
            "spiffe:///service/build",
            "spiffe://kiln.local/service/build/../admin",
        ] {
            assert_eq!(WorkloadId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn roles_are_ordered() {
        assert!(Role::Viewer.satisfies(Access::Viewer));
        assert!(!Role::Viewer.satisfies(Access::User));
        assert!(Role::User.satisfies(Access::User));
        assert!(!Role::User.satisfies(Access::Admin));
        assert!(Role::Admin.satisfies(Access::Admin));
        assert!(!Role::Admin.satisfies(Access::Service));
    }

    #[test]
    fn bearer_header_parsing_refuses_garbage() {
        let parse = |s: &str| {
            BearerToken::from_header(Some(&http::HeaderValue::from_str(s).expect("header")))
        };
        assert_eq!(
            parse("Bearer abc").expect("ok").expect("some").as_str(),
            "abc"
        );
        assert_eq!(
            parse("bearer  abc ").expect("ok").expect("some").as_str(),
            "abc"
        );
        for bad in ["Basic abc", "Bearer", "Bearer ", "abc", "Bearer a b"] {
            let err = parse(bad).expect_err(bad);
            assert_eq!(err.reason(), reason::MALFORMED_CREDENTIALS, "{bad}");
        }
        let huge = format!("Bearer {}", "a".repeat(BearerToken::MAX_HEADER_BYTES));
        assert_eq!(
            parse(&huge).expect_err("huge").reason(),
            reason::MALFORMED_CREDENTIALS
        );
        assert!(BearerToken::from_header(None).expect("ok").is_none());
    }
}
