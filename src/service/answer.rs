//! Large answers held until their callers read them.
//!
//! A unary answer is encoded whole before HTTP/2 sends any of it, and a caller that never
//! reads it (grants no flow-control window, or leaves its socket unread) keeps it in the
//! server's memory: 128 calls on one connection, each a record with a large CV, pinned
//! gigabytes (review 13). So:
//!
//! - an answer of at least [`COUNTED_ANSWER_BYTES`] takes its size from one budget shared by
//!   every call ([`AnswerBudget`]), in its handler, before its event is recorded, and from its
//!   caller's share of it (half: review 17, one slow reader held the whole budget and every
//!   other caller's documents and exports were refused); past either the call is refused
//!   `RESOURCE_EXHAUSTED`, and nothing is sent;
//! - such an answer is handed to HTTP/2 in chunks of [`ANSWER_CHUNK`] ([`AnswerHold::wrap`]),
//!   so that what is not yet sent stays with its hold (counted) and HTTP/2 buffers at most
//!   its per-stream send buffer (hyper: 400 KiB) and one chunk of it;
//! - each connection keeps when one of its counted answers last moved ([`AnswerTrack`]):
//!   the connection itself ([`crate::server`]) is closed once none has moved for
//!   [`ANSWER_STALL_TIMEOUT`], which frees what it held. (Per connection, not per answer:
//!   answers queued behind others on a connection read at line rate do not move meanwhile.)

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// The budget of answer bytes not yet sent, in KiB permits, shared by every call; each
/// principal may hold at most half of it.
#[derive(Clone)]
pub struct AnswerBudget(Arc<SharedBudget>);

/// A budget of KiB permits shared by every call, of which each principal may hold at most
/// half: the answer budget here, and the request-body budget (`server::BodyBudget`).
pub(crate) struct SharedBudget {
    total: Arc<Semaphore>,
    /// A principal's share, in KiB.
    share: usize,
    /// Each principal's share (principals come from the policy: a bounded set).
    shares: parking_lot::Mutex<HashMap<Arc<str>, Arc<Semaphore>>>,
}

impl SharedBudget {
    /// A budget of `kib` permits (at least 2), half of it each principal's share.
    pub(crate) fn of_kib(kib: usize) -> Self {
        let kib = kib.clamp(2, Semaphore::MAX_PERMITS);
        Self {
            total: Arc::new(Semaphore::new(kib)),
            share: kib / 2,
            shares: parking_lot::Mutex::default(),
        }
    }

    /// The permits every call takes from.
    pub(crate) fn total(&self) -> &Arc<Semaphore> {
        &self.total
    }

    /// Half the budget, in KiB.
    pub(crate) fn half(&self) -> usize {
        self.share
    }

    /// `principal`'s share.
    pub(crate) fn share_of(&self, principal: &Arc<str>) -> Arc<Semaphore> {
        Arc::clone(
            self.shares
                .lock()
                .entry(Arc::clone(principal))
                .or_insert_with(|| Arc::new(Semaphore::new(self.share))),
        )
    }
}

impl AnswerBudget {
    /// A budget for a server whose calls may carry `max_request_bytes` each.
    pub fn for_requests(max_request_bytes: usize) -> Self {
        let bytes = max_request_bytes
            .saturating_mul(ANSWER_BUDGET_FACTOR)
            .max(MIN_ANSWER_BUDGET);
        Self::of_kib(bytes.div_ceil(1024))
    }

    fn of_kib(kib: usize) -> Self {
        Self(Arc::new(SharedBudget::of_kib(kib)))
    }

    /// Takes an answer of `size` bytes for `principal`, at `peer`, from the budget and from
    /// the principal's share: `None` for an answer too small to count; the error names
    /// `field` when either is spent.
    pub(crate) fn hold(
        &self,
        size: usize,
        principal: &Arc<str>,
        peer: Option<SocketAddr>,
        field: &str,
    ) -> Result<Option<AnswerHold>, Status> {
        if size < COUNTED_ANSWER_BYTES {
            return Ok(None);
        }
        let kib = u32::try_from(size.div_ceil(1024)).unwrap_or(u32::MAX);
        let share = self.0.share_of(principal);
        let own = share.try_acquire_many_owned(kib).map_err(|_| {
            Status::resource_exhausted(format!(
                "{field}: the answer is {size} bytes, and answers to this caller that it has not read yet already hold its share of the answer budget (half of it); read them, or retry shortly"
            ))
        })?;
        let permit = Arc::clone(&self.0.total)
            .try_acquire_many_owned(kib)
            .map_err(|_| {
                Status::resource_exhausted(format!(
                    "{field}: the answer is {size} bytes, and the server already holds as many answer bytes as it takes (answers its callers have not read yet); retry shortly"
                ))
            })?;
        Ok(Some(AnswerHold(Arc::new(parking_lot::Mutex::new(Some(
            Held {
                _permits: (permit, own),
                peer,
            },
        ))))))
    }
}

struct Held {
    /// The answer's bytes in the budget and in its caller's share.
    _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
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
        let held = self.0.lock().take();
        if let Some(track) = &track {
            track.join();
        }
        tonic::body::Body::new(AnswerBody {
            inner: body,
            rest: Bytes::new(),
            held,
            track,
        })
    }
}

/// How many counted answers of one connection are still being handed over, and when one of
/// them last moved (was handed a chunk further).
#[derive(Debug)]
pub struct AnswerTrack {
    /// Read without the lock on every connection poll.
    pending: AtomicUsize,
    moved: parking_lot::Mutex<Instant>,
}

impl Default for AnswerTrack {
    fn default() -> Self {
        Self {
            pending: AtomicUsize::new(0),
            moved: parking_lot::Mutex::new(Instant::now()),
        }
    }
}

