//! The write-ahead log that makes sled writes durable without sled's flush on the hot path.
//!
//! Every commit group (the batches the leader accepted together, their audit event blocks
//! and the new chain head) is appended to the log as one frame, numbered by the group's last
//! batch; concurrent writers share one
//! `write` + `fdatasync` of the log (group commit). sled itself is flushed only at checkpoints
//! (and by its own background flusher), after which older log files are deleted.
//!
//! ```text
//! <data>/wal/<file number, 16 digits>.wal   frames, back to back:
//!   payload length u32 BE ‖ CRC-32 (IEEE) of (seq ‖ payload) u32 BE ‖ seq u64 BE ‖ payload
//!   payload = ops: kind u8 (1 put, 2 delete) ‖ keyspace u8 ‖ key len u32 ‖ key ‖ [value len u32 ‖ value]
//! ```
//!
//! Recovery replays, in order, the frames whose sequence number is above the one sled recorded
//! as applied (`store/wal-applied` is written after each group's writes, and sled recovers a
//! prefix of its own log, so
//! sled's recovered state says exactly which batches it holds). A frame that is cut short or
//! fails its CRC ends the log (a write torn by the crash: each frame is synced before the next
//! is written, so it was never acknowledged), provided no valid frame follows it, in that file
//! or a later one. If one does, decoding resynchronises on it: frames are numbered by their
//! group's last batch and increase through the log, so the damaged bytes held only batches
//! below it. If those are all applied already, the damage is skipped (with a warning);
//! otherwise an acknowledged frame may be lost, and opening fails rather than drop it.
//! A file shorter than any crash leaves it (see [`decode_frames`]) was cut back by something
//! else, and is reported as [`Decoded::cut`].

use bytes::Bytes;
use std::path::{Path, PathBuf};

use crate::store::{Keyspace, Op};

/// Bytes before a frame's payload: length, CRC, sequence number.
pub const FRAME_HEADER: usize = 4 + 4 + 8;
const OP_PUT: u8 = 1;
const OP_DELETE: u8 = 2;

/// Appends the frame of batch `seq` with `ops` to `out`.
pub fn encode_frame<'a, I>(out: &mut Vec<u8>, seq: u64, ops: I)
where
    I: IntoIterator<Item = &'a Op>,
    I::IntoIter: Clone,
{
    let ops = ops.into_iter();
    // One allocation for the frame (a rewrap page is ~1 MB).
    let payload: usize = ops
        .clone()
        .map(|op| match op {
            Op::Put(_, key, value) => 10 + key.len() + value.len(),
            Op::Delete(_, key) => 6 + key.len(),
        })
        .sum();
    out.reserve(FRAME_HEADER + payload);
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER]);
    for op in ops {
        match op {
            Op::Put(ks, key, value) => {
                out.push(OP_PUT);
                out.push(*ks as u8);
                put_bytes(out, key);
                put_bytes(out, value);
            }
            Op::Delete(ks, key) => {
                out.push(OP_DELETE);
                out.push(*ks as u8);
                put_bytes(out, key);
            }
        }
    }
    let payload_len = u32::try_from(out.len() - start - FRAME_HEADER)
        .expect("a batch is limited far below 4 GiB by the request size limit");
    let seq_bytes = seq.to_be_bytes();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&seq_bytes);
    crc.update(&out[start + FRAME_HEADER..]);
    out[start..start + 4].copy_from_slice(&payload_len.to_be_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.finalize().to_be_bytes());
    out[start + 8..start + 16].copy_from_slice(&seq_bytes);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u32::try_from(bytes.len()).expect("keys and values are far below 4 GiB");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

/// A decoded frame.
#[derive(Debug, Clone)]
pub struct Frame {
    /// The batch's sequence number.
    pub seq: u64,
    /// Its writes.
    pub ops: Vec<Op>,
}

/// The log file grows by this many zeros at a time, ahead of its frames: every sync leaves
/// the file a multiple of this long, and at least as long as its frames.
pub const LOG_EXTEND: u64 = 1 << 20;

