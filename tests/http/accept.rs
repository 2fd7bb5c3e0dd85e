//! The HTTP-status and gRPC-status predicates.

use http::{Response, StatusCode};
use std::convert::Infallible;
use tower_backstop::{
    accept::{Accept, AcceptOk, And, Not},
    http::{
        accept::{GrpcCode, GrpcStatus, RejectServerErrors, RejectStatus, StatusIn},
        grpc::PeekedStatus,
    },
};

type Answer = Result<Response<()>, &'static str>;

fn status(code: u16) -> Answer {
    Ok(Response::builder().status(code).body(()).unwrap())
}

fn grpc(code: &'static str) -> Answer {
    Ok(Response::builder()
        .header("grpc-status", code)
        .body(())
        .unwrap())
}

const ERR: Answer = Err("connection refused");

#[test]
fn status_predicates_judge_ok_responses_and_reject_errors() {
    let success = StatusIn::SUCCESS;
    assert!(!success.accept(&status(199)));
    assert!(success.accept(&status(200)));
    assert!(success.accept(&status(299)));
    assert!(!success.accept(&status(300)));
    assert!(!success.accept(&ERR));

    let custom = StatusIn::new(200..=399);
    assert!(custom.accept(&status(304)));
    assert!(!custom.accept(&status(400)));

    assert!(RejectServerErrors.accept(&status(200)));
    assert!(RejectServerErrors.accept(&status(404)));
    assert!(RejectServerErrors.accept(&status(499)));
    assert!(!RejectServerErrors.accept(&status(500)));
    assert!(!RejectServerErrors.accept(&status(599)));
    assert!(!RejectServerErrors.accept(&ERR));

    let miss = RejectStatus(StatusCode::NOT_FOUND);
    assert!(miss.accept(&status(200)));
    assert!(miss.accept(&status(500)));
    assert!(!miss.accept(&status(404)));
    assert!(!miss.accept(&ERR));
}

#[test]
fn status_predicates_combine() {
    let hit = And::new(RejectServerErrors, RejectStatus(StatusCode::NOT_FOUND));
    assert!(hit.accept(&status(200)));
    assert!(hit.accept(&status(410)));
    assert!(!hit.accept(&status(404)));
    assert!(!hit.accept(&status(502)));
    assert!(!hit.accept(&ERR));

    // `not` flips the verdict on errors too; `AcceptOk` keeps them rejected.
    let only_404 = Not::new(RejectStatus(StatusCode::NOT_FOUND));
    assert!(only_404.accept(&status(404)));
    assert!(only_404.accept(&ERR));
    let only_404_ok = And::new(AcceptOk, only_404);
    assert!(only_404_ok.accept(&status(404)));
    assert!(!only_404_ok.accept(&status(200)));
    assert!(!only_404_ok.accept(&ERR));
}

#[test]
fn grpc_code_is_read_from_the_head() {
    let of = |answer: Answer| GrpcCode::of_response(&answer.unwrap());
    assert_eq!(of(grpc("0")), Some(GrpcCode::Ok));
    assert_eq!(of(grpc("5")), Some(GrpcCode::NotFound));
    assert_eq!(of(grpc("14")), Some(GrpcCode::Unavailable));
    assert_eq!(of(grpc("16")), Some(GrpcCode::Unauthenticated));
    // Not a code: read as UNKNOWN, as gRPC clients do.
    assert_eq!(of(grpc("17")), Some(GrpcCode::Unknown));
    assert_eq!(of(grpc("five")), Some(GrpcCode::Unknown));
    // HTTP 200 without a status: it will come in the trailers.
    assert_eq!(of(status(200)), None);
    // A non-gRPC answer, e.g. from a proxy: the specification's mapping.
    assert_eq!(of(status(503)), Some(GrpcCode::Unavailable));
    assert_eq!(of(status(429)), Some(GrpcCode::Unavailable));
    assert_eq!(of(status(404)), Some(GrpcCode::Unimplemented));
    assert_eq!(of(status(401)), Some(GrpcCode::Unauthenticated));
    assert_eq!(of(status(500)), Some(GrpcCode::Unknown));
    assert_eq!(GrpcCode::NotFound as i32, 5);
}

