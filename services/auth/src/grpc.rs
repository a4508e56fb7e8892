//! The gRPC adapter of `csp.auth.v1.AuthService`: extracts the caller, checks the permission,
//! calls the domain, converts the result.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use csp_platform::auth::{Permission, Principal, Role, client_address, require};
use csp_proto::auth::v1::{self as pb, auth_service_server::AuthService};
use tonic::{Request, Response, Status};

use crate::domain::{ApiKeyView, AuditKind, AuditView, Auth, Caller, NewUser, Page, Tokens, UserView};

/// The service's gRPC face.
pub(crate) struct AuthApi {
    auth: Arc<Auth>,
}

impl AuthApi {
    pub(crate) fn new(auth: Arc<Auth>) -> Self {
        Self { auth }
    }
}

fn caller<T>(request: &Request<T>) -> Caller {
    Caller {
        principal: request.extensions().get::<Arc<Principal>>().cloned(),
        address: client_address(request),
    }
}

fn timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: time.timestamp(), nanos: time.timestamp_subsec_nanos() as i32 }
}

fn from_timestamp(ts: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(ts.seconds, ts.nanos.max(0) as u32)
}

fn role_to_pb(role: Role) -> pb::Role {
    match role {
        Role::Admin => pb::Role::Admin,
        Role::Designer => pb::Role::Designer,
        Role::Viewer => pb::Role::Viewer,
        Role::Service => pb::Role::Service,
        Role::Registrar => pb::Role::Registrar,
    }
}

/// Roles from the request, or INVALID_ARGUMENT naming the bad entry.
fn roles_from_pb(roles: &[i32]) -> Result<Vec<Role>, Status> {
    roles
        .iter()
        .enumerate()
        .map(|(i, raw)| match pb::Role::try_from(*raw) {
            Ok(pb::Role::Admin) => Ok(Role::Admin),
            Ok(pb::Role::Designer) => Ok(Role::Designer),
            Ok(pb::Role::Viewer) => Ok(Role::Viewer),
            Ok(pb::Role::Service) => Ok(Role::Service),
            Ok(pb::Role::Registrar) => Ok(Role::Registrar),
            _ => Err(csp_platform::ApiError::invalid_field(format!("roles[{i}]"), "is not a role").into()),
        })
        .collect()
}

fn user_to_pb(user: UserView) -> pb::User {
    pb::User {
        id: user.id,
        username: user.username,
        email: user.email,
        display_name: user.display_name,
        roles: user.roles.into_iter().map(|r| role_to_pb(r) as i32).collect(),
        disabled: user.disabled,
        service_account: user.service_account,
        created_at: Some(timestamp(user.created_at)),
        last_login_at: user.last_login_at.map(timestamp),
    }
}

fn tokens_to_pb(tokens: Tokens) -> pb::TokenPair {
    let (refresh_token, refresh_expires) = match tokens.refresh_token {
        Some((token, expires)) => (token, Some(timestamp(expires))),
        None => (String::new(), None),
    };
    pb::TokenPair {
        access_token: tokens.access_token,
        access_token_expires_at: Some(timestamp(tokens.access_expires_at)),
        refresh_token,
        refresh_token_expires_at: refresh_expires,
        token_type: "Bearer".into(),
    }
}

fn api_key_to_pb(key: ApiKeyView) -> pb::ApiKey {
    pb::ApiKey {
        id: key.id,
        user_id: key.user_id,
        name: key.name,
        prefix: key.prefix,
        created_at: Some(timestamp(key.created_at)),
        expires_at: key.expires_at.map(timestamp),
        last_used_at: key.last_used_at.map(timestamp),
        revoked_at: key.revoked_at.map(timestamp),
    }
}

fn audit_kind_to_pb(kind: Option<AuditKind>) -> pb::AuditEventKind {
    use pb::AuditEventKind as K;
    match kind {
        Some(AuditKind::LoginSucceeded) => K::LoginSucceeded,
        Some(AuditKind::LoginFailed) => K::LoginFailed,
        Some(AuditKind::LockedOut) => K::LockedOut,
        Some(AuditKind::RolesChanged) => K::RolesChanged,
        Some(AuditKind::UserCreated) => K::UserCreated,
        Some(AuditKind::UserDisabled) => K::UserDisabled,
        Some(AuditKind::PasswordChanged) => K::PasswordChanged,
        Some(AuditKind::RefreshTokenReused) => K::RefreshTokenReused,
        Some(AuditKind::ApiKeyCreated) => K::ApiKeyCreated,
        Some(AuditKind::ApiKeyRevoked) => K::ApiKeyRevoked,
        Some(AuditKind::LoggedOut) => K::LoggedOut,
        None => K::Unspecified,
    }
}

