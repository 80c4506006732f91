//! Small single-threaded synchronization primitives for one shard's tasks.
//!
//! Everything here is `!Send` on purpose: a shard's state never leaves its thread.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// Wakes every task waiting on it. A waiter registered before `notify_all` is woken
/// by it; `wait` returns a future that completes on the next notification.
#[derive(Default)]
pub struct Notify {
    generation: Cell<u64>,
    wakers: RefCell<Vec<Waker>>,
}

impl Notify {
    /// Wakes all current waiters.
    pub fn notify_all(&self) {
        self.generation.set(self.generation.get().wrapping_add(1));
        let wakers = std::mem::take(&mut *self.wakers.borrow_mut());
        for waker in wakers {
            waker.wake();
        }
    }

    /// Completes after the next `notify_all`.
    pub fn wait(&self) -> NotifyWait<'_> {
        NotifyWait {
            notify: self,
            generation: self.generation.get(),
        }
    }
}

/// Future returned by [`Notify::wait`].
pub struct NotifyWait<'a> {
    notify: &'a Notify,
    generation: u64,
}

impl Future for NotifyWait<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.notify.generation.get() != self.generation {
            return Poll::Ready(());
        }
        let mut wakers = self.notify.wakers.borrow_mut();
        if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
            wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// A single-threaded one-shot slot: one side completes it, the other awaits it.
pub struct Completion<T> {
    value: RefCell<Option<T>>,
    waker: RefCell<Option<Waker>>,
}

impl<T> Completion<T> {
    /// A new, empty slot.
    pub fn new() -> Rc<Self> {
        Rc::new(Completion {
            value: RefCell::new(None),
            waker: RefCell::new(None),
        })
    }

    /// Fills the slot (first value wins) and wakes the waiter.
    pub fn complete(&self, value: T) {
        let mut slot = self.value.borrow_mut();
        if slot.is_none() {
            *slot = Some(value);
            drop(slot);
            if let Some(waker) = self.waker.borrow_mut().take() {
                waker.wake();
            }
        }
    }

    /// True once completed.
    pub fn is_complete(&self) -> bool {
        self.value.borrow().is_some()
    }

    /// Waits for the value.
    pub fn wait(self: &Rc<Self>) -> CompletionWait<T> {
        CompletionWait { slot: self.clone() }
    }
}

/// Future returned by [`Completion::wait`].
pub struct CompletionWait<T> {
    slot: Rc<Completion<T>>,
}

impl<T> Future for CompletionWait<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        if let Some(value) = self.slot.value.borrow_mut().take() {
            return Poll::Ready(value);
        }
        *self.slot.waker.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }
}
