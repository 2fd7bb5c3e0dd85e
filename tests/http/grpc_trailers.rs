//! gRPC answers whose status comes in the trailers, from a real HTTP/2 server on
//! loopback that answers the akka-grpc way (`200` headers, then trailers), with a tonic
//! server as the fallback, through a tonic client whose channel has the layer.

use crate::support::{ask, channel, served_by, Server, HOLD_LIMIT, OBSERVE_LIMIT};
use bytes::Bytes;
use http::{HeaderMap, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
    task::{JoinHandle, JoinSet},
};
use tonic::{codegen::tokio_stream, transport::Channel, Status};
use tonic_health::pb::{
    health_check_response::ServingStatus,
    health_client::HealthClient,
    health_server::{Health, HealthServer},
    HealthCheckRequest, HealthCheckResponse,
};
use tower::{Layer, ServiceBuilder, ServiceExt};
use tower_backstop::{
    http::{
        accept::{GrpcCode, GrpcStatus},
        grpc::{PeekGrpcStatus, PeekGrpcStatusLayer, PeekedStatus},
        BufferBodyLayer, ReplayBody,
    },
    FallbackLayer,
};

/// `HealthCheckResponse { status: SERVING }`, framed as one gRPC message.
const SERVING: &[u8] = b"\0\0\0\0\x02\x08\x01";

/// A response body the akka-style server feeds from a task.
struct Frames(mpsc::UnboundedReceiver<Frame<Bytes>>);

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|frame| frame.map(Ok))
    }
}

fn trailers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    pairs
        .iter()
        .map(|(name, value)| (name.parse().unwrap(), value.parse().unwrap()))
        .collect()
}

/// The service name in a `HealthCheckRequest` message (field 1, a short string).
fn asked(message: &[u8]) -> String {
    match message {
        [_, _, _, _, _, 0x0a, len, name @ ..] if name.len() == *len as usize => {
            String::from_utf8_lossy(name).into_owned()
        }
        _ => String::new(),
    }
}