fn audit_kinds_from_pb(kinds: &[i32]) -> Result<Vec<AuditKind>, Status> {
    kinds
        .iter()
        .enumerate()
        .map(|(i, raw)| {
            pb::AuditEventKind::try_from(*raw)
                .ok()
                .and_then(|k| k.as_str_name().strip_prefix("AUDIT_EVENT_KIND_").and_then(AuditKind::parse))
                .ok_or_else(|| {
                    csp_platform::ApiError::invalid_field(format!("kinds[{i}]"), "is not an audit event kind")
                        .into()
                })
        })
        .collect()
}

fn audit_to_pb(event: AuditView) -> pb::AuditEvent {
    pb::AuditEvent {
        id: event.id,
        time: Some(timestamp(event.time)),
        kind: audit_kind_to_pb(event.kind) as i32,
        actor_id: event.actor_id.unwrap_or_default(),
        subject_id: event.subject_id.unwrap_or_default(),
        client_address: event.client_address,
        details: Some(csp_proto::json::to_struct(event.details)),
    }
}

#[tonic::async_trait]
impl AuthService for AuthApi {
    #[tracing::instrument(skip_all)]
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let caller = caller(&request);
        let r = request.into_inner();
        let input = NewUser {
            username: r.username,
            email: r.email,
            display_name: r.display_name,
            password: r.password.into(),
            ..Default::default()
        };
        let user = self.auth.register(input, &caller).await?;
        Ok(Response::new(pb::RegisterResponse { user: Some(user_to_pb(user)) }))
    }

    #[tracing::instrument(skip_all)]
    async fn login(&self, request: Request<pb::LoginRequest>) -> Result<Response<pb::LoginResponse>, Status> {
        let caller = caller(&request);
        let r = request.into_inner();
        let (tokens, user) = self.auth.login(&r.login, &r.password, &r.api_key, &caller).await?;
        Ok(Response::new(pb::LoginResponse {
            tokens: Some(tokens_to_pb(tokens)),
            user: Some(user_to_pb(user)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn refresh(
        &self,
        request: Request<pb::RefreshRequest>,
    ) -> Result<Response<pb::RefreshResponse>, Status> {
        let caller = caller(&request);
        let tokens = self.auth.refresh(&request.into_inner().refresh_token, &caller).await?;
        Ok(Response::new(pb::RefreshResponse { tokens: Some(tokens_to_pb(tokens)) }))
    }

    #[tracing::instrument(skip_all)]
    async fn logout(
        &self,
        request: Request<pb::LogoutRequest>,
    ) -> Result<Response<pb::LogoutResponse>, Status> {
        let caller = caller(&request);
        let r = request.into_inner();
        self.auth.logout(&r.refresh_token, r.all_sessions, &caller).await?;
        Ok(Response::new(pb::LogoutResponse {}))
    }

    #[tracing::instrument(skip_all)]
    async fn me(&self, request: Request<pb::MeRequest>) -> Result<Response<pb::MeResponse>, Status> {
        let (user, permissions) = self.auth.me(&caller(&request)).await?;
        Ok(Response::new(pb::MeResponse {
            user: Some(user_to_pb(user)),
            permissions: permissions.names().into_iter().map(str::to_owned).collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn change_password(
        &self,
        request: Request<pb::ChangePasswordRequest>,
    ) -> Result<Response<pb::ChangePasswordResponse>, Status> {
        let caller = caller(&request);
        let r = request.into_inner();
        self.auth.change_password(&r.current_password, &r.new_password, &caller).await?;
        Ok(Response::new(pb::ChangePasswordResponse {}))
    }

    #[tracing::instrument(skip_all)]
    async fn get_public_keys(
        &self,
        _request: Request<pb::GetPublicKeysRequest>,
    ) -> Result<Response<pb::GetPublicKeysResponse>, Status> {
        let keys = self
            .auth
            .keys()
            .published()
            .into_iter()
            .map(|k| pb::PublicKey {
                kid: k.kid,
                kty: "OKP".into(),
                crv: "Ed25519".into(),
                alg: "EdDSA".into(),
                x: k.x,
            })
            .collect();
        Ok(Response::new(pb::GetPublicKeysResponse { keys, max_age_seconds: 300 }))
    }

    #[tracing::instrument(skip_all)]
    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::CreateUserResponse>, Status> {
        require(&request, Permission::UsersAdmin)?;
        let caller = caller(&request);
        let r = request.into_inner();
        let input = NewUser {
            roles: roles_from_pb(&r.roles)?,
            username: r.username,
            email: r.email,
            display_name: r.display_name,
            password: r.password.into(),
            service_account: r.service_account,
        };
        let user = self.auth.create(input, &caller).await?;
        Ok(Response::new(pb::CreateUserResponse { user: Some(user_to_pb(user)) }))
    }

    #[tracing::instrument(skip_all)]
    async fn lookup_users(
        &self,
        request: Request<pb::LookupUsersRequest>,
    ) -> Result<Response<pb::LookupUsersResponse>, Status> {
        let caller = caller(&request);
        let users = self.auth.lookup_users(&request.into_inner().user_ids, &caller).await?;
        Ok(Response::new(pb::LookupUsersResponse {
            users: users
                .into_iter()
                .map(|u| pb::UserCard { id: u.id, username: u.username, display_name: u.display_name })
                .collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        require(&request, Permission::UsersRead)?;
        let r = request.into_inner();
        let page = Page { size: r.page_size, token: r.page_token };
        let (users, next_page_token) = self.auth.list_users(&r.query, r.include_disabled, &page).await?;
        Ok(Response::new(pb::ListUsersResponse {
            users: users.into_iter().map(user_to_pb).collect(),
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn update_user_roles(
        &self,
        request: Request<pb::UpdateUserRolesRequest>,
    ) -> Result<Response<pb::UpdateUserRolesResponse>, Status> {
        require(&request, Permission::UsersAdmin)?;
        let caller = caller(&request);
        let r = request.into_inner();
        let user = self.auth.update_roles(&r.user_id, roles_from_pb(&r.roles)?, &caller).await?;
        Ok(Response::new(pb::UpdateUserRolesResponse { user: Some(user_to_pb(user)) }))
    }

    #[tracing::instrument(skip_all)]
    async fn disable_user(
        &self,
        request: Request<pb::DisableUserRequest>,
    ) -> Result<Response<pb::DisableUserResponse>, Status> {
        require(&request, Permission::UsersAdmin)?;
        let caller = caller(&request);
        let r = request.into_inner();
        let user = self.auth.disable_user(&r.user_id, &r.reason, &caller).await?;
        Ok(Response::new(pb::DisableUserResponse { user: Some(user_to_pb(user)) }))
    }

    #[tracing::instrument(skip_all)]
    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let principal = csp_platform::auth::principal(&request)?;
        if !principal.can(Permission::ApiKeysAdmin) && !principal.can(Permission::ApiKeysOwn) {
            return Err(Status::permission_denied(
                "this call needs the api_keys.admin or api_keys.own permission",
            ));
        }
        let caller = caller(&request);
        let r = request.into_inner();
        let expires_at = match &r.expires_at {
            Some(ts) => Some(from_timestamp(ts).ok_or_else(|| {
                Status::from(csp_platform::ApiError::invalid_field("expires_at", "is not a valid time"))
            })?),
            None => None,
        };
        let (key, secret) = self.auth.create_api_key(&r.user_id, &r.name, expires_at, &caller).await?;
        Ok(Response::new(pb::CreateApiKeyResponse { api_key: Some(api_key_to_pb(key)), secret }))
    }

    #[tracing::instrument(skip_all)]
    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        csp_platform::auth::principal(&request)?;
        let caller = caller(&request);
        let key = self.auth.revoke_api_key(&request.into_inner().api_key_id, &caller).await?;
        Ok(Response::new(pb::RevokeApiKeyResponse { api_key: Some(api_key_to_pb(key)) }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        require(&request, Permission::AuditRead)?;
        let r = request.into_inner();
        let kinds = audit_kinds_from_pb(&r.kinds)?;
        let page = Page { size: r.page_size, token: r.page_token };
        let (events, next_page_token) = self.auth.list_audit(&r.user_id, &kinds, &page).await?;
        Ok(Response::new(pb::ListAuditEventsResponse {
            events: events.into_iter().map(audit_to_pb).collect(),
            next_page_token,
        }))
    }
}
