//! kiln access tokens: the claims, the JWKS format and verification.
//!
//! kiln-auth signs access tokens; every service verifies them locally with the public
//! keys of the JWKS (never a shared secret). The format lives here so that the signer
//! and the verifiers cannot drift apart.
//!
//! Algorithm: **EdDSA (Ed25519)**, chosen by measurement (`bench/layer_chain`, with the
//! jsonwebtoken `rust_crypto` backend on this 2-core machine): verifying a token costs
//! ~32 µs with EdDSA, ~122 µs with RS256 (2048) and ~192 µs with ES256; signing one ~30 µs
//! with EdDSA against ~1.2 ms with RS256. Keys are 32 bytes and generated in
//! microseconds, so rotation is cheap. Hot callers pay for verification once per token
//! anyway: verified tokens are cached (see `authn`), ~0.4 µs a call.
//!
//! Verification accepts EdDSA only: `alg: none`, HS256 made with the public key
//! (algorithm confusion) and every other algorithm are refused before any key is used,
//! and so is any token with a `crit` header (RFC 7515: kiln understands no extension).

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::identity::{AuthMethod, DelegationScope, Principal, Role, WorkloadId};

/// The only algorithm kiln signs and accepts.
pub const ALGORITHM: Algorithm = Algorithm::EdDSA;

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: u64 = 5;

/// The audience of a delegated token for kiln-build: the only audience kiln-auth mints
/// delegated tokens for, and the only service that accepts them.
pub const BUILD_AUDIENCE: &str = "kiln-build";

/// The gRPC service (path prefix) each delegated audience is valid at. A delegated token
/// is refused everywhere else, kiln-auth included, so it can never mint API keys,
/// sessions or further delegations.
const DELEGATED_AUDIENCES: &[(&str, &str)] = &[(BUILD_AUDIENCE, "/kiln.build.v1.BuildService/")];

/// Whether a delegated token of `audience` may call the RPC at `path`.
pub fn audience_admits(audience: &str, path: &str) -> bool {
    DELEGATED_AUDIENCES
        .iter()
        .any(|(aud, prefix)| *aud == audience && path.starts_with(prefix))
}

/// The `act` claim of a delegated token (RFC 8693 §4.1): who acts for the subject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActorClaim {
    /// The acting workload's SPIFFE id, e.g. `spiffe://kiln.local/service/agent`.
    pub sub: String,
}

/// The claims of a kiln access token.
///
/// A **delegated token** (minted by `ExchangeToken`) has the same claims plus `act`,
/// `task` and optionally `workspace`; its `aud` is a service audience such as
/// [`BUILD_AUDIENCE`] instead of the suite audience, and its `sid` is its own delegation
/// id. A token with `act` but the suite audience, or without `act` but a service
/// audience, is refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    /// Issuer, e.g. `kiln`.
    pub iss: String,
    /// Audience, e.g. `kiln`.
    pub aud: String,
    /// The user id.
    pub sub: String,
    /// The username at issue time (saves a look-up for logs and WhoAmI).
    pub name: String,
    /// `viewer`, `user` or `admin`.
    pub role: String,
    /// The session (refresh token family) id.
    pub sid: String,
    /// Unique token id.
    pub jti: String,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Issued at, as kiln-auth's strictly increasing millisecond stamp: what revocations
    /// ("every token of this user issued before …") are compared with. Missing (0) in a
    /// token counts as issued before every revocation.
    #[serde(default)]
    pub iat_ms: u64,
    /// Not before, Unix seconds.
    pub nbf: u64,
    /// Expires at, Unix seconds.
    pub exp: u64,
    /// Delegated tokens only: the workload acting for `sub`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<ActorClaim>,
    /// Delegated tokens only: the task the delegation was minted for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// Delegated tokens only, optional: the one workspace the token may touch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
}

impl AccessClaims {
    /// The principal these claims stand for; `None` for an unknown role.
    pub fn principal(&self) -> Option<Principal> {
        Some(Principal {
            subject: self.sub.clone(),
            username: self.name.clone(),
            role: Some(Role::parse(&self.role)?),
            auth_method: AuthMethod::Token,
            expires_at: Some(UNIX_EPOCH + Duration::from_secs(self.exp)),
            session_id: Some(self.sid.clone()),
            api_key_id: None,
            actor: self.act.as_ref().map(|a| a.sub.clone()),
            scope: self.act.as_ref().map(|_| DelegationScope {
                audience: self.aud.clone(),
                task_id: self.task.clone().unwrap_or_default(),
                workspace_id: self.workspace.clone(),
            }),
        })
    }

