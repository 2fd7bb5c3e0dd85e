//! A request's framing headers, `Content-Length` and `Transfer-Encoding`, against
//! the body that is forwarded.

use super::Rejection;
use http::{header, HeaderMap, HeaderValue};

/// How a request's framing headers delimit its body (RFC 9112 §6), checked before
/// the body is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// Neither `Content-Length` nor `Transfer-Encoding`: the body's end is its own.
    Unframed,
    /// A valid `Content-Length`. `canonical` is false when it was a list of equal
    /// values (`10, 10`, or repeated lines), forwarded as one value.
    Length { len: u64, canonical: bool },
    /// `Transfer-Encoding` with `chunked` last: self-delimiting, right for any length.
    Chunked,
}

impl Framing {
    /// Reads the framing headers, refusing what a server must refuse with `400`:
    /// an invalid `Content-Length`, a `Transfer-Encoding` that does not end in
    /// `chunked` exactly once, and both headers at once (a request smuggling sign).
    pub(crate) fn of(headers: &HeaderMap) -> Result<Framing, Rejection> {
        let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter().peekable();
        let chunked = codings.peek().is_some();
        if chunked && !ends_in_chunked(codings) {
            return Err(Rejection::Malformed);
        }
        let mut lines = headers.get_all(header::CONTENT_LENGTH).iter();
        let Some(first) = lines.next() else {
            return Ok(if chunked {
                Framing::Chunked
            } else {
                Framing::Unframed
            });
        };
        if chunked {
            return Err(Rejection::Malformed);
        }
        // One line of digits, as nearly every client sends it: the fast path.
        if let Some(len) = digits(first.as_bytes()) {
            if lines.next().is_none() {
                return Ok(Framing::Length {
                    len,
                    canonical: true,
                });
            }
        }
        // A list: every element must be the same valid length (RFC 9110 §8.6).
        let mut len = None;
        for line in headers.get_all(header::CONTENT_LENGTH) {
            for element in line.as_bytes().split(|&b| b == b',') {
                let value = digits(trim_ows(element)).ok_or(Rejection::Malformed)?;
                if *len.get_or_insert(value) != value {
                    return Err(Rejection::Malformed);
                }
            }
        }
        let len = len.ok_or(Rejection::Malformed)?;
        Ok(Framing::Length {
            len,
            canonical: false,
        })
    }

    /// The length the headers announce, if they do.
    pub(crate) fn declared(self) -> Option<u64> {
        match self {
            Framing::Length { len, .. } => Some(len),
            Framing::Unframed | Framing::Chunked => None,
        }
    }

    /// Checks the framing against the `received` bytes of a body read to its end,
    /// and writes a listed `Content-Length` as one value.
    pub(crate) fn finish(self, received: u64, headers: &mut HeaderMap) -> Result<(), Rejection> {
        match self {
            Framing::Length { len, .. } if len != received => Err(Rejection::Malformed),
            Framing::Length {
                len,
                canonical: false,
            } => {
                // Rare: allocates the one value.
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// Whether the transfer codings end in `chunked`, which appears nowhere else
/// (RFC 9112 §6.1, §6.3). Empty list elements are ignored (RFC 9110 §5.6.1).
fn ends_in_chunked<'a>(lines: impl Iterator<Item = &'a HeaderValue>) -> bool {
    let mut last_is_chunked = false;
    for line in lines {
        for coding in line.as_bytes().split(|&b| b == b',').map(trim_ows) {
            if coding.is_empty() {
                continue;
            }
            if last_is_chunked {
                // `chunked` followed by another coding, or applied twice.
                return false;
            }
            last_is_chunked = coding.eq_ignore_ascii_case(b"chunked");
        }
    }
    last_is_chunked
}

/// `1*DIGIT` as a `u64`; `None` for anything else, or on overflow.
fn digits(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |len, &b| {
        let digit = u64::from(b.checked_sub(b'0').filter(|d| *d <= 9)?);
        len.checked_mul(10)?.checked_add(digit)
    })
}

fn trim_ows(mut value: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = value {
        value = rest;
    }
    value
}
