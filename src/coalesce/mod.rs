//! Coalescing: fallback calls whose keys are equal and in flight at once share one call.
mod key;
pub use self::key::CoalesceKey;