    /// Whether the claims have the shape of a token for `audience` (the suite's): an
    /// ordinary token for exactly that audience, or a delegated token for a known
    /// service audience with an actor that is a kiln workload and a task.
    fn well_formed(&self, audience: &str) -> Result<(), TokenError> {
        match &self.act {
            None if self.aud == audience && self.task.is_none() && self.workspace.is_none() => {
                Ok(())
            }
            None => Err(TokenError::WrongIssuerOrAudience),
            Some(act) => {
                if !DELEGATED_AUDIENCES.iter().any(|(aud, _)| *aud == self.aud) {
                    return Err(TokenError::WrongIssuerOrAudience);
                }
                let task_ok = self.task.as_deref().is_some_and(|t| !t.is_empty());
                let workspace_ok = self.workspace.as_deref().is_none_or(|w| !w.is_empty());
                if WorkloadId::parse(&act.sub).is_none() || !task_ok || !workspace_ok {
                    return Err(TokenError::Claims);
                }
                Ok(())
            }
        }
    }
}

/// One public key of the JWKS (RFC 8037 OKP key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicJwk {
    pub kid: String,
    /// Always `OKP`.
    pub kty: String,
    /// Always `Ed25519`.
    pub crv: String,
    /// The public key, base64url without padding.
    pub x: String,
    /// Always `EdDSA`.
    pub alg: String,
    /// Always `sig`.
    #[serde(rename = "use")]
    pub use_: String,
}

impl PublicJwk {
    pub fn ed25519(kid: impl Into<String>, public_key: &[u8]) -> Self {
        Self {
            kid: kid.into(),
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            x: URL_SAFE_NO_PAD.encode(public_key),
            alg: "EdDSA".into(),
            use_: "sig".into(),
        }
    }
}

/// A JSON Web Key Set: `{"keys": [...]}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwks {
    pub keys: Vec<PublicJwk>,
}

/// A private signing key (Ed25519, PKCS#8 DER) and its key id.
pub struct SigningKey {
    pub kid: String,
    encoding: EncodingKey,
    public_key: Vec<u8>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A fresh Ed25519 key; returns it with its PKCS#8 DER for storage.
    pub fn generate(kid: impl Into<String>) -> Result<(Self, Vec<u8>), TokenError> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| TokenError::KeyGeneration)?;
        let key = Self::from_pkcs8(kid, pkcs8.as_ref())?;
        Ok((key, pkcs8.as_ref().to_vec()))
    }

    /// A key from stored PKCS#8 DER.
    pub fn from_pkcs8(kid: impl Into<String>, pkcs8: &[u8]) -> Result<Self, TokenError> {
        use ring::signature::KeyPair;
        let pair =
            ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|_| TokenError::BadKey)?;
        Ok(Self {
            kid: kid.into(),
            encoding: EncodingKey::from_ed_der(pkcs8),
            public_key: pair.public_key().as_ref().to_vec(),
        })
    }

    pub fn public_jwk(&self) -> PublicJwk {
        PublicJwk::ed25519(&self.kid, &self.public_key)
    }

    /// Signs `claims` with this key, `kid` in the header.
    pub fn sign(&self, claims: &AccessClaims) -> Result<String, TokenError> {
        let mut header = Header::new(ALGORITHM);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding)
            .map_err(|e| TokenError::Signing(e.to_string()))
    }
}

/// Why a token was refused. Messages are safe to show to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("the token's algorithm is not accepted (only EdDSA)")]
    Algorithm,
    #[error("the token has a critical header extension this server does not understand")]
    CriticalExtension,
    #[error("the token has no key id")]
    MissingKid,
    #[error("the token was signed with an unknown key")]
    UnknownKey,
    #[error("the token's signature is invalid")]
    Signature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token was issued for another issuer or audience")]
    WrongIssuerOrAudience,
    #[error("the token's claims are invalid")]
    Claims,
    #[error("cannot generate a signing key")]
    KeyGeneration,
    #[error("the signing key is unusable")]
    BadKey,
    #[error("cannot sign the token: {0}")]
    Signing(String),
}

