//! `grpc.health.v1.Health` for the kluis services: one status for the server (`""`) and each
//! of its services, `SERVING` until the store refuses writes or the server stops.
//!
//! tonic-health's reporter ends a `Watch` stream only by forgetting the service, after which
//! `Check` answers `NOT_FOUND`; a stopping server must end the streams (they would hold their
//! connections, and the shutdown, open) and still answer `Check` with `NOT_SERVING` until the
//! connections close. Hence this small implementation of the same generated service.

use std::pin::Pin;

use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// The server's phase, as health reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Serving,
    NotServing,
    /// Stopping: `NOT_SERVING`, and every `Watch` stream ends after saying so.
    Stopped,
}

impl Phase {
    fn status(self) -> ServingStatus {
        match self {
            Phase::Serving => ServingStatus::Serving,
            Phase::NotServing | Phase::Stopped => ServingStatus::NotServing,
        }
    }
}

/// Sets what health reports (held by the server).
#[derive(Debug, Clone)]
pub struct HealthState {
    tx: watch::Sender<Phase>,
}

impl HealthState {
    /// A state reporting `SERVING` for `services` (and `""`), and the service serving it.
    pub fn new(services: &[&str]) -> (HealthState, Undecodable<HealthServer<HealthService>>) {
        let (state, service) = HealthState::parts(services);
        let server = HealthServer::new(service)
            .max_decoding_message_size(crate::server::OPEN_SERVICE_MAX_REQUEST_BYTES);
        (state, Undecodable(server))
    }

    fn parts(services: &[&str]) -> (HealthState, HealthService) {
        let (tx, rx) = watch::channel(Phase::Serving);
        let mut names: Vec<String> = services.iter().map(|s| s.to_string()).collect();
        if !names.iter().any(String::is_empty) {
            names.push(String::new());
        }
        (HealthState { tx }, HealthService { rx, names })
    }

    /// Reports `NOT_SERVING` from now on (until the server restarts).
    pub fn set_not_serving(&self) {
        self.tx.send_if_modified(|p| {
            let changed = *p == Phase::Serving;
            if changed {
                *p = Phase::NotServing;
            }
            changed
        });
    }

    /// Stopping: `NOT_SERVING` to every check, and every `Watch` stream ends after saying so.
    pub fn stop(&self) {
        self.tx.send_if_modified(|p| {
            let changed = *p != Phase::Stopped;
            *p = Phase::Stopped;
            changed
        });
    }
}

/// The `grpc.health.v1.Health` service.
#[derive(Debug)]
pub struct HealthService {
    rx: watch::Receiver<Phase>,
    names: Vec<String>,
}

