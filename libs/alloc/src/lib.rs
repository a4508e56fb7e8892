//! What a thread has allocated and not yet freed, for the memory bound of jq runs.
//!
//! A process that wants jq runs bounded by memory installs [`Counting`] as its global
//! allocator (the `csp` binary does). Without it [`net_allocated`] never moves and runs are
//! bounded by time, outputs and depth only.

#![allow(unsafe_code)]

use std::{
    alloc::{GlobalAlloc, Layout},
    cell::Cell,
};

thread_local! {
    /// Bytes allocated minus bytes freed on this thread (frees of memory another thread
    /// allocated count too, so only differences over a stretch of one thread's work mean
    /// anything).
    static NET: Cell<isize> = const { Cell::new(0) };
}

fn add(bytes: isize) {
    // A thread-local without a destructor is there until the thread ends; `try_with` only
    // guards against the allocator being called while the thread is torn down.
    let _ = NET.try_with(|net| net.set(net.get().wrapping_add(bytes)));
}

/// This thread's allocated-minus-freed byte count (see [`Counting`]).
pub fn net_allocated() -> isize {
    NET.try_with(Cell::get).unwrap_or(0)
}

/// A global allocator that counts, per thread, what it hands out and takes back, and
/// otherwise does what the allocator it wraps does.
#[derive(Debug, Default)]
pub struct Counting<A>(pub A);

// SAFETY: every call is passed to the wrapped allocator unchanged; the counting touches only
// a thread-local integer (no allocation, no unwinding).
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counting<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on unchanged.
        let ptr = unsafe { self.0.alloc(layout) };
        if !ptr.is_null() {
            add(layout.size() as isize);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { self.0.alloc_zeroed(layout) };
        if !ptr.is_null() {
            add(layout.size() as isize);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as for `alloc`.
        unsafe { self.0.dealloc(ptr, layout) };
        add(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let new = unsafe { self.0.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            add(new_size as isize - layout.size() as isize);
        }
        new
    }
}
