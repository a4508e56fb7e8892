//! What the auth service does, free of gRPC types.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use csp_bus::SharedBus;
use csp_platform::{
    FieldViolation,
    auth::{Claims, Permissions, Principal, Role, TOKEN_AUDIENCE, TOKEN_ISSUER},
    config::AuthSettings,
};
use sea_orm::{ActiveValue::Set, DatabaseConnection, DatabaseTransaction, TransactionTrait as _};
use secrecy::{ExposeSecret as _, SecretString};

use crate::{
    entity::{api_key, audit_event, refresh_token, user},
    error::Error,
    identity,
    keys::KeyRing,
    lockout::{Lockout, Outcome},
    passwords::Passwords,
    repo, secrets,
};

/// Default and maximum page sizes of listings.
const DEFAULT_PAGE: u64 = 50;
const MAX_PAGE: u64 = 500;

/// Who is calling, from where.
#[derive(Debug, Clone, Default)]
pub(crate) struct Caller {
    pub(crate) principal: Option<Arc<Principal>>,
    pub(crate) address: String,
}

impl Caller {
    fn actor_id(&self) -> Option<String> {
        self.principal.as_ref().map(|p| p.user_id.clone())
    }

    fn signed_in(&self) -> Result<&Arc<Principal>, Error> {
        self.principal.as_ref().ok_or(Error::BadToken("sign in first: this call needs an access token"))
    }
}

/// A user as the API shows it.
#[derive(Debug, Clone)]
pub(crate) struct UserView {
    pub(crate) id: String,
    pub(crate) username: String,
    pub(crate) email: String,
    pub(crate) display_name: String,
    pub(crate) roles: Vec<Role>,
    pub(crate) disabled: bool,
    pub(crate) service_account: bool,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) last_login_at: Option<DateTime<Utc>>,
}

impl From<user::Model> for UserView {
    fn from(u: user::Model) -> Self {
        Self {
            roles: parse_roles(&u.roles),
            id: u.id,
            username: u.username,
            email: u.email,
            display_name: u.display_name,
            disabled: u.disabled,
            service_account: u.service_account,
            created_at: u.created_at,
            last_login_at: u.last_login_at,
        }
    }
}

/// Issued tokens.
#[derive(Debug, Clone)]
pub(crate) struct Tokens {
    pub(crate) access_token: String,
    pub(crate) access_expires_at: DateTime<Utc>,
    pub(crate) refresh_token: Option<(String, DateTime<Utc>)>,
}

/// An API key as the API shows it.
#[derive(Debug, Clone)]
pub(crate) struct ApiKeyView {
    pub(crate) id: String,
    pub(crate) user_id: String,
    pub(crate) name: String,
    pub(crate) prefix: String,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) expires_at: Option<DateTime<Utc>>,
    pub(crate) last_used_at: Option<DateTime<Utc>>,
    pub(crate) revoked_at: Option<DateTime<Utc>>,
}

impl From<api_key::Model> for ApiKeyView {
    fn from(k: api_key::Model) -> Self {
        Self {
            id: k.id,
            user_id: k.user_id,
            name: k.name,
            prefix: k.prefix,
            created_at: k.created_at,
            expires_at: k.expires_at,
            last_used_at: k.last_used_at,
            revoked_at: k.revoked_at,
        }
    }
}

/// The kinds of audit events (the proto enum's names without their prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuditKind {
    LoginSucceeded,
    LoginFailed,
    LockedOut,
    RolesChanged,
    UserCreated,
    UserDisabled,
    PasswordChanged,
    RefreshTokenReused,
    ApiKeyCreated,
    ApiKeyRevoked,
    LoggedOut,
}

impl AuditKind {
    pub(crate) const ALL: [AuditKind; 11] = [
        AuditKind::LoginSucceeded,
        AuditKind::LoginFailed,
        AuditKind::LockedOut,
        AuditKind::RolesChanged,
        AuditKind::UserCreated,
        AuditKind::UserDisabled,
        AuditKind::PasswordChanged,
        AuditKind::RefreshTokenReused,
        AuditKind::ApiKeyCreated,
        AuditKind::ApiKeyRevoked,
        AuditKind::LoggedOut,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AuditKind::LoginSucceeded => "LOGIN_SUCCEEDED",
            AuditKind::LoginFailed => "LOGIN_FAILED",
            AuditKind::LockedOut => "LOCKED_OUT",
            AuditKind::RolesChanged => "ROLES_CHANGED",
            AuditKind::UserCreated => "USER_CREATED",
            AuditKind::UserDisabled => "USER_DISABLED",
            AuditKind::PasswordChanged => "PASSWORD_CHANGED",
            AuditKind::RefreshTokenReused => "REFRESH_TOKEN_REUSED",
            AuditKind::ApiKeyCreated => "API_KEY_CREATED",
            AuditKind::ApiKeyRevoked => "API_KEY_REVOKED",
            AuditKind::LoggedOut => "LOGGED_OUT",
        }
    }

    pub(crate) fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

