use crate::{accept::AcceptOk, accept::TypeName, Fallback};
use std::fmt;
use tower_layer::Layer;

/// Wraps a primary service in a [`Fallback`] to the given fallback service.
///
/// The layer holds the fallback and the predicate, and clones both into each service it
/// builds. See [`Fallback`] for how requests are served.
///
/// ```
/// use std::convert::Infallible;
/// use tower::{service_fn, ServiceBuilder};
/// use tower_backstop::FallbackLayer;
///
/// let db = service_fn(|key: u32| async move { Ok::<_, Infallible>(Some(key * 10)) });
/// let cache = service_fn(|_key: u32| async move { Ok::<Option<u32>, Infallible>(None) });
///
/// let svc = ServiceBuilder::new()
///     .layer(FallbackLayer::new(db).accept(|r: &Result<Option<u32>, Infallible>| {
///         matches!(r, Ok(Some(_)))
///     }))
///     .service(cache);
/// # let _ = svc;
/// ```
#[derive(Clone)]
pub struct FallbackLayer<F, A = AcceptOk> {
    fallback: F,
    accept: A,
}

impl<F> FallbackLayer<F> {
    /// Creates a layer that falls back to `fallback`, accepting any `Ok` from the
    /// primary.
    pub const fn new(fallback: F) -> Self {
        FallbackLayer {
            fallback,
            accept: AcceptOk,
        }
    }
}

impl<F, A> FallbackLayer<F, A> {
    /// Replaces the predicate that decides whether the primary's result stands.
    ///
    /// The default, [`AcceptOk`], accepts every `Ok`. See
    /// [`Fallback::accept`].
    pub fn accept<A2>(self, accept: A2) -> FallbackLayer<F, A2> {
        FallbackLayer {
            fallback: self.fallback,
            accept,
        }
    }
}

impl<P, F, A> Layer<P> for FallbackLayer<F, A>
where
    F: Clone,
    A: Clone,
{
    type Service = Fallback<P, F, A>;

    fn layer(&self, primary: P) -> Self::Service {
        Fallback::from_parts(primary, self.fallback.clone(), self.accept.clone())
    }
}

impl<F, A> fmt::Debug for FallbackLayer<F, A>
where
    F: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackLayer")
            .field("fallback", &self.fallback)
            .field("accept", &TypeName::of(&self.accept))
            .finish()
    }
}
