//! `BufferBody` allocates nothing for a bodiless request, nor for a body that arrives
//! in one chunk (the chunk is shared, not copied); nor does `read_primary_body` for a
//! response body that arrives in one chunk (with the `time` feature).
//!
//! A counting global allocator counts the allocations made by the current thread while
//! a window is open. `BufferBody` around a `Fallback` of two services whose futures are
//! `std::future::Ready` serves requests without headers (so that cloning the request
//! for the fallback — the core's cost — allocates nothing either) inside such a window.
//! Every answer is checked, and a control shows that a body in two chunks, which must
//! be copied into one buffer, is seen allocating.

use bytes::Bytes;
use futures_util::task::noop_waker_ref;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use std::{
    convert::Infallible,
    future::{ready, Future, Ready},
    pin::{pin, Pin},
    task::{Context, Poll},
};
use tower::{service_fn, Service};
use tower_backstop::{
    http::{accept::RejectStatus, ReplayBody},
    Fallback,
};

const N: usize = 200;

#[path = "support/counting_alloc.rs"]
mod counting_alloc;

/// Allocations this thread made while `f` ran.
fn allocations_in(f: impl FnOnce()) -> usize {
    counting_alloc::allocations_in(f).0
}

/// Polls a future that must finish on its first poll.
fn complete<F: Future>(fut: F) -> F::Output {
    let mut cx = Context::from_waker(noop_waker_ref());
    match pin!(fut).poll(&mut cx) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("the future was expected to finish at once"),
    }
}

/// A request body of up to two chunks, yielded without allocating.
struct Chunks([Option<Bytes>; 2]);

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let next = self.0.iter_mut().find_map(Option::take);
        Poll::Ready(next.map(|chunk| Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.iter().all(Option::is_none)
    }
}

type Answer = Ready<Result<Response<usize>, Infallible>>;

/// The primary answers `404` for `/miss`; both answer with the body length they got,
/// the fallback's plus 1000, without allocating.
fn stack() -> impl Service<Request<Chunks>, Response = Response<usize>, Error = Infallible> {
    let primary = service_fn(|req: Request<ReplayBody>| -> Answer {
        let mut response = Response::new(req.body().data().len());
        if req.uri().path() == "/miss" {
            *response.status_mut() = StatusCode::NOT_FOUND;
        }
        ready(Ok(response))
    });
    let fallback = service_fn(|req: Request<ReplayBody>| -> Answer {
        ready(Ok(Response::new(1000 + req.body().data().len())))
    });
    Fallback::new(primary, fallback)
        .accept(RejectStatus(StatusCode::NOT_FOUND))
        .buffer_bodies()
}

fn serve(
    svc: &mut impl Service<Request<Chunks>, Response = Response<usize>, Error = Infallible>,
    path: &'static str,
    chunks: [Option<Bytes>; 2],
) -> usize {
    let mut req = Request::new(Chunks(chunks));
    *req.uri_mut() = http::Uri::from_static(path);
    let mut cx = Context::from_waker(noop_waker_ref());
    assert!(svc.poll_ready(&mut cx).is_ready());
    let Ok(response) = complete(svc.call(req));
    *response.body()
}

#[test]
fn bodiless_requests_allocate_nothing() {
    let mut svc = stack();
    let mut served = Vec::with_capacity(2 * N);
    let count = allocations_in(|| {
        for _ in 0..N {
            served.push(serve(&mut svc, "/hit", [None, None]));
            served.push(serve(&mut svc, "/miss", [None, None]));
        }
    });
    assert_eq!(count, 0);
    assert!(served.chunks(2).all(|pair| pair == [0, 1000]));
}

#[test]
fn a_body_in_one_chunk_allocates_nothing() {
    let mut svc = stack();
    let chunk = Bytes::from(vec![7u8; 512]);
    // A `Bytes` made from a `Vec` allocates its shared header on its first clone:
    // done here, outside the window.
    let _promoted = chunk.clone();
    let mut served = Vec::with_capacity(2 * N);
    let count = allocations_in(|| {
        for _ in 0..N {
            served.push(serve(&mut svc, "/hit", [Some(chunk.clone()), None]));
            served.push(serve(&mut svc, "/miss", [Some(chunk.clone()), None]));
        }
    });
    assert_eq!(count, 0);
    assert!(served.chunks(2).all(|pair| pair == [512, 1512]));
}

#[test]
fn control_a_body_in_two_chunks_is_copied_into_one_buffer() {
    let mut svc = stack();
    let (a, b) = (Bytes::from(vec![1u8; 100]), Bytes::from(vec![2u8; 28]));
    let mut served = 0;
    let count = allocations_in(|| {
        served = serve(&mut svc, "/hit", [Some(a.clone()), Some(b.clone())]);
    });
    assert_eq!(served, 128);
    assert!(count >= 1, "the counter sees the buffer being allocated");
}

/// `read_primary_body` on the same two services, answering with a body of up to two
/// chunks: a hit read whole in one chunk allocates nothing (no copy, no extension, no
/// timer: the body is ready at once).
#[cfg(feature = "time")]
mod read_primary_body {
    use super::*;
    use tower_backstop::http::{accept::StatusIn, read::ReadAheadBody};

    type Answer = Ready<Result<Response<Chunks>, Infallible>>;

    fn answer(chunks: [Option<Bytes>; 2]) -> Answer {
        ready(Ok(Response::new(Chunks(chunks))))
    }

