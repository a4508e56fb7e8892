//! Access-token revocations, from the auth service to every verifier.
//!
//! Access tokens are verified locally, so a user disabled (or whose password changed) would
//! keep working until their tokens expire. Instead the auth service appends "tokens of this user
//! issued before this millisecond are void" to the [`STREAM`] stream, and every process follows it
//! into its [`Verifier`]. The stream keeps the last [`CAP`] entries: far more than can happen
//! within an access token's lifetime, after which a revocation no longer matters.

use std::time::Duration;

use std::sync::Arc;

use csp_platform::{
    Settings,
    auth::{RemoteKeys, Verifier},
    config::ConfigError,
};
use futures::StreamExt as _;

use crate::{EventId, NewEvent, Result, SharedBus};

/// The stream of revocations.
pub const STREAM: &str = "auth:revocations";
/// Revocations kept.
pub const CAP: u64 = 100_000;

/// How often verifiers refresh the published keys (rotations are picked up sooner on the
/// first token with an unknown key id).
const KEY_REFRESH: Duration = Duration::from_secs(300);

/// A verifier of a service other than auth: keys from the auth service, revocations from the
/// bus, both kept up to date by background tasks.
pub fn remote_verifier(settings: &Settings, bus: SharedBus) -> std::result::Result<Verifier, ConfigError> {
    let verifier = Verifier::new(Arc::new(RemoteKeys::new(settings)?));
    tokio::spawn(verifier.clone().keep_keys_fresh(KEY_REFRESH));
    tokio::spawn(follow(bus, verifier.clone()));
    Ok(verifier)
}

/// Voids the tokens of `user_id` issued before `not_before_ms` (milliseconds since the epoch).
pub async fn publish(bus: &SharedBus, user_id: &str, not_before_ms: i64) -> Result<EventId> {
    let event = NewEvent::new(not_before_ms.to_string()).header("user", user_id).with_trace_context();
    bus.append(STREAM, event, Some(CAP)).await
}

/// Applies every revocation kept, then new ones as they come, to `verifier`; run it as a task.
/// Reconnects (resuming where it stopped) when the bus fails.
pub async fn follow(bus: SharedBus, verifier: Verifier) {
    let mut after: Option<EventId> = Some(EventId::ZERO);
    loop {
        let mut stream = match bus.tail(STREAM, after).await {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(%error, "cannot follow token revocations; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(item) = stream.next().await {
            match item {
                Ok(event) => {
                    after = Some(event.id);
                    let not_before =
                        std::str::from_utf8(&event.payload).ok().and_then(|s| s.parse::<i64>().ok());
                    match (event.headers.get("user"), not_before) {
                        (Some(user), Some(not_before)) => verifier.revoke(user, not_before),
                        _ => tracing::warn!(id = %event.id, "ignoring a malformed revocation"),
                    }
                }
                Err(crate::BusError::Truncated { trimmed_up_to, .. }) => {
                    // Older revocations were trimmed: continue with the oldest kept.
                    after = Some(trimmed_up_to);
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, "token revocations interrupted; resuming");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    break;
                }
            }
        }
    }
}