/// An audit event as the API shows it.
#[derive(Debug, Clone)]
pub(crate) struct AuditView {
    pub(crate) id: String,
    pub(crate) time: DateTime<Utc>,
    pub(crate) kind: Option<AuditKind>,
    pub(crate) actor_id: Option<String>,
    pub(crate) subject_id: Option<String>,
    pub(crate) client_address: String,
    pub(crate) details: serde_json::Value,
}

/// A new user.
#[derive(Debug, Clone, Default)]
pub(crate) struct NewUser {
    pub(crate) username: String,
    pub(crate) email: String,
    pub(crate) display_name: String,
    /// Never printed (`Debug` shows it redacted).
    pub(crate) password: SecretString,
    pub(crate) roles: Vec<Role>,
    pub(crate) service_account: bool,
}

/// A page request.
#[derive(Debug, Clone, Default)]
pub(crate) struct Page {
    pub(crate) size: i32,
    pub(crate) token: String,
}

impl Page {
    fn limit(&self) -> Result<u64, Error> {
        match self.size {
            0 => Ok(DEFAULT_PAGE),
            n if n < 0 => Err(Error::field(FieldViolation::new("page_size", "must not be negative"))),
            n => Ok((n as u64).min(MAX_PAGE)),
        }
    }

    fn cursor(&self) -> Result<Option<String>, Error> {
        if self.token.is_empty() {
            return Ok(None);
        }
        URL_SAFE_NO_PAD.decode(&self.token).ok().and_then(|b| String::from_utf8(b).ok()).map(Some).ok_or_else(
            || Error::field(FieldViolation::new("page_token", "is not a token from a previous page")),
        )
    }
}

fn next_token(has_more: bool, last: Option<&str>) -> String {
    match (has_more, last) {
        (true, Some(last)) => URL_SAFE_NO_PAD.encode(last),
        _ => String::new(),
    }
}

fn parse_roles(text: &str) -> Vec<Role> {
    text.split(',').filter_map(|r| r.trim().parse().ok()).collect()
}

fn roles_text(roles: &[Role]) -> String {
    let set: BTreeSet<Role> = roles.iter().copied().collect();
    set.into_iter().map(Role::as_str).collect::<Vec<_>>().join(",")
}

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// The auth service's logic.
pub(crate) struct Auth {
    db: DatabaseConnection,
    keys: KeyRing,
    passwords: Passwords,
    lockout: Lockout,
    bus: SharedBus,
    settings: AuthSettings,
    self_signup: bool,
}

impl Auth {
    pub(crate) fn new(
        db: DatabaseConnection,
        keys: KeyRing,
        bus: SharedBus,
        settings: &csp_platform::Settings,
    ) -> Result<Self, Error> {
        Ok(Self {
            passwords: Passwords::new(&settings.auth.argon2)?,
            lockout: Lockout::new(bus.clone(), settings.auth.lockout.clone()),
            db,
            keys,
            bus,
            settings: settings.auth.clone(),
            self_signup: settings.features.self_signup,
        })
    }

    pub(crate) fn keys(&self) -> &KeyRing {
        &self.keys
    }

    #[cfg(test)]
    pub(crate) fn passwords(&self) -> &Passwords {
        &self.passwords
    }

    // --- sign-up and accounts ---

    /// Self sign-up: a designer account.
    pub(crate) async fn register(&self, input: NewUser, caller: &Caller) -> Result<UserView, Error> {
        if !self.self_signup {
            return Err(Error::FeatureDisabled("self_signup"));
        }
        let input = NewUser { roles: vec![Role::Designer], service_account: false, ..input };
        self.create(input, caller).await
    }