    fn read(
        svc: &mut impl Service<(), Response = Response<ReadAheadBody<Chunks>>, Error = Infallible>,
    ) -> usize {
        let mut cx = Context::from_waker(noop_waker_ref());
        assert!(svc.poll_ready(&mut cx).is_ready());
        let Ok(response) = complete(svc.call(()));
        response.body().whole().expect("read whole").len()
    }

    #[test]
    fn a_hit_read_whole_in_one_chunk_allocates_nothing() {
        let chunk = Bytes::from(vec![7u8; 512]);
        let _promoted = chunk.clone();
        let body = chunk.clone();
        let primary = service_fn(move |()| answer([Some(body.clone()), None]));
        let fallback = service_fn(|()| answer([None, None]));
        let mut svc = Fallback::new(primary, fallback)
            .accept(StatusIn::SUCCESS)
            .read_primary_body();
        let mut read_lengths = Vec::with_capacity(N);
        let count = allocations_in(|| {
            for _ in 0..N {
                read_lengths.push(read(&mut svc));
            }
        });
        assert_eq!(count, 0);
        assert!(read_lengths.iter().all(|&len| len == 512));
    }

    #[test]
    fn control_a_body_in_two_chunks_is_copied_into_one_buffer() {
        let (a, b) = (Bytes::from(vec![1u8; 100]), Bytes::from(vec![2u8; 28]));
        let primary = service_fn(move |()| answer([Some(a.clone()), Some(b.clone())]));
        let fallback = service_fn(|()| answer([None, None]));
        let mut svc = Fallback::new(primary, fallback)
            .accept(StatusIn::SUCCESS)
            .read_primary_body();
        let mut len = 0;
        let count = allocations_in(|| len = read(&mut svc));
        assert_eq!(len, 128);
        assert!(count >= 1, "the counter sees the buffer being allocated");
    }
}

/// `HttpKey`: a request it refuses costs no allocation; a keyed one at most one, for
/// its field values (the URI, method and values are `from_static`: their clones are
/// free, as hyper's shared buffers are).
mod http_key {
    use super::*;
    use http::{header, HeaderValue, Method, Uri};
    use tower_backstop::{coalesce::CoalesceKey, http::HttpKey};

    fn request(
        method: Method,
        fields: &[(header::HeaderName, &'static str)],
    ) -> Request<ReplayBody> {
        let mut req = Request::new(ReplayBody::empty());
        *req.method_mut() = method;
        *req.uri_mut() = Uri::from_static("http://api.example/item/7?v=2");
        for (name, value) in fields {
            req.headers_mut()
                .append(name, HeaderValue::from_static(value));
        }
        req
    }

    fn allocations_per_key(key: &HttpKey, req: &Request<ReplayBody>) -> (usize, bool) {
        let mut keyed = false;
        let count = allocations_in(|| {
            for _ in 0..N {
                keyed = key.key(req).is_some();
            }
        });
        (count / N, keyed)
    }

    #[test]
    fn a_refused_request_allocates_nothing_and_a_keyed_one_at_most_once() {
        let key = HttpKey::new();
        let cookie = request(Method::GET, &[(header::COOKIE, "id=1")]);
        assert_eq!(allocations_per_key(&key, &cookie), (0, false));
        let post = request(Method::POST, &[]);
        assert_eq!(allocations_per_key(&key, &post), (0, false));
        let bare = request(Method::GET, &[]);
        assert_eq!(allocations_per_key(&key, &bare), (0, true));
        let negotiated = request(
            Method::GET,
            &[
                (header::ACCEPT, "application/json"),
                (header::ACCEPT_ENCODING, "gzip"),
                (header::HOST, "api.example"),
            ],
        );
        assert_eq!(allocations_per_key(&key, &negotiated), (1, true));
        // Still one: the vector is sized by a first scan, not grown.
        let many = request(
            Method::GET,
            &[
                (header::ACCEPT, "text/html"),
                (header::ACCEPT, "application/json"),
                (header::ACCEPT_ENCODING, "gzip"),
                (header::ACCEPT_LANGUAGE, "en"),
                (header::HOST, "api.example"),
                (header::IF_NONE_MATCH, "\"v1\""),
            ],
        );
        assert_eq!(allocations_per_key(&key, &many), (1, true));
        let shared = HttpKey::new().share_credentialed();
        assert_eq!(allocations_per_key(&shared, &cookie), (1, true));
    }
}

/// What a waiter's copy of a shared answer costs: `Response::clone` allocates its
/// header map anew (a fixed number of allocations, none for a head without fields)
/// and never copies the body, whatever its size.
mod shared_answer {
    use super::*;
    use http::{header, HeaderValue};

    fn answer(body: Bytes, fields: bool) -> Response<ReplayBody> {
        let mut response = Response::new(ReplayBody::new(body));
        if fields {
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            headers.insert(header::ETAG, HeaderValue::from_static("\"v7\""));
        }
        response
    }

    fn clone_allocations(response: &Response<ReplayBody>) -> usize {
        let mut copies = Vec::with_capacity(N);
        allocations_in(|| copies.extend((0..N).map(|_| response.clone()))) / N
    }

    #[test]
    fn a_copy_allocates_its_head_only() {
        let big = Bytes::from(vec![7u8; 1 << 20]);
        let _promoted = big.clone();
        assert_eq!(clone_allocations(&answer(big.clone(), false)), 0);
        let head = clone_allocations(&answer(Bytes::new(), true));
        assert_eq!(clone_allocations(&answer(big, true)), head);
        assert!(head <= 2, "{head} allocations for a head of two fields");
    }
}
