//! (src/coalesce/key.rs; in src/coalesce.rs put just `mod key; pub use self::key::CoalesceKey;` plus a one-line module doc, and `pub mod coalesce;` in src/lib.rs)
pub trait CoalesceKey<Req> {
    /// What equal requests share; `None`: this request never shares a call.
    type Key: std::hash::Hash + Eq;
    fn key(&self, req: &Req) -> Option<Self::Key>;
}
impl<F, Req, K> CoalesceKey<Req> for F where F: Fn(&Req) -> Option<K>, K: std::hash::Hash + Eq { type Key = K; fn key(&self, req: &Req) -> Option<K> { self(req) } }
