//! The keys that sign and verify access tokens.
//!
//! The signing key comes, in order, from `auth.signing_key_file` (PEM PKCS#8 Ed25519), from
//! `auth.secret_key` (derived, so replicas sharing the secret share the key), or — on the
//! embedded default — from `<database.data_dir>/auth-signing-key.pem`, generated on first start
//! with a warning. `auth.verification_key_files` adds the previous keys of a rotation: tokens
//! they signed stay valid until they expire. Key ids are RFC 7638-style thumbprints.

use std::{path::Path, sync::Arc};

use async_trait::async_trait;
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use csp_platform::{
    Settings,
    auth::{Claims, KeySource, PublicKey},
};
use ed25519_dalek::{
    SigningKey, VerifyingKey,
    pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, spki::der::pem::LineEnding},
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};

use crate::error::Error;

/// The signing key and every key that verifies.
#[derive(Clone)]
pub struct KeyRing {
    inner: Arc<Inner>,
}

struct Inner {
    kid: String,
    encoding: EncodingKey,
    published: Vec<PublicKey>,
}

/// A key id: base64url of the SHA-256 of the public key's JWK thumbprint input, 16 characters.
fn kid_of(key: &VerifyingKey) -> String {
    let x = URL_SAFE_NO_PAD.encode(key.as_bytes());
    // RFC 7638 thumbprint input for an OKP key, members in lexicographic order.
    let input = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
    URL_SAFE_NO_PAD.encode(Sha256::digest(input.as_bytes()))[..16].to_owned()
}

/// The shortest `SECRET_KEY` accepted outside the development environment, in bytes.
pub const MIN_SECRET_BYTES: usize = 32;

/// The signing key's seed from `SECRET_KEY`, by HKDF-SHA256 (RFC 5869) with a fixed salt and
/// purpose: a secret under [`MIN_SECRET_BYTES`] is refused outside development (and only
/// warned about there).
fn seed_from_secret(secret: &str, environment: &str) -> Result<[u8; 32], Error> {
    if secret.len() < MIN_SECRET_BYTES {
        if environment != "development" {
            return Err(Error::Config(format!(
                "SECRET_KEY (auth.secret_key) must be at least {MIN_SECRET_BYTES} bytes outside development; use a long random secret"
            )));
        }
        tracing::warn!("SECRET_KEY is shorter than {MIN_SECRET_BYTES} bytes; use a long random secret");
    }
    let mut seed = [0u8; 32];
    hkdf::Hkdf::<Sha256>::new(Some(b"csp-designer"), secret.as_bytes())
        .expand(b"csp-auth access-token signing key (Ed25519 seed)", &mut seed)
        .map_err(|e| Error::Internal(format!("key derivation: {e}")))?;
    Ok(seed)
}

fn public(key: &VerifyingKey) -> PublicKey {
    PublicKey { kid: kid_of(key), x: URL_SAFE_NO_PAD.encode(key.as_bytes()) }
}

impl KeyRing {
    /// Loads (or creates) the keys the settings ask for.
    pub fn load(settings: &Settings) -> Result<Self, Error> {
        let auth = &settings.auth;
        let signing = if let Some(path) = &auth.signing_key_file {
            read_signing_key(path)?
        } else if let Some(secret) = &auth.secret_key {
            SigningKey::from_bytes(&seed_from_secret(secret.expose_secret(), &settings.environment)?)
        } else {
            generated_key(&settings.database.data_dir)?
        };
        let mut ring = Self::from_signing_key(signing)?;
        for path in &auth.verification_key_files {
            let key = read_verifying_key(path)?;
            if let Some(inner) = Arc::get_mut(&mut ring.inner)
                && !inner.published.iter().any(|k| k.kid == kid_of(&key))
            {
                inner.published.push(public(&key));
            }
        }
        Ok(ring)
    }

    /// A ring with one key (tests, benchmarks).
    pub fn from_signing_key(signing: SigningKey) -> Result<Self, Error> {
        let verifying = signing.verifying_key();
        let der = signing
            .to_pkcs8_der()
            .map_err(|e| Error::Internal(format!("the signing key cannot be encoded: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                kid: kid_of(&verifying),
                encoding: EncodingKey::from_ed_der(der.as_bytes()),
                published: vec![public(&verifying)],
            }),
        })
    }

    /// The key id of the signing key.
    pub fn kid(&self) -> &str {
        &self.inner.kid
    }

    /// Signs access-token claims.
    pub fn sign(&self, claims: &Claims) -> Result<String, Error> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.inner.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.inner.encoding)
            .map_err(|e| Error::Internal(format!("signing: {e}")))
    }

    /// The keys that verify tokens, the signing key first.
    pub fn published(&self) -> Vec<PublicKey> {
        self.inner.published.clone()
    }
}

/// The ring as the auth service's own verifier sees it: no network hop.
#[async_trait]
impl KeySource for KeyRing {
    async fn fetch(&self) -> Result<Vec<PublicKey>, String> {
        Ok(self.published())
    }
}

