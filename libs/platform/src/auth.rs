//! Authentication and authorization shared by every service.
//!
//! - [`Role`] → [`Permission`]: the one table every service consults.
//! - [`Claims`]: what an access token carries (EdDSA JWT signed by the auth service).
//! - [`Verifier`]: verifies access tokens locally. Public keys come from a [`KeySource`] (the
//!   auth service's `GetPublicKeys`), cached and fetched again on an unknown `kid` (at most once
//!   per [`REFETCH_INTERVAL`]). Verified tokens are cached until they expire. Tokens of users
//!   revoked since they were issued (disabled, password changed) are refused; revocations
//!   arrive through [`Verifier::revoke`].
//! - [`AuthLayer`]: a tower layer that verifies the `authorization: Bearer` header of every
//!   call and puts the caller's [`Principal`] in the request extensions; [`require`] checks a
//!   permission in a handler.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    str::FromStr,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;
use futures::future::BoxFuture;
use http::{Request, Response};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};
use tonic::{Status, body::Body};
use tower::{Layer, Service};

/// Issuer and audience of the suite's access tokens.
pub const TOKEN_ISSUER: &str = "csp-auth";
/// Audience of the suite's access tokens.
pub const TOKEN_AUDIENCE: &str = "csp";
/// Least time between two key fetches triggered by unknown key ids.
pub const REFETCH_INTERVAL: Duration = Duration::from_secs(10);
/// Least time between two such fetches after one that failed (the auth service was not up
/// yet, or away): short, so a service started before the auth service accepts tokens as soon
/// as it is up, and still bounded, so unknown key ids cannot hammer an auth service that is
/// down.
pub const REFETCH_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// Tolerated clock skew when checking `exp` and `nbf`, in seconds.
const LEEWAY_SECONDS: u64 = 5;
/// Verified tokens kept in the cache (each until it expires; the least used go first when it
/// is full).
const CACHE_CAPACITY: u64 = 50_000;

/// A named set of permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, including user administration.
    Admin,
    /// Creates, edits, shares and executes designs.
    Designer,
    /// Reads what is shared with them.
    Viewer,
    /// A service account used by another service or an automation.
    Service,
    /// Registers custom component types.
    Registrar,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 5] = [Role::Admin, Role::Designer, Role::Viewer, Role::Service, Role::Registrar];

    /// Lower-case name, as in tokens.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Designer => "designer",
            Role::Viewer => "viewer",
            Role::Service => "service",
            Role::Registrar => "registrar",
        }
    }

    /// The permissions the role grants.
    pub fn permissions(self) -> Permissions {
        use Permission::*;
        match self {
            Role::Admin => Permissions::all(),
            Role::Designer => Permissions::of(&[
                DesignRead,
                DesignWrite,
                DesignExecute,
                ComponentsRead,
                ExecutionsRead,
                CollabJoin,
                AiUse,
            ]),
            Role::Viewer => Permissions::of(&[DesignRead, ComponentsRead, ExecutionsRead, CollabJoin]),
            Role::Service => Permissions::of(&[
                DesignRead,
                DesignExecute,
                ComponentsRead,
                ExecutionsRead,
                AiUse,
                ApiKeysOwn,
            ]),
            Role::Registrar => Permissions::of(&[ComponentsRead, ComponentsRegister]),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| {
            format!("unknown role `{s}` (expected admin, designer, viewer, service or registrar)")
        })
    }
}

/// Something a caller may be allowed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Permission {
    /// Read designs shared with them (or all, for admins).
    DesignRead = 1 << 0,
    /// Create and edit designs.
    DesignWrite = 1 << 1,
    /// Execute designs.
    DesignExecute = 1 << 2,
    /// Read the component catalogue.
    ComponentsRead = 1 << 3,
    /// Register, update and deprecate custom component types.
    ComponentsRegister = 1 << 4,
    /// Watch and read executions.
    ExecutionsRead = 1 << 5,
    /// Join collaboration sessions.
    CollabJoin = 1 << 6,
    /// Use the AI service.
    AiUse = 1 << 7,
    /// Read users.
    UsersRead = 1 << 8,
    /// Create users, change roles, disable users.
    UsersAdmin = 1 << 9,
    /// Read the audit log.
    AuditRead = 1 << 10,
    /// Create and revoke API keys for service accounts.
    ApiKeysAdmin = 1 << 11,
    /// Create and revoke one's own API keys (service accounts).
    ApiKeysOwn = 1 << 12,
}

