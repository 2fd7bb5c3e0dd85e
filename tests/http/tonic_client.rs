//! tonic: a client whose channel stack has the layer, against two tonic servers
//! answering the gRPC health service (`tonic-health`'s generated code, no protoc).

use crate::support::{ask, channel, dead_addr, served_by, Event, Server, Tracker};
use tonic::{
    codegen::tokio_stream,
    transport::{Channel, Endpoint},
    Code, Status,
};
use tonic_health::pb::{
    health_check_response::ServingStatus,
    health_client::HealthClient,
    health_server::{Health, HealthServer},
    HealthCheckRequest, HealthCheckResponse,
};
use tower::{ServiceBuilder, ServiceExt};
use tower_backstop::{
    http::{
        accept::{GrpcCode, GrpcStatus},
        BufferBodyLayer, ReplayBody,
    },
    FallbackLayer,
};

/// The health service of one server. The service name asked for is the script:
///
/// | asked for | primary | fallback |
/// |---|---|---|
/// | `hit-*` | waits until the fallback has the same call in flight, then `OK` | held until released |
/// | `missing-*` | `NOT_FOUND` | `OK` |
/// | `down-*` | `UNAVAILABLE` | `OK` |
/// | `invalid-*` | `INVALID_ARGUMENT` | `OK` |
#[derive(Clone)]
struct Scripted {
    name: &'static str,
    calls: Tracker,
    /// For the primary: the fallback's calls.
    fallback_calls: Option<Tracker>,
}

