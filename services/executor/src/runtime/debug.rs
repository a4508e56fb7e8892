//! Breakpoints: a message reaching a breakpoint node waits there until the user resumes or
//! steps. One message is held at a time; others reaching breakpoints meanwhile queue behind it.
//!
//! - Resume lets the held message through and runs until a message reaches a breakpoint.
//! - Step lets it through and pauses at the next message any node takes (single-stepping
//!   through the network, hop by hop).

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
};

use serde_json::Value;
use tokio::sync::Notify;

/// A message held at a breakpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Paused {
    /// The node holding it.
    pub node_id: String,
    /// The input port it arrived on.
    pub port: String,
    /// The message.
    pub payload: Value,
}

#[derive(Debug, Default)]
struct State {
    breakpoints: HashSet<String>,
    stepping: bool,
    paused: Option<Paused>,
    releases: u64,
}

/// Why a debugger command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the execution is not paused")]
pub struct NotPaused;

/// The breakpoints of one execution and the message held at one.
#[derive(Debug, Default)]
pub struct Debugger {
    /// Breakpoints set or stepping: nodes must ask before each message.
    active: AtomicBool,
    state: Mutex<State>,
    /// Held by the node holding a message.
    slot: tokio::sync::Mutex<()>,
    released: Notify,
    /// Wakes whoever waits for the execution to pause.
    pub(crate) changed: Notify,
}

impl Debugger {
    /// A debugger with these breakpoints (node ids).
    pub fn new(breakpoints: impl IntoIterator<Item = String>) -> Arc<Self> {
        let breakpoints: HashSet<String> = breakpoints.into_iter().collect();
        Arc::new(Self {
            active: AtomicBool::new(!breakpoints.is_empty()),
            state: Mutex::new(State { breakpoints, ..State::default() }),
            ..Self::default()
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a message reaching `node_id` must stop there. One atomic load when no breakpoint
    /// is set.
    #[inline]
    pub(crate) fn stops_at(&self, node_id: &str) -> bool {
        self.active.load(Ordering::Relaxed) && {
            let state = self.lock();
            state.stepping || state.breakpoints.contains(node_id)
        }
    }

    /// Holds a message at `node_id` until released. `on_pause` runs once it is held (to report
    /// it), `on_release` once it is let through.
    pub(crate) async fn hold(
        &self,
        paused: Paused,
        on_pause: impl std::future::Future<Output = ()>,
        on_release: impl std::future::Future<Output = ()>,
    ) {
        let _slot = self.slot.lock().await;
        if !self.stops_at(&paused.node_id) {
            return; // released for good while waiting for the slot
        }
        let releases = {
            let mut state = self.lock();
            state.paused = Some(paused);
            state.releases
        };
        self.changed.notify_waiters();
        on_pause.await;
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.lock().releases != releases {
                break;
            }
            notified.await;
        }
        self.lock().paused = None;
        on_release.await;
    }

    /// The message held, if any.
    pub fn paused(&self) -> Option<Paused> {
        self.lock().paused.clone()
    }

    fn release(&self, stepping: bool, clear: bool) -> Result<(), NotPaused> {
        {
            let mut state = self.lock();
            if state.paused.take().is_none() {
                return Err(NotPaused);
            }
            state.stepping = stepping;
            if clear {
                state.breakpoints.clear();
            }
            self.active.store(state.stepping || !state.breakpoints.is_empty(), Ordering::Relaxed);
            state.releases += 1;
        }
        self.released.notify_waiters();
        self.changed.notify_waiters();
        Ok(())
    }

    /// Lets the held message through; runs until the next breakpoint (or to the end, with
    /// `clear_breakpoints`).
    pub fn resume(&self, clear_breakpoints: bool) -> Result<(), NotPaused> {
        self.release(false, clear_breakpoints)
    }

    /// Lets the held message through and pauses at the next message any node takes.
    pub fn step(&self) -> Result<(), NotPaused> {
        self.release(true, false)
    }

    /// Releases everything for good (cancellation).
    pub(crate) fn disarm(&self) {
        {
            let mut state = self.lock();
            state.stepping = false;
            state.breakpoints.clear();
            state.releases += 1;
        }
        self.active.store(false, Ordering::Relaxed);
        self.released.notify_waiters();
    }
}
