//! A tonic client whose channel asks a replica and falls back to the leader.
//!
//! Run it with:
//!
//! ```text
//! cargo run --all-features --example tonic_client
//! ```
//!
//! Two gRPC health servers start on `127.0.0.1` (`tonic-health`'s generated service,
//! so no protobuf compiler is needed):
//!
//! - the **replica**, close and fast (5 ms), knows only some services: it answers
//!   `NOT_FOUND` for the others, and `UNAVAILABLE` for one it is too busy to check;
//! - the **leader**, slower (40 ms), knows every service.
//!
//! The client's channel is `ServiceBuilder::new().layer(FallbackLayer::new(leader))
//! .service(replica)`, plus the body buffering that lets a gRPC request be sent twice.
//! The replica's `NOT_FOUND` and `UNAVAILABLE` fall back to the leader, which was asked
//! at the same time; any other answer of the replica — `OK`, or an error the leader
//! would repeat, like `INVALID_ARGUMENT` — stands, and the leader's call is cancelled.

use std::{error::Error, net::SocketAddr, time::Duration};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{
    body::Body,
    codegen::tokio_stream,
    transport::{server::TcpIncoming, Channel, Endpoint},
    Request, Response, Status,
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
    outcome::Stats,
    FallbackLayer,
};

/// One health server: its name, its latency, and the services it knows.
struct Node {
    name: &'static str,
    latency: Duration,
    knows: fn(&str) -> Result<ServingStatus, Status>,
}

#[tonic::async_trait]
impl Health for Node {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        tokio::time::sleep(self.latency).await;
        let status = (self.knows)(&request.get_ref().service)?;
        let mut response = Response::new(HealthCheckResponse {
            status: status as i32,
        });
        response
            .metadata_mut()
            .insert("x-served-by", self.name.parse().unwrap());
        Ok(response)
    }

    type WatchStream = tokio_stream::Empty<Result<HealthCheckResponse, Status>>;

    async fn watch(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("watch is not part of this example"))
    }
}

fn replica_knows(service: &str) -> Result<ServingStatus, Status> {
    match service {
        "" => Err(Status::invalid_argument("name a service")),
        "search" | "catalog" => Ok(ServingStatus::Serving),
        "payments" => Err(Status::unavailable("too busy to check")),
        _ => Err(Status::not_found("not replicated here")),
    }
}

fn leader_knows(service: &str) -> Result<ServingStatus, Status> {
    match service {
        "" => Err(Status::invalid_argument("name a service")),
        "billing" => Ok(ServingStatus::NotServing),
        _ => Ok(ServingStatus::Serving),
    }
}

/// A server on loopback and the way to stop it.
struct Running {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

async fn serve(node: Node) -> std::io::Result<Running> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(HealthServer::new(node))
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), async move {
                let _ = stopped.await;
            }),
    );
    Ok(Running { addr, stop, task })
}

impl Running {
    async fn channel(&self) -> Result<Channel, tonic::transport::Error> {
        Endpoint::from_shared(format!("http://{}", self.addr))?
            .connect()
            .await
    }

    async fn shut_down(self) -> Result<(), Box<dyn Error>> {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(5), self.task).await???;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let replica = serve(Node {
        name: "replica",
        latency: Duration::from_millis(5),
        knows: replica_knows,
    })
    .await?;
    let leader = serve(Node {
        name: "leader",
        latency: Duration::from_millis(40),
        knows: leader_knows,
    })
    .await?;

    // Each branch is a plain tonic channel; the replayed body is turned back into
    // tonic's on each of them.
    let to_tonic = |req: http::Request<ReplayBody>| req.map(Body::new);
    let stats = Stats::new();
    let channel = ServiceBuilder::new()
        .layer(BufferBodyLayer::new())
        .layer(
            FallbackLayer::new(leader.channel().await?.map_request(to_tonic))
                .accept(GrpcStatus::rejecting(&[
                    GrpcCode::NotFound,
                    GrpcCode::Unavailable,
                ]))
                .stats(stats.clone()),
        )
        .map_request(to_tonic)
        .service(replica.channel().await?);
    let mut client = HealthClient::new(channel);

    for service in ["search", "billing", "payments", "catalog", ""] {
        let request = HealthCheckRequest {
            service: service.to_owned(),
        };
        let shown = format!("{service:?}");
        match client.check(request).await {
            Ok(response) => {
                let served_by = response.metadata().get("x-served-by").cloned();
                let served_by = served_by
                    .as_ref()
                    .map_or("?", |v| v.to_str().unwrap_or("?"));
                let status = ServingStatus::try_from(response.get_ref().status)
                    .map_or("?", |s| s.as_str_name());
                println!("check {shown:<10} -> {status:<12} served by {served_by}");
            }
            Err(status) => {
                println!(
                    "check {shown:<10} -> {:?}: {} (the replica's answer stands)",
                    status.code(),
                    status.message()
                );
            }
        }
    }

    println!("\nlayer: {}", stats.snapshot());
    drop(client);
    replica.shut_down().await?;
    leader.shut_down().await?;
    Ok(())
}
