//! Ctrl-C and SIGTERM for lb's dev tools (xtask, lb-dev): what a tool made outside
//! itself (namespaces, a sandbox, an API server, an agent) must go before it exits,
//! also when interrupted.
//!
//! [`install`] registers handlers for SIGINT and SIGTERM (signal-hook's iterator: the
//! handler only wakes a thread of ours, so what runs on a signal is ordinary code, not
//! a signal handler). Handlers, not a blocked mask: a blocked mask is inherited by
//! every child (std's `Command` keeps it; `cargo test` under `cargo xtask test` then ran
//! agents that could not see SIGTERM), while handlers go back to the default at
//! exec(2), so children start as they would without us, and one in the same process
//! group gets the terminal's Ctrl-C itself. On the first signal the waiter
//!
//! - runs every teardown registered with [`on_interrupt`] (newest first) and exits
//!   130, if there are any;
//! - else, inside a [`cooperate`] section, only sets [`requested`]: code whose
//!   clean-up is its own values' `Drop` checks it in its loops, returns an error, and
//!   unwinds normally;
//! - else exits 130, as without us.
//!
//! A second signal exits 130 at once.

use std::sync::{
    Mutex, Once,
    atomic::{AtomicBool, AtomicUsize, Ordering},
};

type Teardown = Box<dyn Fn() + Send>;

static TEARDOWNS: Mutex<Vec<(usize, Teardown)>> = Mutex::new(Vec::new());
static NEXT: AtomicUsize = AtomicUsize::new(0);
static REQUESTED: AtomicBool = AtomicBool::new(false);
static COOPERATING: AtomicUsize = AtomicUsize::new(0);

/// Handles SIGINT and SIGTERM from now on (once per process): call it first thing in
/// `main`.
pub fn install() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        let mut signals =
            match signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM]) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("warning: cannot handle SIGINT/SIGTERM ({e}); Ctrl-C will not tear down what was made");
                    return;
                }
            };
        std::thread::spawn(move || {
            for _ in signals.forever() {
                if REQUESTED.swap(true, Ordering::SeqCst) {
                    std::process::exit(130);
                }
                let list = std::mem::take(&mut *TEARDOWNS.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
                if list.is_empty() {
                    if COOPERATING.load(Ordering::SeqCst) == 0 {
                        std::process::exit(130);
                    }
                    eprintln!("\ninterrupted: stopping and cleaning up (again to exit at once)...");
                    continue;
                }
                eprintln!("\ninterrupted: tearing down...");
                for (_, teardown) in list.iter().rev() {
                    teardown();
                }
                std::process::exit(130);
            }
        });
    });
}

/// Whether SIGINT or SIGTERM has arrived.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// `teardown` runs if SIGINT or SIGTERM arrives while the guard lives (then the
/// process exits 130). [`install`] must have run.
#[must_use = "the teardown is dropped with the guard"]
pub fn on_interrupt(teardown: impl Fn() + Send + 'static) -> OnInterrupt {
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    TEARDOWNS.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((id, Box::new(teardown)));
    OnInterrupt(id)
}

/// Unregisters its teardown on drop.
pub struct OnInterrupt(usize);

impl Drop for OnInterrupt {
    fn drop(&mut self) {
        TEARDOWNS.lock().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|(id, _)| *id != self.0);
    }
}

/// While the guard lives, a signal only sets [`requested`] (when no teardown is
/// registered): the caller's loops check it and unwind.
#[must_use = "the section ends with the guard"]
pub fn cooperate() -> Cooperating {
    COOPERATING.fetch_add(1, Ordering::SeqCst);
    Cooperating(())
}

/// Ends its [`cooperate`] section on drop.
pub struct Cooperating(());

impl Drop for Cooperating {
    fn drop(&mut self) {
        COOPERATING.fetch_sub(1, Ordering::SeqCst);
    }
}
