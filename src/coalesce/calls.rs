//! The calls in flight of one coalescing layer: a map from key to shared call, behind
//! one lock, and the protocol its waiters follow.
//!
//! # How a shared call is driven
//!
//! Each shared call is a slot holding one waker per waiter, and its future, boxed once
//! (it must outlive any one waiter, so it cannot live in one). One waiter at a time
//! *drives*: it holds the future and polls it with its own waker, outside the lock —
//! the request that started the call from the start, so its polls take no lock until
//! the call answers. The others store their wakers and sleep. A driver that leaves puts
//! the future back in the slot and wakes one other waiter, which takes it from its next
//! poll; when the call ends, every waiter is woken and collects a clone of the answer
//! (the last one takes the answer itself). Nothing spins, nothing is spawned.
//!
//! # Where things are
//!
//! A slot is found by its key's hash (hashed once with the layer's `RandomState`,
//! outside the lock) in a small index of chains, and by its index afterwards: a waiter
//! holds a [`Ticket`], never a key, so keys need not be `Clone`. Slots, the index and the
//! waker lists keep their capacity when a call ends: in steady state a call allocates
//! only its boxed future, and a joiner nothing.
//!
//! # User code and the lock
//!
//! Under the lock run only a key's `Eq` (finding the call), the inner service's
//! `Clone` (starting one) and the observers (`tracing`, `metrics`); every operation
//! leaves the calls consistent before it runs them, or runs them before it changes
//! anything, so a panic there leaves no waiter counted that does not exist. Keys,
//! requests, futures and answers are dropped after the lock is released, and once the
//! waiter they belong to holds its ticket: a panic in their drop reaches that one
//! request, which leaves the call as any dropped waiter does.

use super::observe::{End, Observers};
use std::{
    any::Any,
    cell::RefCell,
    future::Future,
    hash::{BuildHasher, Hash, RandomState},
    mem,
    pin::Pin,
    sync::{Mutex, MutexGuard, PoisonError},
    task::{Context, Waker},
};

/// The state one layer's services share: every clone of them, every service the layer
/// makes. One lock guards every call in flight of the layer.
pub(crate) struct Registry {
    hasher: RandomState,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// One map per type of call the layer's services make: almost always one (a layer
    /// applied to services of different types keeps their calls apart, as it must).
    maps: Vec<Box<dyn Any + Send>>,
    observers: Observers,
}

impl Registry {
    pub(crate) fn new() -> Registry {
        Registry {
            hasher: RandomState::new(),
            inner: Mutex::default(),
        }
    }

    /// The key's hash, computed outside the lock (`Hash` is user code).
    #[inline]
    pub(crate) fn hash<K: Hash>(&self, key: &K) -> u64 {
        self.hasher.hash_one(key)
    }

    pub(crate) fn set_observers(&self, observers: Observers) {
        self.lock().observers = observers;
    }

    pub(crate) fn observers(&self) -> Observers {
        self.lock().observers.clone()
    }

    /// CORRECTNESS: every operation below leaves the maps consistent before it runs any
    /// user code that may panic (a key's `Eq`, a clone), so a lock poisoned by such a
    /// panic guards consistent data and is simply taken again.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on this layer's map of calls of type `M`, under the lock.
    #[inline]
    fn with<M, R>(&self, f: impl FnOnce(&mut M, &Observers) -> R) -> R
    where
        M: Default + Send + 'static,
    {
        let mut inner = self.lock();
        let Inner { maps, observers } = &mut *inner;
        let i = match maps.iter().position(|map| (**map).is::<M>()) {
            Some(i) => i,
            None => {
                maps.push(Box::<M>::default());
                maps.len() - 1
            }
        };
        let map = maps[i]
            .downcast_mut::<M>()
            .expect("the map found has this type");
        f(map, observers)
    }
}

/// A waiter's place in one shared call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ticket {
    slot: usize,
    generation: u64,
    waiter: usize,
}

/// What [`Calls::join`] did.
pub(crate) enum Join<Key, Fut, F> {
    /// No call with this key was in flight: this request starts one, and drives it.
    Started(Ticket, Pin<Box<Fut>>),
    /// It joined the call in flight, and gets back its key and its unused start.
    Joined(Ticket, Key, F),
}