impl Permission {
    /// Every permission.
    pub const ALL: [Permission; 13] = [
        Permission::DesignRead,
        Permission::DesignWrite,
        Permission::DesignExecute,
        Permission::ComponentsRead,
        Permission::ComponentsRegister,
        Permission::ExecutionsRead,
        Permission::CollabJoin,
        Permission::AiUse,
        Permission::UsersRead,
        Permission::UsersAdmin,
        Permission::AuditRead,
        Permission::ApiKeysAdmin,
        Permission::ApiKeysOwn,
    ];

    /// Dotted name, e.g. `design.write`.
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::DesignRead => "design.read",
            Permission::DesignWrite => "design.write",
            Permission::DesignExecute => "design.execute",
            Permission::ComponentsRead => "components.read",
            Permission::ComponentsRegister => "components.register",
            Permission::ExecutionsRead => "executions.read",
            Permission::CollabJoin => "collab.join",
            Permission::AiUse => "ai.use",
            Permission::UsersRead => "users.read",
            Permission::UsersAdmin => "users.admin",
            Permission::AuditRead => "audit.read",
            Permission::ApiKeysAdmin => "api_keys.admin",
            Permission::ApiKeysOwn => "api_keys.own",
        }
    }
}

/// A set of permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Permissions(u32);

impl Permissions {
    /// Every permission.
    pub fn all() -> Self {
        Self::of(&Permission::ALL)
    }

    /// Exactly these.
    pub fn of(permissions: &[Permission]) -> Self {
        Self(permissions.iter().fold(0, |bits, p| bits | *p as u32))
    }

    /// The union of the roles' permissions.
    pub fn of_roles(roles: &[Role]) -> Self {
        Self(roles.iter().fold(0, |bits, r| bits | r.permissions().0))
    }

    /// Whether `permission` is in the set.
    pub fn contains(self, permission: Permission) -> bool {
        self.0 & permission as u32 != 0
    }

    /// The names of the permissions in the set.
    pub fn names(self) -> Vec<&'static str> {
        Permission::ALL.into_iter().filter(|p| self.contains(*p)).map(Permission::as_str).collect()
    }
}

/// The claims of an access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer: [`TOKEN_ISSUER`].
    pub iss: String,
    /// Audience: [`TOKEN_AUDIENCE`].
    pub aud: String,
    /// The user id.
    pub sub: String,
    /// The user's username, for logs and display.
    #[serde(default)]
    pub name: String,
    /// The user's roles.
    pub roles: Vec<Role>,
    /// Issued at, seconds since the epoch.
    pub iat: i64,
    /// Issued at, milliseconds since the epoch: revocations compare at this precision, so a
    /// login right after a password change is not caught by the change's revocation.
    #[serde(default)]
    pub iat_ms: i64,
    /// Not valid before, seconds since the epoch.
    pub nbf: i64,
    /// Expires at, seconds since the epoch.
    pub exp: i64,
    /// Token id.
    pub jti: String,
}

/// The verified caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The user id.
    pub user_id: String,
    /// The username.
    pub username: String,
    /// The user's roles.
    pub roles: Vec<Role>,
    /// What the roles allow.
    pub permissions: Permissions,
    /// The token's id.
    pub token_id: String,
    /// When the token was issued, milliseconds since the epoch.
    pub issued_at_ms: i64,
    /// When the token expires, seconds since the epoch.
    pub expires_at: i64,
}

impl Principal {
    /// Whether the caller may do `permission`.
    pub fn can(&self, permission: Permission) -> bool {
        self.permissions.contains(permission)
    }

    /// Whether the caller is an admin.
    pub fn is_admin(&self) -> bool {
        self.roles.contains(&Role::Admin)
    }

    fn from_claims(claims: Claims) -> Self {
        Self {
            permissions: Permissions::of_roles(&claims.roles),
            user_id: claims.sub,
            username: claims.name,
            roles: claims.roles,
            token_id: claims.jti,
            issued_at_ms: if claims.iat_ms > 0 { claims.iat_ms } else { claims.iat.saturating_mul(1000) },
            expires_at: claims.exp,
        }
    }
}