#[tonic::async_trait]
impl Health for Scripted {
    async fn check(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, Status> {
        let asked = request.into_inner().service;
        let call = self.calls.start(asked.clone());
        let verdict = match (&self.fallback_calls, asked.split('-').next()) {
            (Some(fallback_calls), Some("hit")) => {
                let in_flight = Event::Started(asked.clone());
                if fallback_calls.wait_until(|e| e.contains(&in_flight)).await {
                    Ok(())
                } else {
                    Err(Status::internal("the fallback's call never reached it"))
                }
            }
            (Some(_), Some("missing")) => Err(Status::not_found("no such service")),
            (Some(_), Some("down")) => Err(Status::unavailable("shedding load")),
            (Some(_), Some("invalid")) => Err(Status::invalid_argument("bad name")),
            (None, Some("hit")) => {
                self.calls.hold().await;
                Ok(())
            }
            _ => Ok(()),
        };
        call.finish();
        verdict?;
        let mut response = tonic::Response::new(HealthCheckResponse {
            status: ServingStatus::Serving as i32,
        });
        response
            .metadata_mut()
            .insert("x-served-by", self.name.parse().unwrap());
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

struct Servers {
    primary: Server,
    fallback: Server,
    primary_calls: Tracker,
    fallback_calls: Tracker,
}

impl Servers {
    async fn start() -> Servers {
        let (primary_calls, fallback_calls) = (Tracker::default(), Tracker::default());
        let primary = Server::grpc(HealthServer::new(Scripted {
            name: "primary",
            calls: primary_calls.clone(),
            fallback_calls: Some(fallback_calls.clone()),
        }))
        .await;
        let fallback = Server::grpc(HealthServer::new(Scripted {
            name: "fallback",
            calls: fallback_calls.clone(),
            fallback_calls: None,
        }))
        .await;
        Servers {
            primary,
            fallback,
            primary_calls,
            fallback_calls,
        }
    }

    async fn stop(self) {
        self.fallback_calls.release();
        self.primary.stop().await;
        self.fallback.stop().await;
    }
}

/// The channel stack under test: bodies buffered, the fallback channel beside the
/// primary one, each branch converting the replayed body back into tonic's.
async fn client_with(
    primary: Channel,
    fallback: Channel,
    accept: GrpcStatus,
    max_bytes: usize,
) -> HealthClient<
    impl tonic::client::GrpcService<
            tonic::body::Body,
            Error = tonic::transport::Error,
            ResponseBody = tonic::body::Body,
            Future = impl Send,
        > + Clone
        + Send,
> {
    let to_tonic = |req: http::Request<ReplayBody>| req.map(tonic::body::Body::new);
    let channel = ServiceBuilder::new()
        .layer(BufferBodyLayer::new().max_bytes(max_bytes))
        .layer(FallbackLayer::new(fallback.map_request(to_tonic)).accept(accept))
        .map_request(to_tonic)
        .service(primary);
    HealthClient::new(channel)
}

const MISS: GrpcStatus = GrpcStatus::rejecting(&[GrpcCode::NotFound, GrpcCode::Unavailable]);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_found_and_unavailable_are_served_by_the_fallback() {
    let servers = Servers::start().await;
    let primary = channel(servers.primary.addr).await;
    let fallback = channel(servers.fallback.addr).await;
    let mut client = client_with(primary, fallback, MISS, 64 * 1024).await;

    for asked in ["missing-1", "down-1"] {
        let response = client.check(ask(asked)).await.unwrap();
        assert_eq!(served_by(&response), "fallback", "{asked}");
        assert_eq!(response.get_ref().status, ServingStatus::Serving as i32);
    }
    // A status outside the rejected set stands, error or not.
    let status = client.check(ask("invalid-1")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "bad name");

    // With the default predicate, any error status falls back.
    let primary = channel(servers.primary.addr).await;
    let fallback = channel(servers.fallback.addr).await;
    let mut client = client_with(primary, fallback, GrpcStatus::new(), 64 * 1024).await;
    let response = client.check(ask("invalid-2")).await.unwrap();
    assert_eq!(served_by(&response), "fallback");

    servers.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_from_the_primary_cancels_the_fallbacks_call_on_its_server() {
    let servers = Servers::start().await;
    let primary = channel(servers.primary.addr).await;
    let fallback = channel(servers.fallback.addr).await;
    let mut client = client_with(primary, fallback, MISS, 64 * 1024).await;

    for n in 1..=2 {
        let asked = format!("hit-{n}");
        let response = client.check(ask(&asked)).await.unwrap();
        assert_eq!(served_by(&response), "primary");
        // The fallback's handler is held until `release`: only a reset stream ends it
        // before that.
        let cancelled = Event::Cancelled(asked.clone());
        assert!(
            servers
                .fallback_calls
                .wait_until(|e| e.contains(&cancelled))
                .await,
            "{:?}",
            servers.fallback_calls.events()
        );
    }
    assert_eq!(servers.fallback_calls.completed(), 0);

    servers.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_cap_is_resource_exhausted_and_sent_nowhere() {
    let servers = Servers::start().await;
    let primary = channel(servers.primary.addr).await;
    let fallback = channel(servers.fallback.addr).await;
    let mut client = client_with(primary, fallback, MISS, 32).await;

    let status = client.check(ask(&"x".repeat(100))).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    // Under the cap, the same client works.
    let response = client.check(ask("missing-1")).await.unwrap();
    assert_eq!(served_by(&response), "fallback");
    assert_eq!(servers.primary_calls.started(), 1);
    assert_eq!(servers.fallback_calls.started(), 1);

    servers.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_primary_is_served_by_the_fallback() {
    let servers = Servers::start().await;
    let primary = Endpoint::from_shared(format!("http://{}", dead_addr().await))
        .unwrap()
        .connect_lazy();
    let fallback = channel(servers.fallback.addr).await;
    let mut client = client_with(primary, fallback, MISS, 64 * 1024).await;

    let response = client.check(ask("missing-1")).await.unwrap();
    assert_eq!(served_by(&response), "fallback");

    servers.stop().await;
}

/// [`client_with`]'s stack with `peek_grpc_status` (features `http` and `time`): the
/// body type is `ReadAheadBody`.
#[cfg(feature = "time")]
async fn peeking_client(
    primary: Channel,
    fallback: Channel,
    accept: GrpcStatus,
) -> HealthClient<
    impl tonic::client::GrpcService<
            tonic::body::Body,
            Error = tonic::transport::Error,
            ResponseBody = tower_backstop::http::read::ReadAheadBody<tonic::body::Body>,
            Future = impl Send,
        > + Clone
        + Send,
> {
    let to_tonic = |req: http::Request<ReplayBody>| req.map(tonic::body::Body::new);
    let channel = ServiceBuilder::new()
        .layer(BufferBodyLayer::new())
        .layer(
            FallbackLayer::new(fallback.map_request(to_tonic))
                .accept(accept)
                .peek_grpc_status(),
        )
        .map_request(to_tonic)
        .service(primary);
    // The bounds `tonic::client::Grpc` puts on a transport, which generated clients use.
    let _ = tonic::client::Grpc::new(channel.clone());
    HealthClient::new(channel)
}

#[cfg(feature = "time")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_peek_grpc_status_a_status_in_the_headers_is_judged_as_before() {
    let servers = Servers::start().await;
    let primary = channel(servers.primary.addr).await;
    let fallback = channel(servers.fallback.addr).await;
    let mut client = peeking_client(primary, fallback, MISS).await;

    // tonic answers errors trailers-only: judged by the head, no frame read.
    let response = client.check(ask("missing-1")).await.unwrap();
    assert_eq!(served_by(&response), "fallback");
    let status = client.check(ask("invalid-1")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "bad name");
    // A success comes as a message: it stands, and the fallback's call is cancelled.
    let response = client.check(ask("hit-1")).await.unwrap();
    assert_eq!(served_by(&response), "primary");
    assert_eq!(response.get_ref().status, ServingStatus::Serving as i32);
    let cancelled = Event::Cancelled("hit-1".to_owned());
    assert!(
        servers
            .fallback_calls
            .wait_until(|e| e.contains(&cancelled))
            .await
    );

    servers.stop().await;
}
