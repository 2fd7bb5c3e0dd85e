//! gRPC statuses: one reader for `grpc-status` wherever it is, and [`PeekGrpcStatus`],
//! which finds the status of answers that send it in their trailers.
//!
//! A gRPC server sends the status of a call in one of two places:
//!
//! - **In the headers** (*trailers-only*): the answer has no message, and its only
//!   `HEADERS` frame carries `grpc-status`. tonic and grpc-go answer every error this
//!   way.
//! - **In the trailers**: HTTP `200` headers without `grpc-status`, then the messages
//!   (if any), then a trailers frame with `grpc-status`. Every answer with a message is
//!   sent this way, and some servers — akka-grpc, Python's grpcio — also send errors
//!   so: `200` headers, then trailers with `grpc-status: 5` and no message at all.
//!
//! [`GrpcCode::of_response`] reads the first kind from the head. The second is only
//! known once the body's first frame has arrived; [`PeekGrpcStatus`] waits for that
//! frame inside the response future and, when it is the trailers, records their status
//! on the response as a [`PeekedStatus`] extension, which `of_response` (and so
//! [`GrpcStatus`](super::accept::GrpcStatus)) reads too; an answer that sends nothing
//! within the wait is marked [`IncompleteBody`](super::read::IncompleteBody), and
//! rejected. The frame it read is replayed to the caller by a
//! [`ReadAheadBody`](super::read::ReadAheadBody): an answer that stands reaches the
//! caller unchanged. The peek is the reader of [`super::read`], stopped at the first
//! frame that carries something.
//!
//! Every `grpc-status` value — in headers or trailers — is parsed by
//! [`GrpcCode::from_bytes`], exactly as tonic parses it.

#[cfg(feature = "time")]
mod peek;

#[cfg(feature = "time")]
#[cfg_attr(docsrs, doc(cfg(feature = "time")))]
pub use self::peek::{PeekGrpcStatus, PeekGrpcStatusLayer, DEFAULT_MAX_WAIT};

use http::{HeaderMap, HeaderName, Response};

/// The header (or trailer) that carries a gRPC status.
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// A gRPC status code.
///
/// The numbering is gRPC's (and `tonic::Code`'s): `GrpcCode::NotFound as i32 == 5`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i32)]
#[allow(missing_docs)]
pub enum GrpcCode {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

impl GrpcCode {
    pub(crate) const ALL: [GrpcCode; 17] = [
        GrpcCode::Ok,
        GrpcCode::Cancelled,
        GrpcCode::Unknown,
        GrpcCode::InvalidArgument,
        GrpcCode::DeadlineExceeded,
        GrpcCode::NotFound,
        GrpcCode::AlreadyExists,
        GrpcCode::PermissionDenied,
        GrpcCode::ResourceExhausted,
        GrpcCode::FailedPrecondition,
        GrpcCode::Aborted,
        GrpcCode::OutOfRange,
        GrpcCode::Unimplemented,
        GrpcCode::Internal,
        GrpcCode::Unavailable,
        GrpcCode::DataLoss,
        GrpcCode::Unauthenticated,
    ];

    /// Parses a `grpc-status` value as tonic does (`tonic::Code::from_bytes`): only
    /// the decimal numbers `0` to `16`, written without sign, padding or spaces, are
    /// codes; anything else — `05`, `+5`, ` 5`, `17`, an empty value — is `Unknown`.
    ///
    /// ```
    /// use tower_backstop::http::accept::GrpcCode;
    ///
    /// assert_eq!(GrpcCode::from_bytes(b"5"), GrpcCode::NotFound);
    /// assert_eq!(GrpcCode::from_bytes(b"05"), GrpcCode::Unknown);
    /// assert_eq!(GrpcCode::from_bytes(b"17"), GrpcCode::Unknown);
    /// ```
    pub const fn from_bytes(bytes: &[u8]) -> GrpcCode {
        match bytes {
            [digit @ b'0'..=b'9'] => GrpcCode::ALL[(*digit - b'0') as usize],
            [b'1', digit @ b'0'..=b'6'] => GrpcCode::ALL[10 + (*digit - b'0') as usize],
            _ => GrpcCode::Unknown,
        }
    }

    /// The status in a header map's `grpc-status` — a response's headers or its
    /// trailers — parsed by [`from_bytes`](GrpcCode::from_bytes); `None` if it has
    /// none.
    pub fn of_headers(headers: &HeaderMap) -> Option<GrpcCode> {
        headers
            .get(GRPC_STATUS)
            .map(|value| GrpcCode::from_bytes(value.as_bytes()))
    }

    /// The status a gRPC client reads from this response, if it can be known before
    /// its body is read further:
    ///
    /// - `grpc-status` in the headers (a trailers-only answer): that code, parsed by
    ///   [`from_bytes`](GrpcCode::from_bytes).
    /// - Otherwise, a [`PeekedStatus`] extension ([`PeekGrpcStatus`] adds one when the
    ///   body's first frame holds the status): that code.
    /// - Otherwise, HTTP `200`: `None`, the status will come in the trailers after a
    ///   message.
    /// - Otherwise (a proxy's answer): the code the gRPC specification maps the HTTP
    ///   status to, as tonic does — `UNAVAILABLE` for 429, 502, 503 and 504,
    ///   `UNIMPLEMENTED` for 404, `INTERNAL` for 400, `UNAUTHENTICATED` for 401,
    ///   `PERMISSION_DENIED` for 403, `UNKNOWN` for the others.
    pub fn of_response<B>(response: &Response<B>) -> Option<GrpcCode> {
        if let Some(code) = GrpcCode::of_headers(response.headers()) {
            return Some(code);
        }
        if let Some(PeekedStatus(code)) = response.extensions().get() {
            return Some(*code);
        }
        let code = match response.status().as_u16() {
            200 => return None,
            400 => GrpcCode::Internal,
            401 => GrpcCode::Unauthenticated,
            403 => GrpcCode::PermissionDenied,
            404 => GrpcCode::Unimplemented,
            429 | 502 | 503 | 504 => GrpcCode::Unavailable,
            _ => GrpcCode::Unknown,
        };
        Some(code)
    }

    pub(crate) const fn bit(self) -> u32 {
        1 << self as u32
    }
}

/// The gRPC status of an answer with no message before it, as [`PeekGrpcStatus`] read
/// it from the body's first frame; a response extension.
///
/// - The first frame is the trailers: their `grpc-status`, or `Unknown` if they have
///   none (tonic's reading of a `200` answer without a status).
/// - The body ended without a frame: `Unknown`, as tonic reads it.
/// - The body failed before its first frame: `Unknown`. (tonic may give such an error
///   another code — `UNAVAILABLE` for a refused stream, for one; the error itself is
///   replayed to the caller.) The answer is also marked
///   [`IncompleteBody::Failed`](super::read::IncompleteBody::Failed).
///
/// [`GrpcCode::of_response`] reads it when the headers carry no `grpc-status`. Insert
/// one yourself to have [`GrpcStatus`](super::accept::GrpcStatus) judge a status you
/// found another way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeekedStatus(pub GrpcCode);
