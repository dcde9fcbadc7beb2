//! A fake kiln-auth for testing the identity layer in isolation: it serves a JWKS the
//! test controls (the test holds the private keys, so it can mint expired, premature,
//! foreign or forged tokens), resolves a fixed set of API keys, and answers WhoAmI with
//! the principal the layer authenticated. Everything else is UNIMPLEMENTED.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use kiln_proto::auth as pb;
use kiln_proto::auth::auth_service_server::AuthService;
use kiln_rpc::token::Jwks;
use tonic::Status;

#[derive(Default)]
pub struct FakeAuthState {
    pub jwks: Mutex<Jwks>,
    pub jwks_fetches: AtomicUsize,
    pub valid_keys: Mutex<HashMap<String, pb::Role>>,
    pub key_lookups: AtomicUsize,
    /// What ListRevocations answers (the cursor is the index past the last one).
    pub revocations: Mutex<Vec<pb::TokenRevocation>>,
    pub revocation_polls: AtomicUsize,
    /// While set, ListRevocations fails (kiln-auth unreachable).
    pub revocations_down: std::sync::atomic::AtomicBool,
}

#[derive(Clone)]
pub struct FakeAuth {
    pub state: Arc<FakeAuthState>,
}

fn not_implemented(rpc: &str) -> Status {
    Status::unimplemented(format!("fake auth: {rpc}"))
}

