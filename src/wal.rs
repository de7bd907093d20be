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
//! is written, so it was never acknowledged), provided no valid frame of a batch not yet
//! applied follows it, in that file or a later one. If one does, a frame that was
//! acknowledged is damaged, and opening fails rather than drop the writes after it.

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

/// How the bytes of a log file end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogEnd {
    /// After the last frame: nothing, or only the zeros the log writer puts ahead of frames.
    Clean,
    /// In a frame cut short or failing its CRC at byte `at`, with no valid frame of a later
    /// batch after it in the file: a write torn by a crash.
    Torn {
        /// Where the bad frame starts.
        at: usize,
    },
    /// In a bad frame at byte `at`, followed in the file by a valid frame of a later batch:
    /// an acknowledged frame is damaged.
    Corrupt {
        /// Where the bad frame starts.
        at: usize,
    },
}

/// How far past the last known batch a frame found by [`decode_frames`]'s search after a bad
/// frame may be numbered (random bytes land in the window with probability ~2^-40 per offset).
const SEQ_WINDOW: u64 = 1 << 24;

/// Decodes frames from the start of `bytes`, and says how the bytes end. `floor` is the
/// highest batch known before this file (frames at or below it are replayed but need not be):
/// after a bad frame, the rest of the file is searched for a valid frame numbered above both
/// `floor` and the last good frame, which makes the end [`LogEnd::Corrupt`].
pub fn decode_frames(bytes: &[u8], floor: u64) -> (Vec<Frame>, LogEnd) {
    let mut frames: Vec<Frame> = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        match decode_frame(&bytes[at..]) {
            Some((frame, used)) => {
                frames.push(frame);
                at += used;
            }
            // Zeros written ahead of the frames: the clean end of the log.
            None if bytes[at..].iter().all(|&b| b == 0) => break,
            None => {
                let last = frames.last().map_or(floor, |f| f.seq.max(floor));
                let end = if valid_frame_after(bytes, at, last) {
                    LogEnd::Corrupt { at }
                } else {
                    LogEnd::Torn { at }
                };
                return (frames, end);
            }
        }
    }
    (frames, LogEnd::Clean)
}

/// Whether a valid frame numbered in `(after, after + SEQ_WINDOW]` starts anywhere in `bytes`
/// past `from`. Candidates are picked by their sequence number (one comparison per offset);
/// only those are CRC-checked.
fn valid_frame_after(bytes: &[u8], from: usize, after: u64) -> bool {
    let end = bytes.len().saturating_sub(FRAME_HEADER);
    (from + 1..=end).any(|o| {
        let seq = u64::from_be_bytes(
            bytes[o + 8..o + 16]
                .try_into()
                .expect("a frame header holds 8 bytes of sequence number"),
        );
        seq > after
            && seq - after <= SEQ_WINDOW
            && decode_frame(&bytes[o..]).is_some_and(|(frame, _)| frame.seq == seq)
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
                ops.push(Op::Put(ks, key.to_vec(), value.to_vec()));
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
            (0usize..5, bytes(), bytes()).prop_map(|(k, key, v)| Op::Put(Keyspace::ALL[k], key, v)),
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
            for (i, ops) in batches.iter().enumerate() {
                encode_frame(&mut log, i as u64 + 1, ops);
            }
            let (frames, end) = decode_frames(&log, 0);
            prop_assert_eq!(end, LogEnd::Clean);
            prop_assert_eq!(frames.len(), batches.len());
            for (f, ops) in frames.iter().zip(&batches) {
                prop_assert!(f.ops.len() == ops.len() && f.ops.iter().zip(ops).all(|(a, b)| same(a, b)));
            }
            // Zeros written ahead of the frames end the log cleanly.
            let mut padded = log.clone();
            padded.resize(log.len() + cut.index(3 * FRAME_HEADER), 0);
            let (frames, end) = decode_frames(&padded, 0);
            prop_assert_eq!(end, LogEnd::Clean);
            prop_assert_eq!(frames.len(), batches.len());
            // A torn tail (zeros after it, as written ahead): a strict prefix of frames, never
            // garbage, and never taken for damage.
            let cut = cut.index(log.len());
            let mut torn = log[..cut].to_vec();
            torn.resize(log.len() + FRAME_HEADER, 0);
            let (frames, end) = decode_frames(&torn, 0);
            prop_assert!(matches!(end, LogEnd::Clean | LogEnd::Torn { .. }), "{:?}", end);
            prop_assert!(frames.len() <= batches.len());
            for (i, f) in frames.iter().enumerate() {
                prop_assert_eq!(f.seq, i as u64 + 1);
            }
            // A flipped bit is caught by the CRC (or the framing).
            let mut bad = log.clone();
            let at = flip.index(bad.len());
            bad[at] ^= 0x10;
            let (frames, end) = decode_frames(&bad, 0);
            prop_assert_ne!(end, LogEnd::Clean);
            // ... and damage before the last frame is told apart from a torn tail.
            let damaged_before_last = frames.len() + 1 < batches.len();
            prop_assert_eq!(matches!(end, LogEnd::Corrupt { .. }), damaged_before_last);
        }
    }

    #[test]
    fn frames_at_or_below_the_floor_after_a_bad_frame_are_not_damage() {
        let mut log = Vec::new();
        for seq in 1..=3 {
            encode_frame(
                &mut log,
                seq,
                &[Op::Delete(Keyspace::Meta, vec![seq as u8])],
            );
        }
        let second = decode_frame(&log).expect("frame").1;
        log[second + FRAME_HEADER] ^= 0x01;
        assert_eq!(decode_frames(&log, 0).1, LogEnd::Corrupt { at: second });
        // Batch 3 is already applied (the floor): losing the frames from 2 on loses nothing.
        assert_eq!(decode_frames(&log, 3).1, LogEnd::Torn { at: second });
    }
}
