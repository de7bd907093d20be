//! The stored form of a record: a MAC-protected header in the `records` keyspace and sealed
//! field chunks in the `fields` keyspace.
//!
//! ```text
//! records/<record id (16 bytes)>  → StoredRecord { body, mac_key_version, mac }
//!   body = RecordBody { id, revision, timestamps, lifecycle,
//!                       deks:   category → wrapped DEK,
//!                       fields: name → { category, revision written, chunk count, size,
//!                                        SHA-256 of its chunks' nonce ‖ tag, content type,
//!                                        blind-index tag } }
//!   mac  = HMAC-SHA256(integrity key, context("kluis/v1/record", key version, id, body))
//! fields/<id> ‖ <name> ‖ 0x00 ‖ <revision u64> ‖ <chunk u32>  → envelope (≤ 16 KiB plaintext)
//! index/<name> ‖ 0x00 ‖ <HMAC of normalised value> ‖ <id>    → empty
//! ```
//!
//! The MAC covers every field's digest, so replacing, dropping, adding or rolling back a single
//! field's ciphertext with write access to the store alone is detected on read.

use std::collections::BTreeMap;

use prost::Message;

use crate::crypto::{self, SecretKey};

/// Plaintext bytes per sealed chunk. Together with the store's segment size this keeps every
/// sled page below its blob threshold (see `store`).
pub const CHUNK_LEN: usize = 16 * 1024;
/// Current record format.
pub const RECORD_FORMAT: u32 = 1;
const CTX_RECORD: &[u8] = b"kluis/v1/record";
const CTX_FIELD: &[u8] = b"kluis/v1/field";

/// What the `records` keyspace holds for a record.
#[derive(Clone, PartialEq, Message)]
pub struct StoredRecord {
    /// The encoded [`RecordBody`], exactly as MACed.
    #[prost(bytes = "vec", tag = "1")]
    pub body: Vec<u8>,
    /// Version of the integrity key.
    #[prost(uint32, tag = "2")]
    pub mac_key_version: u32,
    /// HMAC-SHA256 over the record id and body.
    #[prost(bytes = "vec", tag = "3")]
    pub mac: Vec<u8>,
    /// The chunk envelopes of fields kept in the header ([`FieldEntry::in_header`]), by field
    /// name. Outside the MAC, like chunks in the `fields` keyspace: each is authenticated by
    /// its AEAD tag (bound to record, field and chunk) and by the field digest in the MACed
    /// body, so damage to one shows as damage to that field alone.
    #[prost(btree_map = "string, bytes", tag = "4")]
    pub inline: BTreeMap<String, Vec<u8>>,
}

/// The record's clear metadata and references to its sealed parts.
#[derive(Clone, PartialEq, Message)]
pub struct RecordBody {
    /// Record format version.
    #[prost(uint32, tag = "1")]
    pub format: u32,
    /// The record id (16 bytes of a UUID).
    #[prost(bytes = "vec", tag = "2")]
    pub id: Vec<u8>,
    /// Revision, 1 on creation, +1 per update.
    #[prost(uint64, tag = "3")]
    pub revision: u64,
    /// Creation time, Unix milliseconds.
    #[prost(int64, tag = "4")]
    pub created_ms: i64,
    /// Last update time, Unix milliseconds.
    #[prost(int64, tag = "5")]
    pub updated_ms: i64,
    /// Lifecycle state.
    #[prost(string, tag = "6")]
    pub lifecycle: String,
    /// Category name → its wrapped DEK.
    #[prost(btree_map = "string, message", tag = "7")]
    pub deks: BTreeMap<String, StoredDek>,
    /// Field name → where and what its ciphertext is.
    #[prost(btree_map = "string, message", tag = "8")]
    pub fields: BTreeMap<String, FieldEntry>,
    /// ISO date the lifecycle stage began (empty: the creation date).
    #[prost(string, tag = "9")]
    pub lifecycle_date: String,
    /// Restricted (Art. 18): only stored.
    #[prost(bool, tag = "10")]
    pub restricted: bool,
    /// Why it is restricted (free text of the privacy officer; no field values).
    #[prost(string, tag = "11")]
    pub restriction_reason: String,
    /// Under legal hold: not erasable.
    #[prost(bool, tag = "12")]
    pub legal_hold: bool,
    /// Why it is held.
    #[prost(string, tag = "13")]
    pub legal_hold_reason: String,
    /// Purpose → consent (or objection) state.
    #[prost(btree_map = "string, message", tag = "14")]
    pub consents: BTreeMap<String, ConsentEntry>,
}

