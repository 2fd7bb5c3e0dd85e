//! `HttpKey`, the ready-made coalescing key: which requests share a key, which differ,
//! and which are never keyed (credentials, unsafe methods, bodies), in memory.

use axum::body::Body;
use bytes::Bytes;
use http::{header, HeaderName, Method, Request};
use std::collections::HashSet;
use tower_backstop::{
    coalesce::CoalesceKey,
    http::{HttpKey, ReplayBody, RequestKey, CREDENTIALS},
};

/// A bodiless request to `uri` with these header fields.
fn req(method: Method, uri: &str, headers: &[(&str, &str)]) -> Request<ReplayBody> {
    let mut builder = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(ReplayBody::empty()).unwrap()
}

fn get(uri: &str, headers: &[(&str, &str)]) -> Request<ReplayBody> {
    req(Method::GET, uri, headers)
}

fn key(key: &HttpKey, req: &Request<ReplayBody>) -> RequestKey {
    key.key(req).expect("the request is keyed")
}

fn assert_shares(policy: &HttpKey, a: &Request<ReplayBody>, b: &Request<ReplayBody>) {
    assert_eq!(
        key(policy, a),
        key(policy, b),
        "{a:?} and {b:?} should share"
    );
    // Equal keys hash equally: a map of calls in flight finds one from the other.
    let set: HashSet<_> = [key(policy, a)].into();
    assert!(set.contains(&key(policy, b)));
}

fn assert_apart(policy: &HttpKey, a: &Request<ReplayBody>, b: &Request<ReplayBody>) {
    assert_ne!(
        key(policy, a),
        key(policy, b),
        "{a:?} and {b:?} must not share"
    );
}

#[test]
fn equal_requests_share_a_key() {
    let policy = HttpKey::new();
    let headers = [("accept", "application/json"), ("accept-encoding", "gzip")];
    assert_shares(
        &policy,
        &get("https://api.example/item/7?v=2", &headers),
        &get("https://api.example/item/7?v=2", &headers),
    );
    // Fields outside the list do not vary the key.
    assert_shares(
        &policy,
        &get("/item/7", &[("user-agent", "a"), ("x-request-id", "1")]),
        &get("/item/7", &[("user-agent", "b"), ("x-request-id", "2")]),
    );
    // The authority is compared without regard to case, as `http::Uri` does.
    assert_shares(
        &policy,
        &get("http://API.example/item", &[]),
        &get("http://api.example/item", &[]),
    );
}

#[test]
fn the_method_and_every_part_of_the_uri_are_in_the_key() {
    let policy = HttpKey::new();
    let base = get("https://api.example/item/7?v=2", &[]);
    for other in [
        "http://api.example/item/7?v=2",
        "https://other.example/item/7?v=2",
        "https://api.example:8443/item/7?v=2",
        "https://api.example/item/8?v=2",
        "https://api.example/item/7?v=3",
        "https://api.example/item/7",
        "/item/7?v=2",
    ] {
        assert_apart(&policy, &base, &get(other, &[]));
    }
    let head = req(Method::HEAD, "https://api.example/item/7?v=2", &[]);
    assert_apart(&policy, &base, &head);
}

#[test]
fn the_fields_that_vary_the_answer_are_in_the_key() {
    let policy = HttpKey::new();
    for (name, a, b) in [
        ("accept", "application/json", "text/html"),
        ("accept-encoding", "gzip", "br"),
        ("accept-language", "en", "fr"),
        ("host", "a.example", "b.example"),
        ("range", "bytes=0-99", "bytes=100-199"),
        ("if-none-match", "\"v1\"", "\"v2\""),
        (
            "if-modified-since",
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Mon, 07 Nov 1994 08:49:37 GMT",
        ),
        ("if-match", "\"v1\"", "\"v2\""),
        (
            "if-unmodified-since",
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Mon, 07 Nov 1994 08:49:37 GMT",
        ),
        ("if-range", "\"v1\"", "\"v2\""),
    ] {
        let with_a = get("/item/7", &[(name, a)]);
        assert_shares(&policy, &with_a, &get("/item/7", &[(name, a)]));
        assert_apart(&policy, &with_a, &get("/item/7", &[(name, b)]));
        // Having the field at all is a difference.
        assert_apart(&policy, &with_a, &get("/item/7", &[]));
    }
    // Every value counts, in order: one more, or another order, is another key.
    let two = get(
        "/",
        &[("accept", "text/html"), ("accept", "application/json")],
    );
    assert_apart(&policy, &two, &get("/", &[("accept", "text/html")]));
    assert_apart(
        &policy,
        &two,
        &get(
            "/",
            &[("accept", "application/json"), ("accept", "text/html")],
        ),
    );
    // The order of different fields does not matter.
    assert_shares(
        &policy,
        &get(
            "/",
            &[
                ("accept", "text/html"),
                ("accept-language", "en"),
                ("host", "a"),
            ],
        ),
        &get(
            "/",
            &[
                ("host", "a"),
                ("accept-language", "en"),
                ("accept", "text/html"),
            ],
        ),
    );
    // A value cannot pass for another field's.
    assert_apart(
        &policy,
        &get("/", &[("accept", "en")]),
        &get("/", &[("accept-language", "en")]),
    );
}