/// What a waiter's poll found.
pub(crate) enum Step<Fut, T, E> {
    /// The call's answer (a clone of it, or the answer itself for the last waiter), and
    /// whether its refill is another waiter's (see [`Slot::claim_refill`]).
    Ready(Result<T, E>, bool),
    /// Someone else drives the call, or it is running: this waiter's waker is stored.
    Pending,
    /// Nobody drives the call: this waiter does, holding the future from now on.
    Drive(Pin<Box<Fut>>),
    /// The call panicked in another waiter's poll.
    Panicked,
}

/// What an operation took out of the map, dropped after the lock is released: dropping
/// a key, a future or an answer runs user code (a future's drop may run an `OnCancel`
/// action, or call into this very layer).
pub(crate) struct Garbage<Key, Fut, T, E> {
    key: Option<Key>,
    fut: Option<Pin<Box<Fut>>>,
    result: Option<Result<T, E>>,
}

impl<Key, Fut, T, E> Default for Garbage<Key, Fut, T, E> {
    fn default() -> Self {
        Garbage {
            key: None,
            fut: None,
            result: None,
        }
    }
}

/// The calls in flight of one type, by key.
pub(crate) struct Calls<Key, Fut, T, E> {
    /// The first slot of each bucket's chain, by the low bits of the key's hash: a
    /// power of two of them, at least as many as the slots (grown, never shrunk).
    buckets: Vec<Option<usize>>,
    /// Slots indexed: in the buckets' chains.
    indexed: usize,
    slots: Vec<Slot<Key, Fut, T, E>>,
    free: Vec<usize>,
}

impl<Key, Fut, T, E> Default for Calls<Key, Fut, T, E> {
    fn default() -> Self {
        Calls {
            buckets: Vec::new(),
            indexed: 0,
            slots: Vec::new(),
            free: Vec::new(),
        }
    }
}

struct Slot<Key, Fut, T, E> {
    /// Bumped when the slot is freed: a ticket of an earlier call never matches.
    generation: u64,
    hash: u64,
    /// The next slot of the same hash, while indexed.
    next: Option<usize>,
    key: Option<Key>,
    /// Whether new requests with this key join this call: until it ends.
    indexed: bool,
    state: State<Fut, T, E>,
    /// Waiters that have neither left nor collected the answer.
    waiters: usize,
    /// Requests that joined after the first: for the observers.
    joined: usize,
    /// The waiter that drives the future, if any.
    driver: Option<usize>,
    /// One per waiter, by ticket; kept (emptied) when the slot is reused.
    wakers: Vec<Option<Waker>>,
    /// Places in `wakers` of waiters that left while the call was in flight, for the
    /// next joiner: `wakers` is bounded by the waiters present at once, not by the
    /// requests that ever joined.
    vacant: Vec<usize>,
    /// A waiter whose request was already a miss when it took the answer has claimed
    /// the call's one refill.
    refill_claimed: bool,
}

impl<Key, Fut, T, E> Slot<Key, Fut, T, E> {
    /// Whether a waiter taking the answer now leaves the refill to another: the call
    /// refills once, for the first waiter whose request is already a miss when it takes
    /// the answer (`miss`: the `Fallback` in front had rejected its primary). A waiter
    /// whose primary was still pending keeps its refill, for if it turns out a miss:
    /// under a speculative launch a shared call may so refill more than once, never
    /// less than a miss needs.
    fn claim_refill(&mut self, miss: bool) -> bool {
        if !miss {
            return false;
        }
        mem::replace(&mut self.refill_claimed, true)
    }

    /// A new waiter's place in `wakers`: a vacant one, or a new one.
    fn add_waiter(&mut self) -> usize {
        self.waiters += 1;
        match self.vacant.pop() {
            Some(waiter) => waiter,
            None => {
                self.wakers.push(None);
                self.wakers.len() - 1
            }
        }
    }
}

impl<Key, Fut, T, E> Default for Slot<Key, Fut, T, E> {
    fn default() -> Self {
        Slot {
            generation: 0,
            hash: 0,
            next: None,
            key: None,
            indexed: false,
            state: State::Free,
            waiters: 0,
            joined: 0,
            driver: None,
            wakers: Vec::new(),
            vacant: Vec::new(),
            refill_claimed: false,
        }
    }
}