    /// Creates a user (the caller's permission is checked by the adapter).
    pub(crate) async fn create(&self, input: NewUser, caller: &Caller) -> Result<UserView, Error> {
        let mut violations = Vec::new();
        let username = identity::username(&input.username, "username").map_err(|v| violations.push(v)).ok();
        let email = identity::email(&input.email, "email").map_err(|v| violations.push(v)).ok();
        let display = username.as_ref().and_then(|u| {
            identity::display_name(&input.display_name, u, "display_name")
                .map_err(|v| violations.push(v))
                .ok()
        });
        if input.roles.is_empty() {
            violations.push(FieldViolation::new("roles", "at least one role is required"));
        }
        if input.service_account {
            if !input.password.expose_secret().is_empty() {
                violations.push(FieldViolation::new(
                    "password",
                    "service accounts authenticate with API keys, not passwords",
                ));
            }
        } else if let Some(username) = &username {
            violations.extend(identity::new_password(
                input.password.expose_secret(),
                username,
                email.as_ref().map(|(_, key)| key.as_str()),
                self.settings.password_min_length,
                "password",
            ));
        } else {
            // The username is wrong; still refuse a malformed password before any hashing.
            if let Err(v) = identity::password_shape(input.password.expose_secret(), "password") {
                violations.push(v);
            }
        }
        Error::fields(violations)?;
        let (Some(username), Some((email, email_key)), Some(display_name)) = (username, email, display)
        else {
            return Err(Error::Internal("validated fields missing".into()));
        };

        let (username_taken, email_taken) =
            repo::username_or_email_taken(&self.db, &username.key, &email_key).await?;
        if username_taken {
            return Err(Error::AlreadyExists(format!("the username {} is taken", username.display)));
        }
        if email_taken {
            return Err(Error::AlreadyExists("an account with this email exists".into()));
        }
        let password_hash = if input.service_account {
            None
        } else {
            Some(self.passwords.hash(input.password.expose_secret().to_owned()).await?)
        };
        let now = Utc::now();
        let model = user::Model {
            id: uuid::Uuid::new_v4().to_string(),
            username: username.display,
            username_key: username.key,
            email,
            email_key,
            display_name,
            password_hash,
            roles: roles_text(&input.roles),
            disabled: false,
            service_account: input.service_account,
            created_at: now,
            last_login_at: None,
            password_changed_at: Some(now),
        };
        let txn = self.db.begin().await?;
        let created = match repo::insert_user(&txn, model).await {
            Ok(created) => created,
            // Two sign-ups racing for one name: the unique index decides.
            Err(e) if e.to_string().to_lowercase().contains("unique") => {
                return Err(Error::AlreadyExists("the username or email is taken".into()));
            }
            Err(e) => return Err(e.into()),
        };
        let details = serde_json::json!({ "roles": input.roles, "service_account": input.service_account });
        audit(&txn, AuditKind::UserCreated, caller.actor_id(), Some(&created.id), caller, details).await?;
        txn.commit().await?;
        tracing::info!(user_id = %created.id, username = %created.username, "user created");
        Ok(created.into())
    }

    /// The caller's account and permissions.
    pub(crate) async fn me(&self, caller: &Caller) -> Result<(UserView, Permissions), Error> {
        let principal = caller.signed_in()?;
        let user = repo::user_by_id(&self.db, &principal.user_id)
            .await?
            .ok_or(Error::BadToken("this account no longer exists"))?;
        if user.disabled {
            return Err(Error::Disabled);
        }
        let view = UserView::from(user);
        let permissions = Permissions::of_roles(&view.roles);
        Ok((view, permissions))
    }

    // --- login, refresh, logout ---