/// Consent for a purpose (for a legitimate-interest purpose, `granted = false` is an objection).
#[derive(Clone, PartialEq, Message)]
pub struct ConsentEntry {
    /// Given (true) or withdrawn / objected (false).
    #[prost(bool, tag = "1")]
    pub granted: bool,
    /// When it last changed, Unix milliseconds.
    #[prost(int64, tag = "2")]
    pub changed_ms: i64,
}

/// A wrapped DEK.
#[derive(Clone, PartialEq, Message)]
pub struct StoredDek {
    /// KEK version that wraps it.
    #[prost(uint32, tag = "1")]
    pub kek_version: u32,
    /// The envelope.
    #[prost(bytes = "vec", tag = "2")]
    pub sealed: Vec<u8>,
    /// When this DEK was made, Unix milliseconds (re-key makes a new one).
    #[prost(int64, tag = "3")]
    pub created_ms: i64,
}

/// A field's entry in the header.
#[derive(Clone, PartialEq, Message)]
pub struct FieldEntry {
    /// Category name.
    #[prost(string, tag = "1")]
    pub category: String,
    /// Revision at which the value was written (part of its chunk keys).
    #[prost(uint64, tag = "2")]
    pub revision: u64,
    /// Number of chunks.
    #[prost(uint32, tag = "3")]
    pub chunks: u32,
    /// Plaintext size in bytes.
    #[prost(uint64, tag = "4")]
    pub size: u64,
    /// SHA-256 over each chunk envelope's nonce ‖ tag, in order.
    #[prost(bytes = "vec", tag = "5")]
    pub digest: Vec<u8>,
    /// Content type (blobs only).
    #[prost(string, tag = "6")]
    pub content_type: String,
    /// Blind-index tag (searchable fields only).
    #[prost(bytes = "vec", tag = "7")]
    pub index_tag: Vec<u8>,
    /// When this value was written, Unix milliseconds (0: before this was kept).
    #[prost(int64, tag = "8")]
    pub written_ms: i64,
    /// In memory: the value's only chunk envelope when the field is kept in the header
    /// (`in_header`). Never part of the MACed body: [`RecordBody::seal`] moves it to
    /// [`StoredRecord::inline`] and [`RecordBody::open`] brings it back.
    #[prost(bytes = "vec", tag = "9")]
    pub inline: Vec<u8>,
    /// The value is one chunk of at most [`INLINE_MAX`] bytes, kept in the stored header
    /// instead of as a separate `fields` entry.
    #[prost(bool, tag = "10")]
    pub in_header: bool,
}

/// Largest chunk envelope kept inside the record header: short text values (names, BSN,
/// IBAN, addresses) live with the header, so reading or writing a typical record is one
/// store key instead of one per field.
pub const INLINE_MAX: usize = 512;

/// Only the data keys of a record body (decoding skips the field entries).
#[derive(Clone, PartialEq, Message)]
struct DeksOnly {
    #[prost(btree_map = "string, message", tag = "7")]
    deks: BTreeMap<String, StoredDek>,
}

/// The wrapped DEKs a stored header names, without checking its MAC: for counting which KEK
/// versions records need (a job still opens and checks every header it changes).
pub fn peek_deks(stored: &[u8]) -> Result<BTreeMap<String, StoredDek>, HeaderError> {
    let stored = StoredRecord::decode(stored).map_err(|_| HeaderError)?;
    DeksOnly::decode(stored.body.as_slice())
        .map(|d| d.deks)
        .map_err(|_| HeaderError)
}

/// A header that could not be read back.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("record header failed its integrity check")]
pub struct HeaderError;

impl RecordBody {
    /// Encodes and MACs the body.
    pub fn seal(&self, key_version: u32, key: &SecretKey) -> Vec<u8> {
        let mut inline = BTreeMap::new();
        let body = if self.fields.values().any(|e| !e.inline.is_empty()) {
            let mut stripped = self.clone();
            for (name, entry) in stripped.fields.iter_mut() {
                if !entry.inline.is_empty() {
                    entry.in_header = true;
                    inline.insert(name.clone(), std::mem::take(&mut entry.inline));
                }
            }
            stripped.encode_to_vec()
        } else {
            self.encode_to_vec()
        };
        let ctx = crypto::context(&[CTX_RECORD, &key_version.to_be_bytes(), &self.id, &body]);
        let mac = crypto::hmac_sha256(key, &[&ctx]);
        StoredRecord {
            body,
            mac_key_version: key_version,
            mac: mac.to_vec(),
            inline,
        }
        .encode_to_vec()
    }

