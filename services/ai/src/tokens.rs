//! Token counts, estimated with `tiktoken-rs` (`o200k_base`) when a provider gives none, and
//! for worst-case reservations before a call.

use std::sync::OnceLock;

use tiktoken_rs::CoreBPE;

use crate::model::Message;

/// Tokens a message costs beyond its text (role and framing, as OpenAI counts them).
const PER_MESSAGE: u64 = 4;

fn bpe() -> Option<&'static CoreBPE> {
    static BPE: OnceLock<Option<CoreBPE>> = OnceLock::new();
    BPE.get_or_init(|| tiktoken_rs::o200k_base().ok()).as_ref()
}

/// Tokens of a text.
pub(crate) fn count(text: &str) -> u64 {
    match bpe() {
        Some(bpe) => bpe.encode_ordinary(text).len() as u64,
        // Tables unavailable: about four characters a token.
        None => (text.chars().count() as u64).div_ceil(4),
    }
}

/// Tokens of one message as sent.
pub(crate) fn message(m: &Message) -> u64 {
    PER_MESSAGE
        + count(&m.content)
        + m.tool_calls.iter().map(|c| count(&c.name) + count(&c.arguments)).sum::<u64>()
}

/// Tokens of messages as sent.
pub(crate) fn messages(messages: &[Message]) -> u64 {
    messages.iter().map(message).sum::<u64>() + 3
}

/// Loads the tables now, so the first request does not pay for it.
pub(crate) fn warm_up() {
    let _ = bpe();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Role;

    #[test]
    fn counts_are_plausible() {
        assert_eq!(count(""), 0);
        let hello = count("Hello, world!");
        assert!((2..=6).contains(&hello), "{hello}");
        let long = count(&"word ".repeat(1000));
        assert!((900..=1100).contains(&long), "{long}");
        assert!(messages(&[Message::new(Role::User, "Hello, world!")]) > hello);
    }
}
