//! Deciding whether the primary's answer stands.
//!
//! A [`Fallback`](crate::Fallback) asks an [`Accept`] predicate about every result
//! the primary returns. An accepted result is served and the fallback is dropped;
//! a rejected one is discarded and the fallback's result is served instead.
//!
//! Any `Fn(&Result<T, E>) -> bool` closure is a predicate. The named predicates here
//! cover the common cases and combine with [`Accept::and`], [`Accept::or`] and
//! [`Accept::not`]:
//!
//! ```
//! use tower_backstop::accept::{Accept, AcceptOk};
//!
//! // A cache answers `Ok(None)` on a miss: accept only `Ok(Some(_))`.
//! let hit = AcceptOk.and(|r: &Result<Option<u32>, ()>| matches!(r, Ok(Some(_))));
//! assert!(hit.accept(&Ok(Some(7))));
//! assert!(!hit.accept(&Ok(None)));
//! assert!(!hit.accept(&Err(())));
//! ```
//!
//! Named predicates such as [`AcceptOk`] judge results of every type, so a method call
//! like `AcceptOk.not()` leaves the compiler nothing to pick the types from. Build such
//! combinations with [`And::new`], [`Or::new`] and [`Not::new`] instead; the types are
//! then fixed where the predicate is used:
//!
//! ```
//! use tower_backstop::accept::{Accept, AcceptAll, AcceptOk, Not};
//!
//! // Accepts only errors.
//! let errors_only = Not::new(AcceptOk);
//! assert!(errors_only.accept(&Err::<u32, &str>("down")));
//! assert!(!errors_only.accept(&Ok::<u32, &str>(1)));
//! # let _ = Not::new(AcceptAll);
//! ```

use std::fmt;

/// Decides whether a result from the primary service is served.
///
/// Implemented for every `Fn(&Result<T, E>) -> bool`, so a closure works wherever an
/// `Accept` is expected. Implement it by hand for a named, reusable predicate.
///
/// A predicate is cloned into every response future, so it should be cheap to clone
/// (closures without captures and the predicates in this module are zero-sized).
pub trait Accept<T, E> {
    /// Returns `true` if `result` should be served as the answer to the request.
    fn accept(&self, result: &Result<T, E>) -> bool;

    /// Accepts a result only if both `self` and `other` accept it.
    ///
    /// `other` is not asked when `self` rejects.
    fn and<O>(self, other: O) -> And<Self, O>
    where
        Self: Sized,
        O: Accept<T, E>,
    {
        And::new(self, other)
    }

    /// Accepts a result if either `self` or `other` accepts it.
    ///
    /// `other` is not asked when `self` accepts.
    fn or<O>(self, other: O) -> Or<Self, O>
    where
        Self: Sized,
        O: Accept<T, E>,
    {
        Or::new(self, other)
    }

    /// Accepts exactly the results that `self` rejects.
    fn not(self) -> Not<Self>
    where
        Self: Sized,
    {
        Not::new(self)
    }
}

impl<T, E, F> Accept<T, E> for F
where
    F: Fn(&Result<T, E>) -> bool,
{
    fn accept(&self, result: &Result<T, E>) -> bool {
        self(result)
    }
}

/// Accepts every `Ok` and rejects every `Err`: the default predicate.
///
/// With it, the fallback serves whenever the primary fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AcceptOk;

impl<T, E> Accept<T, E> for AcceptOk {
    fn accept(&self, result: &Result<T, E>) -> bool {
        result.is_ok()
    }
}

/// Accepts every result, `Ok` or `Err`.
///
/// With it, the fallback is only ever served if the primary never answers — useful
/// together with a [`Not`] or [`Or`], and in tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AcceptAll;

impl<T, E> Accept<T, E> for AcceptAll {
    fn accept(&self, _result: &Result<T, E>) -> bool {
        true
    }
}

/// Accepts a result only if both predicates do. Returned by [`Accept::and`].
#[derive(Clone, Copy, Default)]
pub struct And<A, B> {
    a: A,
    b: B,
}

impl<A, B> And<A, B> {
    /// Accepts what both `a` and `b` accept; `b` is not asked when `a` rejects.
    pub const fn new(a: A, b: B) -> Self {
        And { a, b }
    }
}

impl<T, E, A, B> Accept<T, E> for And<A, B>
where
    A: Accept<T, E>,
    B: Accept<T, E>,
{
    fn accept(&self, result: &Result<T, E>) -> bool {
        self.a.accept(result) && self.b.accept(result)
    }
}

/// Accepts a result if either predicate does. Returned by [`Accept::or`].
#[derive(Clone, Copy, Default)]
pub struct Or<A, B> {
    a: A,
    b: B,
}

impl<A, B> Or<A, B> {
    /// Accepts what `a` or `b` accepts; `b` is not asked when `a` accepts.
    pub const fn new(a: A, b: B) -> Self {
        Or { a, b }
    }
}

impl<T, E, A, B> Accept<T, E> for Or<A, B>
where
    A: Accept<T, E>,
    B: Accept<T, E>,
{
    fn accept(&self, result: &Result<T, E>) -> bool {
        self.a.accept(result) || self.b.accept(result)
    }
}

/// Accepts exactly what the inner predicate rejects. Returned by [`Accept::not`].
#[derive(Clone, Copy, Default)]
pub struct Not<A> {
    inner: A,
}

impl<A> Not<A> {
    /// Accepts exactly what `inner` rejects.
    pub const fn new(inner: A) -> Self {
        Not { inner }
    }
}

impl<T, E, A> Accept<T, E> for Not<A>
where
    A: Accept<T, E>,
{
    fn accept(&self, result: &Result<T, E>) -> bool {
        !self.inner.accept(result)
    }
}

/// Formats a predicate that may be a closure: by its type name, never requiring `Debug`.
pub(crate) struct TypeName<T: ?Sized>(std::marker::PhantomData<T>);

impl<T: ?Sized> TypeName<T> {
    pub(crate) const fn of(_: &T) -> Self {
        TypeName(std::marker::PhantomData)
    }
}

impl<T: ?Sized> fmt::Debug for TypeName<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(std::any::type_name::<T>())
    }
}

impl<A, B> fmt::Debug for And<A, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("And")
            .field("a", &TypeName::of(&self.a))
            .field("b", &TypeName::of(&self.b))
            .finish()
    }
}

impl<A, B> fmt::Debug for Or<A, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Or")
            .field("a", &TypeName::of(&self.a))
            .field("b", &TypeName::of(&self.b))
            .finish()
    }
}

impl<A> fmt::Debug for Not<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Not")
            .field("inner", &TypeName::of(&self.inner))
            .finish()
    }
}