/// Seconds since the Unix epoch.
pub fn now_seconds() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Milliseconds since the Unix epoch.
pub fn now_millis() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Why a token was refused. The message is safe to return to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `authorization` header.
    #[error("missing access token")]
    Missing,
    /// The header is not `Bearer <token>`.
    #[error("the authorization header must be `Bearer <token>`")]
    MalformedHeader,
    /// The token is not a well-formed JWT of the expected algorithm.
    #[error("malformed access token: {0}")]
    Malformed(&'static str),
    /// The key id is not one of the published keys.
    #[error("access token signed with an unknown key")]
    UnknownKey,
    /// The signature does not verify.
    #[error("access token signature is invalid")]
    BadSignature,
    /// The token has expired.
    #[error("access token expired")]
    Expired,
    /// The token is not valid yet.
    #[error("access token not valid yet")]
    NotYetValid,
    /// The token's user was revoked after it was issued.
    #[error("access token revoked")]
    Revoked,
    /// The keys could not be fetched.
    #[error("cannot verify access tokens right now: {0}")]
    KeysUnavailable(String),
}

impl From<AuthError> for Status {
    fn from(error: AuthError) -> Self {
        match error {
            AuthError::KeysUnavailable(_) => Status::unavailable(error.to_string()),
            other => Status::unauthenticated(other.to_string()),
        }
    }
}

/// A published verification key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// Key id.
    pub kid: String,
    /// The Ed25519 public key, base64url without padding.
    pub x: String,
}

/// Where a [`Verifier`] gets the public keys.
#[async_trait]
pub trait KeySource: Send + Sync + 'static {
    /// The keys that currently verify tokens.
    async fn fetch(&self) -> Result<Vec<PublicKey>, String>;
}

/// Keys fetched from the auth service's `GetPublicKeys`.
pub struct RemoteKeys {
    client: csp_proto::auth::v1::auth_service_client::AuthServiceClient<crate::client::TracedChannel>,
}

impl RemoteKeys {
    /// Keys of the auth service at `services.auth.address`.
    pub fn new(settings: &crate::Settings) -> Result<Self, crate::config::ConfigError> {
        let channel = crate::client::channel(settings, crate::Service::Auth)?;
        Ok(Self { client: csp_proto::auth::v1::auth_service_client::AuthServiceClient::new(channel) })
    }
}

#[async_trait]
impl KeySource for RemoteKeys {
    async fn fetch(&self) -> Result<Vec<PublicKey>, String> {
        let mut client = self.client.clone();
        let mut request = tonic::Request::new(csp_proto::auth::v1::GetPublicKeysRequest {});
        request.set_timeout(Duration::from_secs(5));
        let response = client.get_public_keys(request).await.map_err(|s| s.message().to_owned())?;
        Ok(response.into_inner().keys.into_iter().map(|k| PublicKey { kid: k.kid, x: k.x }).collect())
    }
}

/// Verifies access tokens. Cheap to clone; clones share keys, cache and revocations.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<VerifierInner>,
}

struct VerifierInner {
    source: Arc<dyn KeySource>,
    keys: RwLock<HashMap<String, DecodingKey>>,
    /// When the keys were last fetched, and whether that fetch succeeded.
    fetch: tokio::sync::Mutex<Option<(Instant, bool)>>,
    /// User id → tokens issued before this millisecond are revoked.
    revoked: RwLock<HashMap<String, i64>>,
    cache: moka::sync::Cache<String, Arc<Principal>>,
    validation: Validation,
}

/// A verified token stays cached until it expires.
struct UntilExpiry;

