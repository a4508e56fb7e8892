//! What one run of a jq filter on one message may spend, and how a run that spends more is
//! stopped.
//!
//! jaq evaluates a filter by running one term after another, and every term it runs asks the
//! run's data for the filter's lookup table first. The data here is a [`Run`] whose lookup
//! counts as one step: each step checks the depth of the stack and the memory the run holds,
//! and every [`CHECK_EVERY`] steps the clock and whether the caller has stopped the run. A run
//! over its budget is unwound out of jaq with [`std::panic::resume_unwind`] (no panic hook, no
//! message) and [`guarded`] turns the unwinding into an [`Exhausted`] — the way salsa cancels
//! queries. `range/3`, the one built-in generator that yields without running terms, is
//! replaced by one that takes a step per value, so `[range(1e18)]` is stopped too.

use std::{
    cell::Cell,
    fmt,
    panic::AssertUnwindSafe,
    time::{Duration, Instant},
};

use jaq_core::{DataT, Lut, data::HasLut};
use jaq_json::Val;

/// What one run of a filter on one input may spend before it is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock time.
    pub time: Duration,
    /// Bytes the run may allocate and hold at once (measured where the process's global
    /// allocator is `csp_alloc::Counting`; otherwise not bounded).
    pub memory: usize,
    /// Outputs.
    pub outputs: usize,
    /// Bytes of stack the run may use below where it starts (deep recursion).
    pub stack: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { time: Duration::from_secs(1), memory: 256 << 20, outputs: 100_000, stack: 512 << 10 }
    }
}

/// Why a run was stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exhausted {
    /// It ran longer than [`Limits::time`].
    Time,
    /// It held more than [`Limits::memory`].
    Memory,
    /// It produced more than [`Limits::outputs`].
    Outputs,
    /// It recursed deeper than [`Limits::stack`] allows.
    Depth,
    /// The caller stopped it (the execution was cancelled).
    Stopped,
}

impl Exhausted {
    /// What happened, with the limit that was reached.
    pub fn describe(self, limits: &Limits) -> String {
        match self {
            Self::Time => format!("the expression ran longer than {} ms", limits.time.as_millis()),
            Self::Memory => format!("the expression held more than {} MiB", limits.memory >> 20),
            Self::Outputs => format!("the expression produced more than {} results", limits.outputs),
            Self::Depth => "the expression recursed too deeply".to_owned(),
            Self::Stopped => "the expression was stopped".to_owned(),
        }
    }
}

/// The clock and the stop check run once per this many steps (the stack and memory checks
/// on every step: memory can double in one).
const CHECK_EVERY: u32 = 64;

/// The meter of one run.
pub(crate) struct Meter<'s> {
    limits: Limits,
    deadline: Instant,
    stop: &'s dyn Fn() -> bool,
    memory_base: isize,
    stack_base: usize,
    steps: Cell<u32>,
}

impl<'s> Meter<'s> {
    pub(crate) fn new(limits: Limits, stop: &'s dyn Fn() -> bool) -> Self {
        Self {
            limits,
            deadline: Instant::now() + limits.time,
            stop,
            memory_base: csp_alloc::net_allocated(),
            stack_base: stack_position(),
            steps: Cell::new(0),
        }
    }

    /// One step of the run; unwinds out of it when it is over its budget.
    pub(crate) fn step(&self) {
        if self.stack_base.saturating_sub(stack_position()) > self.limits.stack {
            throw(Exhausted::Depth);
        }
        if csp_alloc::net_allocated().saturating_sub(self.memory_base) > self.limits.memory as isize {
            throw(Exhausted::Memory);
        }
        let steps = self.steps.get().wrapping_add(1);
        self.steps.set(steps);
        if steps.is_multiple_of(CHECK_EVERY) {
            if (self.stop)() {
                throw(Exhausted::Stopped);
            }
            if Instant::now() >= self.deadline {
                throw(Exhausted::Time);
            }
        }
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }
}

/// Where this thread's stack is now (stacks grow down on every platform this runs on).
#[inline(always)]
fn stack_position() -> usize {
    let here = 0u8;
    std::hint::black_box(std::ptr::addr_of!(here)) as usize
}

fn throw(why: Exhausted) -> ! {
    std::panic::resume_unwind(Box::new(why))
}

/// Runs `f`, which steps a [`Meter`]; a run stopped by the meter is `Err`. A panic that is not
/// the meter's (a defect in jaq) is an error too, rather than the end of the thread.
pub(crate) fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, Stopped> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|payload| match payload.downcast::<Exhausted>() {
        Ok(why) => Stopped::Exhausted(*why),
        Err(_) => Stopped::Panicked,
    })
}

/// Why [`guarded`] returned early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stopped {
    Exhausted(Exhausted),
    Panicked,
}

impl Stopped {
    pub(crate) fn describe(self, limits: &Limits) -> String {
        match self {
            Self::Exhausted(why) => why.describe(limits),
            Self::Panicked => "the expression failed inside the jq engine".to_owned(),
        }
    }
}

/// jaq's data for a metered run: values are JSON values, and every look at the lookup table
/// is a step.
pub(crate) struct Metered;

impl DataT for Metered {
    type V<'a> = Val;
    type Data<'a> = Run<'a>;
}

/// The data of one run: the filter's lookup table and the run's meter.
#[derive(Clone)]
pub(crate) struct Run<'a> {
    pub(crate) lut: &'a Lut<Metered>,
    pub(crate) meter: &'a Meter<'a>,
}

impl<'a> HasLut<'a, Metered> for Run<'a> {
    fn lut(&self) -> &'a Lut<Metered> {
        self.meter.step();
        self.lut
    }
}

impl fmt::Debug for Run<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("jq::Run")
    }
}

/// `range($from; $to; $by)` as jaq's own (values from `$from` by `$by` while short of
/// `$to`), with a step per value.
pub(crate) fn range() -> jaq_core::native::Fun<Metered> {
    jaq_core::native::run(("range", jaq_core::native::v(3), |mut cv| {
        use std::cmp::Ordering::{Equal, Greater, Less};
        let meter = cv.0.data().meter;
        let by = cv.0.pop_var();
        let to = cv.0.pop_var();
        let from = cv.0.pop_var();
        let direction = by.partial_cmp(&Val::from(0isize)).unwrap_or(Equal);
        let mut next: Result<Val, jaq_core::Exn<'_, Val>> = Ok(from);
        Box::new(std::iter::from_fn(move || {
            meter.step();
            match next.clone() {
                Ok(x) => {
                    let more = match direction {
                        Greater => x < to,
                        Less => x > to,
                        Equal => x != to,
                    };
                    more.then(|| std::mem::replace(&mut next, (x + by.clone()).map_err(jaq_core::Exn::from)))
                }
                Err(e) => {
                    // One error, then nothing.
                    next = Ok(to.clone());
                    Some(Err(e))
                }
            }
        }))
    }))
}
