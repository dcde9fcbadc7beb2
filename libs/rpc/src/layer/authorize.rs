//! Whether the caller may call this RPC: a failed authentication is refused with its
//! error, a role below the RPC's declared level with PERMISSION_DENIED. It trusts only
//! what [`super::authenticate`] left, and refuses when that is missing.

use http::Request;
use tonic::body::Body;

use super::{Admission, AuthenticationFailed, Route};
use crate::access::Access;
use crate::error::{ApiError, reason};
use crate::identity::{AuthMethod, Principal};

/// The authorization admission.
#[derive(Debug, Clone, Copy, Default)]
pub struct Authorize;

impl Authorize {
    fn check(request: &Request<Body>) -> Result<(), ApiError> {
        let access = match Route::of(request) {
            None => return Err(Route::missing()),
            Some(Route::Infrastructure) | Some(Route::Rpc(Access::Public)) => return Ok(()),
            Some(Route::Rpc(access)) => access,
        };
        if let Some(AuthenticationFailed(err)) = request.extensions().get() {
            return Err(err.clone());
        }
        let path = request.uri().path();
        let Some(principal) = request.extensions().get::<Principal>() else {
            return Err(ApiError::unauthenticated(
                reason::MISSING_CREDENTIALS,
                format!("{path} needs an authenticated caller"),
            ));
        };
        match access {
            Access::Service if principal.auth_method == AuthMethod::Workload => Ok(()),
            Access::Service => Err(ApiError::permission_denied(
                reason::WORKLOAD_IDENTITY_REQUIRED,
                format!("{path} is for kiln services"),
            )),
            _ if principal.role.is_some_and(|role| role.satisfies(access)) => Ok(()),
            _ => Err(ApiError::permission_denied(
                reason::INSUFFICIENT_ROLE,
                format!(
                    "{path} needs role {} or higher; {} has role {}",
                    access.to_string().to_lowercase(),
                    principal.username,
                    principal.role.map_or("none", |r| r.as_str()),
                ),
            )),
        }
    }
}

impl Admission for Authorize {
    fn admit_now(&self, request: &mut Request<Body>) -> Option<Result<(), ApiError>> {
        Some(Self::check(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Role, WorkloadId};

    fn user(role: Role) -> Principal {
        Principal {
            role: Some(role),
            auth_method: AuthMethod::Token,
            ..Principal::workload(&WorkloadId {
                trust_domain: "kiln.local".into(),
                service: "bob".into(),
            })
        }
    }

    fn check(route: Option<Route>, principal: Option<Principal>) -> Result<(), String> {
        let mut request = crate::layer::testing::request("/kiln.auth.v1.AuthService/CreateUser");
        if let Some(route) = route {
            request.extensions_mut().insert(route);
        }
        if let Some(principal) = principal {
            request.extensions_mut().insert(principal);
        }
        Authorize::check(&request).map_err(|e| e.reason().to_owned())
    }

    #[test]
    fn roles_below_the_declared_level_are_refused() {
        let admin = Some(Route::Rpc(Access::Admin));
        assert_eq!(check(admin, Some(user(Role::Admin))), Ok(()));
        assert_eq!(
            check(admin, Some(user(Role::User))),
            Err(reason::INSUFFICIENT_ROLE.into())
        );
        assert_eq!(
            check(Some(Route::Rpc(Access::User)), Some(user(Role::User))),
            Ok(())
        );
        assert_eq!(
            check(Some(Route::Rpc(Access::User)), Some(user(Role::Viewer))),
            Err(reason::INSUFFICIENT_ROLE.into())
        );
    }

    #[test]
    fn service_rpcs_need_a_workload_and_users_never_qualify() {
        let service = Some(Route::Rpc(Access::Service));
        assert_eq!(
            check(service, Some(user(Role::Admin))),
            Err(reason::WORKLOAD_IDENTITY_REQUIRED.into())
        );
        let workload = Principal::workload(&WorkloadId {
            trust_domain: "kiln.local".into(),
            service: "agent".into(),
        });
        assert_eq!(check(service, Some(workload)), Ok(()));
    }

    #[test]
    fn failed_or_missing_authentication_is_refused_and_public_calls_pass() {
        let mut request = crate::layer::testing::request("/kiln.auth.v1.AuthService/CreateUser");
        request.extensions_mut().insert(Route::Rpc(Access::Viewer));
        request
            .extensions_mut()
            .insert(AuthenticationFailed(ApiError::unauthenticated(
                reason::TOKEN_REVOKED,
                "revoked",
            )));
        assert_eq!(
            Authorize::check(&request).map_err(|e| e.reason()),
            Err(reason::TOKEN_REVOKED)
        );
        assert_eq!(
            check(Some(Route::Rpc(Access::Viewer)), None),
            Err(reason::MISSING_CREDENTIALS.into())
        );
        assert_eq!(check(Some(Route::Rpc(Access::Public)), None), Ok(()));
        assert_eq!(check(Some(Route::Infrastructure), None), Ok(()));
        assert_eq!(
            check(None, Some(user(Role::Admin))),
            Err(reason::INTERNAL.into())
        );
    }
}
