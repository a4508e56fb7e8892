//! A stand-in for the auth service's key publication, for tests of other services: it serves
//! `GetPublicKeys` with a test key and mints access tokens for any user and roles, so tests can
//! exercise real token verification without the auth service.

use std::net::SocketAddr;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use csp_platform::{
    Settings,
    auth::{Claims, Role, TOKEN_AUDIENCE, TOKEN_ISSUER, now_millis},
};
use csp_proto::auth::v1::{
    GetPublicKeysRequest, GetPublicKeysResponse, PublicKey,
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
}

struct Keys(String);

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
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(AuthServiceServer::new(Keys(x)))
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await;
        });
        TestIssuer { signing, addr, stop }
    }

    /// Points `settings` at this issuer as the auth service.
    pub fn point(&self, settings: &mut Settings) {
        settings.services.auth.address = format!("http://{}", self.addr);
    }

    /// An access token for `user_id` with `roles`, valid for ten minutes.
    pub fn token(&self, user_id: &str, roles: &[Role]) -> String {
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