    /// Decodes a stored header, checking its MAC (under integrity key `key_version`) and that
    /// it belongs to `id`.
    pub fn open(
        id: &[u8],
        stored: &[u8],
        key_version: u32,
        key: &SecretKey,
    ) -> Result<RecordBody, HeaderError> {
        let stored = StoredRecord::decode(stored).map_err(|_| HeaderError)?;
        if stored.mac_key_version != key_version {
            return Err(HeaderError);
        }
        let ctx = crypto::context(&[CTX_RECORD, &key_version.to_be_bytes(), id, &stored.body]);
        if !crypto::hmac_sha256_verify(key, &[&ctx], &stored.mac) {
            return Err(HeaderError);
        }
        let mut body = RecordBody::decode(stored.body.as_slice()).map_err(|_| HeaderError)?;
        if body.id != id || body.format != RECORD_FORMAT {
            return Err(HeaderError);
        }
        let mut inline = stored.inline;
        for (name, entry) in body.fields.iter_mut() {
            // Whatever the MACed body holds here is not trusted; a missing chunk stays
            // empty and reads as damage to this field.
            entry.inline = if entry.in_header {
                inline.remove(name).unwrap_or_default()
            } else {
                Vec::new()
            };
        }
        Ok(body)
    }
}

/// Key of chunk `chunk` of `field` written at `revision` in record `id`.
pub fn chunk_key(id: &[u8], field: &str, revision: u64, chunk: u32) -> Vec<u8> {
    let mut key = Vec::with_capacity(id.len() + field.len() + 13);
    key.extend_from_slice(id);
    key.extend_from_slice(field.as_bytes());
    key.push(0);
    key.extend_from_slice(&revision.to_be_bytes());
    key.extend_from_slice(&chunk.to_be_bytes());
    key
}

/// AEAD context of a field chunk: binds record, field, chunk number and count.
pub fn chunk_context(id: &[u8], field: &str, chunk: u32, chunks: u32) -> Vec<u8> {
    crypto::context(&[
        CTX_FIELD,
        id,
        field.as_bytes(),
        &chunk.to_be_bytes(),
        &chunks.to_be_bytes(),
    ])
}

/// Key prefix of the blind-index entries of `field` with tag `tag`.
pub fn index_prefix(field: &str, tag: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(field.len() + 1 + tag.len() + 16);
    key.extend_from_slice(field.as_bytes());
    key.push(0);
    key.extend_from_slice(tag);
    key
}

/// Key of the blind-index entry of `field` with tag `tag` for record `id`.
pub fn index_key(field: &str, tag: &[u8], id: &[u8]) -> Vec<u8> {
    let mut key = index_prefix(field, tag);
    key.extend_from_slice(id);
    key
}

/// Sealed chunks of one field value, with their digest.
pub struct SealedField {
    /// The chunk envelopes, in order.
    pub chunks: Vec<Vec<u8>>,
    /// SHA-256 over every chunk's nonce ‖ tag, in order (see [`crypto::commitment`]).
    pub digest: [u8; 32],
}

/// Seals `plaintext` for `field` of record `id` under `dek`, in chunks of [`CHUNK_LEN`].
pub fn seal_field(
    dek: &crypto::SealingKey,
    id: &[u8],
    field: &str,
    plaintext: &[u8],
) -> Result<SealedField, crypto::CryptoError> {
    let chunks = dek.seal_chunks(plaintext, CHUNK_LEN, |i, n| chunk_context(id, field, i, n))?;
    let mut digest = FieldDigest::new();
    for chunk in &chunks {
        digest.add(chunk)?;
    }
    Ok(SealedField {
        chunks,
        digest: digest.finish(),
    })
}

/// The digest a header keeps of a field: SHA-256 over each chunk envelope's nonce ‖ tag.
pub struct FieldDigest(ring::digest::Context);

impl FieldDigest {
    /// An empty digest.
    pub fn new() -> Self {
        Self(ring::digest::Context::new(&ring::digest::SHA256))
    }

