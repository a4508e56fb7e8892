//! Rules for usernames, emails, display names and passwords.
//!
//! Usernames are NFKC-normalised and compared case-insensitively, so `Alice`, `ALICE`,
//! `Ａｌｉｃｅ` (full width) and a decomposed `Åsa` vs a composed one are the same account.
//! Passwords: at least `auth.password_min_length` characters, at most [`MAX_PASSWORD_BYTES`]
//! bytes (checked before any hashing), not containing the username, not one of the common
//! passwords bundled with zxcvbn, and not trivially guessable.

use csp_platform::error::FieldViolation;
use unicode_normalization::UnicodeNormalization as _;

/// Longest password accepted, in bytes. Longer input is refused before hashing.
pub(crate) const MAX_PASSWORD_BYTES: usize = 1024;
const USERNAME_CHARS: std::ops::RangeInclusive<usize> = 3..=64;
const MAX_EMAIL_BYTES: usize = 254;
const MAX_DISPLAY_NAME_CHARS: usize = 100;

/// A valid username: as chosen (normalised) and the key uniqueness compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Username {
    pub(crate) display: String,
    pub(crate) key: String,
}

/// The comparison key of a username or email typed at login.
pub(crate) fn login_key(login: &str) -> String {
    login.trim().nfkc().collect::<String>().to_lowercase()
}

/// Checks and normalises a username.
pub(crate) fn username(raw: &str, field: &str) -> Result<Username, FieldViolation> {
    let display: String = raw.nfkc().collect();
    let count = display.chars().count();
    if display.chars().any(char::is_control) {
        return Err(FieldViolation::new(field, "must not contain control characters"));
    }
    if !USERNAME_CHARS.contains(&count) {
        return Err(FieldViolation::new(
            field,
            format!("must be {} to {} characters", USERNAME_CHARS.start(), USERNAME_CHARS.end()),
        ));
    }
    if let Some(bad) = display.chars().find(|c| !(c.is_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(FieldViolation::new(
            field,
            format!("may contain letters, digits, '.', '_' and '-' only (found {bad:?})"),
        ));
    }
    let key = display.to_lowercase();
    Ok(Username { display, key })
}

/// A valid email address and its comparison key.
pub(crate) fn email(raw: &str, field: &str) -> Result<(String, String), FieldViolation> {
    let email = raw.trim();
    let invalid = || FieldViolation::new(field, "must be an email address like name@example.com");
    if email.is_empty()
        || email.len() > MAX_EMAIL_BYTES
        || email.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(invalid());
    }
    let (local, domain) = email.rsplit_once('@').ok_or_else(invalid)?;
    if local.is_empty() || local.len() > 64 || local.contains('@') || !domain.contains('.') {
        return Err(invalid());
    }
    if domain.starts_with('.') || domain.ends_with('.') || domain.contains("..") {
        return Err(invalid());
    }
    Ok((email.to_owned(), email.to_lowercase()))
}

/// A valid display name (defaults to the username).
pub(crate) fn display_name(raw: &str, username: &Username, field: &str) -> Result<String, FieldViolation> {
    let name: String = raw.trim().nfkc().collect();
    if name.is_empty() {
        return Ok(username.display.clone());
    }
    if name.chars().any(char::is_control) {
        return Err(FieldViolation::new(field, "must not contain control characters"));
    }
    if name.chars().count() > MAX_DISPLAY_NAME_CHARS {
        return Err(FieldViolation::new(
            field,
            format!("must be at most {MAX_DISPLAY_NAME_CHARS} characters"),
        ));
    }
    Ok(name)
}

/// Cheap checks done before anything else (and before any hashing): present, not huge.
pub(crate) fn password_shape(password: &str, field: &str) -> Result<(), FieldViolation> {
    if password.is_empty() {
        return Err(FieldViolation::new(field, "is required"));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(FieldViolation::new(field, format!("must be at most {MAX_PASSWORD_BYTES} bytes")));
    }
    Ok(())
}

