//! The auth service over gRPC, on SQLite + the in-memory bus and on PostgreSQL + Redis.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use csp_platform::{
    auth::{Claims, Role, TOKEN_AUDIENCE, TOKEN_ISSUER},
    server::bind,
};
use csp_proto::auth::v1::{self as pb, auth_service_client::AuthServiceClient};
use csp_testkit::TestEnv;
use ed25519_dalek::{SigningKey, pkcs8::EncodePrivateKey, pkcs8::spki::der::pem::LineEnding};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Status, transport::Channel};
use tonic_types::StatusExt as _;

const ADMIN_PASSWORD: &str = "Tr1cky-Lantern-Oboe-42";
const PASSWORD: &str = "correct horse battery staple";

struct Harness {
    client: AuthServiceClient<Channel>,
    signing: SigningKey,
    kid: String,
    settings: csp_platform::Settings,
    stop: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start(env: &TestEnv) -> Harness {
    start_with(env, |_| {}).await
}

async fn start_with(env: &TestEnv, configure: impl FnOnce(&mut csp_platform::Settings)) -> Harness {
    let signing = SigningKey::from_bytes(&[42; 32]);
    let key_file = env.dir().join("signing.pem");
    std::fs::write(&key_file, signing.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes()).unwrap();
    let mut settings = env.settings();
    settings.auth.signing_key_file = Some(key_file);
    // Cheap hashing keeps the suite fast; the cost is a setting, not the logic under test.
    settings.auth.argon2 =
        csp_platform::config::Argon2Settings { memory_kib: 64, iterations: 1, parallelism: 1 };
    settings.features.self_signup = true;
    configure(&mut settings);

    let listener = bind("auth", "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let app = csp_auth::Application::with_listener(&settings, env.bus(), listener).await.unwrap();
    let addr = app.local_addr();
    let stop = CancellationToken::new();
    tokio::spawn(app.run_until_stopped(stop.clone().cancelled_owned()));
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let kid = csp_auth::keys::KeyRing::from_signing_key(signing.clone()).unwrap().kid().to_owned();
    csp_auth::create_user(&settings, "admin", "admin@example.com", ADMIN_PASSWORD, vec![Role::Admin])
        .await
        .unwrap();
    Harness { client: AuthServiceClient::new(channel), signing, kid, settings, stop }
}

fn authed<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

fn from(message: pb::LoginRequest, address: &str) -> Request<pb::LoginRequest> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("x-forwarded-for", address.parse().unwrap());
    request
}

async fn login(h: &mut Harness, login: &str, password: &str) -> Result<pb::TokenPair, Status> {
    let request = pb::LoginRequest { login: login.into(), password: password.into(), api_key: String::new() };
    Ok(h.client.login(request).await?.into_inner().tokens.unwrap())
}

async fn admin_token(h: &mut Harness) -> String {
    login(h, "admin", ADMIN_PASSWORD).await.unwrap().access_token
}

async fn register(h: &mut Harness, username: &str, email: &str, password: &str) -> Result<pb::User, Status> {
    let request = pb::RegisterRequest {
        username: username.into(),
        email: email.into(),
        password: password.into(),
        display_name: String::new(),
    };
    Ok(h.client.register(request).await?.into_inner().user.unwrap())
}

fn violations(status: &Status) -> Vec<(String, String)> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| (v.field, v.description)).collect())
        .unwrap_or_default()
}

fn claims(h: &Harness, sub: &str) -> Claims {
    let now = csp_platform::auth::now_seconds();
    let _ = h;
    Claims {
        iss: TOKEN_ISSUER.into(),
        aud: TOKEN_AUDIENCE.into(),
        sub: sub.into(),
        name: "someone".into(),
        roles: vec![Role::Admin],
        iat: now,
        iat_ms: now * 1000,
        nbf: now,
        exp: now + 600,
        jti: "test".into(),
    }
}

