//! The ready-made coalescing key for HTTP requests: the request's method and target
//! URI (RFC 9111's cache key) and the request fields that vary the answer.

use crate::coalesce::CoalesceKey;
use http::{header, HeaderName, HeaderValue, Method, Request, Uri};
use http_body::Body;
use std::{fmt, sync::Arc};

/// The request fields an [`HttpKey`] compares by default: what content, in which
/// form, for which host, and under which conditions (RFC 9110 §12.5, §13, §14).
///
/// `Accept`, `Accept-Encoding`, `Accept-Language` (content negotiation: the answer's
/// type, compression, language), `Host` (the target when the URI has no authority, as
/// in HTTP/1.1's origin form; compared whenever present, since servers behind a
/// proxy may read it anyway), `Range` and `If-Range` (a part of the representation),
/// and the conditional fields `If-Match`, `If-None-Match`, `If-Modified-Since`,
/// `If-Unmodified-Since` (a `304` or `412` instead of the representation).
///
/// Available with the `http` feature.
pub const DEFAULT_VARY: [HeaderName; 10] = [
    header::ACCEPT,
    header::ACCEPT_ENCODING,
    header::ACCEPT_LANGUAGE,
    header::HOST,
    header::RANGE,
    header::IF_RANGE,
    header::IF_MATCH,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_UNMODIFIED_SINCE,
];

/// The request fields that carry credentials: `Authorization`, `Cookie`,
/// `Proxy-Authorization`. An [`HttpKey`] never coalesces a request that has one,
/// unless told to with [`share_credentialed`](HttpKey::share_credentialed).
///
/// Available with the `http` feature.
pub const CREDENTIALS: [HeaderName; 3] = [
    header::AUTHORIZATION,
    header::COOKIE,
    header::PROXY_AUTHORIZATION,
];

/// The coalescing key for `http::Request`s: two requests share one fallback call only
/// if their method, URI and the fields that vary the answer are all equal.
///
/// Its [`CoalesceKey::key`] is `None` — the request never shares a call, and
/// costs nothing, no allocation — for a request that:
///
/// - has a method other than `GET` or `HEAD`. The other safe methods are left out
///   too: an `OPTIONS` answer (a CORS preflight) depends on `Origin` and
///   `Access-Control-Request-*`, and a `TRACE` answer echoes the request;
/// - may have a body: one that is not known to be empty
///   ([`is_end_stream`](Body::is_end_stream), or an exact size hint of 0 bytes — what
///   hyper reports for a request without one, and [`ReplayBody`](super::ReplayBody)
///   for an empty buffered body). A `GET` with a body (a search query, say) is
///   answered by its body, which is not in the key;
/// - carries credentials ([`CREDENTIALS`]: `Authorization`, `Cookie`,
///   `Proxy-Authorization`), unless [`share_credentialed`](HttpKey::share_credentialed)
///   was called;
/// - asks for a protocol upgrade (`Upgrade`: a WebSocket handshake is answered for its
///   own connection).
///
/// **It judges requests, not answers.** Every request that shares a call gets the same
/// response, its `Set-Cookie` and `Cache-Control: private` included: an origin that
/// starts a session on an anonymous first visit (a new session cookie, a CSRF token)
/// would hand that one session to every request that joined. Coalesce only routes
/// whose answers are the same for everyone, or key such routes on what tells their
/// callers apart.
///
/// Otherwise the key ([`RequestKey`]) holds the method, the URI as the request has it
/// (scheme, authority, path and query; the authority compared without regard to case,
/// as `http::Uri` does), and every value, in order, of the fields in
/// [`DEFAULT_VARY`] and those added with [`vary`](HttpKey::vary), compared byte for
/// byte: requests that differ in any of them, or in whether they have one, do not
/// share. Nothing else is compared.
///
/// # The risk
///
/// **A key that leaves out what varies the answer hands one caller's response to
/// another.** The default covers what HTTP itself defines as varying a request's
/// answer. If your fallback answers by anything else — a tenant or API-key header, a
/// custom header set by an auth layer, `X-Forwarded-Host` or `Forwarded` when it
/// builds links from them, a field its answers name in `Vary` — add it with
/// [`vary`](HttpKey::vary). Request *extensions* (what an auth layer put there) are
/// not headers and cannot be compared: a fallback that answers by them must not be
/// coalesced with this key; write a closure key that includes them.
///
/// # Cost
///
/// A request it refuses costs a scan of its field names and no allocation. A keyed
/// request costs two such scans (name comparisons, no hashing) and one allocation,
/// for its compared field values, when it has any (none for a request with none of
/// them: an HTTP/2 request with no `Host`, say). The method, URI and values are clones: a reference count for what hyper
/// parses (a `Bytes` built from a `Vec`, as `Uri::try_from(&str)` builds it,
/// allocates once, on its first clone); a URI with a scheme other than `http` or
/// `https` allocates for it.
///
/// ```
/// use http::{header, Request};
/// use tower_backstop::{coalesce::CoalesceKey, http::HttpKey};
///
/// let key = HttpKey::new().vary(header::HeaderName::from_static("x-tenant"));
/// let get = |tenant: &'static str| {
///     Request::get("/item/7").header("x-tenant", tenant).body(String::new()).unwrap()
/// };
/// assert_eq!(key.key(&get("a")), key.key(&get("a")));
/// assert_ne!(key.key(&get("a")), key.key(&get("b")));
///
/// // Credentials: never shared by default.
/// let private = Request::get("/item/7").header(header::COOKIE, "id=1").body(String::new()).unwrap();
/// assert_eq!(key.key(&private), None);
/// ```
///
/// It is cheap to clone (a reference count at most). Available with the `http`
/// feature.
#[derive(Clone, Debug, Default)]
pub struct HttpKey {
    // Fields compared besides `DEFAULT_VARY`; `None` when there are none.
    vary: Option<Arc<[HeaderName]>>,
    credentialed: bool,
}