/// The full policy for a new password. Returns every rule it breaks.
pub(crate) fn new_password(
    password: &str,
    username: &Username,
    email_key: Option<&str>,
    min_chars: usize,
    field: &str,
) -> Vec<FieldViolation> {
    if let Err(violation) = password_shape(password, field) {
        return vec![violation];
    }
    let mut violations = Vec::new();
    if password.chars().count() < min_chars {
        violations.push(FieldViolation::new(field, format!("must be at least {min_chars} characters")));
    }
    let folded = login_key(password);
    if folded.contains(&username.key) {
        violations.push(FieldViolation::new(field, "must not contain the username"));
    }
    if let Some(local) = email_key.and_then(|e| e.split('@').next()).filter(|l| l.chars().count() >= 4)
        && folded.contains(local)
    {
        violations.push(FieldViolation::new(field, "must not contain the email address"));
    }
    let entropy = zxcvbn::zxcvbn(password, &[username.key.as_str()]);
    let whole = password.chars().count();
    let common = entropy.sequence().iter().any(|m| {
        m.i == 0
            && m.j + 1 == whole
            // zxcvbn does not export its dictionary enum; its Debug name identifies the list.
            && matches!(&m.pattern, zxcvbn::matching::patterns::MatchPattern::Dictionary(d)
                if format!("{:?}", d.dictionary_name) == "Passwords")
    });
    if common {
        violations.push(FieldViolation::new(field, "is one of the most common passwords"));
    } else if violations.is_empty() && u8::from(entropy.score()) < 2 {
        let hint = entropy.feedback().and_then(|f| f.warning()).map(|w| format!(": {w}")).unwrap_or_default();
        violations.push(FieldViolation::new(field, format!("is too easy to guess{hint}")));
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_normalise_to_one_key() {
        let key = |s: &str| username(s, "username").map(|u| u.key);
        let alice = key("Alice").unwrap();
        assert_eq!(key("ALICE").unwrap(), alice);
        assert_eq!(key("Ａｌｉｃｅ").unwrap(), alice, "full-width letters fold under NFKC");
        assert_eq!(key("A\u{30a}sa").unwrap(), key("\u{c5}sa").unwrap(), "decomposed and composed Å");
        assert_eq!(username("Ｂｏｂ", "username").unwrap().display, "Bob");
    }

    #[test]
    fn bad_usernames_say_why() {
        let why = |s: &str| username(s, "username").unwrap_err().description;
        assert!(why("ab").contains("3 to 64"));
        assert!(why(&"x".repeat(65)).contains("3 to 64"));
        assert!(why("bob\u{7}").contains("control"));
        assert!(why("bob\n").contains("control"));
        assert!(why("bob smith").contains("letters, digits"));
        assert!(why("bob@x").contains("letters, digits"));
        assert!(username("jöns.o'b", "username").is_err());
        assert!(username("jöns.o-b_2", "username").is_ok());
    }

    #[test]
    fn emails_are_checked_and_folded() {
        assert_eq!(
            email(" Ann@Example.COM ", "email").unwrap(),
            ("Ann@Example.COM".into(), "ann@example.com".into())
        );
        for bad in ["", "ann", "ann@", "@x.com", "ann@localhost", "a b@x.com", "ann@x..com", "ann@.x.com"] {
            assert!(email(bad, "email").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn password_policy() {
        let user = username("alice", "username").unwrap();
        let rules = |p: &str| -> Vec<String> {
            new_password(p, &user, Some("alice.smith@example.com"), 12, "password")
                .into_iter()
                .map(|v| v.description)
                .collect()
        };
        assert!(rules("").iter().any(|r| r == "is required"));
        assert!(rules(&"x".repeat(MAX_PASSWORD_BYTES + 1)).iter().any(|r| r.contains("at most")));
        assert!(rules("short").iter().any(|r| r.contains("at least 12")));
        assert!(rules("my-alice-is-long-enough").iter().any(|r| r.contains("username")));
        assert!(rules("xx-ALICE.SMITH-99-zz").iter().any(|r| r.contains("email")));
        assert!(
            rules("password1234").iter().any(|r| r.contains("most common")),
            "{:?}",
            rules("password1234")
        );
        assert!(
            rules("aaaaaaaaaaaaaaaa").iter().any(|r| r.contains("too easy")),
            "{:?}",
            rules("aaaaaaaaaaaaaaaa")
        );
        assert!(
            rules("correct horse battery staple").is_empty(),
            "{:?}",
            rules("correct horse battery staple")
        );
        assert!(rules("Tr1cky-Lantern-Oboe-42").is_empty());
    }
}
