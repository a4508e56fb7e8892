//! Locking accounts and client addresses after repeated failed logins.
//!
//! Failures are counted per account and per client address in a fixed window
//! (`auth.lockout.window`) on the shared counters (Redis in a cluster, memory on the embedded
//! default). Reaching the limit locks for `auth.lockout.duration`; a successful login clears the
//! account's failures.
//!
//! A password login counts its attempt *before* the (slow) password check, as a reservation
//! that can never pass the limits, however many guesses arrive at once on however many
//! replicas: a guess that finds the budget spent is refused unverified. A success gives its
//! reservation back.

use std::time::Duration;

use csp_bus::{Adjust, Claim, Reserved, SharedBus};
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

    /// Reserves one failure of `account` from `address` before its password is checked:
    /// `Err(Locked)` when that would pass a limit (the password is then not checked at all).
    /// Settle it with [`settle`](Self::settle).
    pub(crate) async fn attempt(&self, account: &str, address: &str) -> Result<(), Error> {
        self.check(account, address).await?;
        let window = self.settings.window;
        let claims = [
            Claim {
                key: fail_key("account", account),
                amount: 1,
                limit: u64::from(self.settings.max_failures),
                ttl: window,
            },
            Claim {
                key: fail_key("address", address),
                amount: 1,
                limit: u64::from(self.settings.max_failures_per_address),
                ttl: window,
            },
        ];
        match self.counters.reserve(&claims).await? {
            Reserved::Granted => Ok(()),
            Reserved::Refused(_) => Err(Error::Locked(self.settings.duration)),
        }
    }

    /// Settles an [`attempt`](Self::attempt): a success gives the reservation back and clears
    /// the account's failures; a failure keeps it, and locks what reached its limit.
    pub(crate) async fn settle(
        &self,
        account: &str,
        address: &str,
        succeeded: bool,
    ) -> Result<Outcome, Error> {
        let window = self.settings.window;
        if succeeded {
            let give_back = [Adjust { key: fail_key("address", address), delta: -1, ttl: window }];
            self.counters.adjust(&give_back).await?;
            self.succeeded(account).await?;
            return Ok(Outcome::Counted);
        }
        let account_failures = self.counters.count(&fail_key("account", account)).await?;
        let address_failures = self.counters.count(&fail_key("address", address)).await?;
        self.lock_reached(account, address, account_failures, address_failures).await
    }

    async fn lock_reached(
        &self,
        account: &str,
        address: &str,
        account_failures: u64,
        address_failures: u64,
    ) -> Result<Outcome, Error> {
        let lock_account = account_failures >= u64::from(self.settings.max_failures);
        let lock_address = address_failures >= u64::from(self.settings.max_failures_per_address);
        // The failure counts are left to their window: reset here, they would admit the
        // guesses already past the lock check to the password check again.
        if lock_account {
            self.counters.set(&lock_key("account", account), 1, self.settings.duration).await?;
        }
        if lock_address {
            self.counters.set(&lock_key("address", address), 1, self.settings.duration).await?;
        }
        Ok(if lock_account || lock_address {
            Outcome::Locked { account: lock_account, address: lock_address }
        } else {
            Outcome::Counted
        })
    }

    /// Counts a failure of `account` from `address`.
    pub(crate) async fn failed(&self, account: &str, address: &str) -> Result<Outcome, Error> {
        let window = self.settings.window;
        let account_failures = self.counters.hit(&fail_key("account", account), window).await?;
        let address_failures = self.counters.hit(&fail_key("address", address), window).await?;
        self.lock_reached(account, address, account_failures, address_failures).await
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
