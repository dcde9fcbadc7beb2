//! The gRPC face of [`AuthApi`]: each RPC reads the caller from the request extensions,
//! calls the operation in its module and turns an [`AuthError`] into a rich `Status`.

use kiln_proto::auth as pb;
use kiln_proto::auth::auth_service_server::AuthService;
use tonic::{Request, Response, Status};

use crate::convert::principal_to_pb;
use crate::error::AuthError;
use crate::{AuthApi, Caller};

type Reply<T> = Result<Response<T>, Status>;

fn reply<T>(result: Result<T, AuthError>) -> Reply<T> {
    result.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl AuthService for AuthApi {
    async fn login(&self, request: Request<pb::LoginRequest>) -> Reply<pb::LoginResponse> {
        let caller = Caller::of(&request);
        reply(self.inner.login(&caller, request.into_inner()).await)
    }

    async fn refresh(&self, request: Request<pb::RefreshRequest>) -> Reply<pb::RefreshResponse> {
        let caller = Caller::of(&request);
        let token = request.into_inner().refresh_token;
        reply(self.inner.refresh(&caller, &token).await)
    }

    async fn logout(&self, request: Request<pb::LogoutRequest>) -> Reply<pb::LogoutResponse> {
        let caller = Caller::of(&request);
        let all = request.into_inner().all_sessions;
        reply(
            self.inner
                .logout(&caller, all)
                .await
                .map(|revoked_sessions| pb::LogoutResponse { revoked_sessions }),
        )
    }

    async fn who_am_i(&self, request: Request<pb::WhoAmIRequest>) -> Reply<pb::WhoAmIResponse> {
        let caller = Caller::of(&request);
        reply(caller.user().map(|p| pb::WhoAmIResponse {
            principal: Some(principal_to_pb(p)),
        }))
    }

    async fn change_password(
        &self,
        request: Request<pb::ChangePasswordRequest>,
    ) -> Reply<pb::ChangePasswordResponse> {
        let caller = Caller::of(&request);
        reply(
            self.inner
                .change_password(&caller, request.into_inner())
                .await
                .map(|revoked_sessions| pb::ChangePasswordResponse { revoked_sessions }),
        )
    }

    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Reply<pb::CreateApiKeyResponse> {
        let caller = Caller::of(&request);
        reply(
            self.inner
                .create_api_key(&caller, request.into_inner())
                .await,
        )
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Reply<pb::ListApiKeysResponse> {
        let caller = Caller::of(&request);
        reply(
            self.inner
                .list_api_keys(&caller, request.into_inner())
                .await,
        )
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Reply<pb::RevokeApiKeyResponse> {
        let caller = Caller::of(&request);
        let id = request.into_inner().api_key_id;
        reply(
            self.inner
                .revoke_api_key(&caller, &id)
                .await
                .map(|key| pb::RevokeApiKeyResponse { api_key: Some(key) }),
        )
    }

    async fn create_user(&self, request: Request<pb::CreateUserRequest>) -> Reply<pb::User> {
        let caller = Caller::of(&request);
        reply(self.inner.create_user(&caller, request.into_inner()).await)
    }

    async fn get_user(&self, request: Request<pb::GetUserRequest>) -> Reply<pb::User> {
        let caller = Caller::of(&request);
        reply(
            self.inner
                .get_user(&caller, &request.into_inner().user_id)
                .await,
        )
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Reply<pb::ListUsersResponse> {
        let caller = Caller::of(&request);
        reply(self.inner.list_users(&caller, request.into_inner()).await)
    }

    async fn update_user(
        &self,
        request: Request<pb::UpdateUserRequest>,
    ) -> Reply<pb::UpdateUserResponse> {
        let caller = Caller::of(&request);
        reply(
            self.inner
                .update_user(&caller, request.into_inner())
                .await
                .map(|user| pb::UpdateUserResponse { user: Some(user) }),
        )
    }

    async fn delete_user(
        &self,
        request: Request<pb::DeleteUserRequest>,
    ) -> Reply<pb::DeleteUserResponse> {
        let caller = Caller::of(&request);
        let id = request.into_inner().user_id;
        reply(
            self.inner
                .delete_user(&caller, &id)
                .await
                .map(|()| pb::DeleteUserResponse {}),
        )
    }

    async fn revoke_user_sessions(
        &self,
        request: Request<pb::RevokeUserSessionsRequest>,
    ) -> Reply<pb::RevokeUserSessionsResponse> {
        let caller = Caller::of(&request);
        reply(
            self.inner
                .revoke_user_sessions(&caller, request.into_inner())
                .await,
        )
    }

    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Reply<pb::ListAuditEventsResponse> {
        let caller = Caller::of(&request);
        let result = match caller.admin() {
            Ok(_) => crate::audit::list(&self.inner.store, request.get_ref()).await,
            Err(e) => Err(e),
        };
        reply(result)
    }

    async fn rotate_signing_key(
        &self,
        request: Request<pb::RotateSigningKeyRequest>,
    ) -> Reply<pb::RotateSigningKeyResponse> {
        let previous_key_id = self.current_key_id();
        let result = self.rotate_signing_key().await;
        if let (Ok(key_id), Some(caller)) =
            (&result, request.extensions().get::<kiln_rpc::Principal>())
        {
            let peer = request
                .extensions()
                .get::<kiln_rpc::identity::PeerInfo>()
                .and_then(|p| p.remote_addr)
                .map(|a| a.to_string())
                .unwrap_or_default();
            let event = crate::audit::Event::new(
                crate::audit::Actor::of(caller),
                "signing_key.rotate",
                &peer,
            )
            .target("signing_key", key_id)
            .detail("previous_key_id", previous_key_id.clone());
            crate::audit::record(&self.inner.store, self.inner.now(), event).await;
        }
        reply(result.map(|key_id| pb::RotateSigningKeyResponse {
            key_id,
            previous_key_id,
        }))
    }

    async fn get_jwks(&self, _request: Request<pb::GetJwksRequest>) -> Reply<pb::GetJwksResponse> {
        let jwks = self.inner.keys.jwks(self.inner.now());
        let jwks_json = serde_json::to_string(&jwks)
            .map_err(|e| AuthError::Corrupt(format!("serialising the JWKS: {e}")));
        reply(jwks_json.map(|jwks_json| {
            pb::GetJwksResponse {
                keys: jwks
                    .keys
                    .iter()
                    .map(|k| pb::Jwk {
                        kid: k.kid.clone(),
                        kty: k.kty.clone(),
                        alg: k.alg.clone(),
                        r#use: k.use_.clone(),
                        crv: k.crv.clone(),
                        x: k.x.clone(),
                        y: String::new(),
                    })
                    .collect(),
                jwks_json,
                issuer: self.inner.config.issuer.clone(),
                audience: self.inner.config.audience.clone(),
            }
        }))
    }

    async fn authenticate_api_key(
        &self,
        request: Request<pb::AuthenticateApiKeyRequest>,
    ) -> Reply<pb::AuthenticateApiKeyResponse> {
        let key = request.into_inner().key;
        reply(self.inner.authenticate_api_key(&key).await)
    }

    async fn list_revocations(
        &self,
        request: Request<pb::ListRevocationsRequest>,
    ) -> Reply<pb::ListRevocationsResponse> {
        // SERVICE access: the layer admitted a kiln workload certificate only.
        reply(self.inner.list_revocations(request.into_inner()).await)
    }

    async fn exchange_token(
        &self,
        request: Request<pb::ExchangeTokenRequest>,
    ) -> Reply<pb::ExchangeTokenResponse> {
        // SERVICE access: a workload of the trust domain; the handler checks which one.
        let caller = Caller::of(&request);
        reply(
            self.inner
                .exchange_token(&caller, request.into_inner())
                .await,
        )
    }
}
