//! Locking accounts and client addresses after repeated failed logins.
//!
//! Failures are counted per account and per client address in a fixed window
//! (`auth.lockout.window`) on the shared counters (Redis in a cluster, memory on the embedded
//! default). Reaching the limit locks for `auth.lockout.duration`; a successful login clears the
//! account's failures.

use std::time::Duration;

use csp_bus::SharedBus;
use csp_platform::config::LockoutSettings;

use crate::error::Error;

/// What a failure led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Still below the limits.
    Counted,
    /// This failure locked the account and/or the address.
    Locked { account: bool, address: bool },
}

pub(crate) struct Lockout {
    counters: SharedBus,
    settings: LockoutSettings,
}

impl Lockout {
    pub(crate) fn new(counters: SharedBus, settings: LockoutSettings) -> Self {
        Self { counters, settings }
    }

    /// `Err(Locked(retry_after))` while the account or the address is locked.
    pub(crate) async fn check(&self, account: &str, address: &str) -> Result<(), Error> {
        let account_lock = self.counters.ttl(&lock_key("account", account)).await?;
        let address_lock = self.counters.ttl(&lock_key("address", address)).await?;
        match account_lock.into_iter().chain(address_lock).max() {
            Some(remaining) => Err(Error::Locked(remaining.max(Duration::from_secs(1)))),
            None => Ok(()),
        }
    }

    /// Counts a failure of `account` from `address`.
    pub(crate) async fn failed(&self, account: &str, address: &str) -> Result<Outcome, Error> {
        let window = self.settings.window;
        let account_failures = self.counters.hit(&fail_key("account", account), window).await?;
        let address_failures = self.counters.hit(&fail_key("address", address), window).await?;
        let lock_account = account_failures >= u64::from(self.settings.max_failures);
        let lock_address = address_failures >= u64::from(self.settings.max_failures_per_address);
        if lock_account {
            self.counters.set(&lock_key("account", account), 1, self.settings.duration).await?;
            self.counters.reset(&fail_key("account", account)).await?;
        }
        if lock_address {
            self.counters.set(&lock_key("address", address), 1, self.settings.duration).await?;
            self.counters.reset(&fail_key("address", address)).await?;
        }
        Ok(if lock_account || lock_address {
            Outcome::Locked { account: lock_account, address: lock_address }
        } else {
            Outcome::Counted
        })
    }

    /// Clears the account's failures after a successful login.
    pub(crate) async fn succeeded(&self, account: &str) -> Result<(), Error> {
        self.counters.reset(&fail_key("account", account)).await?;
        Ok(())
    }

    /// How long a lock lasts.
    pub(crate) fn duration(&self) -> Duration {
        self.settings.duration
    }
}

fn fail_key(scope: &str, id: &str) -> String {
    format!("auth:failures:{scope}:{id}")
}

fn lock_key(scope: &str, id: &str) -> String {
    format!("auth:lock:{scope}:{id}")
}