impl HttpKey {
    /// A key over the method, the URI and [`DEFAULT_VARY`], refusing requests with
    /// credentials. Allocates nothing.
    pub const fn new() -> Self {
        HttpKey {
            vary: None,
            credentialed: false,
        }
    }

    /// Also compares the values of the request field `name`: requests that differ in
    /// it (or in whether they have it) never share a call. Call it once per field your
    /// fallback's answer depends on. A name already compared is not added twice, and
    /// a field of [`CREDENTIALS`] is not added at all: credentials are refused, or
    /// compared once [`share_credentialed`](HttpKey::share_credentialed) is called.
    pub fn vary(mut self, name: HeaderName) -> Self {
        if CREDENTIALS.contains(&name) || self.fields().any(|field| *field == name) {
            return self;
        }
        let extra = self.vary.as_deref().unwrap_or_default();
        self.vary = Some(extra.iter().cloned().chain([name]).collect());
        self
    }

    /// **Lets requests that carry credentials share a call** — read this first.
    ///
    /// By default a request with `Authorization`, `Cookie` or `Proxy-Authorization`
    /// ([`CREDENTIALS`]) never shares: its answer is usually meant for that caller
    /// alone. After this call such requests are keyed too, **with the values of those
    /// fields in the key**: requests share only when all their credential fields are
    /// equal byte for byte, so an answer reaches only callers that presented the same
    /// credentials. That is right when the answer depends on the credentials and on
    /// what else the key compares: many concurrent requests of one client with one
    /// token, or a service token many callers share and get the same answers with.
    ///
    /// It is wrong when something that is not a request field decides who may see
    /// what: a client certificate (a TLS identity is not a header), the peer's
    /// address, an extension an auth layer added. Those are not in the key. A cookie
    /// that does not vary the answer only costs sharing, never safety. Never write a
    /// closure key that drops the credentials instead.
    pub fn share_credentialed(mut self) -> Self {
        self.credentialed = true;
        self
    }