/// Verifies access tokens against a JWKS.
pub struct TokenVerifier {
    keys: HashMap<String, DecodingKey>,
    validation: Validation,
    audience: String,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl TokenVerifier {
    /// A verifier for tokens of `issuer` and `audience` signed by a key of `jwks`, and
    /// for delegated tokens of `issuer` (see [`AccessClaims`]; where they may be used is
    /// the caller's check, with [`audience_admits`]). Keys that are not Ed25519 OKP keys
    /// are ignored.
    pub fn new(jwks: &Jwks, issuer: &str, audience: &str) -> Self {
        let keys = jwks
            .keys
            .iter()
            .filter(|k| k.kty == "OKP" && k.crv == "Ed25519" && k.alg == "EdDSA")
            .filter_map(|k| Some((k.kid.clone(), DecodingKey::from_ed_components(&k.x).ok()?)))
            .collect();
        let mut validation = Validation::new(ALGORITHM);
        validation.algorithms = vec![ALGORITHM];
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_issuer(&[issuer]);
        // `aud` is required but compared in `AccessClaims::well_formed`: which audience is
        // right depends on whether the token is delegated.
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        Self {
            keys,
            validation,
            audience: audience.to_owned(),
        }
    }

    pub fn knows(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    /// Checks the token's header, signature and claims.
    pub fn verify(&self, token: &str) -> Result<AccessClaims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != ALGORITHM {
            return Err(TokenError::Algorithm);
        }
        // RFC 7515 §4.1.11: a recipient must reject a JWS whose `crit` names an extension
        // it does not understand. kiln understands none, and an empty list is invalid.
        if header.crit.is_some() {
            return Err(TokenError::CriticalExtension);
        }
        let kid = header.kid.ok_or(TokenError::MissingKid)?;
        let key = self.keys.get(&kid).ok_or(TokenError::UnknownKey)?;
        let data =
            jsonwebtoken::decode::<AccessClaims>(token, key, &self.validation).map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                match e.kind() {
                    K::ExpiredSignature => TokenError::Expired,
                    K::ImmatureSignature => TokenError::NotYetValid,
                    K::InvalidIssuer | K::InvalidAudience => TokenError::WrongIssuerOrAudience,
                    K::InvalidSignature => TokenError::Signature,
                    K::InvalidAlgorithm => TokenError::Algorithm,
                    K::InvalidToken | K::Base64(_) | K::Json(_) | K::Utf8(_) => {
                        TokenError::Malformed
                    }
                    _ => TokenError::Claims,
                }
            })?;
        data.claims.well_formed(&self.audience)?;
        Ok(data.claims)
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(now: u64) -> AccessClaims {
        AccessClaims {
            iss: "kiln".into(),
            aud: "kiln".into(),
            sub: "u-1".into(),
            name: "alice".into(),
            role: "user".into(),
            sid: "s-1".into(),
            jti: "j-1".into(),
            iat: now,
            iat_ms: now * 1000,
            nbf: now,
            exp: now + 900,
            ..AccessClaims::default()
        }
    }

    fn delegated(now: u64) -> AccessClaims {
        AccessClaims {
            aud: BUILD_AUDIENCE.into(),
            sid: "d-1".into(),
            act: Some(ActorClaim {
                sub: "spiffe://kiln.local/service/agent".into(),
            }),
            task: Some("t-1".into()),
            workspace: Some("w-1".into()),
            ..claims(now)
        }
    }

    fn setup() -> (SigningKey, TokenVerifier) {
        let (key, _) = SigningKey::generate("k1").expect("key");
        let jwks = Jwks {
            keys: vec![key.public_jwk()],
        };
        (key, TokenVerifier::new(&jwks, "kiln", "kiln"))
    }

    #[test]
    fn a_signed_token_verifies_and_maps_to_a_principal() {
        let (key, verifier) = setup();
        let token = key.sign(&claims(unix_now())).expect("signed");
        let verified = verifier.verify(&token).expect("valid");
        let principal = verified.principal().expect("known role");
        assert_eq!(principal.role, Some(Role::User));
        assert_eq!(principal.session_id.as_deref(), Some("s-1"));
    }