impl HealthService {
    fn known(&self, service: &str) -> Result<(), Status> {
        if self.names.iter().any(|n| n == service) {
            Ok(())
        } else {
            // Echoed only if it has a name's shape, as every name in an answer (README,
            // "Status codes"): a value sent here is not shown, nor a name too long for it.
            Err(Status::not_found(format!(
                "service: `{}` is not served here (one of: \"\", {})",
                crate::error::printable_name(service),
                self.names
                    .iter()
                    .filter(|n| !n.is_empty())
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    }
}

fn answer(phase: Phase) -> HealthCheckResponse {
    HealthCheckResponse {
        status: phase.status() as i32,
    }
}

/// The health service, with a request that does not decode answered `INVALID_ARGUMENT`, as
/// the kluis services answer it (tonic answers `INTERNAL`; health answers nothing else with
/// it). Health needs no credentials and is not audited or logged per call.
#[derive(Debug, Clone)]
pub struct Undecodable<Svc>(Svc);

impl<Svc: tonic::server::NamedService> tonic::server::NamedService for Undecodable<Svc> {
    const NAME: &'static str = Svc::NAME;
}

type Body = tonic::body::Body;

impl<Svc> tower::Service<http::Request<Body>> for Undecodable<Svc>
where
    Svc: tower::Service<
        http::Request<Body>,
        Response = http::Response<Body>,
        Error = std::convert::Infallible,
    >,
    Svc::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = std::convert::Infallible;
    type Future = Pin<
        Box<
            dyn std::future::Future<Output = Result<http::Response<Body>, std::convert::Infallible>>
                + Send
                + 'static,
        >,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), std::convert::Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let answer = self.0.call(request);
        Box::pin(async move {
            let response = answer.await?;
            match Status::from_header_map(response.headers()) {
                Some(s) if s.code() == tonic::Code::Internal => {
                    // tonic's text names the message type, the field's path and prost's rule;
                    // some of prost's rules end with the bytes they met as a number
                    // (`invalid key value: 9180250956958063027`), which is left out.
                    let why: Vec<&str> = s
                        .message()
                        .split(": ")
                        .filter(|part| !part.bytes().all(|b| b.is_ascii_digit()))
                        .collect();
                    Ok(Status::invalid_argument(format!(
                        "request body is not one valid gRPC health request: {}",
                        why.join(": ")
                    ))
                    .into_http())
                }
                _ => Ok(response),
            }
        })
    }
}

/// A `Watch` stream.
type WatchStream =
    Pin<Box<dyn futures::Stream<Item = Result<HealthCheckResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.known(&request.get_ref().service)?;
        Ok(Response::new(answer(*self.rx.borrow())))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let rx = self.rx.clone();
        if self.known(&request.get_ref().service).is_err() {
            // The health protocol's answer for a service not served here: SERVICE_UNKNOWN on
            // the stream (not an error), which stays open until the server stops.
            let stream = futures::stream::unfold((rx, true), |(mut rx, first)| async move {
                if first {
                    let unknown = HealthCheckResponse {
                        status: ServingStatus::ServiceUnknown as i32,
                    };
                    return Some((Ok(unknown), (rx, false)));
                }
                while *rx.borrow_and_update() != Phase::Stopped {
                    if rx.changed().await.is_err() {
                        break;
                    }
                }
                None
            });
            return Ok(Response::new(Box::pin(stream)));
        }
        // The current status first, then each change; after `Stopped`, nothing more.
        let stream =
            futures::stream::unfold((rx, true, false), |(mut rx, first, done)| async move {
                if done || (!first && rx.changed().await.is_err()) {
                    return None;
                }
                let phase = *rx.borrow_and_update();
                Some((Ok(answer(phase)), (rx, false, phase == Phase::Stopped)))
            });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn request(service: &str) -> Request<HealthCheckRequest> {
        Request::new(HealthCheckRequest {
            service: service.into(),
        })
    }

    #[tokio::test]
    async fn checks_and_watches_follow_the_phase_and_end_when_stopped() {
        let (tx_state, service) = HealthState::parts(&["kluis.v1.Records"]);
        let status = |r: Result<Response<HealthCheckResponse>, Status>| {
            r.expect("known service").into_inner().status
        };
        assert_eq!(
            status(service.check(request("")).await),
            ServingStatus::Serving as i32
        );
        let unknown = service
            .check(request("kluis.v1.Nope"))
            .await
            .expect_err("unknown");
        assert_eq!(unknown.code(), tonic::Code::NotFound);
        assert!(unknown.message().contains("kluis.v1.Records"), "{unknown}");

        let mut watch = service
            .watch(request("kluis.v1.Records"))
            .await
            .expect("watch")
            .into_inner();
        let next = |s: Option<Result<HealthCheckResponse, Status>>| {
            s.expect("an item").expect("ok").status
        };
        assert_eq!(next(watch.next().await), ServingStatus::Serving as i32);
        tx_state.set_not_serving();
        tx_state.set_not_serving();
        assert_eq!(next(watch.next().await), ServingStatus::NotServing as i32);
        tx_state.stop();
        assert_eq!(next(watch.next().await), ServingStatus::NotServing as i32);
        assert!(watch.next().await.is_none(), "the stream ends once stopped");
        // Checks still answer, NOT_SERVING; a new watch says so and ends at once.
        assert_eq!(
            status(service.check(request("kluis.v1.Records")).await),
            ServingStatus::NotServing as i32
        );
        let mut late = service
            .watch(request(""))
            .await
            .expect("watch")
            .into_inner();
        assert_eq!(next(late.next().await), ServingStatus::NotServing as i32);
        assert!(late.next().await.is_none());
    }

    #[tokio::test]
    async fn watching_an_unknown_service_says_so_and_ends_at_shutdown() {
        let (state, service) = HealthState::parts(&["kluis.v1.Records"]);
        let mut watch = service
            .watch(request("kluis.v1.Nope"))
            .await
            .expect("a stream, not an error")
            .into_inner();
        let first = watch.next().await.expect("an item").expect("ok").status;
        assert_eq!(first, ServingStatus::ServiceUnknown as i32);
        state.set_not_serving();
        let pending =
            tokio::time::timeout(std::time::Duration::from_millis(50), watch.next()).await;
        assert!(pending.is_err(), "nothing more until the server stops");
        state.stop();
        assert!(watch.next().await.is_none(), "ended at shutdown");
    }
}