    /// Adds the next chunk envelope.
    pub fn add(&mut self, envelope: &[u8]) -> Result<(), crypto::CryptoError> {
        for part in crypto::commitment(envelope)? {
            self.0.update(part);
        }
        Ok(())
    }

    /// The digest.
    pub fn finish(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.0.finish().as_ref());
        out
    }
}

impl Default for FieldDigest {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn body() -> RecordBody {
        RecordBody {
            format: RECORD_FORMAT,
            id: vec![7; 16],
            revision: 3,
            created_ms: 1,
            updated_ms: 2,
            lifecycle: "applicant".into(),
            deks: BTreeMap::new(),
            fields: BTreeMap::from([(
                "email".to_string(),
                FieldEntry {
                    category: "contact".into(),
                    revision: 3,
                    chunks: 1,
                    size: 5,
                    digest: vec![1; 32],
                    content_type: String::new(),
                    index_tag: vec![2; 32],
                    written_ms: 2,
                    inline: Vec::new(),
                    in_header: false,
                },
            )]),
            lifecycle_date: "2026-01-05".into(),
            restricted: true,
            restriction_reason: "contested".into(),
            legal_hold: true,
            legal_hold_reason: "case".into(),
            consents: BTreeMap::from([(
                "talent_pool".to_string(),
                ConsentEntry {
                    granted: true,
                    changed_ms: 3,
                },
            )]),
        }
    }

    #[test]
    fn header_mac_detects_any_change_and_other_ids() {
        let key = SecretKey::generate().expect("rng");
        let stored = body().seal(1, &key);
        assert_eq!(
            RecordBody::open(&[7; 16], &stored, 1, &key).expect("opens"),
            body()
        );
        assert!(RecordBody::open(&[8; 16], &stored, 1, &key).is_err());
        for i in 0..stored.len() {
            let mut bad = stored.clone();
            bad[i] ^= 0x01;
            assert!(
                RecordBody::open(&[7; 16], &bad, 1, &key).is_err(),
                "byte {i}"
            );
        }
    }

    /// A field kept in the header travels outside the MAC: opening restores it; damage to
    /// it leaves the header valid and changes only that field's chunk (which its AEAD tag and
    /// the MACed digest catch when it is read); damage anywhere else is refused.
    #[test]
    fn header_kept_chunks_sit_outside_the_mac() {
        let key = SecretKey::generate().expect("rng");
        let mut with_inline = body();
        let entry = with_inline.fields.get_mut("email").expect("email");
        entry.inline = vec![3; 45];
        entry.in_header = true;
        let stored = with_inline.seal(1, &key);
        let decoded = StoredRecord::decode(stored.as_slice()).expect("decode");
        assert_eq!(decoded.inline["email"], vec![3; 45]);
        assert!(!decoded.body.windows(45).any(|w| w == [3; 45]));
        assert_eq!(
            RecordBody::open(&[7; 16], &stored, 1, &key).expect("opens"),
            with_inline
        );
        for i in 0..stored.len() {
            let mut bad = stored.clone();
            bad[i] ^= 0x01;
            if let Ok(opened) = RecordBody::open(&[7; 16], &bad, 1, &key) {
                let mut expected = with_inline.clone();
                let email = expected.fields.get_mut("email").expect("email");
                let got = &opened.fields["email"].inline;
                assert_ne!(got, &email.inline, "byte {i} changed nothing");
                email.inline = got.clone();
                assert_eq!(opened, expected, "byte {i} changed more than the chunk");
            }
        }
    }

    proptest! {
        #[test]
        fn fields_round_trip_through_chunks(data in proptest::collection::vec(any::<u8>(), 0..(3 * CHUNK_LEN + 17))) {
            let key = SecretKey::generate().expect("rng");
            let sealing = crypto::SealingKey::new(&key, 1);
            let sealed = seal_field(&sealing, b"id", "cv_document", &data).expect("seal");
            let n = u32::try_from(sealed.chunks.len()).expect("count");
            let mut out = Vec::new();
            for (i, c) in sealed.chunks.iter().enumerate() {
                let i = u32::try_from(i).expect("idx");
                out.extend_from_slice(&crypto::open(&key, &chunk_context(b"id", "cv_document", i, n), c).expect("open"));
            }
            prop_assert_eq!(out, data);
            if n > 1 {
                // Reordering chunks fails authentication.
                prop_assert!(crypto::open(&key, &chunk_context(b"id", "cv_document", 0, n), &sealed.chunks[1]).is_err());
            }
        }
    }
}