#[tonic::async_trait]
impl AuthService for FakeAuth {
    async fn login(
        &self,
        _request: tonic::Request<pb::LoginRequest>,
    ) -> Result<tonic::Response<pb::LoginResponse>, Status> {
        Err(not_implemented("Login"))
    }
    async fn refresh(
        &self,
        _request: tonic::Request<pb::RefreshRequest>,
    ) -> Result<tonic::Response<pb::RefreshResponse>, Status> {
        Err(not_implemented("Refresh"))
    }
    async fn logout(
        &self,
        _request: tonic::Request<pb::LogoutRequest>,
    ) -> Result<tonic::Response<pb::LogoutResponse>, Status> {
        Err(not_implemented("Logout"))
    }
    async fn who_am_i(
        &self,
        request: tonic::Request<pb::WhoAmIRequest>,
    ) -> Result<tonic::Response<pb::WhoAmIResponse>, Status> {
        let principal = kiln_rpc::principal(&request)?;
        Ok(tonic::Response::new(pb::WhoAmIResponse {
            principal: Some(pb::Principal {
                user_id: principal.subject.clone(),
                username: principal.username.clone(),
                role: match principal.role {
                    Some(kiln_rpc::Role::Admin) => pb::Role::Admin as i32,
                    Some(kiln_rpc::Role::User) => pb::Role::User as i32,
                    Some(kiln_rpc::Role::Viewer) => pb::Role::Viewer as i32,
                    None => 0,
                },
                session_id: principal.session_id.clone().unwrap_or_default(),
                ..Default::default()
            }),
        }))
    }
    async fn change_password(
        &self,
        _request: tonic::Request<pb::ChangePasswordRequest>,
    ) -> Result<tonic::Response<pb::ChangePasswordResponse>, Status> {
        Err(not_implemented("ChangePassword"))
    }
    async fn create_api_key(
        &self,
        _request: tonic::Request<pb::CreateApiKeyRequest>,
    ) -> Result<tonic::Response<pb::CreateApiKeyResponse>, Status> {
        Err(not_implemented("CreateApiKey"))
    }
    async fn list_api_keys(
        &self,
        _request: tonic::Request<pb::ListApiKeysRequest>,
    ) -> Result<tonic::Response<pb::ListApiKeysResponse>, Status> {
        Err(not_implemented("ListApiKeys"))
    }
    async fn revoke_api_key(
        &self,
        _request: tonic::Request<pb::RevokeApiKeyRequest>,
    ) -> Result<tonic::Response<pb::RevokeApiKeyResponse>, Status> {
        Err(not_implemented("RevokeApiKey"))
    }
    async fn create_user(
        &self,
        request: tonic::Request<pb::CreateUserRequest>,
    ) -> Result<tonic::Response<pb::User>, Status> {
        let _ = request;
        Ok(tonic::Response::new(pb::User::default()))
    }
    async fn get_user(
        &self,
        _request: tonic::Request<pb::GetUserRequest>,
    ) -> Result<tonic::Response<pb::User>, Status> {
        Err(not_implemented("GetUser"))
    }
    async fn list_users(
        &self,
        _request: tonic::Request<pb::ListUsersRequest>,
    ) -> Result<tonic::Response<pb::ListUsersResponse>, Status> {
        Err(not_implemented("ListUsers"))
    }
    async fn update_user(
        &self,
        _request: tonic::Request<pb::UpdateUserRequest>,
    ) -> Result<tonic::Response<pb::UpdateUserResponse>, Status> {
        Err(not_implemented("UpdateUser"))
    }
    async fn delete_user(
        &self,
        _request: tonic::Request<pb::DeleteUserRequest>,
    ) -> Result<tonic::Response<pb::DeleteUserResponse>, Status> {
        Err(not_implemented("DeleteUser"))
    }
    async fn revoke_user_sessions(
        &self,
        _request: tonic::Request<pb::RevokeUserSessionsRequest>,
    ) -> Result<tonic::Response<pb::RevokeUserSessionsResponse>, Status> {
        Err(not_implemented("RevokeUserSessions"))
    }
    async fn list_audit_events(
        &self,
        _request: tonic::Request<pb::ListAuditEventsRequest>,
    ) -> Result<tonic::Response<pb::ListAuditEventsResponse>, Status> {
        Err(not_implemented("ListAuditEvents"))
    }
    async fn rotate_signing_key(
        &self,
        _request: tonic::Request<pb::RotateSigningKeyRequest>,
    ) -> Result<tonic::Response<pb::RotateSigningKeyResponse>, Status> {
        Err(not_implemented("RotateSigningKey"))
    }
    async fn get_jwks(
        &self,
        request: tonic::Request<pb::GetJwksRequest>,
    ) -> Result<tonic::Response<pb::GetJwksResponse>, Status> {
        let _ = request;
        self.state.jwks_fetches.fetch_add(1, Ordering::SeqCst);
        let jwks = self.state.jwks.lock().expect("lock").clone();
        Ok(tonic::Response::new(pb::GetJwksResponse {
            jwks_json: serde_json::to_string(&jwks).expect("json"),
            issuer: "kiln".into(),
            audience: "kiln".into(),
            ..Default::default()
        }))
    }
    async fn authenticate_api_key(
        &self,
        request: tonic::Request<pb::AuthenticateApiKeyRequest>,
    ) -> Result<tonic::Response<pb::AuthenticateApiKeyResponse>, Status> {
        self.state.key_lookups.fetch_add(1, Ordering::SeqCst);
        let key = request.into_inner().key;
        let valid = self
            .state
            .valid_keys
            .lock()
            .expect("lock")
            .get(&key)
            .cloned();
        match valid {
            Some(role) => Ok(tonic::Response::new(pb::AuthenticateApiKeyResponse {
                principal: Some(pb::Principal {
                    user_id: "u-key-owner".into(),
                    username: "keyowner".into(),
                    role: role as i32,
                    auth_method: pb::AuthMethod::ApiKey as i32,
                    api_key_id: "k1".into(),
                    ..Default::default()
                }),
                expires_at: None,
            })),
            None => Err(Status::unauthenticated("unknown API key")),
        }
    }
    async fn exchange_token(
        &self,
        _: tonic::Request<pb::ExchangeTokenRequest>,
    ) -> Result<tonic::Response<pb::ExchangeTokenResponse>, Status> {
        Err(not_implemented("ExchangeToken"))
    }
    async fn list_revocations(
        &self,
        request: tonic::Request<pb::ListRevocationsRequest>,
    ) -> Result<tonic::Response<pb::ListRevocationsResponse>, Status> {
        self.state.revocation_polls.fetch_add(1, Ordering::SeqCst);
        if self.state.revocations_down.load(Ordering::SeqCst) {
            return Err(Status::unavailable("fake auth: down"));
        }
        let after = usize::try_from(request.into_inner().after).unwrap_or(0);
        let all = self.state.revocations.lock().expect("lock").clone();
        Ok(tonic::Response::new(pb::ListRevocationsResponse {
            revocations: all.get(after..).unwrap_or_default().to_vec(),
            cursor: i64::try_from(all.len()).expect("small"),
            ..Default::default()
        }))
    }
}