impl AnswerTrack {
    /// A new answer. It does not count as movement of a connection whose answers wait
    /// already (review 18: one started every 30 s kept a connection that read nothing); on
    /// one without, its timer starts now.
    fn join(&self) {
        let mut moved = self.moved.lock();
        if self.pending.fetch_add(1, Ordering::AcqRel) == 0 {
            *moved = Instant::now();
        }
    }

    fn moved(&self) {
        *self.moved.lock() = Instant::now();
    }

    fn leave(&self) {
        self.pending.fetch_sub(1, Ordering::Release);
    }

    /// Since when none of the connection's answers has moved; `None` without answers.
    pub(crate) fn stalled_since(&self) -> Option<Instant> {
        if self.pending.load(Ordering::Acquire) == 0 {
            return None;
        }
        Some(*self.moved.lock())
    }
}

/// An answer's body, handed over in chunks of [`ANSWER_CHUNK`].
struct AnswerBody {
    inner: tonic::body::Body,
    /// The bytes of the current data frame not yet handed over.
    rest: Bytes,
    /// Its share of the budget, until it is done.
    held: Option<Held>,
    /// Its connection's track, until it is done.
    track: Option<Arc<AnswerTrack>>,
}

impl AnswerBody {
    fn moved(&self) {
        if let Some(track) = &self.track {
            track.moved();
        }
    }

    fn done(&mut self) {
        self.held = None;
        if let Some(track) = self.track.take() {
            track.leave();
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

    fn who(name: &str) -> Arc<str> {
        Arc::from(name)
    }

    fn available(budget: &AnswerBudget) -> usize {
        budget.0.total.available_permits()
    }

    #[tokio::test]
    async fn a_counted_answer_is_handed_over_in_chunks_and_frees_its_budget_when_done() {
        let budget = AnswerBudget::of_kib(2048);
        let a = who("a");
        assert!(budget
            .hold(COUNTED_ANSWER_BYTES - 1, &a, None, "f")
            .expect("small")
            .is_none());
        let size = 3 * ANSWER_CHUNK + 10;
        let hold = budget
            .hold(size, &a, None, "f")
            .expect("fits")
            .expect("counted");
        assert_eq!(available(&budget), 2048 - size.div_ceil(1024));
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
        assert_eq!(available(&budget), 2048);
        assert!(track.stalled_since().is_none());
    }

    #[tokio::test]
    async fn a_caller_holds_at_most_half_the_budget_and_a_dropped_answer_gives_its_share_back() {
        // Review 17: one slow reader held the whole budget.
        let budget = AnswerBudget::of_kib(400);
        let (a, b) = (who("a"), who("b"));
        let first = budget
            .hold(150 * 1024, &a, None, "field_names")
            .expect("fits")
            .expect("counted");
        let refused = match budget.hold(100 * 1024, &a, None, "field_names") {
            Err(status) => status,
            Ok(_) => panic!("past a's share"),
        };
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused
                .message()
                .starts_with("field_names: the answer is 102400 bytes, and answers to this caller"),
            "{}",
            refused.message()
        );
        // Another caller has the other half; past the whole budget, everyone is refused.
        let second = budget
            .hold(200 * 1024, &b, None, "export")
            .expect("b's share")
            .expect("counted");
        let refused = match budget.hold(100 * 1024, &who("c"), None, "export") {
            Err(status) => status,
            Ok(_) => panic!("past the budget"),
        };
        assert!(
            refused
                .message()
                .contains("the server already holds as many answer bytes as it takes"),
            "{}",
            refused.message()
        );
        drop(second);
        let track = Arc::new(AnswerTrack::default());
        let body = first.wrap(
            body_of(vec![Bytes::from(vec![0u8; 150 * 1024])]),
            Some(Arc::clone(&track)),
        );
        assert!(track.stalled_since().is_some());
        drop(body);
        assert!(track.stalled_since().is_none());
        assert!(budget.hold(200 * 1024, &a, None, "field_names").is_ok());
        assert_eq!(available(&budget), 400);
    }

    #[test]
    fn a_connection_stalls_only_while_none_of_its_answers_moves() {
        // Review 17: an answer queued behind others on a connection read at line rate does
        // not move meanwhile.
        let track = AnswerTrack::default();
        assert_eq!(track.stalled_since(), None);
        track.join();
        let first = track.stalled_since().expect("one answer");
        std::thread::sleep(Duration::from_millis(20));
        track.join();
        let second = track.stalled_since().expect("two answers");
        assert_eq!(
            second, first,
            "a new answer beside one waiting is no movement"
        );
        std::thread::sleep(Duration::from_millis(20));
        track.moved();
        let third = track.stalled_since().expect("two");
        assert!(third > second);
        track.leave();
        assert!(track.stalled_since().is_some());
        track.leave();
        assert_eq!(track.stalled_since(), None);
        // Without answers waiting, a new answer's timer starts afresh.
        std::thread::sleep(Duration::from_millis(20));
        track.join();
        assert!(track.stalled_since().expect("one") > third);
    }

    #[test]
    fn the_budget_holds_at_least_two_of_the_largest_answers_and_a_share_one() {
        let max_request_bytes = crate::config::DEFAULT_MAX_REQUEST_BYTES;
        let budget = AnswerBudget::for_requests(max_request_bytes);
        assert!(available(&budget) * 1024 >= 2 * 2 * max_request_bytes);
        assert!(budget.0.share * 1024 >= 2 * max_request_bytes);
        for mrb in [1, 1 << 20, 16 << 20, 20 << 20] {
            let b = AnswerBudget::for_requests(mrb);
            assert!(available(&b) >= MIN_ANSWER_BUDGET / 1024);
            assert!(b.0.share * 1024 >= 2 * mrb, "{mrb}");
        }
    }
}