    /// The fields compared, in the key's order: [`DEFAULT_VARY`], those added with
    /// [`vary`](HttpKey::vary), then [`CREDENTIALS`] if
    /// [`share_credentialed`](HttpKey::share_credentialed) was called.
    pub fn fields(&self) -> impl Iterator<Item = &HeaderName> {
        let credentials: &[HeaderName] = if self.credentialed { &CREDENTIALS } else { &[] };
        DEFAULT_VARY
            .iter()
            .chain(self.vary.as_deref().unwrap_or_default())
            .chain(credentials)
    }
}

impl HttpKey {
    /// The place of `name` in [`fields`](HttpKey::fields), if it is compared.
    /// Slice by slice: `fields().position(..)` over the chained iterators is several
    /// times slower, and this runs for every field of every request.
    fn position(&self, name: &HeaderName) -> Option<usize> {
        let at = |fields: &[HeaderName]| fields.iter().position(|field| field == name);
        if let Some(index) = at(&DEFAULT_VARY) {
            return Some(index);
        }
        let extra = self.vary.as_deref().unwrap_or_default();
        if let Some(index) = at(extra) {
            return Some(DEFAULT_VARY.len() + index);
        }
        if self.credentialed {
            return at(&CREDENTIALS).map(|index| DEFAULT_VARY.len() + extra.len() + index);
        }
        None
    }
}

impl<B: Body> CoalesceKey<Request<B>> for HttpKey {
    type Key = RequestKey;

    fn key(&self, req: &Request<B>) -> Option<RequestKey> {
        if !matches!(*req.method(), Method::GET | Method::HEAD) {
            return None;
        }
        let body = req.body();
        if !(body.is_end_stream() || body.size_hint().exact() == Some(0)) {
            return None;
        }
        // One scan of the request's fields to refuse and count, one to copy: name
        // comparisons, no hashing (cheaper than a lookup per compared field).
        let headers = req.headers();
        let mut count = 0;
        for name in headers.keys() {
            if !self.credentialed && CREDENTIALS.contains(name) {
                return None;
            }
            // A protocol upgrade (a WebSocket handshake) is answered for this
            // connection alone: its `101` carries a `Sec-WebSocket-Accept` made from this
            // request's own key.
            if name == header::UPGRADE {
                return None;
            }
        }
        for (name, _) in headers {
            if self.position(name).is_some() {
                count += 1;
            }
        }
        let mut fields = Vec::with_capacity(count);
        if count > 0 {
            for (name, value) in headers {
                if let Some(index) = self.position(name) {
                    fields.push((index, value.clone()));
                }
            }
            // CORRECTNESS: the key holds each compared field's index and values, in the
            // order of `fields()` and, within a field, the request's order (the sort is
            // stable): equal requests give equal keys whatever order their fields came
            // in, a value cannot pass for another field's, and one more value (a second
            // `Cookie`) is a difference.
            fields.sort_by_key(|&(index, _)| index);
        }
        Some(RequestKey {
            method: req.method().clone(),
            uri: req.uri().clone(),
            fields,
        })
    }
}

/// The key an [`HttpKey`] gives a request: its method, URI and the values of the
/// fields compared. Equal keys share a call.
///
/// `Hash`, `Eq`, `Clone`, `Send`, `Sync` and `'static`. Its `Debug` shows the method,
/// the URI and how many field values it holds, never the values themselves (they can
/// be credentials).
///
/// Available with the `http` feature.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RequestKey {
    method: Method,
    uri: Uri,
    // (the field's place in `HttpKey::fields`, one of its values)
    fields: Vec<(usize, HeaderValue)>,
}

impl RequestKey {
    /// The request's method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The request's URI, as the request had it.
    pub fn uri(&self) -> &Uri {
        &self.uri
    }
}

impl fmt::Debug for RequestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestKey")
            .field("method", &self.method)
            .field("uri", &self.uri)
            .field("fields", &self.fields.len())
            .finish()
    }
}
