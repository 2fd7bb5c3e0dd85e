//! Bytes read from a body into memory: one growth policy for the request buffer
//! ([`BufferBody`](super::BufferBody)) and the response reader
//! ([`ReadBody`](super::read::ReadBody), [`PeekGrpcStatus`](super::grpc::PeekGrpcStatus)).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::HeaderMap;

/// Frames read in one `poll` at most: after that many, a reader wakes itself and
/// returns `Pending`, so that a body that is always ready (with empty frames, say)
/// cannot hold the thread, and a timer or timeout around it can fire.
pub(crate) const FRAMES_PER_POLL: usize = 32;

/// What a field costs against a cap, on top of its name and value: the overhead
/// HTTP/2 counts per field in a header list (RFC 9113 §6.5.2).
const FIELD_OVERHEAD: usize = 32;

/// The size of a header list as HTTP/2 counts it: name, value and 32 bytes per field.
pub(crate) fn field_bytes(fields: &HeaderMap) -> usize {
    fields.iter().fold(0usize, |sum, (name, value)| {
        sum.saturating_add(name.as_str().len())
            .saturating_add(value.len())
            .saturating_add(FIELD_OVERHEAD)
    })
}

/// The data of a body read so far.
#[derive(Debug, Default)]
pub(crate) enum Data {
    #[default]
    Empty,
    // A single chunk is kept as the body sent it: no copy.
    One(Bytes),
    // From the second chunk on, chunks are copied into one buffer.
    Many(BytesMut),
}

impl Data {
    pub(crate) fn len(&self) -> usize {
        match self {
            Data::Empty => 0,
            Data::One(bytes) => bytes.len(),
            Data::Many(buf) => buf.len(),
        }
    }

    /// Appends a chunk the caller has checked against `max_bytes`. `still_expected`
    /// is the body's own lower bound on what is left after it: a claim, trusted only
    /// as far as the bytes received.
    pub(crate) fn push(&mut self, mut chunk: impl Buf, still_expected: u64, max_bytes: usize) {
        let len = chunk.remaining();
        if len == 0 {
            return;
        }
        // Saturating: lengths come from the body, and the sums are only compared.
        let total = self.len().saturating_add(len);
        *self = match std::mem::take(self) {
            // `copy_to_bytes` on `Bytes` (what hyper, axum and tonic bodies yield) is a
            // reference-count bump, not a copy.
            Data::Empty => Data::One(chunk.copy_to_bytes(len)),
            Data::One(first) => {
                // Room for what the body says is left, but never more than twice
                // what has arrived (nor more than the cap): a body claiming a TiB
                // and sending two bytes gets a buffer of four.
                let claimed = usize::try_from(still_expected)
                    .unwrap_or(usize::MAX)
                    .saturating_add(total);
                let capacity = claimed
                    .min(total.saturating_mul(2))
                    .min(max_bytes)
                    .max(total);
                let mut buf = BytesMut::with_capacity(capacity);
                buf.put(first);
                buf.put(chunk);
                Data::Many(buf)
            }
            Data::Many(mut buf) => {
                // Grows by doubling, from bytes received.
                buf.put(chunk);
                Data::Many(buf)
            }
        };
    }

    pub(crate) fn freeze(self) -> Bytes {
        match self {
            Data::Empty => Bytes::new(),
            Data::One(bytes) => bytes,
            Data::Many(buf) => buf.freeze(),
        }
    }
}
