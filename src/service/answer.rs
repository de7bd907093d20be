//! Large answers held until their callers read them.
//!
//! A unary answer is encoded whole before HTTP/2 sends any of it, and a caller that never
//! reads it (grants no flow-control window, or leaves its socket unread) keeps it in the
//! server's memory: 128 calls on one connection, each a record with a large CV, pinned
//! gigabytes (review 13). So:
//!
//! - an answer of at least [`COUNTED_ANSWER_BYTES`] takes its size from one budget shared by
//!   every call ([`AnswerBudget`]), in its handler, before its event is recorded; past the
//!   budget the call is refused `RESOURCE_EXHAUSTED`, and nothing is sent;
//! - such an answer is handed to HTTP/2 in chunks of [`ANSWER_CHUNK`] ([`AnswerHold::wrap`]),
//!   so that what is not yet sent stays with its hold (counted) and HTTP/2 buffers at most
//!   its per-stream send buffer (hyper: 400 KiB) and one chunk of it;
//! - each connection keeps when each of its counted answers last moved ([`AnswerTrack`]):
//!   the connection itself ([`crate::server`]) is closed once one of them has not moved for
//!   [`ANSWER_STALL_TIMEOUT`], which frees what it held.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tonic::Status;

/// Answers at least this large take from the [`AnswerBudget`] and are sent in chunks; smaller
/// ones are bounded by the calls a connection may have open.
pub const COUNTED_ANSWER_BYTES: usize = 64 * 1024;
/// A counted answer is handed to HTTP/2 this much at a time.
pub const ANSWER_CHUNK: usize = 64 * 1024;
/// The answer bytes all calls together may hold before they are sent, as a multiple of
/// `max_request_bytes` (at least [`MIN_ANSWER_BUDGET`]); one answer may be twice
/// `max_request_bytes`, so at least two of the largest fit.
pub const ANSWER_BUDGET_FACTOR: usize = 4;
/// The least budget of answer bytes.
pub const MIN_ANSWER_BUDGET: usize = 64 * 1024 * 1024;
/// A connection one of whose counted answers has not moved for this long (its caller reads
/// nothing of it) is closed.
pub const ANSWER_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The budget of answer bytes not yet sent, in KiB permits, shared by every call.
#[derive(Clone)]
pub struct AnswerBudget(Arc<Semaphore>);

impl AnswerBudget {
    /// A budget for a server whose calls may carry `max_request_bytes` each.
    pub fn for_requests(max_request_bytes: usize) -> Self {
        let bytes = max_request_bytes
            .saturating_mul(ANSWER_BUDGET_FACTOR)
            .max(MIN_ANSWER_BUDGET);
        Self::of_kib(bytes.div_ceil(1024))
    }

    fn of_kib(kib: usize) -> Self {
        Self(Arc::new(Semaphore::new(
            kib.clamp(1, Semaphore::MAX_PERMITS),
        )))
    }

    /// Takes an answer of `size` bytes for the caller at `peer` from the budget: `None` for
    /// an answer too small to count, the error `field` is named in when the budget is spent.
    pub(crate) fn hold(
        &self,
        size: usize,
        peer: Option<SocketAddr>,
        field: &str,
    ) -> Result<Option<AnswerHold>, Status> {
        if size < COUNTED_ANSWER_BYTES {
            return Ok(None);
        }
        let kib = u32::try_from(size.div_ceil(1024)).unwrap_or(u32::MAX);
        let permit = Arc::clone(&self.0)
            .try_acquire_many_owned(kib)
            .map_err(|_| {
                Status::resource_exhausted(format!(
                    "{field}: the answer is {size} bytes, and the server already holds as many answer bytes as it takes (answers its callers have not read yet); retry shortly"
                ))
            })?;
        Ok(Some(AnswerHold(Arc::new(parking_lot::Mutex::new(Some(
            Held { permit, peer },
        ))))))
    }
}