    /// Exchanges a login and password (or an API key) for tokens.
    pub(crate) async fn login(
        &self,
        login: &str,
        password: &str,
        api_key: &str,
        caller: &Caller,
    ) -> Result<(Tokens, UserView), Error> {
        if !api_key.is_empty() {
            if !login.is_empty() || !password.is_empty() {
                return Err(Error::field(FieldViolation::new(
                    "api_key",
                    "use either an API key or a login and password",
                )));
            }
            return self.login_with_api_key(api_key, caller).await;
        }
        let mut violations = Vec::new();
        if login.trim().is_empty() {
            violations.push(FieldViolation::new("login", "is required"));
        } else if login.len() > 320 || login.chars().any(char::is_control) {
            violations.push(FieldViolation::new("login", "is not a username or email address"));
        }
        if let Err(v) = identity::password_shape(password, "password") {
            violations.push(v);
        }
        Error::fields(violations)?;

        let key = identity::login_key(login);
        let user = repo::user_by_login(&self.db, &key).await?;
        // Failures count against the account when it exists, else against what was typed.
        // (A login that names nobody is kept — in counters and logs — only as a digest: it is
        // often a password typed in the wrong field.)
        let account = user
            .as_ref()
            .map_or_else(|| format!("unknown:{}", &crate::secrets::digest(&key)[..16]), |u| u.id.clone());
        // Counted before the slow check: concurrent guesses cannot all slip past the limit.
        self.lockout.attempt(&account, &caller.address).await?;

        let hash = user.as_ref().and_then(|u| u.password_hash.clone());
        let matches = self.passwords.verify(password.to_owned(), hash).await?;
        let succeeded = matches && user.as_ref().is_some_and(|u| !u.disabled);
        let outcome = self.lockout.settle(&account, &caller.address, succeeded).await?;
        let Some(user) = user.filter(|_| matches) else {
            let subject = (!account.starts_with("unknown:")).then_some(account.as_str());
            // What was typed as the login is not kept when it names nobody: it is often a
            // password typed in the wrong field.
            let details = serde_json::json!({ "known_login": subject.is_some() });
            audit(&self.db, AuditKind::LoginFailed, None, subject, caller, details).await?;
            if let Outcome::Locked { account: by_account, address: by_address } = outcome {
                let details = serde_json::json!({ "account": by_account, "address": by_address });
                audit(&self.db, AuditKind::LockedOut, None, subject, caller, details).await?;
                tracing::warn!(account = %account, address = %caller.address, "login locked after repeated failures");
                return Err(Error::Locked(self.lockout.duration()));
            }
            return Err(Error::InvalidCredentials);
        };
        if user.disabled {
            return Err(Error::Disabled);
        }

        let now = Utc::now();
        let txn = self.db.begin().await?;
        let mut active: user::ActiveModel = user.clone().into();
        active.last_login_at = Set(Some(now));
        let user = repo::save_user(&txn, active).await?;
        let refresh = self.new_refresh_token(&txn, &user.id, &new_id(), caller).await?;
        audit(
            &txn,
            AuditKind::LoginSucceeded,
            Some(user.id.clone()),
            Some(&user.id),
            caller,
            serde_json::json!({ "method": "password" }),
        )
        .await?;
        txn.commit().await?;
        let tokens = self.tokens_for(&user, Some(refresh))?;
        Ok((tokens, user.into()))
    }

    async fn login_with_api_key(&self, secret: &str, caller: &Caller) -> Result<(Tokens, UserView), Error> {
        self.lockout.check("api-keys", &caller.address).await?;
        let refuse = || Error::BadToken("invalid API key");
        let key = match repo::api_key_by_hash(&self.db, &secrets::digest(secret)).await? {
            Some(key) => key,
            None => {
                // Guessing keys is hopeless, but hammering the endpoint still counts.
                let _ = self.lockout.failed("api-keys", &caller.address).await?;
                return Err(refuse());
            }
        };
        let now = Utc::now();
        if key.revoked_at.is_some() || key.expires_at.is_some_and(|t| t <= now) {
            return Err(refuse());
        }
        let user = repo::user_by_id(&self.db, &key.user_id).await?.ok_or_else(refuse)?;
        if user.disabled {
            return Err(Error::Disabled);
        }
        repo::touch_api_key(&self.db, &key.id, now).await?;
        audit(
            &self.db,
            AuditKind::LoginSucceeded,
            Some(user.id.clone()),
            Some(&user.id),
            caller,
            serde_json::json!({ "method": "api_key", "api_key_id": key.id }),
        )
        .await?;
        Ok((self.tokens_for(&user, None)?, user.into()))
    }

