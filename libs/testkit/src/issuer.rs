//! A stand-in for the auth service's key publication, for tests of other services: it serves
//! `GetPublicKeys` with a test key and mints access tokens for any user and roles, so tests can
//! exercise real token verification without the auth service. `LookupUsers` knows the users it
//! minted tokens for (and those [`TestIssuer::add_user`] names).

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use csp_platform::{
    Settings,
    auth::{Claims, Role, TOKEN_AUDIENCE, TOKEN_ISSUER, now_millis},
};
use csp_proto::auth::v1::{
    GetPublicKeysRequest, GetPublicKeysResponse, LookupUsersRequest, LookupUsersResponse, PublicKey,
    UserCard,
    auth_service_server::{AuthService, AuthServiceServer},
};
use ed25519_dalek::{SigningKey, pkcs8::EncodePrivateKey as _};
use tokio_util::sync::CancellationToken;

/// The key id the issuer publishes.
pub const TEST_KID: &str = "test-issuer-key";

/// See the module docs. Stops serving when dropped.
pub struct TestIssuer {
    signing: SigningKey,
    addr: SocketAddr,
    stop: CancellationToken,
    users: Arc<Mutex<BTreeSet<String>>>,
}

struct Keys(String, Arc<Mutex<BTreeSet<String>>>);

#[tonic::async_trait]
impl AuthService for Keys {
    async fn get_public_keys(
        &self,
        _request: tonic::Request<GetPublicKeysRequest>,
    ) -> Result<tonic::Response<GetPublicKeysResponse>, tonic::Status> {
        let key = PublicKey {
            kid: TEST_KID.into(),
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            alg: "EdDSA".into(),
            x: self.0.clone(),
        };
        Ok(tonic::Response::new(GetPublicKeysResponse { keys: vec![key], max_age_seconds: 300 }))
    }

    async fn lookup_users(
        &self,
        request: tonic::Request<LookupUsersRequest>,
    ) -> Result<tonic::Response<LookupUsersResponse>, tonic::Status> {
        if request.metadata().get("authorization").is_none() {
            return Err(tonic::Status::unauthenticated("sign in first"));
        }
        let known = self.1.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let users = request
            .into_inner()
            .user_ids
            .into_iter()
            .filter(|id| known.contains(id))
            .map(|id| UserCard { username: id.clone(), display_name: id.clone(), id })
            .collect();
        Ok(tonic::Response::new(LookupUsersResponse { users }))
    }

    csp_proto::unimplemented_rpcs! {
        register(csp_proto::auth::v1::RegisterRequest) -> csp_proto::auth::v1::RegisterResponse;
        login(csp_proto::auth::v1::LoginRequest) -> csp_proto::auth::v1::LoginResponse;
        refresh(csp_proto::auth::v1::RefreshRequest) -> csp_proto::auth::v1::RefreshResponse;
        logout(csp_proto::auth::v1::LogoutRequest) -> csp_proto::auth::v1::LogoutResponse;
        me(csp_proto::auth::v1::MeRequest) -> csp_proto::auth::v1::MeResponse;
        change_password(csp_proto::auth::v1::ChangePasswordRequest) -> csp_proto::auth::v1::ChangePasswordResponse;
        create_user(csp_proto::auth::v1::CreateUserRequest) -> csp_proto::auth::v1::CreateUserResponse;
        list_users(csp_proto::auth::v1::ListUsersRequest) -> csp_proto::auth::v1::ListUsersResponse;
        update_user_roles(csp_proto::auth::v1::UpdateUserRolesRequest) -> csp_proto::auth::v1::UpdateUserRolesResponse;
        disable_user(csp_proto::auth::v1::DisableUserRequest) -> csp_proto::auth::v1::DisableUserResponse;
        create_api_key(csp_proto::auth::v1::CreateApiKeyRequest) -> csp_proto::auth::v1::CreateApiKeyResponse;
        revoke_api_key(csp_proto::auth::v1::RevokeApiKeyRequest) -> csp_proto::auth::v1::RevokeApiKeyResponse;
        list_audit_events(csp_proto::auth::v1::ListAuditEventsRequest) -> csp_proto::auth::v1::ListAuditEventsResponse;
    }
}

impl TestIssuer {
    /// Serves on a loopback port.
    pub async fn start() -> TestIssuer {
        let mut seed = [0u8; 32];
        rand::fill(&mut seed);
        let signing = SigningKey::from_bytes(&seed);
        let x = URL_SAFE_NO_PAD.encode(signing.verifying_key().as_bytes());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let shutdown = stop.clone().cancelled_owned();
        let users = Arc::new(Mutex::new(BTreeSet::new()));
        let known = users.clone();
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(AuthServiceServer::new(Keys(x, known)))
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await;
        });
        TestIssuer { signing, addr, stop, users }
    }

    /// Makes `LookupUsers` know `user_id` (a user who has not signed in yet).
    pub fn add_user(&self, user_id: &str) {
        self.users.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(user_id.to_owned());
    }

    /// Points `settings` at this issuer as the auth service.
    pub fn point(&self, settings: &mut Settings) {
        settings.services.auth.address = format!("http://{}", self.addr);
    }

    /// An access token for `user_id` with `roles`, valid for ten minutes.
    pub fn token(&self, user_id: &str, roles: &[Role]) -> String {
        self.add_user(user_id);
        let now = now_millis();
        let claims = Claims {
            iss: TOKEN_ISSUER.into(),
            aud: TOKEN_AUDIENCE.into(),
            sub: user_id.into(),
            name: user_id.into(),
            roles: roles.to_vec(),
            iat: now / 1000,
            iat_ms: now,
            nbf: now / 1000,
            exp: now / 1000 + 600,
            jti: uuid::Uuid::new_v4().to_string(),
        };
        self.sign(&claims)
    }

    /// Signs arbitrary claims with the published key.
    pub fn sign(&self, claims: &Claims) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.kid = Some(TEST_KID.into());
        let der = self.signing.to_pkcs8_der().unwrap();
        jsonwebtoken::encode(&header, claims, &jsonwebtoken::EncodingKey::from_ed_der(der.as_bytes()))
            .unwrap()
    }
}

impl Drop for TestIssuer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A request carrying `authorization: Bearer <token>`.
pub fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}