#[test]
fn grpc_status_is_parsed_as_tonic_parses_it() {
    for (n, code) in (0..=16).zip([
        tonic::Code::Ok,
        tonic::Code::Cancelled,
        tonic::Code::Unknown,
        tonic::Code::InvalidArgument,
        tonic::Code::DeadlineExceeded,
        tonic::Code::NotFound,
        tonic::Code::AlreadyExists,
        tonic::Code::PermissionDenied,
        tonic::Code::ResourceExhausted,
        tonic::Code::FailedPrecondition,
        tonic::Code::Aborted,
        tonic::Code::OutOfRange,
        tonic::Code::Unimplemented,
        tonic::Code::Internal,
        tonic::Code::Unavailable,
        tonic::Code::DataLoss,
        tonic::Code::Unauthenticated,
    ]) {
        let text = n.to_string();
        let ours = GrpcCode::from_bytes(text.as_bytes());
        assert_eq!(ours as i32, n, "{text}");
        assert_eq!(ours as i32, code as i32, "{text}");
    }
    // Anything but a code as written is UNKNOWN, for tonic and for us alike.
    for value in [
        "05", "+5", " 5", "5 ", "-0", "00", "010", "17", "99", "1.0", "0x5", "", "five", "\u{663}",
    ] {
        let theirs = tonic::Code::from_bytes(value.as_bytes());
        assert_eq!(theirs, tonic::Code::Unknown, "{value:?}");
        assert_eq!(
            GrpcCode::from_bytes(value.as_bytes()),
            GrpcCode::Unknown,
            "{value:?}"
        );
    }
}

#[test]
fn a_padded_or_signed_grpc_status_in_the_head_is_unknown() {
    let of = |answer: Answer| GrpcCode::of_response(&answer.unwrap());
    assert_eq!(of(grpc("05")), Some(GrpcCode::Unknown));
    assert_eq!(of(grpc("+5")), Some(GrpcCode::Unknown));
    assert_eq!(of(grpc("014")), Some(GrpcCode::Unknown));
    // So a predicate that rejects only NOT_FOUND accepts them, as a tonic client
    // reports UNKNOWN for them.
    let miss = GrpcStatus::rejecting(&[GrpcCode::NotFound]);
    assert!(miss.accept(&grpc("05")));
    assert!(miss.accept(&grpc("+5")));
    assert!(!miss.accept(&grpc("5")));
}

#[test]
fn a_peeked_status_is_read_when_the_head_has_none() {
    let peeked = |code| -> Answer {
        let mut response = Response::new(());
        response.extensions_mut().insert(PeekedStatus(code));
        Ok(response)
    };
    let of = |answer: Answer| GrpcCode::of_response(&answer.unwrap());
    assert_eq!(of(peeked(GrpcCode::NotFound)), Some(GrpcCode::NotFound));
    assert!(!GrpcStatus::new().accept(&peeked(GrpcCode::NotFound)));
    assert!(GrpcStatus::new().accept(&peeked(GrpcCode::Ok)));
    // The headers' status comes first, as for a gRPC client.
    let mut both = grpc("0").unwrap();
    both.extensions_mut()
        .insert(PeekedStatus(GrpcCode::NotFound));
    assert_eq!(GrpcCode::of_response(&both), Some(GrpcCode::Ok));
}

#[test]
fn grpc_status_rejects_the_chosen_codes() {
    let any_error = GrpcStatus::new();
    assert_eq!(any_error, GrpcStatus::default());
    assert!(any_error.accept(&grpc("0")));
    assert!(
        any_error.accept(&status(200)),
        "status in trailers: accepted"
    );
    assert!(!any_error.accept(&grpc("3")));
    assert!(!any_error.accept(&grpc("14")));
    assert!(!any_error.accept(&status(503)));
    assert!(!any_error.accept(&ERR));

    let lenient = GrpcStatus::new().accepting(GrpcCode::InvalidArgument);
    assert!(lenient.accept(&grpc("3")));
    assert!(!lenient.accept(&grpc("5")));

    let miss = GrpcStatus::rejecting(&[GrpcCode::NotFound, GrpcCode::Unavailable]);
    assert!(!miss.accept(&grpc("5")));
    assert!(!miss.accept(&grpc("14")));
    assert!(miss.accept(&grpc("3")));
    assert!(miss.accept(&grpc("0")));
    assert!(!miss.accept(&ERR));
    let stricter = miss.also_rejecting(GrpcCode::DeadlineExceeded);
    assert!(!stricter.accept(&grpc("4")));
    assert!(stricter.rejects(GrpcCode::NotFound));
    assert!(!stricter.rejects(GrpcCode::Ok));

    assert_eq!(
        format!("{miss:?}"),
        "GrpcStatus { rejected: {NotFound, Unavailable} }"
    );
}

#[test]
fn predicates_are_small_copy_values() {
    fn assert_predicate<
        A: Accept<Response<axum::body::Body>, Infallible> + Copy + Send + Sync + 'static,
    >(
        _: A,
    ) {
    }
    assert_predicate(StatusIn::SUCCESS);
    assert_predicate(RejectServerErrors);
    assert_predicate(RejectStatus(StatusCode::NOT_FOUND));
    assert_predicate(GrpcStatus::new());
    assert_eq!(std::mem::size_of::<RejectServerErrors>(), 0);
}