    /// Rotates a refresh token. Presenting a token that was already rotated revokes its whole
    /// family: someone else has a copy.
    pub(crate) async fn refresh(&self, token: &str, caller: &Caller) -> Result<Tokens, Error> {
        if token.is_empty() || token.len() > 512 {
            return Err(Error::field(FieldViolation::new("refresh_token", "is required")));
        }
        let now = Utc::now();
        let txn = self.db.begin().await?;
        let row = repo::refresh_token_by_hash(&txn, &secrets::digest(token))
            .await?
            .ok_or(Error::BadToken("unknown refresh token"))?;
        if row.revoked_at.is_some() {
            return Err(Error::BadToken("refresh token revoked"));
        }
        let won = row.used_at.is_none() && repo::mark_refresh_token_used(&txn, &row.id, now).await?;
        if !won {
            let revoked = repo::revoke_family(&txn, &row.family_id, now).await?;
            audit(
                &txn,
                AuditKind::RefreshTokenReused,
                None,
                Some(&row.user_id),
                caller,
                serde_json::json!({ "family_id": row.family_id, "revoked_tokens": revoked }),
            )
            .await?;
            txn.commit().await?;
            tracing::warn!(user_id = %row.user_id, family = %row.family_id, "refresh token reused; family revoked");
            return Err(Error::BadToken(
                "refresh token already used; every token of this session is revoked",
            ));
        }
        if row.expires_at <= now {
            return Err(Error::BadToken("refresh token expired"));
        }
        let user =
            repo::user_by_id(&txn, &row.user_id).await?.ok_or(Error::BadToken("unknown refresh token"))?;
        if user.disabled {
            return Err(Error::Disabled);
        }
        let refresh = self.new_refresh_token(&txn, &user.id, &row.family_id, caller).await?;
        txn.commit().await?;
        self.tokens_for(&user, Some(refresh))
    }

    /// Revokes a session (its refresh-token family), or every session of the caller.
    pub(crate) async fn logout(&self, token: &str, all_sessions: bool, caller: &Caller) -> Result<(), Error> {
        let principal = caller.signed_in()?;
        let now = Utc::now();
        let txn = self.db.begin().await?;
        if all_sessions {
            repo::revoke_user_tokens(&txn, &principal.user_id, now).await?;
        } else {
            if token.is_empty() {
                return Err(Error::field(FieldViolation::new(
                    "refresh_token",
                    "is required unless all_sessions is set",
                )));
            }
            let row = repo::refresh_token_by_hash(&txn, &secrets::digest(token))
                .await?
                .filter(|r| r.user_id == principal.user_id)
                .ok_or(Error::BadToken("unknown refresh token"))?;
            repo::revoke_family(&txn, &row.family_id, now).await?;
        }
        audit(
            &txn,
            AuditKind::LoggedOut,
            caller.actor_id(),
            Some(&principal.user_id),
            caller,
            serde_json::json!({ "all_sessions": all_sessions }),
        )
        .await?;
        txn.commit().await?;
        if all_sessions {
            self.revoke_access(&principal.user_id).await?;
        }
        Ok(())
    }

    /// Replaces the caller's password; every session of the account ends, this one included.
    pub(crate) async fn change_password(
        &self,
        current: &str,
        new: &str,
        caller: &Caller,
    ) -> Result<(), Error> {
        let principal = caller.signed_in()?;
        identity::password_shape(current, "current_password").map_err(Error::field)?;
        let user = repo::user_by_id(&self.db, &principal.user_id)
            .await?
            .ok_or(Error::BadToken("this account no longer exists"))?;
        let username = identity::username(&user.username, "username")
            .map_err(|_| Error::Internal("stored username invalid".into()))?;
        Error::fields(identity::new_password(
            new,
            &username,
            Some(&user.email_key),
            self.settings.password_min_length,
            "new_password",
        ))?;
        if !self.passwords.verify(current.to_owned(), user.password_hash.clone()).await? {
            return Err(Error::field(FieldViolation::new("current_password", "is not the current password")));
        }
        let hash = self.passwords.hash(new.to_owned()).await?;
        let now = Utc::now();
        let txn = self.db.begin().await?;
        let mut active: user::ActiveModel = user.into();
        active.password_hash = Set(Some(hash));
        active.password_changed_at = Set(Some(now));
        let user = repo::save_user(&txn, active).await?;
        let revoked = repo::revoke_user_tokens(&txn, &user.id, now).await?;
        audit(
            &txn,
            AuditKind::PasswordChanged,
            Some(user.id.clone()),
            Some(&user.id),
            caller,
            serde_json::json!({ "revoked_tokens": revoked }),
        )
        .await?;
        txn.commit().await?;
        self.revoke_access(&user.id).await
    }

    // --- administration ---