impl moka::Expiry<String, Arc<Principal>> for UntilExpiry {
    fn expire_after_create(
        &self,
        _token: &String,
        principal: &Arc<Principal>,
        _now: Instant,
    ) -> Option<Duration> {
        let left = principal.expires_at.saturating_add(LEEWAY_SECONDS as i64).saturating_sub(now_seconds());
        Some(Duration::from_secs(left.max(0) as u64))
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    match lock.read() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    match lock.write() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl Verifier {
    /// A verifier whose keys come from `source`.
    pub fn new(source: Arc<dyn KeySource>) -> Self {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_nbf = true;
        validation.set_issuer(&[TOKEN_ISSUER]);
        validation.set_audience(&[TOKEN_AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "nbf", "iat", "sub", "iss", "aud"]);
        Self {
            inner: Arc::new(VerifierInner {
                source,
                keys: RwLock::new(HashMap::new()),
                fetch: tokio::sync::Mutex::new(None),
                revoked: RwLock::new(HashMap::new()),
                cache: moka::sync::Cache::builder()
                    .max_capacity(CACHE_CAPACITY)
                    .expire_after(UntilExpiry)
                    .build(),
                validation,
            }),
        }
    }

    /// Verifies a token: signature, algorithm, key, issuer, audience, time window, revocation.
    pub async fn verify(&self, token: &str) -> Result<Arc<Principal>, AuthError> {
        let now = now_seconds();
        if let Some(principal) = self.inner.cache.get(token) {
            if principal.expires_at + LEEWAY_SECONDS as i64 <= now {
                self.inner.cache.invalidate(token);
                return Err(AuthError::Expired);
            }
            self.check_revocation(&principal)?;
            return Ok(principal);
        }

        let header =
            jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed("unreadable header"))?;
        if header.alg != Algorithm::EdDSA {
            return Err(AuthError::Malformed("algorithm must be EdDSA"));
        }
        let kid = header.kid.ok_or(AuthError::Malformed("no key id"))?;
        let key = match self.key(&kid) {
            Some(key) => key,
            None => {
                self.refresh_keys(true).await?;
                self.key(&kid).ok_or(AuthError::UnknownKey)?
            }
        };
        let data =
            jsonwebtoken::decode::<Claims>(token, &key, &self.inner.validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::ExpiredSignature => AuthError::Expired,
                    ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                    ErrorKind::InvalidSignature => AuthError::BadSignature,
                    ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                        AuthError::Malformed("algorithm must be EdDSA")
                    }
                    ErrorKind::InvalidIssuer => AuthError::Malformed("wrong issuer"),
                    ErrorKind::InvalidAudience => AuthError::Malformed("wrong audience"),
                    ErrorKind::MissingRequiredClaim(_) => AuthError::Malformed("missing claims"),
                    _ => AuthError::Malformed("undecodable"),
                }
            })?;
        let principal = Arc::new(Principal::from_claims(data.claims));
        self.check_revocation(&principal)?;
        self.inner.cache.insert(token.to_owned(), principal.clone());
        Ok(principal)
    }

    fn key(&self, kid: &str) -> Option<DecodingKey> {
        read(&self.inner.keys).get(kid).cloned()
    }

    fn check_revocation(&self, principal: &Principal) -> Result<(), AuthError> {
        match read(&self.inner.revoked).get(&principal.user_id) {
            Some(not_before) if principal.issued_at_ms < *not_before => Err(AuthError::Revoked),
            _ => Ok(()),
        }
    }

    /// Fetches the keys again. With `throttled`, does nothing if the last fetch was less than
    /// [`REFETCH_INTERVAL`] ago, or [`REFETCH_AFTER_FAILURE`] after a failed one (an
    /// attacker's unknown `kid`s cannot hammer the auth service).
    pub async fn refresh_keys(&self, throttled: bool) -> Result<(), AuthError> {
        let mut last = self.inner.fetch.lock().await;
        let wait = |ok: bool| if ok { REFETCH_INTERVAL } else { REFETCH_AFTER_FAILURE };
        if throttled && last.is_some_and(|(at, ok)| at.elapsed() < wait(ok)) {
            return Ok(());
        }
        let fetched = self.inner.source.fetch().await;
        *last = Some((Instant::now(), fetched.is_ok()));
        let keys = fetched.map_err(AuthError::KeysUnavailable)?;
        let mut parsed = HashMap::new();
        for key in keys {
            match DecodingKey::from_ed_components(&key.x) {
                Ok(decoding) => {
                    parsed.insert(key.kid, decoding);
                }
                Err(e) => tracing::warn!(kid = %key.kid, error = %e, "ignoring an unreadable public key"),
            }
        }
        *write(&self.inner.keys) = parsed;
        Ok(())
    }

    /// Refuses tokens of `user_id` issued before `not_before_ms` (milliseconds since the epoch).
    pub fn revoke(&self, user_id: &str, not_before_ms: i64) {
        let not_before = not_before_ms;
        let mut revoked = write(&self.inner.revoked);
        let entry = revoked.entry(user_id.to_owned()).or_insert(not_before);
        *entry = (*entry).max(not_before);
    }

    /// Refreshes the keys periodically (picks up rotations); run it as a task.
    pub async fn keep_keys_fresh(self, every: Duration) {
        let mut ticker = tokio::time::interval(every);
        loop {
            ticker.tick().await;
            if let Err(error) = self.refresh_keys(false).await {
                tracing::debug!(%error, "could not refresh the token keys");
            }
        }
    }
}