/// A token signed by `key` with `kid` in its header.
fn sign(claims: &Claims, key: &SigningKey, kid: &str) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.kid = Some(kid.into());
    let der = key.to_pkcs8_der().unwrap();
    jsonwebtoken::encode(&header, claims, &jsonwebtoken::EncodingKey::from_ed_der(der.as_bytes())).unwrap()
}

async fn me(h: &mut Harness, token: &str) -> Result<pb::MeResponse, Status> {
    Ok(h.client.me(authed(pb::MeRequest {}, token)).await?.into_inner())
}

fn assert_unauthenticated(result: Result<pb::MeResponse, Status>, why: &str) {
    match result {
        Err(status) => assert_eq!(status.code(), Code::Unauthenticated, "{why}: {status:?}"),
        Ok(me) => panic!("{why}: accepted as {:?}", me.user.map(|u| u.username)),
    }
}

/// Every forged, stale or tampered token is refused; only the real one passes.
async fn forged_and_stale_tokens_are_refused(env: TestEnv) {
    let mut h = start(&env).await;
    let admin = h
        .client
        .login(pb::LoginRequest {
            login: "admin".into(),
            password: ADMIN_PASSWORD.into(),
            api_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let admin_id = admin.user.unwrap().id;
    let real = admin.tokens.unwrap().access_token;
    assert_eq!(me(&mut h, &real).await.unwrap().user.unwrap().username, "admin");

    let good = claims(&h, &admin_id);
    let (signing, kid) = (h.signing.clone(), h.kid.clone());
    let b64 = |v: &serde_json::Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
    let payload = b64(&serde_json::to_value(&good).unwrap());

    // alg "none", no signature.
    let none = format!("{}.{}.", b64(&serde_json::json!({"alg": "none", "typ": "JWT", "kid": kid})), payload);
    assert_unauthenticated(me(&mut h, &none).await, "alg none");

    // HS256 with the public key as the HMAC secret (the classic key-confusion attack).
    let public = signing.verifying_key();
    for secret in [public.as_bytes().to_vec(), URL_SAFE_NO_PAD.encode(public.as_bytes()).into_bytes()] {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = Some(kid.clone());
        let hs =
            jsonwebtoken::encode(&header, &good, &jsonwebtoken::EncodingKey::from_secret(&secret)).unwrap();
        assert_unauthenticated(me(&mut h, &hs).await, "HS256 with the public key");
    }

    // Signed by a key nobody published, with an unknown or a borrowed kid.
    let stranger = SigningKey::from_bytes(&[7; 32]);
    assert_unauthenticated(me(&mut h, &sign(&good, &stranger, "not-a-published-kid")).await, "unknown kid");
    assert_unauthenticated(me(&mut h, &sign(&good, &stranger, &kid)).await, "wrong key, real kid");

    // Expired, not yet valid, wrong issuer or audience — all properly signed.
    let now = csp_platform::auth::now_seconds();
    let expired = Claims {
        iat: now - 1200,
        iat_ms: (now - 1200) * 1000,
        nbf: now - 1200,
        exp: now - 120,
        ..good.clone()
    };
    let status = me(&mut h, &sign(&expired, &signing, &kid)).await.unwrap_err();
    assert!(status.message().contains("expired"), "{status:?}");
    let early = Claims { nbf: now + 3600, exp: now + 7200, ..good.clone() };
    let status = me(&mut h, &sign(&early, &signing, &kid)).await.unwrap_err();
    assert!(status.message().contains("not valid yet"), "{status:?}");
    assert_unauthenticated(
        me(&mut h, &sign(&Claims { iss: "evil".into(), ..good.clone() }, &signing, &kid)).await,
        "issuer",
    );
    assert_unauthenticated(
        me(&mut h, &sign(&Claims { aud: "other".into(), ..good.clone() }, &signing, &kid)).await,
        "audience",
    );

    // Tampering with the payload (e.g. to raise roles) or the signature.
    let parts: Vec<&str> = real.split('.').collect();
    let mut raised =
        serde_json::from_slice::<serde_json::Value>(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    raised["exp"] = serde_json::json!(now + 99_999);
    let tampered = format!("{}.{}.{}", parts[0], b64(&raised), parts[2]);
    assert_unauthenticated(me(&mut h, &tampered).await, "tampered payload");
    let mut signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    signature[10] ^= 0x01;
    let bad_sig = format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(signature));
    assert_unauthenticated(me(&mut h, &bad_sig).await, "tampered signature");
    assert_unauthenticated(me(&mut h, "garbage").await, "not a JWT");
    let mut request = Request::new(pb::MeRequest {});
    request.metadata_mut().insert("authorization", format!("Basic {real}").parse().unwrap());
    assert_eq!(h.client.me(request).await.unwrap_err().code(), Code::Unauthenticated, "wrong scheme");

    // The real token still works after all that.
    me(&mut h, &real).await.unwrap();
}

/// Tokens of a disabled user stop working at once; so do their refresh tokens and logins.
async fn a_disabled_users_tokens_are_refused(env: TestEnv) {
    let mut h = start(&env).await;
    let user = register(&mut h, "dana", "dana@example.com", PASSWORD).await.unwrap();
    let tokens = login(&mut h, "dana", PASSWORD).await.unwrap();
    me(&mut h, &tokens.access_token).await.unwrap();

    let admin = admin_token(&mut h).await;
    let request = pb::DisableUserRequest { user_id: user.id.clone(), reason: "left the company".into() };
    let disabled = h.client.disable_user(authed(request, &admin)).await.unwrap().into_inner().user.unwrap();
    assert!(disabled.disabled);

    // The revocation travels over the bus to the verifier; give it a moment.
    let started = Instant::now();
    loop {
        match me(&mut h, &tokens.access_token).await {
            Err(status) if status.code() == Code::Unauthenticated => break,
            _ if started.elapsed() > Duration::from_secs(5) => {
                panic!("the disabled user's token still works")
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let refresh =
        h.client.refresh(pb::RefreshRequest { refresh_token: tokens.refresh_token }).await.unwrap_err();
    assert_eq!(refresh.code(), Code::Unauthenticated);
    let relogin = login(&mut h, "dana", PASSWORD).await.unwrap_err();
    assert_eq!(relogin.code(), Code::Unauthenticated);
    assert!(relogin.message().contains("disabled"), "{relogin:?}");
}

/// Refresh tokens rotate; presenting a rotated one revokes the whole family.
async fn refresh_rotation_and_reuse_detection(env: TestEnv) {
    let mut h = start(&env).await;
    let user = register(&mut h, "rita", "rita@example.com", PASSWORD).await.unwrap();
    let first = login(&mut h, "rita", PASSWORD).await.unwrap();
    let second = h
        .client
        .refresh(pb::RefreshRequest { refresh_token: first.refresh_token.clone() })
        .await
        .unwrap()
        .into_inner()
        .tokens
        .unwrap();
    assert_ne!(second.refresh_token, first.refresh_token, "rotated");
    me(&mut h, &second.access_token).await.unwrap();

    // A second, independent login is its own family and survives what follows.
    let other_session = login(&mut h, "rita", PASSWORD).await.unwrap();

    // Someone replays the first token: refused, and the family (including `second`) dies.
    let reuse =
        h.client.refresh(pb::RefreshRequest { refresh_token: first.refresh_token }).await.unwrap_err();
    assert_eq!(reuse.code(), Code::Unauthenticated);
    assert!(reuse.message().contains("already used"), "{reuse:?}");
    let after =
        h.client.refresh(pb::RefreshRequest { refresh_token: second.refresh_token }).await.unwrap_err();
    assert_eq!(after.code(), Code::Unauthenticated, "the whole family is revoked");
    h.client.refresh(pb::RefreshRequest { refresh_token: other_session.refresh_token }).await.unwrap();

    // The reuse is in the audit log.
    let admin = admin_token(&mut h).await;
    let request = pb::ListAuditEventsRequest {
        user_id: user.id.clone(),
        kinds: vec![pb::AuditEventKind::RefreshTokenReused as i32],
        ..Default::default()
    };
    let events = h.client.list_audit_events(authed(request, &admin)).await.unwrap().into_inner().events;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].subject_id, user.id);

    // Unknown tokens are refused too.
    let unknown =
        h.client.refresh(pb::RefreshRequest { refresh_token: "no-such-token".into() }).await.unwrap_err();
    assert_eq!(unknown.code(), Code::Unauthenticated);
}

/// Usernames: length, control characters, Unicode normalisation and case.
async fn usernames_are_checked_and_normalised(env: TestEnv) {
    let mut h = start(&env).await;
    for (name, expected) in [
        ("x".repeat(65), "3 to 64"),
        ("ab".to_owned(), "3 to 64"),
        ("bob\u{0007}".to_owned(), "control"),
        ("bob\u{202e}evil".to_owned(), "letters, digits"),
        ("bob smith".to_owned(), "letters, digits"),
    ] {
        let status = register(&mut h, &name, "someone@example.com", PASSWORD).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{name:?}");
        let v = violations(&status);
        assert!(v.iter().any(|(f, d)| f == "username" && d.contains(expected)), "{name:?}: {v:?}");
    }

    let alice = register(&mut h, "Åsa.Alice", "asa@example.com", PASSWORD).await.unwrap();
    assert_eq!(alice.username, "Åsa.Alice");
    for twin in ["åsa.alice", "ÅSA.ALICE", "A\u{30a}sa.Alice", "Ａ\u{30a}ｓａ.Ａｌｉｃｅ"] {
        let status =
            register(&mut h, twin, &format!("{}@example.com", twin.len()), PASSWORD).await.unwrap_err();
        assert_eq!(status.code(), Code::AlreadyExists, "{twin:?} is the same user: {status:?}");
    }
    // Logins normalise the same way.
    login(&mut h, "A\u{30a}SA.alice", PASSWORD).await.unwrap();
    login(&mut h, "ASA@EXAMPLE.COM", PASSWORD).await.unwrap();
    let status = register(&mut h, "asa2", "ASA@example.com", PASSWORD).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "emails compare case-insensitively");
}

/// Passwords: the rules come back as field errors; absurd ones are refused before hashing.
async fn passwords_are_checked_before_hashing(env: TestEnv) {
    let mut h = start(&env).await;
    let cases = [
        ("".to_owned(), "is required"),
        ("short".to_owned(), "at least 12"),
        ("paul-is-my-name-ok".to_owned(), "username"),
        ("password1234".to_owned(), "most common"),
        ("x".repeat(100_000), "at most 1024 bytes"),
    ];
    for (password, expected) in cases {
        let started = Instant::now();
        let status = register(&mut h, "paul", "paul@example.com", &password).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        let v = violations(&status);
        assert!(v.iter().any(|(f, d)| f == "password" && d.contains(expected)), "{expected}: {v:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    // 10 MB does not even get through the transport.
    let huge = "x".repeat(10 * 1024 * 1024);
    let status = login(&mut h, "admin", &huge).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument),
        "{status:?}"
    );
    let status = login(&mut h, "admin", "").await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

/// N failures lock the account (RESOURCE_EXHAUSTED with retry-after); per address too.
async fn repeated_failures_lock_the_account_and_the_address(env: TestEnv) {
    let mut h = start(&env).await;
    register(&mut h, "lena", "lena@example.com", PASSWORD).await.unwrap();
    register(&mut h, "mara", "mara@example.com", PASSWORD).await.unwrap();
    // A success resets the account's count.
    for _ in 0..4 {
        assert_eq!(
            login(&mut h, "lena", "wrong password!!").await.unwrap_err().code(),
            Code::Unauthenticated
        );
    }
    login(&mut h, "lena", PASSWORD).await.unwrap();
    for _ in 0..4 {
        assert_eq!(
            login(&mut h, "lena", "wrong password!!").await.unwrap_err().code(),
            Code::Unauthenticated
        );
    }
    let locked = login(&mut h, "lena", "wrong password!!").await.unwrap_err();
    assert_eq!(locked.code(), Code::ResourceExhausted, "the 5th failure in a row locks");
    let retry: u64 = locked.metadata().get("retry-after").unwrap().to_str().unwrap().parse().unwrap();
    assert!((890..=900).contains(&retry), "{retry}");
    assert!(locked.get_details_retry_info().unwrap().retry_delay.is_some());
    let still = login(&mut h, "lena", PASSWORD).await.unwrap_err();
    assert_eq!(still.code(), Code::ResourceExhausted, "even the right password waits");
    login(&mut h, "mara", PASSWORD).await.unwrap();

    // One address trying many accounts gets locked as an address (20 failures by default).
    for i in 0..19 {
        let request = pb::LoginRequest {
            login: format!("nobody{i}"),
            password: "wrong password!!".into(),
            api_key: String::new(),
        };
        assert_eq!(
            h.client.login(from(request, "203.0.113.9")).await.unwrap_err().code(),
            Code::Unauthenticated
        );
    }
    let request = pb::LoginRequest {
        login: "nobody-last".into(),
        password: "wrong password!!".into(),
        api_key: String::new(),
    };
    assert_eq!(
        h.client.login(from(request, "203.0.113.9")).await.unwrap_err().code(),
        Code::ResourceExhausted
    );
    let request =
        pb::LoginRequest { login: "mara".into(), password: PASSWORD.into(), api_key: String::new() };
    assert_eq!(
        h.client.login(from(request, "203.0.113.9")).await.unwrap_err().code(),
        Code::ResourceExhausted
    );
    let request =
        pb::LoginRequest { login: "mara".into(), password: PASSWORD.into(), api_key: String::new() };
    h.client.login(from(request, "198.51.100.7")).await.unwrap();

    let admin = admin_token(&mut h).await;
    let request = pb::ListAuditEventsRequest {
        kinds: vec![pb::AuditEventKind::LockedOut as i32],
        ..Default::default()
    };
    let events = h.client.list_audit_events(authed(request, &admin)).await.unwrap().into_inner().events;
    assert_eq!(events.len(), 2, "one account lock and one address lock");
}

/// Administration: roles, permissions, listing, password change, logout, API keys.
async fn administration_and_service_accounts(env: TestEnv) {
    let mut h = start(&env).await;
    let admin = admin_token(&mut h).await;
    let user = register(&mut h, "vera", "vera@example.com", PASSWORD).await.unwrap();
    assert_eq!(user.roles, [pb::Role::Designer as i32], "self sign-up makes designers");
    let vera = login(&mut h, "vera", PASSWORD).await.unwrap();

    // A designer may not administer.
    let request = pb::ListUsersRequest::default();
    assert_eq!(
        h.client.list_users(authed(request, &vera.access_token)).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    assert_eq!(
        h.client.list_users(pb::ListUsersRequest::default()).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    // Paging through users.
    for i in 0..5 {
        let request = pb::CreateUserRequest {
            username: format!("user{i}"),
            email: format!("user{i}@example.com"),
            password: PASSWORD.into(),
            roles: vec![pb::Role::Viewer as i32],
            ..Default::default()
        };
        h.client.create_user(authed(request, &admin)).await.unwrap();
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let request = pb::ListUsersRequest { page_size: 3, page_token: token, ..Default::default() };
        let page = h.client.list_users(authed(request, &admin)).await.unwrap().into_inner();
        seen.extend(page.users.into_iter().map(|u| u.username));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ["admin", "user0", "user1", "user2", "user3", "user4", "vera"]);
    let request = pb::ListUsersRequest { query: "VER".into(), ..Default::default() };
    let found = h.client.list_users(authed(request, &admin)).await.unwrap().into_inner().users;
    assert_eq!(found.iter().map(|u| u.username.as_str()).collect::<Vec<_>>(), ["vera"]);
    let request = pb::ListUsersRequest { page_token: "%%%".into(), ..Default::default() };
    assert_eq!(h.client.list_users(authed(request, &admin)).await.unwrap_err().code(), Code::InvalidArgument);

    // Role changes take effect: the old token is revoked, a new login carries the new roles.
    let request = pb::UpdateUserRolesRequest {
        user_id: user.id.clone(),
        roles: vec![pb::Role::Registrar as i32, pb::Role::Viewer as i32],
    };
    let updated =
        h.client.update_user_roles(authed(request, &admin)).await.unwrap().into_inner().user.unwrap();
    assert_eq!(updated.roles, [pb::Role::Viewer as i32, pb::Role::Registrar as i32]);
    let fresh = login(&mut h, "vera", PASSWORD).await.unwrap();
    let perms = me(&mut h, &fresh.access_token).await.unwrap().permissions;
    assert!(
        perms.contains(&"components.register".to_owned()) && !perms.contains(&"design.write".to_owned()),
        "{perms:?}"
    );
    let request = pb::UpdateUserRolesRequest { user_id: user.id.clone(), roles: vec![99] };
    let status = h.client.update_user_roles(authed(request, &admin)).await.unwrap_err();
    assert_eq!(violations(&status)[0].0, "roles[0]");

    // Changing the password ends every session; the new password works.
    let request = pb::ChangePasswordRequest {
        current_password: "not it at all".into(),
        new_password: "Another-Fine-Passphrase-9".into(),
    };
    let status = h.client.change_password(authed(request, &fresh.access_token)).await.unwrap_err();
    assert_eq!(violations(&status)[0].0, "current_password");
    let request = pb::ChangePasswordRequest {
        current_password: PASSWORD.into(),
        new_password: "Another-Fine-Passphrase-9".into(),
    };
    h.client.change_password(authed(request, &fresh.access_token)).await.unwrap();
    let refused =
        h.client.refresh(pb::RefreshRequest { refresh_token: fresh.refresh_token }).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert_eq!(login(&mut h, "vera", PASSWORD).await.unwrap_err().code(), Code::Unauthenticated);
    let renewed = login(&mut h, "vera", "Another-Fine-Passphrase-9").await.unwrap();
    me(&mut h, &renewed.access_token).await.unwrap();

    // Logout revokes the session's refresh token.
    let request = pb::LogoutRequest { refresh_token: renewed.refresh_token.clone(), all_sessions: false };
    h.client.logout(authed(request, &renewed.access_token)).await.unwrap();
    assert_eq!(
        h.client
            .refresh(pb::RefreshRequest { refresh_token: renewed.refresh_token })
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );

    // A service account with an API key, exchanged for access tokens, then revoked.
    let request = pb::CreateUserRequest {
        username: "ci-bot".into(),
        email: "ci@example.com".into(),
        roles: vec![pb::Role::Service as i32],
        service_account: true,
        ..Default::default()
    };
    let bot = h.client.create_user(authed(request, &admin)).await.unwrap().into_inner().user.unwrap();
    let request =
        pb::CreateApiKeyRequest { user_id: bot.id.clone(), name: "pipeline".into(), expires_at: None };
    let created = h.client.create_api_key(authed(request, &admin)).await.unwrap().into_inner();
    assert!(created.secret.starts_with(&created.api_key.as_ref().unwrap().prefix));
    let request =
        pb::LoginRequest { login: String::new(), password: String::new(), api_key: created.secret.clone() };
    let bot_login = h.client.login(request).await.unwrap().into_inner();
    assert!(bot_login.tokens.as_ref().unwrap().refresh_token.is_empty(), "API keys get no refresh token");
    let bot_me = me(&mut h, &bot_login.tokens.unwrap().access_token).await.unwrap();
    assert_eq!(bot_me.user.unwrap().id, bot.id);
    let request = pb::RevokeApiKeyRequest { api_key_id: created.api_key.unwrap().id };
    assert!(
        h.client
            .revoke_api_key(authed(request, &admin))
            .await
            .unwrap()
            .into_inner()
            .api_key
            .unwrap()
            .revoked_at
            .is_some()
    );
    let request = pb::LoginRequest { login: String::new(), password: String::new(), api_key: created.secret };
    assert_eq!(h.client.login(request).await.unwrap_err().code(), Code::Unauthenticated);
    // API keys are for service accounts only.
    let request = pb::CreateApiKeyRequest { user_id: user.id.clone(), name: "nope".into(), expires_at: None };
    assert_eq!(
        h.client.create_api_key(authed(request, &admin)).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    // GetPublicKeys needs no token and names the signing key.
    let keys = h.client.get_public_keys(pb::GetPublicKeysRequest {}).await.unwrap().into_inner().keys;
    assert_eq!(keys[0].kid, h.kid);
    assert_eq!(
        (keys[0].kty.as_str(), keys[0].crv.as_str(), keys[0].alg.as_str()),
        ("OKP", "Ed25519", "EdDSA")
    );
    let _ = &h.settings;
}

/// Self sign-up answers UNIMPLEMENTED naming its flag when switched off.
async fn self_signup_follows_its_flag(env: TestEnv) {
    let h = start(&env).await;
    h.stop.cancel();
    let mut settings = h.settings.clone();
    settings.features.self_signup = false;
    let listener = bind("auth", "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let app = csp_auth::Application::with_listener(&settings, env.bus(), listener).await.unwrap();
    let addr = app.local_addr();
    let stop = CancellationToken::new();
    tokio::spawn(app.run_until_stopped(stop.clone().cancelled_owned()));
    let mut client = AuthServiceClient::new(
        Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap(),
    );
    let request = pb::RegisterRequest {
        username: "late".into(),
        email: "late@example.com".into(),
        password: PASSWORD.into(),
        display_name: String::new(),
    };
    let status = client.register(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    assert!(status.message().contains("features.self_signup"), "{status:?}");
    stop.cancel();
}

/// Ids that cannot be ids (a NUL byte, which PostgreSQL cannot store; not a UUID) are
/// INVALID_ARGUMENT naming the field, on both backends — never INTERNAL.
async fn malformed_ids_are_invalid_arguments(env: TestEnv) {
    use tonic_types::StatusExt as _;
    let mut h = start(&env).await;
    let admin = admin_token(&mut h).await;
    for id in ["a\0b", "\0", "not-a-uuid", "0190a5c4-0000-7000-8000-00000000000\0"] {
        let mut statuses = Vec::new();
        let request = pb::DisableUserRequest { user_id: id.into(), reason: String::new() };
        statuses.push(("user_id", h.client.disable_user(authed(request, &admin)).await.map(|_| ())));
        let request = pb::CreateApiKeyRequest { user_id: id.into(), name: "k".into(), expires_at: None };
        statuses.push(("user_id", h.client.create_api_key(authed(request, &admin)).await.map(|_| ())));
        let request = pb::RevokeApiKeyRequest { api_key_id: id.into() };
        statuses.push(("api_key_id", h.client.revoke_api_key(authed(request, &admin)).await.map(|_| ())));
        for (field, result) in statuses {
            let status = result.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{id:?}: {}", status.message());
            let fields: Vec<String> = status
                .get_details_bad_request()
                .unwrap()
                .field_violations
                .into_iter()
                .map(|v| v.field)
                .collect();
            assert_eq!(fields, [field], "{id:?}");
            assert!(!status.message().contains('\0'), "{id:?}");
        }
    }
    // A well-formed id of nobody is still NOT_FOUND.
    let nobody = uuid::Uuid::now_v7().to_string();
    let request = pb::DisableUserRequest { user_id: nobody, reason: String::new() };
    assert_eq!(h.client.disable_user(authed(request, &admin)).await.unwrap_err().code(), Code::NotFound);
}

/// Thirty wrong passwords for one account at once, with a limit of five: at most five are
/// checked (and audited as failures); the rest are refused unchecked, as locked.
async fn concurrent_guesses_cannot_pass_the_lockout_limit(env: TestEnv) {
    let mut h = start(&env).await;
    let user = register(&mut h, "nina", "nina@example.com", PASSWORD).await.unwrap();
    let guesses = (0..30).map(|i| {
        let mut client = h.client.clone();
        async move {
            let request = pb::LoginRequest {
                login: "nina".into(),
                password: format!("wrong password {i:02}"),
                api_key: String::new(),
            };
            client.login(from(request, &format!("198.51.100.{i}"))).await.unwrap_err().code()
        }
    });
    let codes = futures::future::join_all(guesses).await;
    let checked = codes.iter().filter(|c| **c == Code::Unauthenticated).count();
    let locked = codes.iter().filter(|c| **c == Code::ResourceExhausted).count();
    assert_eq!(checked + locked, 30, "{codes:?}");
    assert!(checked <= 5, "{checked} guesses were checked: {codes:?}");
    // The password is right, the account locked all the same.
    assert_eq!(login(&mut h, "nina", PASSWORD).await.unwrap_err().code(), Code::ResourceExhausted);

    let admin = admin_token(&mut h).await;
    let request = pb::ListAuditEventsRequest {
        kinds: vec![pb::AuditEventKind::LoginFailed as i32],
        user_id: user.id.clone(),
        ..Default::default()
    };
    let failures = h.client.list_audit_events(authed(request, &admin)).await.unwrap().into_inner().events;
    assert!(failures.len() <= 5, "{} failures verified and audited", failures.len());
    // A login that names nobody is not kept as typed.
    let request = pb::LoginRequest {
        login: "my secret password".into(),
        password: "wrong password!!".into(),
        api_key: String::new(),
    };
    h.client.login(request).await.unwrap_err();
    let request = pb::ListAuditEventsRequest {
        kinds: vec![pb::AuditEventKind::LoginFailed as i32],
        ..Default::default()
    };
    let events = h.client.list_audit_events(authed(request, &admin)).await.unwrap().into_inner().events;
    assert!(!format!("{events:?}").contains("my secret password"), "{events:?}");
}

/// A caller that is not a trusted proxy cannot pose as many addresses: its `x-forwarded-for`
/// is ignored, and its own address is locked after the per-address limit (20).
async fn only_trusted_proxies_say_where_a_call_came_from(env: TestEnv) {
    let mut h = start_with(&env, |s| s.server.trusted_proxies = vec!["192.0.2.1/32".parse().unwrap()]).await;
    register(&mut h, "omar", "omar@example.com", PASSWORD).await.unwrap();
    for i in 0..19 {
        let request = pb::LoginRequest {
            login: format!("nobody{i}"),
            password: "wrong password!!".into(),
            api_key: String::new(),
        };
        let code = h.client.login(from(request, &format!("203.0.113.{i}"))).await.unwrap_err().code();
        assert_eq!(code, Code::Unauthenticated, "attempt {i}");
    }
    let request = pb::LoginRequest {
        login: "nobody-last".into(),
        password: "wrong password!!".into(),
        api_key: String::new(),
    };
    let code = h.client.login(from(request, "198.51.100.200")).await.unwrap_err().code();
    assert_eq!(code, Code::ResourceExhausted, "the caller's own address is locked, whatever it claims");
    let request =
        pb::LoginRequest { login: "omar".into(), password: PASSWORD.into(), api_key: String::new() };
    let code = h.client.login(from(request, "198.51.100.201")).await.unwrap_err().code();
    assert_eq!(code, Code::ResourceExhausted);
}

csp_testkit::backend_tests!(
    only_trusted_proxies_say_where_a_call_came_from,
    concurrent_guesses_cannot_pass_the_lockout_limit,
    malformed_ids_are_invalid_arguments,
    forged_and_stale_tokens_are_refused,
    a_disabled_users_tokens_are_refused,
    refresh_rotation_and_reuse_detection,
    usernames_are_checked_and_normalised,
    passwords_are_checked_before_hashing,
    repeated_failures_lock_the_account_and_the_address,
    administration_and_service_accounts,
    self_signup_follows_its_flag,
);