/// How the bytes of a log file end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogEnd {
    /// After the last frame: nothing, or only the zeros the log writer puts ahead of frames.
    Clean,
    /// In a frame cut short or failing its CRC at byte `at`, with no valid frame of a later
    /// batch after it in the file: a write torn by a crash (unless the file is also
    /// [`Decoded::cut`]).
    Torn {
        /// Where the bad frame starts.
        at: usize,
    },
    /// In a bad frame at byte `at`, followed in the file by a valid frame of a later batch,
    /// `next`, such that the bytes in between can hold batches above the floor: an
    /// acknowledged frame that is not applied yet is damaged.
    Corrupt {
        /// Where the bad frame starts.
        at: usize,
        /// Where the next valid frame starts.
        resumed_at: usize,
        /// The highest batch known to be held before the damage (the floor, or the last good
        /// frame before it): the damaged bytes can hold batches `known + 1 .. next`.
        known: u64,
        /// The next valid frame's sequence number.
        next: u64,
    },
}

/// Damaged bytes that [`decode_frames`] skipped: the next valid frame after them is numbered
/// at most one above the floor, so every batch they can hold is applied already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Skipped {
    /// Where the bad frame starts.
    pub at: usize,
    /// Where the next valid frame starts.
    pub resumed_at: usize,
    /// The last good frame's sequence number before the damage (`None`: none in this file).
    pub after: Option<u64>,
    /// The next valid frame's sequence number: the damaged bytes held batches below it.
    pub next: u64,
}

/// A log file shorter than any crash leaves it: something else cut it back (or zeroed its
/// end and shortened it), so frames of acknowledged writes may be gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    /// The file's length.
    pub len: u64,
    /// The least length a crash leaves this file at, given its frames.
    pub needed: u64,
    /// Where its readable frames end.
    pub frames_end: usize,
}

/// What [`decode_frames`] read from one log file.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// The valid frames, in file order.
    pub frames: Vec<Frame>,
    /// How the file ends.
    pub end: LogEnd,
    /// Damage skipped because every batch it can hold is applied.
    pub skipped: Vec<Skipped>,
    /// Set if the file is shorter than any crash leaves it (never with [`LogEnd::Corrupt`]).
    pub cut: Option<Cut>,
}

/// How far past the last known batch a frame found by [`decode_frames`]'s search after a bad
/// frame may be numbered (random bytes land in the window with probability ~2^-40 per offset).
const SEQ_WINDOW: u64 = 1 << 24;

/// Decodes frames from the start of `bytes`, and says how the bytes end. `floor` is the
/// highest batch known to be held before this file (applied to sled, or replayed from an
/// earlier file): frames at or below it are returned but need not be replayed.
///
/// After a bad frame, decoding resynchronises on the next valid frame (found by its sequence
/// number, which must be above the last good frame's and within [`SEQ_WINDOW`] of what is
/// known, then by the same length, CRC and op checks as every frame). Frames are numbered by
/// their group's last batch and increase through a file, so the damaged bytes held only
/// batches below that frame's number: if it is at most one above the highest batch known
/// (the floor, or the last good frame), the damage holds nothing that is not applied and is
/// skipped ([`Decoded::skipped`]); otherwise the end is [`LogEnd::Corrupt`]. Without a valid
/// frame after it, the bad frame is [`LogEnd::Torn`].
///
/// The log writer makes the file a multiple of [`LOG_EXTEND`] long, at least as long as its
/// frames, before it writes a frame, and each frame is synced before the next is written;
/// a crash can only leave the file longer. So a file shorter than the next multiple of
/// [`LOG_EXTEND`] above the start of its last valid frame (above the bad frame, for a torn
/// end) was cut back by something else: [`Decoded::cut`].
pub fn decode_frames(bytes: &[u8], floor: u64) -> Decoded {
    let mut frames: Vec<Frame> = Vec::new();
    let mut skipped = Vec::new();
    // Where the last valid frame starts.
    let mut last_start: Option<usize> = None;
    let mut at = 0;
    let end = loop {
        if at >= bytes.len() {
            break LogEnd::Clean;
        }
        match decode_frame(&bytes[at..]) {
            Some((frame, used)) => {
                frames.push(frame);
                last_start = Some(at);
                at += used;
            }
            // Zeros written ahead of the frames: the clean end of the log.
            None if bytes[at..].iter().all(|&b| b == 0) => break LogEnd::Clean,
            None => {
                let after = frames.last().map(|f| f.seq);
                let known = after.map_or(floor, |a| a.max(floor));
                match next_valid_frame(
                    bytes,
                    at,
                    after.unwrap_or(0),
                    known.saturating_add(SEQ_WINDOW),
                ) {
                    None => break LogEnd::Torn { at },
                    Some((resumed_at, next)) if next <= known.saturating_add(1) => {
                        skipped.push(Skipped {
                            at,
                            resumed_at,
                            after,
                            next,
                        });
                        at = resumed_at;
                    }
                    Some((resumed_at, next)) => {
                        break LogEnd::Corrupt {
                            at,
                            resumed_at,
                            known,
                            next,
                        }
                    }
                }
            }
        }
    };
    let up = |n: usize| (n as u64).div_ceil(LOG_EXTEND) * LOG_EXTEND;
    let needed = match end {
        LogEnd::Clean => last_start.map_or(0, up),
        LogEnd::Torn { at } => up(at),
        LogEnd::Corrupt { .. } => 0,
    };
    let len = bytes.len() as u64;
    let cut = (len < needed).then_some(Cut {
        len,
        needed,
        frames_end: at.min(bytes.len()),
    });
    Decoded {
        frames,
        end,
        skipped,
        cut,
    }
}