fn read_pem(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|e| Error::Config(format!("auth key file {}: {e}", path.display())))
}

fn read_signing_key(path: &Path) -> Result<SigningKey, Error> {
    SigningKey::from_pkcs8_pem(&read_pem(path)?).map_err(|e| {
        Error::Config(format!(
            "auth.signing_key_file {}: not a PKCS#8 Ed25519 private key ({e})",
            path.display()
        ))
    })
}

fn read_verifying_key(path: &Path) -> Result<VerifyingKey, Error> {
    let pem = read_pem(path)?;
    if let Ok(signing) = SigningKey::from_pkcs8_pem(&pem) {
        return Ok(signing.verifying_key());
    }
    VerifyingKey::from_public_key_pem(&pem).map_err(|e| {
        Error::Config(format!("auth.verification_key_files {}: not an Ed25519 key ({e})", path.display()))
    })
}

/// The embedded default's key: read from the data folder, or generated there.
fn generated_key(data_dir: &Path) -> Result<SigningKey, Error> {
    let path = data_dir.join("auth-signing-key.pem");
    if path.exists() {
        return read_signing_key(&path);
    }
    std::fs::create_dir_all(data_dir)
        .map_err(|e| Error::Config(format!("cannot create {}: {e}", data_dir.display())))?;
    let mut seed = [0u8; 32];
    rand::fill(&mut seed);
    let key = SigningKey::from_bytes(&seed);
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| Error::Internal(format!("encoding a generated key: {e}")))?;
    write_private(&path, pem.as_bytes())?;
    tracing::warn!(
        path = %path.display(),
        "no auth.signing_key_file or SECRET_KEY: generated a token signing key; \
         replicas will not share it — configure one for a cluster"
    );
    Ok(key)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file =
        options.open(path).map_err(|e| Error::Config(format!("cannot write {}: {e}", path.display())))?;
    file.write_all(bytes).map_err(|e| Error::Config(format!("cannot write {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn generated_keys_persist_and_secrets_derive_stable_keys() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = Settings::default();
        settings.database.data_dir = dir.path().to_owned();
        let first = KeyRing::load(&settings).unwrap();
        let again = KeyRing::load(&settings).unwrap();
        assert_eq!(first.kid(), again.kid(), "the generated key is reused after a restart");

        settings.auth.secret_key = Some("a long shared secret for every replica of auth".to_owned().into());
        let a = KeyRing::load(&settings).unwrap();
        let b = KeyRing::load(&settings).unwrap();
        assert_eq!(a.kid(), b.kid());
        assert_ne!(a.kid(), first.kid());
    }

    #[test]
    fn secrets_derive_keys_with_hkdf_and_short_ones_are_refused_in_production() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = Settings::default();
        settings.database.data_dir = dir.path().to_owned();
        let secret = "a long shared secret for every replica of auth";
        settings.auth.secret_key = Some(secret.to_owned().into());
        let ring = KeyRing::load(&settings).unwrap();
        // Not a bare hash of the secret: HKDF-SHA256 with the suite's salt and purpose.
        let bare: [u8; 32] = Sha256::digest(format!("csp-auth-signing-key:{secret}")).into();
        assert_ne!(ring.kid(), kid_of(&SigningKey::from_bytes(&bare).verifying_key()));
        let mut expected = [0u8; 32];
        hkdf::Hkdf::<Sha256>::new(Some(b"csp-designer"), secret.as_bytes())
            .expand(b"csp-auth access-token signing key (Ed25519 seed)", &mut expected)
            .unwrap();
        assert_eq!(ring.kid(), kid_of(&SigningKey::from_bytes(&expected).verifying_key()));

        settings.auth.secret_key = Some("too short for production".to_owned().into());
        assert!(KeyRing::load(&settings).is_ok(), "development only warns");
        settings.environment = "production".into();
        let refused = KeyRing::load(&settings).err().unwrap().to_string();
        assert!(refused.contains("at least 32 bytes"), "{refused}");
        assert!(!refused.contains("too short for production"), "the secret is not echoed: {refused}");
    }

    #[test]
    fn rotation_publishes_the_previous_key_too() {
        let dir = tempfile::tempdir().unwrap();
        let old = SigningKey::from_bytes(&[7; 32]);
        let new = SigningKey::from_bytes(&[9; 32]);
        std::fs::write(dir.path().join("old.pem"), old.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes())
            .unwrap();
        std::fs::write(dir.path().join("new.pem"), new.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes())
            .unwrap();
        let mut settings = Settings::default();
        settings.auth.signing_key_file = Some(dir.path().join("new.pem"));
        settings.auth.verification_key_files = vec![dir.path().join("old.pem")];
        let ring = KeyRing::load(&settings).unwrap();
        let kids: Vec<String> = ring.published().into_iter().map(|k| k.kid).collect();
        assert_eq!(kids, [kid_of(&new.verifying_key()), kid_of(&old.verifying_key())]);
        assert_eq!(ring.kid(), kids[0]);
    }
}
