//! The first request message's size, checked from its gRPC frame header before the message is
//! read: a request over its method's decode limit (src/codec.rs) is answered OUT_OF_RANGE
//! after 5 bytes, so a peer sending megabytes of junk costs the service neither the bytes'
//! decryption nor their buffering.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};

/// gRPC's frame header: a compression flag and a big-endian 32-bit length.
const FRAME_HEADER: usize = 5;

/// A request body with the frames already read in front of the rest.
pub(crate) struct Prefixed {
    read: VecDeque<Result<Frame<Bytes>, hyper::Error>>,
    rest: Incoming,
}

impl Body for Prefixed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(frame) = self.read.pop_front() {
            return Poll::Ready(Some(frame));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.rest.size_hint();
        let read: u64 = self
            .read
            .iter()
            .filter_map(|f| f.as_ref().ok()?.data_ref().map(|d| d.len() as u64))
            .sum();
        hint.set_lower(hint.lower().saturating_add(read));
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper.saturating_add(read));
        }
        hint
    }
}

/// Reads the request until its first frame header (or its end), and refuses the request
/// when the header claims more than the method's limit. `wait` bounds how long the header
/// may take to arrive.
pub(crate) async fn check(
    request: hyper::Request<Incoming>,
    wait: Duration,
) -> Result<hyper::Request<Prefixed>, tonic::Status> {
    let (parts, mut body) = request.into_parts();
    let mut read = VecDeque::new();
    let mut header = Vec::with_capacity(FRAME_HEADER);
    let reading = async {
        while header.len() < FRAME_HEADER {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        let need = FRAME_HEADER - header.len();
                        header.extend_from_slice(&data[..need.min(data.len())]);
                    }
                    let end = frame.is_trailers();
                    read.push_back(Ok(frame));
                    if end {
                        break;
                    }
                }
                // An error is passed on for the service to see, in its place.
                Some(Err(e)) => {
                    read.push_back(Err(e));
                    break;
                }
                None => break,
            }
        }
    };
    if tokio::time::timeout(wait, reading).await.is_err() {
        return Err(tonic::Status::deadline_exceeded(
            "the request message did not begin in time",
        ));
    }
    if header.len() == FRAME_HEADER {
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        let (limit, method) = crate::codec::limit_for_path(parts.uri.path());
        if limit.bytes().is_some_and(|max| len > max)
            && let Some(refusal) = limit.refuse(&format!("{method}Request"), len)
        {
            return Err(refusal);
        }
    }
    Ok(hyper::Request::from_parts(
        parts,
        Prefixed { read, rest: body },
    ))
}