    /// The active users among `ids` (any signed-in caller), in the order asked; ids that are
    /// not UUIDs or name nobody active are left out.
    pub(crate) async fn lookup_users(&self, ids: &[String], caller: &Caller) -> Result<Vec<UserView>, Error> {
        caller.signed_in()?;
        if ids.len() > 100 {
            return Err(Error::field(FieldViolation::new("user_ids", "at most 100 at a time")));
        }
        let wanted: Vec<String> = ids.iter().filter_map(|id| uuid_id("user_ids", id).ok()).collect();
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let found = repo::users_by_ids(&self.db, &wanted).await?;
        Ok(wanted
            .iter()
            .filter_map(|id| found.iter().find(|u| &u.id == id && !u.disabled).cloned())
            .map(UserView::from)
            .collect())
    }

    pub(crate) async fn list_users(
        &self,
        query: &str,
        include_disabled: bool,
        page: &Page,
    ) -> Result<(Vec<UserView>, String), Error> {
        let limit = page.limit()?;
        let cursor = page.cursor()?;
        let query = Some(query.trim()).filter(|q| !q.is_empty());
        let mut users =
            repo::list_users(&self.db, query, include_disabled, cursor.as_deref(), limit + 1).await?;
        let has_more = users.len() as u64 > limit;
        users.truncate(limit as usize);
        let next = next_token(has_more, users.last().map(|u| u.username_key.as_str()));
        Ok((users.into_iter().map(Into::into).collect(), next))
    }

    pub(crate) async fn update_roles(
        &self,
        user_id: &str,
        roles: Vec<Role>,
        caller: &Caller,
    ) -> Result<UserView, Error> {
        if roles.is_empty() {
            return Err(Error::field(FieldViolation::new("roles", "at least one role is required")));
        }
        let principal = caller.signed_in()?;
        let user = self.existing_user(user_id).await?;
        if user.id == principal.user_id && !roles.contains(&Role::Admin) {
            return Err(Error::Forbidden("admins cannot remove their own admin role".into()));
        }
        let before = parse_roles(&user.roles);
        let txn = self.db.begin().await?;
        let mut active: user::ActiveModel = user.into();
        active.roles = Set(roles_text(&roles));
        let user = repo::save_user(&txn, active).await?;
        let details = serde_json::json!({ "before": before, "after": parse_roles(&user.roles) });
        audit(&txn, AuditKind::RolesChanged, caller.actor_id(), Some(&user.id), caller, details).await?;
        txn.commit().await?;
        // Tokens carry roles: make the holder fetch new ones.
        self.revoke_access(&user.id).await?;
        Ok(user.into())
    }

    pub(crate) async fn disable_user(
        &self,
        user_id: &str,
        reason: &str,
        caller: &Caller,
    ) -> Result<UserView, Error> {
        let principal = caller.signed_in()?;
        if user_id == principal.user_id {
            return Err(Error::Forbidden("admins cannot disable themselves".into()));
        }
        if reason.chars().count() > 500 {
            return Err(Error::field(FieldViolation::new("reason", "must be at most 500 characters")));
        }
        let user = self.existing_user(user_id).await?;
        let now = Utc::now();
        let txn = self.db.begin().await?;
        let mut active: user::ActiveModel = user.into();
        active.disabled = Set(true);
        let user = repo::save_user(&txn, active).await?;
        repo::revoke_user_tokens(&txn, &user.id, now).await?;
        repo::revoke_user_api_keys(&txn, &user.id, now).await?;
        audit(
            &txn,
            AuditKind::UserDisabled,
            caller.actor_id(),
            Some(&user.id),
            caller,
            serde_json::json!({ "reason": reason }),
        )
        .await?;
        txn.commit().await?;
        self.revoke_access(&user.id).await?;
        tracing::info!(user_id = %user.id, "user disabled");
        Ok(user.into())
    }