#[test]
fn vary_adds_a_field_to_the_key() {
    let tenant = HeaderName::from_static("x-tenant");
    let a = get("/report", &[("x-tenant", "a")]);
    let b = get("/report", &[("x-tenant", "b")]);
    // Not compared by default: the two would share...
    assert_shares(&HttpKey::new(), &a, &b);
    // ...and once named, they never do.
    let policy = HttpKey::new().vary(tenant.clone()).vary(tenant.clone());
    assert_apart(&policy, &a, &b);
    assert_shares(&policy, &a, &get("/report", &[("x-tenant", "a")]));
    assert_eq!(policy.fields().filter(|name| **name == tenant).count(), 1);
    // A default field named again is compared once, in its place; a credential field
    // is not added (it is refused, or compared by `share_credentialed`).
    let accept = HttpKey::new().vary(header::ACCEPT).vary(header::COOKIE);
    assert_eq!(accept.fields().count(), HttpKey::new().fields().count());
}

#[test]
fn requests_with_credentials_are_never_keyed_by_default() {
    let policy = HttpKey::new().vary(header::AUTHORIZATION);
    for name in CREDENTIALS {
        let private = get("/account", &[(name.as_str(), "secret")]);
        assert_eq!(policy.key(&private), None, "{name} must not be shared");
    }
    // An empty value is still a credential field.
    assert_eq!(policy.key(&get("/", &[("cookie", "")])), None);
}

#[test]
fn share_credentialed_keys_the_credentials_themselves() {
    let policy = HttpKey::new().share_credentialed();
    for name in CREDENTIALS {
        let name = name.as_str();
        let alice = get("/account", &[(name, "token-alice")]);
        // The same credentials share...
        assert_shares(&policy, &alice, &get("/account", &[(name, "token-alice")]));
        // ...other credentials, or none, never do.
        assert_apart(&policy, &alice, &get("/account", &[(name, "token-bob")]));
        assert_apart(&policy, &alice, &get("/account", &[]));
    }
    // Two cookie fields (as HTTP/2 sends them) against one: not the same credentials.
    assert_apart(
        &policy,
        &get("/", &[("cookie", "a=1"), ("cookie", "b=2")]),
        &get("/", &[("cookie", "a=1")]),
    );
}

#[test]
fn only_get_and_head_are_keyed() {
    let policy = HttpKey::new();
    assert!(policy.key(&req(Method::HEAD, "/", &[])).is_some());
    for method in [
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::OPTIONS,
        Method::TRACE,
        Method::CONNECT,
        Method::from_bytes(b"QUERY").unwrap(),
    ] {
        assert_eq!(policy.key(&req(method.clone(), "/", &[])), None, "{method}");
    }
}

#[test]
fn a_request_that_may_have_a_body_is_not_keyed() {
    let policy = HttpKey::new();
    let with_body = Request::get("/search")
        .body(ReplayBody::new(Bytes::from_static(b"{\"q\":\"a\"}")))
        .unwrap();
    assert_eq!(policy.key(&with_body), None);
    // A streamed body that does not say it is empty.
    let stream = futures_util::stream::empty::<Result<Bytes, std::convert::Infallible>>();
    let streamed = Request::get("/search")
        .body(Body::from_stream(stream))
        .unwrap();
    assert_eq!(policy.key(&streamed), None);
    // Bodies that say they are empty are keyed.
    let empty = Request::get("/search").body(Body::empty()).unwrap();
    assert!(policy.key(&empty).is_some());
    let empty = Request::get("/search").body(String::new()).unwrap();
    assert!(policy.key(&empty).is_some());
}

#[test]
fn keys_are_thread_safe_values_and_their_debug_hides_field_values() {
    fn is_key<K: std::hash::Hash + Eq + Clone + Send + Sync + std::fmt::Debug + 'static>() {}
    is_key::<RequestKey>();
    fn is_policy<P: CoalesceKey<Request<Body>> + Clone + Send + Sync + std::fmt::Debug>() {}
    is_policy::<HttpKey>();

    let policy = HttpKey::new().share_credentialed();
    let key = key(
        &policy,
        &get("/account", &[("authorization", "Bearer secret-token")]),
    );
    let shown = format!("{key:?}");
    assert!(shown.contains("/account"), "{shown}");
    assert!(!shown.contains("secret-token"), "{shown}");
    assert_eq!(key.method(), Method::GET);
    assert_eq!(key.uri(), "/account");
}

#[test]
fn an_upgrade_is_never_shared() {
    use tower_backstop::coalesce::CoalesceKey;
    let request = http::Request::get("/chat")
        .header(http::header::UPGRADE, "websocket")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(tower_backstop::http::ReplayBody::default())
        .unwrap();
    assert!(tower_backstop::http::HttpKey::new().key(&request).is_none());
}