struct Held {
    permit: OwnedSemaphorePermit,
    peer: Option<SocketAddr>,
}

/// A counted answer's share of the budget, carried from its handler to the transport in the
/// response's extensions (which need `Clone`: the first [`AnswerHold::wrap`] takes it).
#[derive(Clone)]
pub struct AnswerHold(Arc<parking_lot::Mutex<Option<Held>>>);

impl AnswerHold {
    /// The caller's address, if known.
    pub(crate) fn peer(&self) -> Option<SocketAddr> {
        self.0.lock().as_ref().and_then(|h| h.peer)
    }

    /// `body`, sent in chunks, holding the budget until it has handed its last bytes over
    /// (or is dropped), and registered with its connection's `track` while it does.
    pub(crate) fn wrap(
        &self,
        body: tonic::body::Body,
        track: Option<Arc<AnswerTrack>>,
    ) -> tonic::body::Body {
        let permit = self.0.lock().take().map(|h| h.permit);
        let entry = track.map(|t| {
            let id = t.join();
            (t, id)
        });
        tonic::body::Body::new(AnswerBody {
            inner: body,
            rest: Bytes::new(),
            permit,
            entry,
        })
    }
}

/// The counted answers of one connection that are still being handed over, and when each
/// last moved.
#[derive(Debug, Default)]
pub struct AnswerTrack {
    /// How many answers are registered (read without the lock on every connection poll).
    pending: AtomicUsize,
    next_id: AtomicU64,
    moved: parking_lot::Mutex<HashMap<u64, Instant>>,
}

impl AnswerTrack {
    fn join(&self) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.moved.lock().insert(id, Instant::now());
        self.pending.fetch_add(1, Ordering::Release);
        id
    }

    fn moved(&self, id: u64) {
        if let Some(at) = self.moved.lock().get_mut(&id) {
            *at = Instant::now();
        }
    }

    fn leave(&self, id: u64) {
        if self.moved.lock().remove(&id).is_some() {
            self.pending.fetch_sub(1, Ordering::Release);
        }
    }

    /// When the answer that moved least recently last moved; `None` without answers.
    pub(crate) fn stalled_since(&self) -> Option<Instant> {
        if self.pending.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.moved.lock().values().min().copied()
    }
}

/// An answer's body, handed over in chunks of [`ANSWER_CHUNK`].
struct AnswerBody {
    inner: tonic::body::Body,
    /// The bytes of the current data frame not yet handed over.
    rest: Bytes,
    /// Its share of the budget, until it is done.
    permit: Option<OwnedSemaphorePermit>,
    /// Its connection's track and its id there, until it is done.
    entry: Option<(Arc<AnswerTrack>, u64)>,
}

impl AnswerBody {
    fn moved(&self) {
        if let Some((track, id)) = &self.entry {
            track.moved(*id);
        }
    }

    fn done(&mut self) {
        self.permit = None;
        if let Some((track, id)) = self.entry.take() {
            track.leave(id);
        }
    }

    fn next_chunk(&mut self) -> Bytes {
        let take = self.rest.len().min(ANSWER_CHUNK);
        self.rest.split_to(take)
    }
}

impl Drop for AnswerBody {
    fn drop(&mut self) {
        self.done();
    }
}