    pub(crate) async fn create_api_key(
        &self,
        user_id: &str,
        name: &str,
        expires_at: Option<DateTime<Utc>>,
        caller: &Caller,
    ) -> Result<(ApiKeyView, String), Error> {
        let principal = caller.signed_in()?;
        let owner_id =
            if user_id.is_empty() { principal.user_id.clone() } else { uuid_id("user_id", user_id)? };
        let owner_id = owner_id.as_str();
        let admin = principal.can(csp_platform::auth::Permission::ApiKeysAdmin);
        if owner_id != principal.user_id && !admin {
            return Err(Error::Forbidden("only admins create API keys for other accounts".into()));
        }
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
            return Err(Error::field(FieldViolation::new("name", "must be 1 to 100 characters")));
        }
        if expires_at.is_some_and(|t| t <= Utc::now()) {
            return Err(Error::field(FieldViolation::new("expires_at", "must be in the future")));
        }
        let owner = self.existing_user(owner_id).await?;
        if !owner.service_account {
            return Err(Error::field(FieldViolation::new("user_id", "API keys are for service accounts")));
        }
        if owner.disabled {
            return Err(Error::field(FieldViolation::new("user_id", "the account is disabled")));
        }
        let (secret, prefix) = secrets::api_key();
        let model = api_key::Model {
            id: uuid::Uuid::new_v4().to_string(),
            user_id: owner.id.clone(),
            name: name.to_owned(),
            prefix,
            key_hash: secrets::digest(&secret),
            created_at: Utc::now(),
            expires_at,
            last_used_at: None,
            revoked_at: None,
        };
        let txn = self.db.begin().await?;
        let key = repo::insert_api_key(&txn, model).await?;
        audit(
            &txn,
            AuditKind::ApiKeyCreated,
            caller.actor_id(),
            Some(&owner.id),
            caller,
            serde_json::json!({ "api_key_id": key.id, "name": key.name }),
        )
        .await?;
        txn.commit().await?;
        Ok((key.into(), secret))
    }

    pub(crate) async fn revoke_api_key(&self, id: &str, caller: &Caller) -> Result<ApiKeyView, Error> {
        let principal = caller.signed_in()?;
        let id = uuid_id("api_key_id", id)?;
        let key = repo::api_key_by_id(&self.db, &id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no API key {id}")))?;
        if key.user_id != principal.user_id && !principal.can(csp_platform::auth::Permission::ApiKeysAdmin) {
            return Err(Error::NotFound(format!("no API key {id}")));
        }
        let now = Utc::now();
        let txn = self.db.begin().await?;
        repo::revoke_api_key(&txn, &key.id, now).await?;
        audit(
            &txn,
            AuditKind::ApiKeyRevoked,
            caller.actor_id(),
            Some(&key.user_id),
            caller,
            serde_json::json!({ "api_key_id": key.id }),
        )
        .await?;
        txn.commit().await?;
        let key = repo::api_key_by_id(&self.db, &id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no API key {id}")))?;
        Ok(key.into())
    }

    pub(crate) async fn list_audit(
        &self,
        user_id: &str,
        kinds: &[AuditKind],
        page: &Page,
    ) -> Result<(Vec<AuditView>, String), Error> {
        let limit = page.limit()?;
        let cursor = page.cursor()?;
        let kinds: Vec<String> = kinds.iter().map(|k| k.as_str().to_owned()).collect();
        let user = Some(user_id).filter(|u| !u.is_empty());
        let mut events = repo::list_audit(&self.db, user, &kinds, cursor.as_deref(), limit + 1).await?;
        let has_more = events.len() as u64 > limit;
        events.truncate(limit as usize);
        let next = next_token(has_more, events.last().map(|e| e.id.as_str()));
        let views = events
            .into_iter()
            .map(|e| AuditView {
                kind: AuditKind::parse(&e.kind),
                details: serde_json::from_str(&e.details).unwrap_or_default(),
                id: e.id,
                time: e.time,
                actor_id: e.actor_id,
                subject_id: e.subject_id,
                client_address: e.client_address,
            })
            .collect();
        Ok((views, next))
    }

    // --- helpers ---

    async fn existing_user(&self, id: &str) -> Result<user::Model, Error> {
        if id.is_empty() {
            return Err(Error::field(FieldViolation::new("user_id", "is required")));
        }
        let id = uuid_id("user_id", id)?;
        repo::user_by_id(&self.db, &id).await?.ok_or_else(|| Error::NotFound(format!("no user {id}")))
    }

    async fn new_refresh_token(
        &self,
        txn: &DatabaseTransaction,
        user_id: &str,
        family: &str,
        caller: &Caller,
    ) -> Result<(String, DateTime<Utc>), Error> {
        let token = secrets::refresh_token();
        let now = Utc::now();
        let expires_at =
            now + Duration::from_secs(u64::from(self.settings.refresh_token_expire_days) * 86_400);
        repo::insert_refresh_token(
            txn,
            refresh_token::Model {
                id: uuid::Uuid::new_v4().to_string(),
                family_id: family.to_owned(),
                user_id: user_id.to_owned(),
                token_hash: secrets::digest(&token),
                created_at: now,
                expires_at,
                used_at: None,
                revoked_at: None,
                client_address: caller.address.chars().take(64).collect(),
            },
        )
        .await?;
        Ok((token, expires_at))
    }

    fn tokens_for(
        &self,
        user: &user::Model,
        refresh: Option<(String, DateTime<Utc>)>,
    ) -> Result<Tokens, Error> {
        let now = Utc::now();
        let expires = now + Duration::from_secs(u64::from(self.settings.access_token_expire_minutes) * 60);
        let claims = Claims {
            iss: TOKEN_ISSUER.into(),
            aud: TOKEN_AUDIENCE.into(),
            sub: user.id.clone(),
            name: user.username.clone(),
            roles: parse_roles(&user.roles),
            iat: now.timestamp(),
            iat_ms: now.timestamp_millis(),
            nbf: now.timestamp(),
            exp: expires.timestamp(),
            jti: uuid::Uuid::new_v4().to_string(),
        };
        Ok(Tokens {
            access_token: self.keys.sign(&claims)?,
            access_expires_at: expires,
            refresh_token: refresh,
        })
    }

    /// Voids the user's access tokens issued until now, in every verifier of the cluster.
    async fn revoke_access(&self, user_id: &str) -> Result<(), Error> {
        csp_bus::revocations::publish(&self.bus, user_id, Utc::now().timestamp_millis() + 1).await?;
        Ok(())
    }
}

async fn audit(
    db: &impl sea_orm::ConnectionTrait,
    kind: AuditKind,
    actor_id: Option<String>,
    subject_id: Option<&str>,
    caller: &Caller,
    details: serde_json::Value,
) -> Result<(), Error> {
    repo::insert_audit(
        db,
        audit_event::Model {
            id: new_id(),
            time: Utc::now(),
            kind: kind.as_str().to_owned(),
            actor_id,
            subject_id: subject_id.map(str::to_owned),
            client_address: caller.address.chars().take(64).collect(),
            details: details.to_string(),
        },
    )
    .await?;
    Ok(())
}

/// An id that is a UUID (users, API keys), in its canonical form; INVALID_ARGUMENT naming the
/// field otherwise, without echoing it. A NUL byte or any other non-UUID never reaches the
/// database (PostgreSQL cannot store NUL in text).
fn uuid_id(field: &str, value: &str) -> Result<String, Error> {
    uuid::Uuid::try_parse(value)
        .map(|id| id.hyphenated().to_string())
        .map_err(|_| Error::field(FieldViolation::new(field, "must be a UUID")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A login for a username that does not exist does the same password work as one for a
    /// real account, so response times do not reveal which usernames exist.
    #[tokio::test]
    async fn unknown_users_cost_one_password_verification_like_known_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = csp_platform::Settings::default();
        settings.database.data_dir = dir.path().to_owned();
        settings.auth.argon2 =
            csp_platform::config::Argon2Settings { memory_kib: 64, iterations: 1, parallelism: 1 };
        let db = csp_store::open::<crate::migration::Migrator>(&settings, csp_platform::Service::Auth)
            .await
            .unwrap();
        let bus: SharedBus = std::sync::Arc::new(csp_bus::MemoryBus::new());
        let auth = Auth::new(db.conn().clone(), KeyRing::load(&settings).unwrap(), bus, &settings).unwrap();
        let caller = Caller { principal: None, address: "test".into() };
        let input = NewUser {
            username: "known".into(),
            email: "known@example.com".into(),
            password: "correct horse battery staple".into(),
            roles: vec![Role::Designer],
            ..Default::default()
        };
        assert!(!format!("{input:?}").contains("horse"), "a new user's password never prints");
        auth.create(input, &caller).await.unwrap();

        let before = auth.passwords().verifications();
        assert!(matches!(
            auth.login("known", "wrong horse battery", "", &caller).await,
            Err(Error::InvalidCredentials)
        ));
        let for_known = auth.passwords().verifications() - before;
        let before = auth.passwords().verifications();
        assert!(matches!(
            auth.login("nobody", "wrong horse battery", "", &caller).await,
            Err(Error::InvalidCredentials)
        ));
        let for_unknown = auth.passwords().verifications() - before;
        assert_eq!((for_known, for_unknown), (1, 1));
    }
}