/// The bearer token of a request's headers.
pub fn bearer_token(headers: &http::HeaderMap) -> Result<Option<&str>, AuthError> {
    let Some(value) = headers.get(http::header::AUTHORIZATION) else { return Ok(None) };
    let value = value.to_str().map_err(|_| AuthError::MalformedHeader)?;
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::MalformedHeader)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(AuthError::MalformedHeader);
    }
    Ok(Some(token.trim()))
}

/// Whether calls without a token are refused.
#[derive(Debug, Clone)]
enum Mode {
    /// Attach the principal when a token is present; handlers decide (services).
    Optional,
    /// Refuse calls to the protected services without a valid token, except public paths
    /// (the gateway).
    Required { protected: Arc<HashSet<&'static str>>, public: Arc<HashSet<&'static str>> },
}

/// Verifies the bearer token of every call. See the module docs.
#[derive(Clone)]
pub struct AuthLayer {
    verifier: Verifier,
    mode: Mode,
}

impl AuthLayer {
    /// Services: a present token must be valid; handlers [`require`] what they need.
    pub fn optional(verifier: Verifier) -> Self {
        Self { verifier, mode: Mode::Optional }
    }

    /// The edge: calls to the `protected` services (fully-qualified names) need a valid token,
    /// except the `public` paths (exact `/package.Service/Method`). Calls to other services
    /// pass untouched (they are answered locally or as UNIMPLEMENTED).
    pub fn required(verifier: Verifier, protected: &[&'static str], public: &[&'static str]) -> Self {
        Self {
            verifier,
            mode: Mode::Required {
                protected: Arc::new(protected.iter().copied().collect()),
                public: Arc::new(public.iter().copied().collect()),
            },
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Authenticate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticate { inner, verifier: self.verifier.clone(), mode: self.mode.clone() }
    }
}

/// The service made by [`AuthLayer`].
#[derive(Clone)]
pub struct Authenticate<S> {
    inner: S,
    verifier: Verifier,
    mode: Mode,
}

/// Whether a call to `path` may go without a token.
fn token_optional(protected: &HashSet<&'static str>, public: &HashSet<&'static str>, path: &str) -> bool {
    let service = path.strip_prefix('/').and_then(|p| p.split_once('/')).map(|(service, _)| service);
    match service {
        Some(service) if protected.contains(service) => public.contains(path),
        _ => true,
    }
}

impl<S> Service<Request<Body>> for Authenticate<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        // The readied service handles this call; a fresh clone waits for the next one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let verifier = self.verifier.clone();
        let public = match &self.mode {
            Mode::Optional => true,
            Mode::Required { protected, public } => token_optional(protected, public, request.uri().path()),
        };
        Box::pin(async move {
            let token = match bearer_token(request.headers()) {
                Ok(token) => token.map(str::to_owned),
                Err(e) => return Ok(Status::from(e).into_http()),
            };
            match token {
                Some(token) => match verifier.verify(&token).await {
                    Ok(principal) => {
                        request.extensions_mut().insert(principal);
                    }
                    // A bad token is refused even on public calls: it is never a mistake
                    // worth ignoring silently.
                    Err(e) => return Ok(Status::from(e).into_http()),
                },
                None if !public => return Ok(Status::from(AuthError::Missing).into_http()),
                None => {}
            }
            inner.call(request).await
        })
    }
}

/// The address of the client that made a call: the first `x-forwarded-for` entry (which the
/// gateway sets from the connection it accepted), else the connection's peer.
pub fn client_address<T>(request: &tonic::Request<T>) -> String {
    let forwarded = request
        .metadata()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    match forwarded {
        Some(address) => address.chars().take(64).collect(),
        None => request.remote_addr().map_or_else(|| "unknown".to_owned(), |a| a.ip().to_string()),
    }
}