impl http_body::Body for AnswerBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if !this.rest.is_empty() {
            this.moved();
            return Poll::Ready(Some(Ok(http_body::Frame::data(this.next_chunk()))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.moved();
                match frame.into_data() {
                    Ok(data) => {
                        this.rest = data;
                        Poll::Ready(Some(Ok(http_body::Frame::data(this.next_chunk()))))
                    }
                    Err(other) => Poll::Ready(Some(Ok(other))),
                }
            }
            Poll::Ready(other) => {
                this.done();
                Poll::Ready(other)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = http_body::SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(rest));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn body_of(frames: Vec<Bytes>) -> tonic::body::Body {
        let stream = futures::stream::iter(
            frames
                .into_iter()
                .map(|b| Ok::<_, Status>(http_body::Frame::data(b))),
        );
        tonic::body::Body::new(http_body_util::StreamBody::new(stream))
    }

    #[tokio::test]
    async fn a_counted_answer_is_handed_over_in_chunks_and_frees_its_budget_when_done() {
        let budget = AnswerBudget::of_kib(1024);
        assert!(budget
            .hold(COUNTED_ANSWER_BYTES - 1, None, "f")
            .expect("small")
            .is_none());
        let size = 3 * ANSWER_CHUNK + 10;
        let hold = budget
            .hold(size, None, "f")
            .expect("fits")
            .expect("counted");
        assert_eq!(budget.0.available_permits(), 1024 - size.div_ceil(1024));
        let track = Arc::new(AnswerTrack::default());
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let mut body = hold.wrap(
            body_of(vec![Bytes::from(data.clone()), Bytes::from_static(b"xy")]),
            Some(Arc::clone(&track)),
        );
        // The hold is taken once: a second wrap holds nothing.
        assert!(hold.0.lock().is_none());
        assert!(track.stalled_since().is_some());
        let mut sizes = Vec::new();
        let mut all = Vec::new();
        while let Some(frame) = body.frame().await {
            let data = frame.expect("frame").into_data().expect("data");
            sizes.push(data.len());
            all.extend_from_slice(&data);
        }
        assert_eq!(sizes, [ANSWER_CHUNK, ANSWER_CHUNK, ANSWER_CHUNK, 10, 2]);
        assert_eq!(&all[..size], &data[..]);
        assert_eq!(budget.0.available_permits(), 1024);
        assert!(track.stalled_since().is_none());
    }

    #[tokio::test]
    async fn past_the_budget_an_answer_is_refused_and_a_dropped_one_gives_its_share_back() {
        let budget = AnswerBudget::of_kib(200);
        let first = budget
            .hold(150 * 1024, None, "field_names")
            .expect("fits")
            .expect("counted");
        let refused = match budget.hold(100 * 1024, None, "field_names") {
            Err(status) => status,
            Ok(_) => panic!("past the budget"),
        };
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused
            .message()
            .starts_with("field_names: the answer is 102400 bytes"));
        let track = Arc::new(AnswerTrack::default());
        let body = first.wrap(
            body_of(vec![Bytes::from(vec![0u8; 150 * 1024])]),
            Some(Arc::clone(&track)),
        );
        assert!(track.stalled_since().is_some());
        drop(body);
        assert!(track.stalled_since().is_none());
        assert!(budget.hold(100 * 1024, None, "field_names").is_ok());
    }

    #[test]
    fn the_track_names_the_answer_that_moved_least_recently() {
        let track = AnswerTrack::default();
        let before = Instant::now();
        let a = track.join();
        std::thread::sleep(Duration::from_millis(20));
        let between = Instant::now();
        let b = track.join();
        let since_a = track.stalled_since().expect("two answers");
        assert!(before <= since_a && since_a <= between);
        std::thread::sleep(Duration::from_millis(20));
        let after_b = Instant::now();
        track.moved(a);
        let since_b = track.stalled_since().expect("two answers");
        assert!(
            between <= since_b && since_b <= after_b,
            "b moved least recently now"
        );
        track.leave(b);
        track.leave(b);
        let only_a = track.stalled_since().expect("one answer");
        assert!(only_a >= after_b);
        track.leave(a);
        assert_eq!(track.stalled_since(), None);
    }

    #[test]
    fn the_budget_holds_at_least_two_of_the_largest_answers() {
        let max_request_bytes = crate::config::DEFAULT_MAX_REQUEST_BYTES;
        let budget = AnswerBudget::for_requests(max_request_bytes);
        assert!(budget.0.available_permits() * 1024 >= 2 * 2 * max_request_bytes);
        assert!(AnswerBudget::for_requests(1).0.available_permits() >= MIN_ANSWER_BUDGET / 1024);
    }
}
