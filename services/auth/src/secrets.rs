//! Random secrets (refresh tokens, API keys) and how they are stored: a SHA-256 digest. They
//! carry 256 random bits, so a fast hash is enough; only passwords need argon2.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use sha2::{Digest, Sha256};

/// Prefix of API keys, so they are recognisable in configuration and secret scanners.
pub(crate) const API_KEY_PREFIX: &str = "cspk_";

/// A new refresh token.
pub(crate) fn refresh_token() -> String {
    random_text()
}

/// A new API key secret and the prefix shown to people.
pub(crate) fn api_key() -> (String, String) {
    let secret = format!("{API_KEY_PREFIX}{}", random_text());
    let prefix = secret[..API_KEY_PREFIX.len() + 6].to_owned();
    (secret, prefix)
}

/// How a secret is stored and looked up.
pub(crate) fn digest(secret: &str) -> String {
    Sha256::digest(secret.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

fn random_text() -> String {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_random_and_digests_stable() {
        assert_ne!(refresh_token(), refresh_token());
        let (key, prefix) = api_key();
        assert!(key.starts_with(API_KEY_PREFIX) && key.starts_with(&prefix) && key.len() > 40);
        assert_eq!(digest("x"), digest("x"));
        assert_eq!(digest("x").len(), 64);
    }
}
