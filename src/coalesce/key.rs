//! What makes two requests the same call: the [`CoalesceKey`] trait.

use std::hash::Hash;

/// Says which requests may share one call: those whose keys are equal.
///
/// Implemented for every `Fn(&Req) -> Option<K>` with `K: Hash + Eq`. The key must hold
/// **everything that varies the answer**: two requests with equal keys get the same
/// answer, whoever sent them (see [the module docs](super#the-key-decides-who-gets-whose-answer)).
pub trait CoalesceKey<Req> {
    /// What equal requests share; `None`: this request never shares a call.
    type Key: Hash + Eq;

    /// The key of `req`, or `None` if it must be served by a call of its own.
    fn key(&self, req: &Req) -> Option<Self::Key>;
}

impl<F, Req, K> CoalesceKey<Req> for F
where
    F: Fn(&Req) -> Option<K>,
    K: Hash + Eq,
{
    type Key = K;

    #[inline]
    fn key(&self, req: &Req) -> Option<K> {
        self(req)
    }
}
