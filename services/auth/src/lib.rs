//! kiln-auth: users, passwords, tokens, API keys, roles and the auth audit trail.
//!
//! The RPCs of `kiln.auth.v1.AuthService` are served here. This release carries the contract and
//! the shared server layer only; every RPC answers UNIMPLEMENTED (reason
//! NOT_IMPLEMENTED) with a message naming it, until the auth service lands (users, tokens, API keys).

use kiln_proto::auth as pb;
use kiln_proto::auth::auth_service_server::{AuthService, AuthServiceServer};
use kiln_rpc::ApiError;
use kiln_rpc::limit::MAX_MESSAGE_BYTES_CEILING;
use tonic::Status;

/// The auth service's handlers.
#[derive(Debug, Default)]
pub struct AuthApi {}

/// The tonic service, ready for `KilnServer::add_service`. Its own decode limit is set to
/// the ceiling because the kiln layer enforces the configured limit (answering
/// RESOURCE_EXHAUSTED, as gRPC clients expect) before a message reaches tonic.
pub fn service() -> AuthServiceServer<AuthApi> {
    AuthServiceServer::new(AuthApi::default()).max_decoding_message_size(MAX_MESSAGE_BYTES_CEILING)
}

fn not_implemented(rpc: &str) -> Status {
    ApiError::not_implemented(
        &format!("kiln.auth.v1.AuthService/{rpc}"),
        "kiln-auth is not built yet in this release",
    )
    .into()
}

#[tonic::async_trait]
impl AuthService for AuthApi {
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
        _request: tonic::Request<pb::WhoAmIRequest>,
    ) -> Result<tonic::Response<pb::WhoAmIResponse>, Status> {
        Err(not_implemented("WhoAmI"))
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
        _request: tonic::Request<pb::CreateUserRequest>,
    ) -> Result<tonic::Response<pb::User>, Status> {
        Err(not_implemented("CreateUser"))
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
    async fn get_jwks(
        &self,
        _request: tonic::Request<pb::GetJwksRequest>,
    ) -> Result<tonic::Response<pb::GetJwksResponse>, Status> {
        Err(not_implemented("GetJwks"))
    }
    async fn authenticate_api_key(
        &self,
        _request: tonic::Request<pb::AuthenticateApiKeyRequest>,
    ) -> Result<tonic::Response<pb::AuthenticateApiKeyResponse>, Status> {
        Err(not_implemented("AuthenticateApiKey"))
    }
}