    #[test]
    fn a_token_with_a_critical_extension_is_refused_even_when_signed_by_the_real_key() {
        let (key, verifier) = setup();
        for crit in [vec!["exp".to_owned()], vec!["b64".to_owned()], vec![]] {
            let mut header = Header::new(ALGORITHM);
            header.kid = Some(key.kid.clone());
            header.crit = Some(crit.clone());
            let token =
                jsonwebtoken::encode(&header, &claims(unix_now()), &key.encoding).expect("signed");
            assert_eq!(
                verifier.verify(&token),
                Err(TokenError::CriticalExtension),
                "{crit:?}"
            );
        }
    }

    #[test]
    fn a_delegated_token_verifies_with_its_actor_and_scope() {
        let (key, verifier) = setup();
        let token = key.sign(&delegated(unix_now())).expect("signed");
        let principal = verifier
            .verify(&token)
            .expect("valid")
            .principal()
            .expect("known role");
        assert_eq!(principal.subject, "u-1");
        assert_eq!(
            principal.actor.as_deref(),
            Some("spiffe://kiln.local/service/agent")
        );
        let scope = principal.scope.expect("scope");
        assert_eq!(scope.audience, BUILD_AUDIENCE);
        assert_eq!(scope.task_id, "t-1");
        assert_eq!(scope.workspace_id.as_deref(), Some("w-1"));
        let ordinary = verifier
            .verify(&key.sign(&claims(unix_now())).expect("signed"))
            .expect("valid")
            .principal()
            .expect("role");
        assert_eq!((ordinary.actor, ordinary.scope), (None, None));
    }

    #[test]
    fn audiences_and_delegation_shapes_must_match() {
        let (key, verifier) = setup();
        let now = unix_now();
        let refused = [
            // An ordinary token for a service audience, or any unknown audience.
            AccessClaims {
                aud: BUILD_AUDIENCE.into(),
                ..claims(now)
            },
            AccessClaims {
                aud: "other".into(),
                ..claims(now)
            },
            // A delegated token for the suite audience (valid everywhere) or another.
            AccessClaims {
                aud: "kiln".into(),
                ..delegated(now)
            },
            AccessClaims {
                aud: "kiln-agent".into(),
                ..delegated(now)
            },
        ];
        for c in refused {
            let token = key.sign(&c).expect("signed");
            assert_eq!(
                verifier.verify(&token),
                Err(TokenError::WrongIssuerOrAudience),
                "{c:?}"
            );
        }
        let malformed = [
            AccessClaims {
                task: None,
                ..delegated(now)
            },
            AccessClaims {
                act: Some(ActorClaim {
                    sub: "alice".into(),
                }),
                ..delegated(now)
            },
            AccessClaims {
                workspace: Some(String::new()),
                ..delegated(now)
            },
        ];
        for c in malformed {
            let token = key.sign(&c).expect("signed");
            assert_eq!(verifier.verify(&token), Err(TokenError::Claims), "{c:?}");
        }
        // Scope claims on an ordinary token are not a silent no-op either.
        let token = key
            .sign(&AccessClaims {
                task: Some("t".into()),
                ..claims(now)
            })
            .expect("signed");
        assert_eq!(
            verifier.verify(&token),
            Err(TokenError::WrongIssuerOrAudience)
        );
    }

    #[test]
    fn a_delegated_audience_admits_only_its_service() {
        assert!(audience_admits(
            BUILD_AUDIENCE,
            "/kiln.build.v1.BuildService/StartBuild"
        ));
        for path in [
            "/kiln.auth.v1.AuthService/CreateApiKey",
            "/kiln.auth.v1.AuthService/ExchangeToken",
            "/kiln.agent.v1.AgentService/StartTask",
            "/kiln.build.v1.BuildServiceX/StartBuild",
        ] {
            assert!(!audience_admits(BUILD_AUDIENCE, path), "{path}");
        }
        assert!(!audience_admits(
            "kiln",
            "/kiln.build.v1.BuildService/StartBuild"
        ));
    }

    #[test]
    fn stored_keys_round_trip() {
        let (key, pkcs8) = SigningKey::generate("k1").expect("key");
        let again = SigningKey::from_pkcs8("k1", &pkcs8).expect("loads");
        assert_eq!(key.public_jwk(), again.public_jwk());
    }
}
