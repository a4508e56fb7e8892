//! Password hashing: argon2id at the configured cost, on the blocking pool.
//!
//! A login for an unknown user verifies against a dummy hash of the same cost, so it takes as
//! long as a login with a wrong password for a real user: response times do not reveal which
//! usernames exist. [`Passwords::verifications`] counts verifications, which lets tests prove
//! it instead of timing it.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use argon2::{
    Algorithm, Argon2, Params, Version,
    password_hash::{PasswordHasher as _, PasswordVerifier as _, phc::PasswordHash},
};
use csp_platform::config::Argon2Settings;

use crate::error::Error;

/// Hashes and verifies passwords. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Passwords {
    inner: Arc<Inner>,
}

struct Inner {
    argon: Argon2<'static>,
    dummy: String,
    verifications: AtomicU64,
}

impl Passwords {
    pub(crate) fn new(settings: &Argon2Settings) -> Result<Self, Error> {
        let params = Params::new(settings.memory_kib, settings.iterations, settings.parallelism, None)
            .map_err(|e| Error::Internal(format!("argon2 parameters: {e}")))?;
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        metrics::describe_counter!(
            "csp_auth_password_verifications_total",
            "argon2 password verifications (one per login attempt, known user or not)"
        );
        let dummy = argon
            .hash_password(b"a password nobody has; only its cost matters")
            .map_err(|e| Error::Internal(format!("argon2: {e}")))?
            .to_string();
        Ok(Self { inner: Arc::new(Inner { argon, dummy, verifications: AtomicU64::new(0) }) })
    }

    /// Hashes a password into a PHC string.
    pub(crate) async fn hash(&self, password: String) -> Result<String, Error> {
        let inner = self.inner.clone();
        blocking(move || {
            inner
                .argon
                .hash_password(password.as_bytes())
                .map(|h| h.to_string())
                .map_err(|e| Error::Internal(format!("argon2: {e}")))
        })
        .await?
    }

    /// Whether `password` matches `hash`; with no hash (unknown user, service account) the
    /// dummy is verified so the call costs the same, and the answer is `false`.
    pub(crate) async fn verify(&self, password: String, hash: Option<String>) -> Result<bool, Error> {
        let inner = self.inner.clone();
        blocking(move || {
            inner.verifications.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("csp_auth_password_verifications_total").increment(1);
            let (phc, real) = match &hash {
                Some(hash) => (hash.as_str(), true),
                None => (inner.dummy.as_str(), false),
            };
            let parsed = PasswordHash::new(phc)
                .map_err(|e| Error::Internal(format!("stored hash unreadable: {e}")))?;
            Ok(inner.argon.verify_password(password.as_bytes(), &parsed).is_ok() && real)
        })
        .await?
    }

    /// Verifications performed so far.
    #[cfg(test)]
    pub(crate) fn verifications(&self) -> u64 {
        self.inner.verifications.load(Ordering::Relaxed)
    }
}

/// Runs CPU-heavy work on the blocking pool, inside the current span.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, Error> {
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(work))
        .await
        .map_err(|e| Error::Internal(format!("hashing task failed: {e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn cheap() -> Passwords {
        Passwords::new(&Argon2Settings { memory_kib: 64, iterations: 1, parallelism: 1 }).unwrap()
    }

    #[tokio::test]
    async fn hashes_verify_and_unknown_users_cost_one_verification() {
        let passwords = cheap();
        let hash = passwords.hash("correct horse battery staple".into()).await.unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(passwords.verify("correct horse battery staple".into(), Some(hash.clone())).await.unwrap());
        assert!(!passwords.verify("wrong".into(), Some(hash)).await.unwrap());
        let before = passwords.verifications();
        // The dummy hash's own password never matches for a missing user.
        assert!(
            !passwords.verify("a password nobody has; only its cost matters".into(), None).await.unwrap()
        );
        assert_eq!(passwords.verifications(), before + 1);
    }
}