/// An HTTP/2 server answering `grpc.health.v1.Health/Check` the way akka-grpc and
/// grpcio do: headers with `content-type: application/grpc` and no `grpc-status`,
/// then the body. The service name asked for is the script:
///
/// | asked for | body after the headers |
/// |---|---|
/// | `missing` | trailers `grpc-status: 5`, `grpc-message` — no message |
/// | `hit` | a `SERVING` message, then trailers `grpc-status: 0`, `x-trailer: kept` |
/// | `slow` | nothing until the test releases it, then as `hit` |
/// | `stuck` | a `SERVING` message, then nothing until the test releases it, then the trailers of `hit` |
struct AkkaServer {
    addr: SocketAddr,
    release: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl AkkaServer {
    async fn start() -> AkkaServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (release, released) = watch::channel(false);
        let task = tokio::spawn(async move {
            // Dropped with the task: every connection goes with the server.
            let mut connections = JoinSet::new();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let released = released.clone();
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let mut released = released.clone();
                        async move {
                            let message = req.into_body().collect().await.unwrap().to_bytes();
                            let asked = asked(&message);
                            let (tx, rx) = mpsc::unbounded_channel();
                            tokio::spawn(async move {
                                if asked == "slow" {
                                    let wait = released.wait_for(|r| *r);
                                    let _ = tokio::time::timeout(HOLD_LIMIT, wait).await;
                                }
                                if asked == "missing" {
                                    let _ = tx.send(Frame::trailers(trailers(&[
                                        ("grpc-status", "5"),
                                        ("grpc-message", "no%20such%20service"),
                                    ])));
                                } else {
                                    let _ = tx.send(Frame::data(Bytes::from_static(SERVING)));
                                    if asked == "stuck" {
                                        let wait = released.wait_for(|r| *r);
                                        let _ = tokio::time::timeout(HOLD_LIMIT, wait).await;
                                    }
                                    let _ = tx.send(Frame::trailers(trailers(&[
                                        ("grpc-status", "0"),
                                        ("x-trailer", "kept"),
                                    ])));
                                }
                            });
                            let response = Response::builder()
                                .header("content-type", "application/grpc")
                                .header("x-served-by", "primary")
                                .body(Frames(rx))
                                .unwrap();
                            Ok::<_, Infallible>(response)
                        }
                    });
                connections.spawn(async move {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        AkkaServer {
            addr,
            release,
            task,
        }
    }
}

impl Drop for AkkaServer {
    fn drop(&mut self) {
        self.release.send_replace(true);
        self.task.abort();
    }
}

/// The fallback: a tonic health server that answers `SERVING`, marked as its own.
struct Answering;

#[tonic::async_trait]
impl Health for Answering {
    async fn check(
        &self,
        _request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, Status> {
        let mut response = tonic::Response::new(HealthCheckResponse {
            status: ServingStatus::Serving as i32,
        });
        response
            .metadata_mut()
            .insert("x-served-by", "fallback".parse().unwrap());
        Ok(response)
    }

    type WatchStream = tokio_stream::Empty<Result<HealthCheckResponse, Status>>;

    async fn watch(
        &self,
        _request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("not scripted"))
    }
}

fn to_tonic(req: http::Request<ReplayBody>) -> http::Request<tonic::body::Body> {
    req.map(tonic::body::Body::new)
}

/// The stack under test, with the primary's wait for its first frame set by `peek`.
fn stack(
    primary: Channel,
    fallback: Channel,
    peek: PeekGrpcStatusLayer,
) -> impl tower::Service<
    http::Request<ReplayBody>,
    Response = http::Response<tower_backstop::http::read::ReadAheadBody<tonic::body::Body>>,
    Error = tonic::transport::Error,
    Future = impl Send,
> + Clone
       + Send {
    let layer = FallbackLayer::new(fallback.map_request(to_tonic))
        .accept(GrpcStatus::rejecting(&[GrpcCode::NotFound]))
        .map_fallback(PeekGrpcStatus::pass_through);
    ServiceBuilder::new()
        .layer(layer)
        .layer(peek)
        .map_request(to_tonic)
        .service(primary)
}

async fn servers() -> (AkkaServer, Server) {
    (
        AkkaServer::start().await,
        Server::grpc(HealthServer::new(Answering)).await,
    )
}

/// A tonic client on the stack as the docs build it: one builder call.
async fn client_as_the_docs_build_it(
    akka: &AkkaServer,
    fallback: &Server,
) -> HealthClient<
    impl tonic::client::GrpcService<
        tonic::body::Body,
        Error = tonic::transport::Error,
        ResponseBody = tower_backstop::http::read::ReadAheadBody<tonic::body::Body>,
    >,
> {
    let to_tonic = |req: http::Request<ReplayBody>| req.map(tonic::body::Body::new);
    let stack = ServiceBuilder::new()
        .layer(BufferBodyLayer::new())
        .layer(
            FallbackLayer::new(channel(fallback.addr).await.map_request(to_tonic))
                .accept(GrpcStatus::rejecting(&[GrpcCode::NotFound]))
                .peek_grpc_status(),
        )
        .map_request(to_tonic)
        .service(channel(akka.addr).await);
    HealthClient::new(stack)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_not_found_sent_in_the_trailers_is_served_by_the_fallback() {
    let (akka, fallback) = servers().await;
    let mut client = client_as_the_docs_build_it(&akka, &fallback).await;

    let response = client.check(ask("missing")).await.unwrap();
    assert_eq!(served_by(&response), "fallback");
    assert_eq!(response.get_ref().status, ServingStatus::Serving as i32);

    fallback.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_success_sent_the_akka_way_stands_with_its_message_and_trailers() {
    let (akka, fallback) = servers().await;
    let svc = stack(
        channel(akka.addr).await,
        channel(fallback.addr).await,
        PeekGrpcStatusLayer::new(),
    );
    let mut client = HealthClient::new(BufferBodyLayer::new().layer(svc));

    let response = client.check(ask("hit")).await.unwrap();
    assert_eq!(served_by(&response), "primary");
    assert_eq!(response.get_ref().status, ServingStatus::Serving as i32);
    // tonic merges a unary call's trailers into its metadata.
    assert_eq!(response.metadata().get("x-trailer").unwrap(), "kept");

    // Byte for byte, as the server sent it.
    let req = grpc_request("hit");
    let response = stack(
        channel(akka.addr).await,
        channel(fallback.addr).await,
        PeekGrpcStatusLayer::new(),
    )
    .oneshot(req)
    .await
    .unwrap();
    assert_eq!(response.extensions().get::<PeekedStatus>(), None);
    let collected = response.into_body().collect().await.unwrap();
    let sent = trailers(&[("grpc-status", "0"), ("x-trailer", "kept")]);
    assert_eq!(collected.trailers(), Some(&sent));
    assert_eq!(collected.to_bytes(), SERVING);

    fallback.stop().await;
}

/// A raw `Check` request for `service`, framed as gRPC.
fn grpc_request(service: &'static str) -> http::Request<ReplayBody> {
    let mut message = vec![
        0,
        0,
        0,
        0,
        service.len() as u8 + 2,
        0x0a,
        service.len() as u8,
    ];
    message.extend_from_slice(service.as_bytes());
    http::Request::post("/grpc.health.v1.Health/Check")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(ReplayBody::new(message.into()))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_sends_headers_and_then_nothing_is_rejected_after_max_wait() {
    let (akka, fallback) = servers().await;
    // A small bound: this test runs on the real clock, against real sockets.
    let peek = PeekGrpcStatusLayer::new().max_wait(Duration::from_millis(50));
    let svc = stack(channel(akka.addr).await, channel(fallback.addr).await, peek);

    let response = tokio::time::timeout(OBSERVE_LIMIT, svc.oneshot(grpc_request("slow")))
        .await
        .expect("answered within the bound, before the primary sends anything")
        .unwrap();
    // Nothing came in time: a rejection, whatever the status would have been. Before,
    // the primary's answer stood, unjudged, and its caller waited on the body.
    assert_eq!(response.headers()["x-served-by"], "fallback");
    assert_eq!(response.extensions().get::<PeekedStatus>(), None);
    let collected = tokio::time::timeout(OBSERVE_LIMIT, response.into_body().collect())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
    assert_eq!(collected.to_bytes(), SERVING);

    fallback.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tonic_client_is_served_by_the_fallback_when_the_primary_stalls_after_its_headers() {
    let (akka, fallback) = servers().await;
    // With the default wait (1 s).
    let mut client = client_as_the_docs_build_it(&akka, &fallback).await;

    // The primary sends `200` headers, then nothing until the test ends. Before, it
    // was accepted after the wait and the client hung on the body.
    let response = tokio::time::timeout(OBSERVE_LIMIT, client.check(ask("slow")))
        .await
        .expect("the client is answered, not left waiting on the primary's body")
        .unwrap();
    assert_eq!(served_by(&response), "fallback");
    assert_eq!(response.get_ref().status, ServingStatus::Serving as i32);

    drop(akka);
    fallback.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unary_answer_that_stalls_after_its_message_is_rejected_with_read_primary_body() {
    let (akka, fallback) = servers().await;
    let to_tonic = |req: http::Request<ReplayBody>| req.map(tonic::body::Body::new);
    // The peek stops at the first message; a unary answer whose trailers then stall
    // would be accepted, and the client would wait on them. Reading the whole answer
    // (a small bound: real clock, real sockets) makes the stall a rejection.
    let read = tower_backstop::http::read::ReadBodyLayer::new().max_wait(Duration::from_millis(50));
    let stack = ServiceBuilder::new()
        .layer(BufferBodyLayer::new())
        .layer(
            FallbackLayer::new(channel(fallback.addr).await.map_request(to_tonic))
                .accept(GrpcStatus::rejecting(&[GrpcCode::NotFound]))
                .read_primary_body_with(read),
        )
        .map_request(to_tonic)
        .service(channel(akka.addr).await);
    let mut client = HealthClient::new(stack);

    let response = tokio::time::timeout(OBSERVE_LIMIT, client.check(ask("stuck")))
        .await
        .expect("the client is answered, not left waiting on the primary's trailers")
        .unwrap();
    assert_eq!(served_by(&response), "fallback");
    // A whole answer in time stands, its trailers with it.
    let response = client.check(ask("hit")).await.unwrap();
    assert_eq!(served_by(&response), "primary");
    assert_eq!(response.metadata().get("x-trailer").unwrap(), "kept");

    drop(akka);
    fallback.stop().await;
}