/// The first valid frame that starts in `bytes` past `from` and is numbered in
/// `(after, limit]`, with where it starts. Candidates are picked by their sequence number
/// (one comparison per offset); only those are decoded and CRC-checked.
fn next_valid_frame(bytes: &[u8], from: usize, after: u64, limit: u64) -> Option<(usize, u64)> {
    let end = bytes.len().saturating_sub(FRAME_HEADER);
    (from + 1..=end).find_map(|o| {
        let seq = u64::from_be_bytes(bytes.get(o + 8..o + 16)?.try_into().ok()?);
        (seq > after
            && seq <= limit
            && decode_frame(bytes.get(o..)?).is_some_and(|(f, _)| f.seq == seq))
        .then_some((o, seq))
    })
}

fn decode_frame(bytes: &[u8]) -> Option<(Frame, usize)> {
    let header = bytes.get(..FRAME_HEADER)?;
    let len = u32::from_be_bytes(header[0..4].try_into().ok()?) as usize;
    let crc = u32::from_be_bytes(header[4..8].try_into().ok()?);
    let seq = u64::from_be_bytes(header[8..16].try_into().ok()?);
    let payload = bytes.get(FRAME_HEADER..FRAME_HEADER.checked_add(len)?)?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[8..16]);
    hasher.update(payload);
    if hasher.finalize() != crc {
        return None;
    }
    let mut ops = Vec::new();
    let mut p = payload;
    while !p.is_empty() {
        let (&kind, rest) = p.split_first()?;
        let (&ks, rest) = rest.split_first()?;
        let ks = *Keyspace::ALL.get(usize::from(ks))?;
        let (key, rest) = take_bytes(rest)?;
        match kind {
            OP_PUT => {
                let (value, rest) = take_bytes(rest)?;
                ops.push(Op::Put(ks, key.to_vec(), Bytes::copy_from_slice(value)));
                p = rest;
            }
            OP_DELETE => {
                ops.push(Op::Delete(ks, key.to_vec()));
                p = rest;
            }
            _ => return None,
        }
    }
    Some((Frame { seq, ops }, FRAME_HEADER + len))
}

fn take_bytes(p: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u32::from_be_bytes(p.get(..4)?.try_into().ok()?) as usize;
    let bytes = p.get(4..4usize.checked_add(len)?)?;
    Some((bytes, &p[4 + len..]))
}

/// The log directory inside a data directory.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("wal")
}

/// Path of log file number `no`.
pub fn file_path(wal_dir: &Path, no: u64) -> PathBuf {
    wal_dir.join(format!("{no:016}.wal"))
}

