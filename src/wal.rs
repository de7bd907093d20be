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
//! fails its CRC ends the last log file (a write torn by the crash: it was never acknowledged);
//! anywhere else it is corruption and opening fails.

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

/// Decodes frames from the start of `bytes`. Returns the frames and whether the bytes ended
/// cleanly (`true`: after the last frame, nothing or only zeros, which the log writer puts
/// ahead of its frames) or in a torn or corrupt frame (`false`).
pub fn decode_frames(bytes: &[u8]) -> (Vec<Frame>, bool) {
    let mut frames = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        match decode_frame(&bytes[at..]) {
            Some((frame, used)) => {
                frames.push(frame);
                at += used;
            }
            // Zeros written ahead of the frames: the clean end of the log.
            None => return (frames, bytes[at..].iter().all(|&b| b == 0)),
        }
    }
    (frames, true)
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
            let (frames, clean) = decode_frames(&log);
            prop_assert!(clean);
            prop_assert_eq!(frames.len(), batches.len());
            for (f, ops) in frames.iter().zip(&batches) {
                prop_assert!(f.ops.len() == ops.len() && f.ops.iter().zip(ops).all(|(a, b)| same(a, b)));
            }
            // Zeros written ahead of the frames end the log cleanly.
            let mut padded = log.clone();
            padded.resize(log.len() + cut.index(3 * FRAME_HEADER), 0);
            let (frames, clean) = decode_frames(&padded);
            prop_assert!(clean);
            prop_assert_eq!(frames.len(), batches.len());
            // A torn tail: a strict prefix of frames, never garbage.
            let cut = cut.index(log.len());
            let (frames, _) = decode_frames(&log[..cut]);
            prop_assert!(frames.len() <= batches.len());
            for (i, f) in frames.iter().enumerate() {
                prop_assert_eq!(f.seq, i as u64 + 1);
            }
            // A flipped bit is caught by the CRC (or the framing).
            let mut bad = log.clone();
            let at = flip.index(bad.len());
            bad[at] ^= 0x10;
            let (_, clean) = decode_frames(&bad);
            prop_assert!(!clean);
        }
    }
}