/// The verified caller, or UNAUTHENTICATED.
pub fn principal<T>(request: &tonic::Request<T>) -> Result<Arc<Principal>, Status> {
    request
        .extensions()
        .get::<Arc<Principal>>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("sign in first: this call needs an access token"))
}

/// The verified caller if allowed `permission`; UNAUTHENTICATED or PERMISSION_DENIED otherwise.
pub fn require<T>(request: &tonic::Request<T>, permission: Permission) -> Result<Arc<Principal>, Status> {
    let principal = principal(request)?;
    if principal.can(permission) {
        Ok(principal)
    } else {
        Err(Status::permission_denied(format!("this call needs the {} permission", permission.as_str())))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    };

    use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
    use ed25519_dalek::{SigningKey, pkcs8::EncodePrivateKey as _};

    use super::*;

    fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
        mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Publishes whatever keys the test sets, counting fetches.
    struct Rotating {
        keys: Mutex<Vec<(String, SigningKey)>>,
        fetches: AtomicUsize,
        /// The auth service is not answering.
        down: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl KeySource for Rotating {
        async fn fetch(&self) -> Result<Vec<PublicKey>, String> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                return Err("connection refused".into());
            }
            Ok(lock(&self.keys)
                .iter()
                .map(|(kid, k)| PublicKey {
                    kid: kid.clone(),
                    x: URL_SAFE_NO_PAD.encode(k.verifying_key().as_bytes()),
                })
                .collect())
        }
    }

    fn token(key: &SigningKey, kid: &str) -> String {
        let now = now_seconds();
        let claims = Claims {
            iss: TOKEN_ISSUER.into(),
            aud: TOKEN_AUDIENCE.into(),
            sub: "u".into(),
            name: "u".into(),
            roles: vec![Role::Viewer],
            iat: now,
            iat_ms: now * 1000,
            nbf: now,
            exp: now + 60,
            jti: kid.into(),
        };
        let mut header = jsonwebtoken::Header::new(Algorithm::EdDSA);
        header.kid = Some(kid.into());
        let der = key.to_pkcs8_der().map(|d| d.as_bytes().to_vec()).unwrap_or_default();
        jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_ed_der(&der))
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn rotations_are_picked_up_and_unknown_kids_cannot_hammer_the_source() {
        let old = SigningKey::from_bytes(&[1; 32]);
        let new = SigningKey::from_bytes(&[2; 32]);
        let source = Arc::new(Rotating {
            keys: Mutex::new(vec![("old".into(), old.clone())]),
            fetches: AtomicUsize::new(0),
            down: Default::default(),
        });
        let verifier = Verifier::new(source.clone());
        assert!(verifier.verify(&token(&old, "old")).await.is_ok());
        assert_eq!(source.fetches.load(Ordering::SeqCst), 1);

        // The issuer rotates; the first token with the new kid triggers one fetch... but the
        // last fetch was just now, so the throttle holds it back — until it expires.
        lock(&source.keys).push(("new".into(), new.clone()));
        *verifier.inner.fetch.lock().await = Some((Instant::now() - REFETCH_INTERVAL, true));
        assert!(verifier.verify(&token(&new, "new")).await.is_ok());
        assert_eq!(source.fetches.load(Ordering::SeqCst), 2);

        // A flood of made-up kids costs no further fetch within the interval.
        let stranger = SigningKey::from_bytes(&[3; 32]);
        for i in 0..50 {
            assert_eq!(
                verifier.verify(&token(&stranger, &format!("fake-{i}"))).await,
                Err(AuthError::UnknownKey)
            );
        }
        assert_eq!(source.fetches.load(Ordering::SeqCst), 2);
    }

    /// A service that starts before the auth service (a first boot, a restart of everything)
    /// accepts tokens within a second of the auth service answering, not after the 10 s
    /// throttle; while the auth service is down, unknown kids still cost one fetch a second.
    #[tokio::test]
    async fn a_service_started_before_the_auth_service_accepts_tokens_once_it_answers() {
        let key = SigningKey::from_bytes(&[5; 32]);
        let source = Arc::new(Rotating {
            keys: Mutex::new(vec![("k".into(), key.clone())]),
            fetches: AtomicUsize::new(0),
            down: std::sync::atomic::AtomicBool::new(true),
        });
        let verifier = Verifier::new(source.clone());
        assert!(verifier.refresh_keys(false).await.is_err());
        for _ in 0..20 {
            assert!(matches!(verifier.verify(&token(&key, "k")).await, Err(AuthError::UnknownKey)));
        }
        assert_eq!(source.fetches.load(Ordering::SeqCst), 1, "throttled while down");

        source.down.store(false, Ordering::SeqCst);
        tokio::time::sleep(REFETCH_AFTER_FAILURE + Duration::from_millis(50)).await;
        assert!(verifier.verify(&token(&key, "k")).await.is_ok());
        assert_eq!(source.fetches.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn revocations_apply_to_tokens_issued_before_them_even_when_cached() {
        let key = SigningKey::from_bytes(&[4; 32]);
        let source = Arc::new(Rotating {
            keys: Mutex::new(vec![("k".into(), key.clone())]),
            fetches: AtomicUsize::new(0),
            down: Default::default(),
        });
        let verifier = Verifier::new(source);
        let before = token(&key, "k");
        assert!(verifier.verify(&before).await.is_ok());
        verifier.revoke("u", now_millis() + 1);
        assert_eq!(
            verifier.verify(&before).await,
            Err(AuthError::Revoked),
            "the cached verdict is rechecked"
        );
        // A token issued after the revocation is fine.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = now_millis();
        let claims = Claims {
            iss: TOKEN_ISSUER.into(),
            aud: TOKEN_AUDIENCE.into(),
            sub: "u".into(),
            name: "u".into(),
            roles: vec![],
            iat: now / 1000,
            iat_ms: now,
            nbf: now / 1000,
            exp: now / 1000 + 60,
            jti: "after".into(),
        };
        let mut header = jsonwebtoken::Header::new(Algorithm::EdDSA);
        header.kid = Some("k".into());
        let der = key.to_pkcs8_der().map(|d| d.as_bytes().to_vec()).unwrap_or_default();
        let after = jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_ed_der(&der))
            .unwrap_or_default();
        assert!(verifier.verify(&after).await.is_ok());
    }

    #[test]
    fn roles_grant_what_the_table_says() {
        let designer = Permissions::of_roles(&[Role::Designer]);
        assert!(designer.contains(Permission::DesignWrite));
        assert!(!designer.contains(Permission::UsersAdmin));
        let viewer = Permissions::of_roles(&[Role::Viewer]);
        assert!(viewer.contains(Permission::DesignRead) && !viewer.contains(Permission::DesignWrite));
        assert_eq!(Permissions::of_roles(&[Role::Admin]), Permissions::all());
        let both = Permissions::of_roles(&[Role::Viewer, Role::Registrar]);
        assert!(both.contains(Permission::ComponentsRegister) && both.contains(Permission::CollabJoin));
        assert_eq!("registrar".parse::<Role>(), Ok(Role::Registrar));
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn bearer_headers_parse_strictly() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(bearer_token(&headers), Ok(None));
        headers.insert("authorization", "Bearer abc.def.ghi".parse().unwrap_or_else(|_| unreachable!()));
        assert_eq!(bearer_token(&headers), Ok(Some("abc.def.ghi")));
        headers.insert("authorization", "bearer  x ".parse().unwrap_or_else(|_| unreachable!()));
        assert_eq!(bearer_token(&headers), Ok(Some("x")));
        headers.insert("authorization", "Basic dXNlcjpwYXNz".parse().unwrap_or_else(|_| unreachable!()));
        assert_eq!(bearer_token(&headers), Err(AuthError::MalformedHeader));
    }

    #[test]
    fn only_protected_services_need_tokens() {
        let protected: HashSet<&'static str> = ["a.B"].into_iter().collect();
        let public: HashSet<&'static str> = ["/a.B/Login"].into_iter().collect();
        assert!(token_optional(&protected, &public, "/a.B/Login"));
        assert!(!token_optional(&protected, &public, "/a.B/Me"));
        assert!(token_optional(&protected, &public, "/grpc.health.v1.Health/Check"));
        assert!(
            token_optional(&protected, &public, "/x.Unknown/Do"),
            "unknown services are answered as such"
        );
    }
}