/// The log files in `wal_dir`, by number.
pub fn list(wal_dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(wal_dir)? {
        let path = entry?.path();
        let no = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".wal"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(no) = no {
            out.push((no, path));
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn op() -> impl Strategy<Value = Op> {
        let bytes = || proptest::collection::vec(any::<u8>(), 0..40);
        prop_oneof![
            (0usize..5, bytes(), bytes()).prop_map(|(k, key, v)| Op::Put(
                Keyspace::ALL[k],
                key,
                v.into()
            )),
            (0usize..5, bytes()).prop_map(|(k, key)| Op::Delete(Keyspace::ALL[k], key)),
        ]
    }

    fn same(a: &Op, b: &Op) -> bool {
        match (a, b) {
            (Op::Put(k1, a1, v1), Op::Put(k2, a2, v2)) => k1 == k2 && a1 == a2 && v1 == v2,
            (Op::Delete(k1, a1), Op::Delete(k2, a2)) => k1 == k2 && a1 == a2,
            _ => false,
        }
    }

    proptest! {
        #[test]
        fn frames_round_trip_and_any_truncation_yields_a_prefix(
            batches in proptest::collection::vec(proptest::collection::vec(op(), 0..5), 1..6),
            cut in any::<proptest::sample::Index>(),
            flip in any::<proptest::sample::Index>(),
        ) {
            let mut log = Vec::new();
            let mut starts = Vec::new();
            for (i, ops) in batches.iter().enumerate() {
                starts.push(log.len());
                encode_frame(&mut log, i as u64 + 1, ops);
            }
            let d = decode_frames(&log, 0);
            prop_assert_eq!(d.end, LogEnd::Clean);
            prop_assert_eq!(d.frames.len(), batches.len());
            for (f, ops) in d.frames.iter().zip(&batches) {
                prop_assert!(f.ops.len() == ops.len() && f.ops.iter().zip(ops).all(|(a, b)| same(a, b)));
            }
            // Zeros written ahead of the frames end the log cleanly.
            let mut padded = log.clone();
            padded.resize(log.len() + cut.index(3 * FRAME_HEADER), 0);
            let d = decode_frames(&padded, 0);
            prop_assert_eq!(d.end, LogEnd::Clean);
            prop_assert_eq!(d.frames.len(), batches.len());
            // ... and, as the log writer leaves a file (a multiple of LOG_EXTEND long), no cut.
            padded.resize(LOG_EXTEND as usize, 0);
            prop_assert_eq!(decode_frames(&padded, 0).cut, None);
            // Cut back at a frame boundary past the second frame: detected (the last frame
            // left may have been the one written but not synced, so the first cannot count).
            let k = cut.index(starts.len());
            if k >= 2 {
                let d = decode_frames(&log[..starts[k]], 0);
                prop_assert_eq!(d.end, LogEnd::Clean);
                prop_assert!(d.cut.is_some(), "{:?}", d.cut);
            }
            // A torn tail (zeros after it, as written ahead): a strict prefix of frames, never
            // garbage, and never taken for damage or a cut.
            let cut = cut.index(log.len());
            let mut torn = log[..cut].to_vec();
            torn.resize(LOG_EXTEND as usize, 0);
            let d = decode_frames(&torn, 0);
            prop_assert!(matches!(d.end, LogEnd::Clean | LogEnd::Torn { .. }), "{:?}", d.end);
            prop_assert_eq!(d.cut, None);
            prop_assert!(d.skipped.is_empty());
            prop_assert!(d.frames.len() <= batches.len());
            for (i, f) in d.frames.iter().enumerate() {
                prop_assert_eq!(f.seq, i as u64 + 1);
            }
            // A flipped bit is caught by the CRC (or the framing).
            let mut bad = log.clone();
            let at = flip.index(bad.len());
            bad[at] ^= 0x10;
            let d = decode_frames(&bad, 0);
            prop_assert_ne!(d.end, LogEnd::Clean);
            // ... and damage before the last frame is told apart from a torn tail.
            let damaged_before_last = d.frames.len() + 1 < batches.len();
            prop_assert_eq!(matches!(d.end, LogEnd::Corrupt { .. }), damaged_before_last);
            // With every batch applied, the damage is skipped and the frames after it read.
            let d = decode_frames(&bad, batches.len() as u64);
            if damaged_before_last {
                prop_assert_eq!(d.end, LogEnd::Clean);
                prop_assert_eq!(d.skipped.len(), 1);
                prop_assert_eq!(d.frames.len() + 1, batches.len());
            }
        }
    }

    /// Frames `seqs`, each deleting one meta key, and where each starts.
    fn log_of(seqs: impl IntoIterator<Item = u64>) -> (Vec<u8>, Vec<usize>) {
        let mut log = Vec::new();
        let mut starts = Vec::new();
        for seq in seqs {
            starts.push(log.len());
            encode_frame(
                &mut log,
                seq,
                &[Op::Delete(Keyspace::Meta, seq.to_be_bytes().to_vec())],
            );
        }
        (log, starts)
    }

    fn seqs(d: &Decoded) -> Vec<u64> {
        d.frames.iter().map(|f| f.seq).collect()
    }

    /// As the log writer leaves a file: zeros up to a multiple of LOG_EXTEND.
    fn padded(mut log: Vec<u8>) -> Vec<u8> {
        log.resize(
            (log.len() as u64).div_ceil(LOG_EXTEND).max(1) as usize * LOG_EXTEND as usize,
            0,
        );
        log
    }

    #[test]
    fn damage_that_sled_has_applied_is_skipped_and_the_frames_after_it_are_read() {
        let (mut log, starts) = log_of(1..=5);
        log[starts[2] + FRAME_HEADER + 1] ^= 0x01;
        let log = padded(log);
        // Frame 4 follows the damaged frame 3: with batch 3 (or 4) applied, nothing is lost.
        for floor in [3, 4, 5, 9] {
            let d = decode_frames(&log, floor);
            assert_eq!(d.end, LogEnd::Clean, "floor {floor}");
            assert_eq!(seqs(&d), [1, 2, 4, 5]);
            assert_eq!(
                d.skipped,
                [Skipped {
                    at: starts[2],
                    resumed_at: starts[3],
                    after: Some(2),
                    next: 4
                }]
            );
            assert_eq!(d.cut, None);
        }
        // A damaged first frame: no good frame before it, the floor says what is held.
        let (mut log, starts) = log_of(100..=102);
        log[starts[0] + 9] ^= 0x80;
        let d = decode_frames(&padded(log), 100);
        assert_eq!(d.end, LogEnd::Clean);
        assert_eq!(seqs(&d), [101, 102]);
        assert_eq!(
            d.skipped,
            [Skipped {
                at: 0,
                resumed_at: starts[1],
                after: None,
                next: 101
            }]
        );
        // Damage that reaches over several frames (a zeroed block), all applied.
        let (mut log, starts) = log_of(1..=6);
        log[starts[1] + 3..starts[4] - 2].fill(0);
        let d = decode_frames(&padded(log), 4);
        assert_eq!(seqs(&d), [1, 5, 6]);
        assert_eq!(d.skipped.len(), 1);
        assert_eq!(d.end, LogEnd::Clean);
    }

    #[test]
    fn damage_that_can_hold_unapplied_batches_is_still_refused() {
        let (mut log, starts) = log_of(1..=5);
        log[starts[2] + FRAME_HEADER + 1] ^= 0x01;
        let log = padded(log);
        // Batch 3 is not applied: the damaged frame may hold it.
        for floor in [0, 2] {
            let d = decode_frames(&log, floor);
            assert_eq!(
                d.end,
                LogEnd::Corrupt {
                    at: starts[2],
                    resumed_at: starts[3],
                    known: 2,
                    next: 4
                },
                "floor {floor}"
            );
            assert_eq!(seqs(&d), [1, 2]);
            assert_eq!(d.cut, None);
        }
        // Skipped applied damage, then damage of an unapplied frame: refused at the second.
        let (mut log, starts) = log_of(1..=6);
        log[starts[1] + FRAME_HEADER + 1] ^= 0x01;
        log[starts[4] + FRAME_HEADER + 1] ^= 0x01;
        let d = decode_frames(&padded(log), 3);
        assert_eq!(d.skipped.len(), 1);
        assert_eq!(
            d.end,
            LogEnd::Corrupt {
                at: starts[4],
                resumed_at: starts[5],
                known: 4,
                next: 6
            }
        );
        // The batches of a group share one frame, numbered by the last: frame 7 after the
        // damage holds 6 and 7, so the damaged frame held at most 3..=5.
        let (mut log, starts) = log_of([2, 4, 7]);
        log[starts[1] + FRAME_HEADER] ^= 0x02;
        assert!(matches!(
            decode_frames(&log, 5).end,
            LogEnd::Corrupt { next: 7, .. }
        ));
        assert_eq!(decode_frames(&log, 6).skipped.len(), 1);
    }

    #[test]
    fn no_resynchronisation_on_bytes_that_only_look_like_a_frame() {
        let (mut log, starts) = log_of(1..=2);
        log[starts[1] + FRAME_HEADER] ^= 0x01;
        // After the damage: a header with a plausible sequence number and length whose CRC
        // does not match, and a valid frame numbered at or below the last good one (frames
        // increase through a file, so it cannot be the next).
        let mut fake = Vec::new();
        encode_frame(&mut fake, 3, &[Op::Delete(Keyspace::Meta, b"x".to_vec())]);
        fake[5] ^= 0x01;
        log.extend_from_slice(&fake);
        encode_frame(&mut log, 1, &[Op::Delete(Keyspace::Meta, b"y".to_vec())]);
        let d = decode_frames(&padded(log), 9);
        assert_eq!(d.end, LogEnd::Torn { at: starts[1] });
        assert!(d.skipped.is_empty());
        assert_eq!(seqs(&d), [1]);
    }

    #[test]
    fn a_file_cut_back_at_a_frame_boundary_is_detected() {
        let (log, starts) = log_of(1..=4);
        let d = decode_frames(&log[..starts[3]], 0);
        assert_eq!(d.end, LogEnd::Clean);
        assert_eq!(seqs(&d), [1, 2, 3]);
        assert_eq!(
            d.cut,
            Some(Cut {
                len: starts[3] as u64,
                needed: LOG_EXTEND,
                frames_end: starts[3]
            })
        );
        // Cut back inside the zeros ahead of the frames, short of the multiple of
        // LOG_EXTEND the writer left: detected too.
        let mut short = log.clone();
        short.resize(LOG_EXTEND as usize - 1, 0);
        assert!(decode_frames(&short, 0).cut.is_some());
        // In a later extension: the file had reached 2 MiB.
        let mut big = Vec::new();
        let mut starts = Vec::new();
        for seq in 1..=5 {
            starts.push(big.len());
            encode_frame(
                &mut big,
                seq,
                &[Op::Put(
                    Keyspace::Fields,
                    vec![1],
                    vec![7; 400 * 1024].into(),
                )],
            );
        }
        let d = decode_frames(&big[..starts[4]], 0);
        assert_eq!(d.cut.map(|c| c.needed), Some(2 * LOG_EXTEND));
        // The limit: a cut right after a frame that crosses a multiple of LOG_EXTEND (it
        // could be the frame written but not synced, after the zeros up to 2 MiB were lost).
        assert_eq!(decode_frames(&big[..starts[3]], 0).cut, None);
    }

    #[test]
    fn a_file_zeroed_from_a_frame_boundary_within_its_length_is_a_crash_shape() {
        // Indistinguishable from a crash before those frames were written: no cut.
        let (log, starts) = log_of(1..=4);
        let mut zeroed = padded(log);
        zeroed[starts[2]..].fill(0);
        let d = decode_frames(&zeroed, 0);
        assert_eq!((d.end, d.cut), (LogEnd::Clean, None));
        assert_eq!(seqs(&d), [1, 2]);
        // A crash while the writer extended the file with zeros: longer than the multiple
        // of LOG_EXTEND it had synced, not a multiple itself.
        let (log, _) = log_of(1..=4);
        let mut extending = padded(log);
        extending.resize(LOG_EXTEND as usize + 64 * 1024, 0);
        assert_eq!(decode_frames(&extending, 0).cut, None);
        // The first frame of a new file, written but not synced when the crash came: the
        // file may end with it.
        let (log, _) = log_of([7]);
        assert_eq!(decode_frames(&log, 0).cut, None);
        // An empty file (a rotation or a start-up created it).
        assert_eq!(decode_frames(&[], 0).cut, None);
    }

    #[test]
    fn a_torn_frame_is_a_crash_shape_only_with_the_zeros_after_it() {
        let (log, starts) = log_of(1..=4);
        // Cut in the middle of frame 4, nothing after: not a crash.
        let d = decode_frames(&log[..starts[3] + 5], 0);
        assert_eq!(d.end, LogEnd::Torn { at: starts[3] });
        assert_eq!(
            d.cut,
            Some(Cut {
                len: starts[3] as u64 + 5,
                needed: LOG_EXTEND,
                frames_end: starts[3]
            })
        );
        // The same torn frame followed by the zeros the writer put ahead: a crash.
        let d = decode_frames(&padded(log[..starts[3] + 5].to_vec()), 0);
        assert_eq!((d.end, d.cut), (LogEnd::Torn { at: starts[3] }, None));
        assert_eq!(seqs(&d), [1, 2, 3]);
    }
}