enum State<Fut, T, E> {
    Free,
    /// In flight, in the slot.
    Idle(Pin<Box<Fut>>),
    /// In flight, its future held by its driver.
    Driving,
    /// Answered: waiting for the remaining waiters to collect it.
    Done(Result<T, E>),
    /// Its future (or the clone of its answer) panicked.
    Panicked,
}

impl<Key, Fut, T, E> Calls<Key, Fut, T, E>
where
    Key: Eq,
    Fut: Future<Output = Result<T, E>>,
    T: Clone,
    E: Clone,
{
    /// Joins the call in flight for `key`, or starts one with `start()`. A joiner gets
    /// its key and `start` (which holds its request) back, to drop outside the lock once
    /// it holds its ticket.
    ///
    /// CORRECTNESS: the observers (a `tracing` subscriber, a `metrics` recorder: user
    /// code) hear of a join before anything changes, so a panic there joins nothing.
    pub(crate) fn join<F: FnOnce() -> Fut>(
        &mut self,
        hash: u64,
        key: Key,
        start: F,
        observers: &Observers,
    ) -> Join<Key, Fut, F> {
        let mut at = match self.buckets.len() {
            0 => None,
            n => self.buckets[bucket(hash, n)],
        };
        while let Some(i) = at {
            let slot = &mut self.slots[i];
            if slot.hash == hash && slot.key.as_ref() == Some(&key) {
                observers.joined();
                let waiter = slot.add_waiter();
                slot.joined += 1;
                let ticket = Ticket {
                    slot: i,
                    generation: slot.generation,
                    waiter,
                };
                return Join::Joined(ticket, key, start);
            }
            at = slot.next;
        }
        // The only allocation of a call: its future must outlive any one waiter.
        let fut = Box::pin(start());
        let i = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot::default());
                self.slots.len() - 1
            }
        };
        if self.indexed >= self.buckets.len() {
            self.grow();
        }
        let b = bucket(hash, self.buckets.len());
        let next = self.buckets[b].replace(i);
        self.indexed += 1;
        let slot = &mut self.slots[i];
        slot.hash = hash;
        slot.next = next;
        slot.key = Some(key);
        slot.indexed = true;
        // The request that starts the call drives it, holding its future: its polls
        // take no lock until the call answers.
        slot.state = State::Driving;
        slot.joined = 0;
        slot.refill_claimed = false;
        let waiter = slot.add_waiter();
        slot.driver = Some(waiter);
        let ticket = Ticket {
            slot: i,
            generation: slot.generation,
            waiter,
        };
        Join::Started(ticket, fut)
    }

    fn slot(&mut self, ticket: Ticket) -> &mut Slot<Key, Fut, T, E> {
        let slot = &mut self.slots[ticket.slot];
        assert_eq!(
            slot.generation, ticket.generation,
            "a coalesced request outlived its call"
        );
        slot
    }

    /// The ticket's slot, unless its call was freed already: for the operations that
    /// run while a waiter unwinds (a panic in a key's or a future's drop, after the
    /// call was freed), which must not panic again.
    fn live_slot(&mut self, ticket: Ticket) -> Option<&mut Slot<Key, Fut, T, E>> {
        let slot = self.slots.get_mut(ticket.slot)?;
        (slot.generation == ticket.generation && !matches!(slot.state, State::Free)).then_some(slot)
    }

    /// A waiter's poll; `miss`: its request was already a miss (see
    /// [`Slot::claim_refill`]).
    pub(crate) fn poll(
        &mut self,
        ticket: Ticket,
        cx: &Context<'_>,
        garbage: &mut Garbage<Key, Fut, T, E>,
        miss: bool,
    ) -> Step<Fut, T, E> {
        let slot = self.slot(ticket);
        match &mut slot.state {
            State::Done(result) => {
                if slot.waiters > 1 {
                    // The clone first: if it panics, this waiter has collected nothing.
                    let answer = result.clone();
                    slot.waiters -= 1;
                    slot.wakers[ticket.waiter] = None;
                    let skip = slot.claim_refill(miss);
                    return Step::Ready(answer, skip);
                }
                // The last waiter takes the answer itself.
                let skip = slot.claim_refill(miss);
                self.free(ticket.slot, garbage);
                match garbage.result.take() {
                    Some(answer) => Step::Ready(answer, skip),
                    None => unreachable!("a finished call holds its answer"),
                }
            }
            State::Panicked => {
                slot.waiters -= 1;
                slot.wakers[ticket.waiter] = None;
                if slot.waiters == 0 {
                    self.free(ticket.slot, garbage);
                }
                Step::Panicked
            }
            State::Idle(_) if slot.driver.is_none() || slot.driver == Some(ticket.waiter) => {
                let State::Idle(fut) = mem::replace(&mut slot.state, State::Driving) else {
                    unreachable!("matched just above")
                };
                slot.driver = Some(ticket.waiter);
                Step::Drive(fut)
            }
            State::Idle(_) | State::Driving => {
                let stored = &mut slot.wakers[ticket.waiter];
                match stored {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    _ => *stored = Some(cx.waker().clone()),
                }
                Step::Pending
            }
            State::Free => unreachable!("a coalesced request outlived its call"),
        }
    }

    /// The driver's poll of the future answered: the answer is handed to every waiter
    /// (`wake` gets their wakers).
    // Every argument is a part of the one operation under the lock.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn driven(
        &mut self,
        ticket: Ticket,
        fut: Pin<Box<Fut>>,
        answer: Result<T, E>,
        wake: &mut Wake,
        garbage: &mut Garbage<Key, Fut, T, E>,
        observers: &Observers,
        miss: bool,
    ) -> (Result<T, E>, bool) {
        let slot = self.slot(ticket);
        // The spent future is dropped outside the lock.
        garbage.fut = Some(fut);
        let skip = slot.claim_refill(miss);
        let joined = slot.joined;
        if slot.waiters == 1 {
            self.free(ticket.slot, garbage);
            observers.ended(End::Answered, joined);
            return (answer, skip);
        }
        // CORRECTNESS: the clone comes before any change: if it panics, the call is
        // still `Driving`, and the driver's unwind guard reports it as panicked.
        let copy = answer.clone();
        slot.state = State::Done(copy);
        slot.waiters -= 1;
        slot.wakers[ticket.waiter] = None;
        slot.driver = None;
        wake.list()
            .extend(slot.wakers.iter_mut().filter_map(Option::take));
        // A request arriving from now on starts a new call: nothing is cached.
        self.unindex(ticket.slot);
        // CORRECTNESS: the observers (user code) last, on consistent calls.
        observers.ended(End::Answered, joined);
        (answer, skip)
    }

    /// The driver's poll panicked: every other waiter is woken to a clear panic of its
    /// own, and the next request with this key starts afresh.
    pub(crate) fn panicked(
        &mut self,
        ticket: Ticket,
        wake: &mut Wake,
        garbage: &mut Garbage<Key, Fut, T, E>,
        observers: &Observers,
    ) {
        let Some(slot) = self.live_slot(ticket) else {
            return;
        };
        if !matches!(slot.state, State::Driving) {
            return;
        }
        let joined = slot.joined;
        slot.state = State::Panicked;
        slot.driver = None;
        slot.waiters -= 1;
        slot.wakers[ticket.waiter] = None;
        if slot.waiters == 0 {
            self.free(ticket.slot, garbage);
        } else {
            wake.list()
                .extend(slot.wakers.iter_mut().filter_map(Option::take));
            self.unindex(ticket.slot);
        }
        observers.ended(End::Panicked, joined);
    }

    /// A waiter goes away unanswered, with the call's future if it drove it. The last
    /// one drops the call; a driver that leaves puts the future back in the slot and
    /// wakes another waiter to take over.
    pub(crate) fn leave(
        &mut self,
        ticket: Ticket,
        fut: Option<Pin<Box<Fut>>>,
        wake: &mut Wake,
        garbage: &mut Garbage<Key, Fut, T, E>,
        observers: &Observers,
    ) {
        let Some(slot) = self.live_slot(ticket) else {
            // Freed while this waiter unwound: what it held goes with it.
            garbage.fut = fut;
            return;
        };
        if let Some(fut) = fut {
            slot.state = State::Idle(fut);
        }
        slot.waiters -= 1;
        slot.wakers[ticket.waiter] = None;
        let in_flight = matches!(slot.state, State::Idle(_) | State::Driving);
        if slot.waiters == 0 {
            let joined = slot.joined;
            self.free(ticket.slot, garbage);
            if in_flight {
                observers.ended(End::Dropped, joined);
            }
            return;
        }
        if in_flight {
            slot.vacant.push(ticket.waiter);
        }
        // CORRECTNESS: a driver that leaves hands the call to another waiter. So does a
        // waiter that leaves while nobody drives: it may be the one the last driver
        // woke to take over, and must pass that on, or the call would stall.
        if in_flight && (slot.driver.is_none() || slot.driver == Some(ticket.waiter)) {
            slot.driver = None;
            // A waiter that has not been polled yet has no waker, and will drive from
            // its first poll.
            if let Some(waker) = slot.wakers.iter_mut().find_map(Option::take) {
                wake.list().push(waker);
            }
        }
    }

    /// Takes the slot out of its hash chain: new requests no longer join it.
    fn unindex(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        if !mem::take(&mut slot.indexed) {
            return;
        }
        let (b, next) = (bucket(slot.hash, self.buckets.len()), slot.next.take());
        self.indexed -= 1;
        let Some(head) = self.buckets[b] else {
            unreachable!("an indexed slot is in its chain")
        };
        if head == i {
            self.buckets[b] = next;
            return;
        }
        let mut at = head;
        while let Some(after) = self.slots[at].next {
            if after == i {
                self.slots[at].next = next;
                return;
            }
            at = after;
        }
    }

    /// Doubles the buckets (16 at first) and rechains the indexed slots: only when the
    /// calls in flight outgrow them.
    #[cold]
    fn grow(&mut self) {
        let n = (self.buckets.len() * 2).max(16);
        self.buckets.clear();
        self.buckets.resize(n, None);
        for i in 0..self.slots.len() {
            if self.slots[i].indexed {
                let b = bucket(self.slots[i].hash, n);
                self.slots[i].next = self.buckets[b].replace(i);
            }
        }
    }

    /// Frees the slot for a later call, handing what it held to `garbage`.
    fn free(&mut self, i: usize, garbage: &mut Garbage<Key, Fut, T, E>) {
        self.unindex(i);
        let slot = &mut self.slots[i];
        slot.generation = slot.generation.wrapping_add(1);
        garbage.key = slot.key.take();
        match mem::replace(&mut slot.state, State::Free) {
            State::Idle(fut) => garbage.fut = Some(fut),
            State::Done(result) => garbage.result = Some(result),
            State::Free | State::Driving | State::Panicked => {}
        }
        slot.driver = None;
        slot.waiters = 0;
        slot.wakers.clear();
        slot.vacant.clear();
        self.free.push(i);
    }

    /// Calls in flight or waiting to be collected, for the tests of the bounds.
    #[cfg(test)]
    fn live(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

thread_local! {
    /// The wakers an operation collects under the lock, woken after it: recycled, so
    /// waking the waiters of a call allocates nothing in steady state.
    static WAKE: RefCell<Vec<Waker>> = const { RefCell::new(Vec::new()) };
}

impl Registry {
    /// Runs `op` on the map of calls of type `Calls<Key, Fut, T, E>`, then — the lock
    /// released — wakes the wakers it collected and drops what it took out.
    #[inline]
    pub(crate) fn run<Key, Fut, T, E, R>(
        &self,
        op: impl FnOnce(
            &mut Calls<Key, Fut, T, E>,
            &mut Wake,
            &mut Garbage<Key, Fut, T, E>,
            &Observers,
        ) -> R,
    ) -> R
    where
        Calls<Key, Fut, T, E>: Send + 'static,
    {
        let mut wake = Wake(None);
        let mut garbage = Garbage::default();
        let out = self.with(|calls, observers| op(calls, &mut wake, &mut garbage, observers));
        if let Some(mut list) = wake.0 {
            for waker in list.drain(..) {
                waker.wake();
            }
            let _ = WAKE.try_with(|spare| {
                if let Ok(mut spare) = spare.try_borrow_mut() {
                    if spare.capacity() < list.capacity() {
                        *spare = list;
                    }
                }
            });
        }
        drop(garbage);
        out
    }
}

/// The wakers an operation wakes once the lock is released: the thread's recycled list,
/// taken only by an operation that has some to wake.
pub(crate) struct Wake(Option<Vec<Waker>>);

impl Wake {
    fn list(&mut self) -> &mut Vec<Waker> {
        self.0.get_or_insert_with(|| {
            WAKE.try_with(|spare| spare.try_borrow_mut().map(|mut s| mem::take(&mut *s)).ok())
                .ok()
                .flatten()
                .unwrap_or_default()
        })
    }
}

/// The bucket of `hash` among `n`, a power of two.
#[inline]
fn bucket(hash: u64, n: usize) -> usize {
    (hash as usize) & (n - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        future::Ready,
        task::{Poll, Waker},
    };

    type TestCalls = Calls<u32, Ready<Result<u32, ()>>, u32, ()>;

    #[test]
    fn slots_and_chains_are_reused_and_bounded_by_the_calls_in_flight() {
        let mut calls = TestCalls::default();
        let observers = Observers::default();
        let cx = Context::from_waker(Waker::noop());
        let mut garbage = Garbage::default();
        let mut wake = Wake(None);
        // Three keys on one hash: one chain.
        let tickets: Vec<_> = (0..3)
            .map(
                |k| match calls.join(7, k, || std::future::ready(Ok(k)), &observers) {
                    Join::Started(ticket, fut) => (ticket, Some(fut)),
                    Join::Joined(..) => unreachable!("three keys"),
                },
            )
            .collect();
        assert_eq!(calls.live(), 3);
        // The middle one leaves: the chain stays whole.
        let mut tickets = tickets.into_iter();
        let (first, mut first_fut) = tickets.next().unwrap();
        let (second, second_fut) = tickets.next().unwrap();
        let (third, mut third_fut) = tickets.next().unwrap();
        calls.leave(second, second_fut, &mut wake, &mut garbage, &observers);
        assert_eq!(calls.live(), 2);
        let Join::Joined(again, 2, _) = calls.join(7, 2, || unreachable!(), &observers) else {
            panic!("key 2 is in flight")
        };
        assert!(matches!(
            calls.poll(again, &cx, &mut garbage, false),
            Step::Pending
        ));
        for (t, fut) in [(first, first_fut.take()), (third, third_fut.take())] {
            let mut fut = fut.unwrap();
            let Poll::Ready(answer) = fut.as_mut().poll(&mut Context::from_waker(Waker::noop()))
            else {
                unreachable!()
            };
            let _ = calls.driven(t, fut, answer, &mut wake, &mut garbage, &observers, false);
        }
        // Keys 0 and 2 answered; key 2's second waiter collects.
        assert_eq!(calls.live(), 1);
        assert!(matches!(
            calls.poll(again, &cx, &mut garbage, false),
            Step::Ready(Ok(2), false)
        ));
        assert_eq!(calls.live(), 0);
        assert_eq!(calls.indexed, 0);
        assert!(calls.buckets.iter().all(Option::is_none));
        assert_eq!(calls.slots.len(), 3);
    }

    #[test]
    fn waiters_that_come_and_go_reuse_their_places() {
        let mut calls = TestCalls::default();
        let observers = Observers::default();
        let mut garbage = Garbage::default();
        let mut wake = Wake(None);
        let Join::Started(driver, fut) = calls.join(1, 1, || std::future::ready(Ok(1)), &observers)
        else {
            unreachable!("nothing in flight")
        };
        // A thousand requests join the call one after another and leave (their
        // primaries answered): the call keeps one place for each waiter present.
        for _ in 0..1000 {
            let Join::Joined(ticket, ..) = calls.join(1, 1, || unreachable!(), &observers) else {
                panic!("the call is in flight")
            };
            calls.leave(ticket, None, &mut wake, &mut garbage, &observers);
        }
        assert_eq!(calls.slots[driver.slot].wakers.len(), 2);
        calls.leave(driver, Some(fut), &mut wake, &mut garbage, &observers);
        assert_eq!(calls.live(), 0);
    }
}
