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

    /// Takes the value, if completed (for polling without a task).
    pub fn take(&self) -> Option<T> {
        self.value.borrow_mut().take()
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

impl<T> Completion<T> {
    /// Waits until completed, leaving the value in the slot (for [`Completion::take`]).
    pub fn wait_ref(self: &Rc<Self>) -> CompletionReady<T> {
        CompletionReady { slot: self.clone() }
    }
}

/// Future returned by [`Completion::wait_ref`].
pub struct CompletionReady<T> {
    slot: Rc<Completion<T>>,
}

impl<T> Future for CompletionReady<T> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.slot.value.borrow().is_some() {
            return Poll::Ready(());
        }
        *self.slot.waker.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
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

/// A byte budget shared by many holders (a bound on memory, e.g. received
/// requests). Holders take bytes with [`Held::grow`] and give them back by
/// dropping or shrinking their [`Held`].
pub struct Budget {
    available: Cell<usize>,
    capacity: usize,
    freed: Notify,
}

impl Budget {
    /// A budget of `bytes`.
    pub fn new(bytes: usize) -> Rc<Budget> {
        Rc::new(Budget {
            available: Cell::new(bytes),
            capacity: bytes,
            freed: Notify::default(),
        })
    }

    /// Bytes not held by anyone.
    pub fn available(&self) -> usize {
        self.available.get()
    }

    /// Bytes held.
    pub fn in_use(&self) -> usize {
        self.capacity - self.available.get()
    }

    fn give(&self, bytes: usize) {
        self.available.set(self.available.get() + bytes);
        debug_assert!(self.available.get() <= self.capacity);
        self.freed.notify_all();
    }
}

/// Bytes held from one or more budgets at once (each holds the same amount);
/// given back when dropped.
pub struct Held {
    budgets: Vec<Rc<Budget>>,
    bytes: usize,
}

impl Held {
    /// Holds nothing yet, from these budgets.
    pub fn empty(budgets: Vec<Rc<Budget>>) -> Held {
        Held { budgets, bytes: 0 }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Takes `bytes` more from every budget, waiting until all of them have room.
    /// Cancellation-safe: it takes all or nothing, at once.
    pub async fn grow(&mut self, bytes: usize) {
        debug_assert!(self.budgets.iter().all(|b| bytes <= b.capacity));
        loop {
            match self.budgets.iter().find(|b| b.available() < bytes) {
                Some(short) => short.clone().freed.wait().await,
                None => {
                    for budget in &self.budgets {
                        budget.available.set(budget.available() - bytes);
                    }
                    self.bytes += bytes;
                    return;
                }
            }
        }
    }

    /// Gives `bytes` back (at most what is held).
    pub fn shrink(&mut self, bytes: usize) {
        let bytes = bytes.min(self.bytes);
        self.bytes -= bytes;
        for budget in &self.budgets {
            budget.give(bytes);
        }
    }

    /// Moves `bytes` (at most what is held) into a new holder.
    pub fn split(&mut self, bytes: usize) -> Held {
        let bytes = bytes.min(self.bytes);
        self.bytes -= bytes;
        Held {
            budgets: self.budgets.clone(),
            bytes,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let bytes = self.bytes;
        self.shrink(bytes);
    }
}
