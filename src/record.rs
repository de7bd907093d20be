//! The stored form of a record: a MAC-protected header in the `records` keyspace and sealed
//! field chunks in the `fields` keyspace.
//!
//! ```text
//! records/<record id (16 bytes)>  → StoredRecord { body, mac_key_version, mac, inline }
//!   body = RecordBody { id, revision, timestamps, lifecycle,
//!                       deks:   category → wrapped DEK,
//!                       fields: name → { category, revision written, chunk count, size,
//!                                        SHA-256 of its chunks' nonce ‖ tag, detached,
//!                                        content type, blind-index tag } }
//!   mac  = HMAC-SHA256(integrity key, context("kluis/v1/record", key version, id, body))
//!   inline = name → envelope of a short value (≤ 512 bytes), outside the MAC
//! fields/<id> ‖ <name> ‖ 0x00 ‖ <revision u64> ‖ <chunk u32>  → a detached value's chunk
//!                                        ciphertext (16 KiB), or an envelope (records
//!                                        written before detached sealing)
//! fields/<id> ‖ <name> ‖ 0x00 ‖ <revision u64> ‖ 0xFFFFFFFF   → its manifest
//! index/<name> ‖ 0x00 ‖ <HMAC of normalised value> ‖ <id>    → empty
//! ```
//!
//! The MAC covers every field's digest, so replacing, dropping, adding or rolling back a single
//! field's ciphertext with write access to the store alone is detected on read.

use std::collections::BTreeMap;

use bytes::Bytes;
use prost::Message;

use zeroize::Zeroizing;

use crate::crypto::{self, SecretKey};

/// Plaintext bytes per sealed chunk. Together with the store's segment size this keeps every
/// sled page below its blob threshold (see `store`).
pub const CHUNK_LEN: usize = 16 * 1024;
/// Current record format, written with every record body sealed from a full decode: 2 since
/// detached field values (`8d9f5f1`), so that a build from before them, which accepts only
/// format 1, refuses such a record whole (DATA_LOSS) instead of reading its detached chunks
/// as envelopes, or dropping the `detached` flags it does not know when it writes the header
/// back (which would lose those values for every build).
pub const RECORD_FORMAT: u32 = 2;
/// Oldest record format this build reads (format 1: every field value an envelope).
pub const RECORD_FORMAT_OLDEST: u32 = 1;
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
    /// Why it is restricted, in plaintext: only in headers written before reasons were
    /// sealed (read for export; never written now).
    #[prost(string, tag = "11")]
    pub restriction_reason: String,
    /// Under legal hold: not erasable.
    #[prost(bool, tag = "12")]
    pub legal_hold: bool,
    /// Why it is held, in plaintext: as `restriction_reason`.
    #[prost(string, tag = "13")]
    pub legal_hold_reason: String,
    /// Purpose → consent (or objection) state.
    #[prost(btree_map = "string, message", tag = "14")]
    pub consents: BTreeMap<String, ConsentEntry>,
    /// Why it is restricted (the privacy officer's free text), sealed under the key ring's
    /// notes key for this record ([`note_context`]); empty when not restricted.
    #[prost(bytes = "vec", tag = "15")]
    pub restriction_reason_sealed: Vec<u8>,
    /// Why it is held, sealed as `restriction_reason_sealed`.
    #[prost(bytes = "vec", tag = "16")]
    pub legal_hold_reason_sealed: Vec<u8>,
    /// The latest date an employment of this record ended (ISO date; empty: none recorded
    /// apart from a current `ended` stage). Kept across a rehire, so that no later stage
    /// change can date an end, and so the legal duties counted from it, earlier.
    #[prost(string, tag = "17")]
    pub last_ended: String,
    /// When its data subject's erasure request erased what no legal duty keeps (Unix ms; 0:
    /// never). What stays is kept for that duty only: no new data is written to it.
    #[prost(int64, tag = "18")]
    pub erasure_requested_ms: i64,
    /// Its closed procedure was reopened once (kept across stages): it is not reopened again.
    #[prost(bool, tag = "19")]
    pub reopened: bool,
    /// The date its procedure closed, kept while an employment that followed the close has
    /// stage `employed` (ISO date; empty otherwise): such an employment may not begin after
    /// the closed procedure's data fell due, nor be moved there later (review 12).
    #[prost(string, tag = "20")]
    pub closed_on: String,
}

impl RecordBody {
    /// Whether its restriction keeps the sweeper from erasing what is due. A restriction
    /// (GDPR Art. 18: only stored) does, until the data subject asks for erasure: their own
    /// request then wins (review 16: a record restricted at the request kept the retained BSN
    /// past its duty, for as long as nobody lifted the restriction). A legal hold is what
    /// keeps data for legal claims.
    pub fn restriction_holds(&self) -> bool {
        self.restricted && self.erasure_requested_ms == 0
    }

    /// The latest end of an employment this record has had, if any: the recorded one, or
    /// the current `ended` stage's date (headers from before `last_ended` was kept).
    pub fn latest_end(&self) -> Option<chrono::NaiveDate> {
        let current = (self.lifecycle == "ended")
            .then(|| stored_day(&self.lifecycle_date))
            .flatten();
        current.max(stored_day(&self.last_ended))
    }

    /// The day the procedure closed, while the record is `procedure_closed`, or `employed`
    /// with no employment ended before (the hire of a closed applicant): an employment may
    /// not begin after that procedure's data falls due.
    pub fn closed_procedure_day(&self) -> Option<chrono::NaiveDate> {
        match self.lifecycle.as_str() {
            "procedure_closed" => self.lifecycle_day(),
            "employed" if self.latest_end().is_none() => stored_day(&self.closed_on),
            _ => None,
        }
    }

    /// The day the current lifecycle stage began, as set (none for a record never moved).
    pub fn lifecycle_day(&self) -> Option<chrono::NaiveDate> {
        stored_day(&self.lifecycle_date)
    }
}

/// A lifecycle date as a header holds it. Kluis writes `YYYY-MM-DD`; builds before dates
/// were checked strictly (review 10) stored what chrono accepted, e.g. `" 2026-1-05"` or
/// `"+2026-1-05"`: such a date is read as the day it names, never compared as text.
pub fn stored_day(date: &str) -> Option<chrono::NaiveDate> {
    chrono::NaiveDate::parse_from_str(date.trim(), "%Y-%m-%d").ok()
}

/// A stored lifecycle date in the form Kluis writes (`YYYY-MM-DD`), for answers and
/// exports; empty stays empty.
pub fn canonical_date(date: &str) -> String {
    stored_day(date).map_or_else(|| date.to_string(), |d| d.format("%Y-%m-%d").to_string())
}

/// A lifecycle date from a request: exactly `YYYY-MM-DD` in ASCII digits, an existing day.
/// (chrono alone also takes `" 2026-1-05"`, `"+2026-1-05"`, tabs and newlines.)
pub fn parse_request_day(date: &str) -> Option<chrono::NaiveDate> {
    let b = date.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' || !digits(0..4) || !digits(5..7) {
        return None;
    }
    if !digits(8..10) {
        return None;
    }
    chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d").ok()
}

/// The AEAD context of note `name` (`restriction_reason`, `legal_hold_reason`) of record
/// `id`: a sealed reason opens only in the record and the place it was sealed for.
pub fn note_context(id: &[u8], name: &str) -> Vec<u8> {
    crypto::context(&[b"kluis/v1/record-note", id, name.as_bytes()])
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
    /// Which data key of the category this is: 1 for the first, one more for each re-key.
    /// Headers from before it was kept hold 0, read as 1 ([`StoredDek::generation`]).
    #[prost(uint32, tag = "4")]
    pub dek_generation: u32,
}

impl StoredDek {
    /// The data key's generation, the key version its field envelopes carry (review 10:
    /// before, every field envelope said 1, so it did not tell data keys apart).
    pub fn generation(&self) -> u32 {
        self.dek_generation.max(1)
    }
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
    /// The value is sealed detached ([`SealedValue::Detached`]): its chunks hold ciphertext
    /// only, and its manifest (checked against `digest`) is stored under [`manifest_key`].
    /// Absent (false) in records written before: their chunks are whole envelopes.
    #[prost(bool, tag = "11")]
    pub detached: bool,
}

impl FieldEntry {
    /// What the `fields` keyspace holds of this value: its number of chunks (0 when it is
    /// kept in the header) and whether a manifest goes with them.
    pub fn stored(&self) -> (u32, bool) {
        if self.in_header {
            (0, false)
        } else {
            (self.chunks, self.detached)
        }
    }
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

/// Calls `f(category, KEK version, created_ms)` for each wrapped DEK a stored header names,
/// without checking its MAC and without decoding into maps: for counting which KEK versions
/// records need (a job still opens and checks every header it changes).
pub fn peek_dek_versions(
    stored: &[u8],
    mut f: impl FnMut(&str, u32, i64),
) -> Result<(), HeaderError> {
    let mut body: &[u8] = &[];
    for field in WireFields::new(stored) {
        let field = field?;
        match (field.tag, field.wire_type) {
            (1, 2) => body = field.value,
            (1, _) => return Err(HeaderError),
            _ => {}
        }
    }
    for field in WireFields::new(body) {
        let field = field?;
        if field.tag != 7 {
            continue;
        }
        if field.wire_type != 2 {
            return Err(HeaderError);
        }
        let (mut name, mut version, mut created) = ("", 0u32, 0i64);
        for part in WireFields::new(field.value) {
            let part = part?;
            match (part.tag, part.wire_type) {
                (1, 2) => name = std::str::from_utf8(part.value).map_err(|_| HeaderError)?,
                (2, 2) => {
                    (version, created) = (0, 0);
                    for dek in WireFields::new(part.value) {
                        let dek = dek?;
                        match (dek.tag, dek.wire_type) {
                            (1, 0) => version = dek.varint_u32()?,
                            // int64 travels as its two's-complement varint.
                            (3, 0) => created = read_varint(dek.value)?.0 as i64,
                            (1 | 3, _) => return Err(HeaderError),
                            _ => {}
                        }
                    }
                }
                (1 | 2, _) => return Err(HeaderError),
                _ => {}
            }
        }
        f(name, version, created);
    }
    Ok(())
}

/// What identifies a body: its format and record id (decoding skips everything else).
#[derive(Clone, PartialEq, Message)]
struct BodyIdentity {
    #[prost(uint32, tag = "1")]
    format: u32,
    #[prost(bytes = "vec", tag = "2")]
    id: Vec<u8>,
    #[prost(btree_map = "string, message", tag = "7")]
    deks: BTreeMap<String, StoredDek>,
}

/// The `mac_key_version` field of [`StoredRecord`] and the fields before and after it, for
/// re-encoding a header with a new body and MAC while keeping the rest byte for byte.
#[derive(Clone, PartialEq, Message)]
struct StoredHead {
    #[prost(bytes = "vec", tag = "1")]
    body: Vec<u8>,
    #[prost(uint32, tag = "2")]
    mac_key_version: u32,
    #[prost(bytes = "vec", tag = "3")]
    mac: Vec<u8>,
}

/// A stored header split into its parts without copying (protobuf wire format, as prost
/// decodes it: for a repeated scalar field the last occurrence wins).
struct StoredParts<'a> {
    body: &'a [u8],
    mac_key_version: u32,
    mac: &'a [u8],
    /// Every top-level field other than body, key version and MAC (the header-kept chunks),
    /// raw and in order.
    rest: Vec<&'a [u8]>,
}

impl<'a> StoredParts<'a> {
    fn parse(stored: &'a [u8]) -> Result<Self, HeaderError> {
        let mut parts = StoredParts {
            body: &[],
            mac_key_version: 0,
            mac: &[],
            rest: Vec::new(),
        };
        for field in WireFields::new(stored) {
            let field = field?;
            match (field.tag, field.wire_type) {
                (1, 2) => parts.body = field.value,
                (2, 0) => parts.mac_key_version = field.varint_u32()?,
                (3, 2) => parts.mac = field.value,
                (1..=3, _) => return Err(HeaderError),
                (4, 2) => {
                    check_inline_entry(field.value)?;
                    parts.rest.push(field.raw);
                }
                (4, _) => return Err(HeaderError),
                _ => parts.rest.push(field.raw),
            }
        }
        Ok(parts)
    }
}

/// Checks an entry of [`StoredRecord::inline`] as prost would decode it: a UTF-8 name (1)
/// and bytes (2), other fields skipped.
fn check_inline_entry(entry: &[u8]) -> Result<(), HeaderError> {
    for field in WireFields::new(entry) {
        let field = field?;
        match (field.tag, field.wire_type) {
            (1, 2) => {
                std::str::from_utf8(field.value).map_err(|_| HeaderError)?;
            }
            (2, 2) => {}
            (1 | 2, _) => return Err(HeaderError),
            _ => {}
        }
    }
    Ok(())
}

/// One top-level field of an encoded protobuf message.
struct WireField<'a> {
    tag: u32,
    wire_type: u8,
    /// The whole field, key included.
    raw: &'a [u8],
    /// Its value: the payload of a length-delimited field, else the value's bytes.
    value: &'a [u8],
}

impl WireField<'_> {
    fn varint_u32(&self) -> Result<u32, HeaderError> {
        let (v, _) = read_varint(self.value)?;
        // prost truncates a 64-bit varint to the field's 32 bits.
        Ok(v as u32)
    }
}

/// Walks the top-level fields of an encoded protobuf message.
struct WireFields<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> WireFields<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, at: 0 }
    }

    fn next_field(&mut self) -> Result<WireField<'a>, HeaderError> {
        let start = self.at;
        let rest = &self.buf[start..];
        let (key, key_len) = read_varint(rest)?;
        // As prost: a key above u32::MAX is invalid (not a field with a large tag).
        let key = u32::try_from(key).map_err(|_| HeaderError)?;
        let tag = key >> 3;
        let wire_type = (key & 7) as u8;
        if tag == 0 {
            return Err(HeaderError);
        }
        let after_key = &rest[key_len..];
        let (value_start, value_len) = match wire_type {
            0 => (0, read_varint(after_key)?.1),
            1 => (0, 8),
            2 => {
                let (len, len_len) = read_varint(after_key)?;
                (len_len, usize::try_from(len).map_err(|_| HeaderError)?)
            }
            5 => (0, 4),
            _ => return Err(HeaderError),
        };
        let end = value_start
            .checked_add(value_len)
            .filter(|&end| end <= after_key.len())
            .ok_or(HeaderError)?;
        self.at = start + key_len + end;
        Ok(WireField {
            tag,
            wire_type,
            raw: &rest[..key_len + end],
            value: &after_key[value_start..end],
        })
    }
}

impl<'a> Iterator for WireFields<'a> {
    type Item = Result<WireField<'a>, HeaderError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.buf.len() {
            return None;
        }
        let field = self.next_field();
        if field.is_err() {
            // Stop after the first error.
            self.at = self.buf.len();
        }
        Some(field)
    }
}

/// Reads a base-128 varint: its value and how many bytes it took (at most 10).
fn read_varint(buf: &[u8]) -> Result<(u64, usize), HeaderError> {
    let mut value = 0u64;
    for (i, &byte) in buf.iter().take(10).enumerate() {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            if i == 9 && byte > 1 {
                return Err(HeaderError);
            }
            return Ok((value, i + 1));
        }
    }
    Err(HeaderError)
}

/// A stored header opened for its data keys alone, MAC checked: what a rewrap reads and
/// changes. [`DekHeader::seal`] re-encodes the header with [`DekHeader::deks`] in place of the
/// stored ones and every other byte of the body and of the header-kept chunks as it was, so
/// a rewrap neither decodes nor rebuilds the field entries (the result is the same bytes as
/// [`RecordBody::open`], changing `deks`, then [`RecordBody::seal`]).
pub struct DekHeader<'a> {
    /// The record id.
    pub id: &'a [u8],
    /// Category name → wrapped DEK, as stored; change these, then [`DekHeader::seal`].
    pub deks: BTreeMap<String, StoredDek>,
    body: &'a [u8],
    rest: Vec<&'a [u8]>,
}

impl<'a> DekHeader<'a> {
    /// Opens `stored` as [`RecordBody::open`] does (MAC under integrity key `key_version`,
    /// record id, format), decoding only the data keys.
    pub fn open(
        id: &'a [u8],
        stored: &'a [u8],
        key_version: u32,
        key: &SecretKey,
    ) -> Result<Self, HeaderError> {
        let parts = StoredParts::parse(stored)?;
        if parts.mac_key_version != key_version {
            return Err(HeaderError);
        }
        if !crypto::hmac_sha256_verify(
            key,
            &mac_parts(key_version, id, parts.body).as_parts(),
            parts.mac,
        ) {
            return Err(HeaderError);
        }
        let ident = BodyIdentity::decode(parts.body).map_err(|_| HeaderError)?;
        if ident.id != id || !(RECORD_FORMAT_OLDEST..=RECORD_FORMAT).contains(&ident.format) {
            return Err(HeaderError);
        }
        Ok(Self {
            id,
            deks: ident.deks,
            body: parts.body,
            rest: parts.rest,
        })
    }

    /// The stored header with [`DekHeader::deks`], MACed under integrity key `key_version`.
    pub fn seal(&self, key_version: u32, key: &SecretKey) -> Result<Vec<u8>, HeaderError> {
        let deks = DeksOnly {
            deks: self.deks.clone(),
        }
        .encode_to_vec();
        let mut body = Vec::with_capacity(self.body.len() + deks.len());
        let mut placed = false;
        for field in WireFields::new(self.body) {
            let field = field?;
            if field.tag >= 7 && !placed {
                body.extend_from_slice(&deks);
                placed = true;
            }
            if field.tag != 7 {
                body.extend_from_slice(field.raw);
            }
        }
        if !placed {
            body.extend_from_slice(&deks);
        }
        let mac = crypto::hmac_sha256(key, &mac_parts(key_version, self.id, &body).as_parts());
        let mut out = StoredHead {
            body,
            mac_key_version: key_version,
            mac: mac.to_vec(),
        }
        .encode_to_vec();
        for raw in &self.rest {
            out.extend_from_slice(raw);
        }
        Ok(out)
    }
}

/// The header MAC's input, `crypto::context(&[CTX_RECORD, key version, id, body])`, as a
/// short prefix and the body, so that the body is not copied to be MACed.
struct MacParts<'a> {
    prefix: Vec<u8>,
    body: &'a [u8],
}

impl MacParts<'_> {
    fn as_parts(&self) -> [&[u8]; 2] {
        [&self.prefix, self.body]
    }
}

fn mac_parts<'a>(key_version: u32, id: &[u8], body: &'a [u8]) -> MacParts<'a> {
    let mut prefix = crypto::context(&[CTX_RECORD, &key_version.to_be_bytes(), id]);
    let len = u32::try_from(body.len()).expect("a record body is far below 4 GiB");
    prefix.extend_from_slice(&len.to_be_bytes());
    MacParts { prefix, body }
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
        let mac = crypto::hmac_sha256(key, &mac_parts(key_version, &self.id, &body).as_parts());
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
        // The same wire rules as the partial readers (`DekHeader`, `peek_dek_versions`): a
        // header one of them refuses (an unknown group field added outside the MAC, say) is
        // damage here too, so no record reads fine and yet stops the key jobs.
        StoredParts::parse(stored)?;
        let stored = StoredRecord::decode(stored).map_err(|_| HeaderError)?;
        if stored.mac_key_version != key_version {
            return Err(HeaderError);
        }
        if !crypto::hmac_sha256_verify(
            key,
            &mac_parts(key_version, id, &stored.body).as_parts(),
            &stored.mac,
        ) {
            return Err(HeaderError);
        }
        let mut body = RecordBody::decode(stored.body.as_slice()).map_err(|_| HeaderError)?;
        if body.id != id || !(RECORD_FORMAT_OLDEST..=RECORD_FORMAT).contains(&body.format) {
            return Err(HeaderError);
        }
        // Sealed again, it is sealed in the current format (it may gain detached values).
        body.format = RECORD_FORMAT;
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

/// Key of the manifest of a detached value ([`crypto::Detached`]) of `field` written at
/// `revision` in record `id`: after its chunks, numbered `u32::MAX` (no value has that many
/// chunks, see [`crypto::SealingKey::seal_detached`]).
pub fn manifest_key(id: &[u8], field: &str, revision: u64) -> Vec<u8> {
    chunk_key(id, field, revision, MANIFEST_CHUNK)
}

/// The chunk number of a detached value's manifest ([`manifest_key`]).
pub const MANIFEST_CHUNK: u32 = u32::MAX;

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
    let mut out = Vec::new();
    chunk_context_into(id, field, chunk, chunks, &mut out);
    out
}

/// Appends [`chunk_context`] to `out`.
pub fn chunk_context_into(id: &[u8], field: &str, chunk: u32, chunks: u32, out: &mut Vec<u8>) {
    crypto::context_into(
        &[
            CTX_FIELD,
            id,
            field.as_bytes(),
            &chunk.to_be_bytes(),
            &chunks.to_be_bytes(),
        ],
        out,
    );
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

/// A field value as sealed: one envelope (a short value, kept in the header), or in chunks
/// sealed detached (ciphertext chunks in the `fields` keyspace, their nonces and tags in the
/// value's manifest).
#[derive(Clone)]
pub enum SealedValue {
    /// One envelope ([`crypto::seal`] format) of a value of at most [`ENVELOPE_MAX`] bytes.
    Envelope(Vec<u8>),
    /// A longer value sealed in place in chunks of [`CHUNK_LEN`] ([`crypto::Detached`]).
    Detached(crypto::Detached),
}

/// A sealed field value, with its digest.
#[derive(Clone)]
pub struct SealedField {
    /// The sealed value.
    pub value: SealedValue,
    /// SHA-256 over every chunk's nonce ‖ tag, in order (see [`crypto::commitment`]; for a
    /// detached seal, its manifest after the header).
    pub digest: [u8; 32],
    /// Bytes of plaintext.
    pub size: usize,
}

impl SealedField {
    /// Number of chunks.
    pub fn chunk_count(&self) -> usize {
        match &self.value {
            SealedValue::Envelope(_) => 1,
            SealedValue::Detached(d) => (d.manifest.len() - crypto::HEADER_LEN) / crypto::SEAL_LEN,
        }
    }

    /// What the store keeps as chunk `0..n`: the envelope, or the ciphertext chunks (views
    /// of the one sealed buffer, nothing copied).
    pub fn stored_chunks(&self) -> Vec<Bytes> {
        match &self.value {
            SealedValue::Envelope(envelope) => vec![Bytes::copy_from_slice(envelope)],
            SealedValue::Detached(d) => detached_chunks(d),
        }
    }
}

/// The ciphertext chunks of a detached value (of [`CHUNK_LEN`] bytes, the last one shorter),
/// as views of its one buffer: nothing is copied.
pub fn detached_chunks(sealed: &crypto::Detached) -> Vec<Bytes> {
    let len = sealed.ciphertext.len();
    let count = len.div_ceil(CHUNK_LEN).max(1);
    (0..count)
        .map(|i| {
            let start = (i * CHUNK_LEN).min(len);
            sealed.ciphertext.slice(start..(start + CHUNK_LEN).min(len))
        })
        .collect()
}

/// Longest value sealed into a single envelope, kept in the record header: the envelope
/// fits [`INLINE_MAX`]. Longer values are sealed detached.
pub const ENVELOPE_MAX: usize = INLINE_MAX - crypto::OVERHEAD;

/// Seals `plaintext` for `field` of record `id` under `dek`. A value of at most
/// [`ENVELOPE_MAX`] bytes becomes one envelope; a longer one is sealed where it lies, in
/// chunks of [`CHUNK_LEN`] ([`crypto::SealingKey::seal_detached`]): the buffer the vault took
/// from the request becomes the ciphertext, and no byte of it is copied.
pub fn seal_field(
    dek: &crypto::SealingKey,
    id: &[u8],
    field: &str,
    plaintext: Zeroizing<Vec<u8>>,
) -> Result<SealedField, crypto::CryptoError> {
    let size = plaintext.len();
    if size <= ENVELOPE_MAX {
        let envelope = dek.seal(&chunk_context(id, field, 0, 1), &plaintext)?;
        let mut digest = FieldDigest::new();
        digest.add(&envelope)?;
        return Ok(SealedField {
            value: SealedValue::Envelope(envelope),
            digest: digest.finish(),
            size,
        });
    }
    let detached = dek.seal_detached(plaintext, CHUNK_LEN, |i, n, out| {
        chunk_context_into(id, field, i, n, out)
    })?;
    let digest = manifest_digest(&detached.manifest);
    Ok(SealedField {
        value: SealedValue::Detached(detached),
        digest,
        size,
    })
}

/// The digest a header keeps of a detached value: SHA-256 over its manifest after the
/// header, i.e. over each chunk's nonce ‖ tag in order, as [`FieldDigest`] for envelopes.
pub fn manifest_digest(manifest: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    let seals = manifest.get(crypto::HEADER_LEN..).unwrap_or_default();
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, seals).as_ref());
    out
}

/// Opens a field `dek` sealed for `field` of record `id` ([`seal_field`]): for a write whose
/// attempt conflicted, to seal the value again.
pub fn reopen_field(
    dek: &crypto::SealingKey,
    id: &[u8],
    field: &str,
    sealed: &SealedField,
) -> Result<Zeroizing<Vec<u8>>, crypto::CryptoError> {
    let plaintext = match &sealed.value {
        SealedValue::Envelope(envelope) => dek.reopen(&chunk_context(id, field, 0, 1), envelope)?,
        SealedValue::Detached(d) => dek.reopen_detached(d, CHUNK_LEN, |i, n, out| {
            chunk_context_into(id, field, i, n, out)
        })?,
    };
    if plaintext.len() != sealed.size {
        return Err(crypto::CryptoError::Malformed);
    }
    Ok(plaintext)
}

/// A field value on its way into a write: the plaintext the vault took from the request, or
/// the value as an attempt of the write that did not commit sealed it (with the key and
/// record id it was sealed under, to be opened and sealed again by the next attempt, whose
/// data key or record id may differ). `Debug` shows the length only.
pub enum PendingValue {
    /// Not sealed yet.
    Plain(Zeroizing<Vec<u8>>),
    /// Sealed by an earlier attempt.
    Sealed(Box<SealedAttempt>),
    /// Lost to a first seal that failed part way (only when the system's random generator
    /// fails): its buffer was sealed in place, so no retry can seal the value (review 26:
    /// one would have sealed an empty value).
    Spent,
}

/// A value as an attempt of a write sealed it ([`PendingValue::Sealed`]).
pub struct SealedAttempt {
    /// The key it was sealed under.
    pub key: crypto::SealingKey,
    /// The record it was sealed for.
    pub id: Vec<u8>,
    /// The sealed value (its ciphertext shared with the attempt's batch).
    pub sealed: SealedField,
}

impl PendingValue {
    /// A value to seal, taken as it is (it becomes the ciphertext: no copy).
    pub fn new(plaintext: Zeroizing<Vec<u8>>) -> Self {
        Self::Plain(plaintext)
    }

    /// Bytes of plaintext.
    pub fn len(&self) -> usize {
        match self {
            Self::Plain(plain) => plain.len(),
            Self::Sealed(was) => was.sealed.size,
            Self::Spent => 0,
        }
    }

    /// Whether the value is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The plaintext, while not sealed yet.
    pub fn plaintext(&self) -> Option<&[u8]> {
        match self {
            Self::Plain(plain) => Some(plain),
            Self::Sealed(_) | Self::Spent => None,
        }
    }

    /// Seals the value for `field` of record `id` under `dek`: in place the first time; after
    /// that, opened from the earlier attempt's seal and sealed again.
    pub fn seal(
        &mut self,
        dek: &crypto::SealingKey,
        id: &[u8],
        field: &str,
    ) -> Result<SealedField, crypto::CryptoError> {
        let plain = match self {
            Self::Plain(plain) => {
                let plain = std::mem::replace(plain, Zeroizing::new(Vec::new()));
                // Until the seal succeeds: the buffer is sealed where it lies.
                *self = Self::Spent;
                plain
            }
            // The same field on every attempt: only the key and the record id may differ.
            Self::Sealed(was) => reopen_field(&was.key, &was.id, field, &was.sealed)?,
            Self::Spent => return Err(crypto::CryptoError::Random),
        };
        let sealed = seal_field(dek, id, field, plain)?;
        *self = Self::Sealed(Box::new(SealedAttempt {
            key: dek.clone(),
            id: id.to_vec(),
            sealed: sealed.clone(),
        }));
        Ok(sealed)
    }
}

impl std::fmt::Debug for PendingValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Plain(plain) => write!(f, "PendingValue({} bytes)", plain.len()),
            Self::Sealed(was) => write!(f, "PendingValue({} bytes, sealed)", was.sealed.size),
            Self::Spent => f.write_str("PendingValue(lost to a failed seal)"),
        }
    }
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

    /// Opens a sealed field with the crypto module's own primitives (not `reopen_field`).
    fn open_sealed(key: &SecretKey, id: &[u8], field: &str, sealed: &SealedField) -> Vec<u8> {
        match &sealed.value {
            SealedValue::Envelope(envelope) => {
                crypto::open(key, &chunk_context(id, field, 0, 1), envelope)
                    .expect("envelope opens")
                    .to_vec()
            }
            SealedValue::Detached(d) => {
                let opener = crypto::OpeningKey::new(key);
                let chunks = detached_chunks(d);
                let n = u32::try_from(chunks.len()).expect("count");
                let mut out = Zeroizing::new(Vec::new());
                for (i, chunk) in chunks.iter().enumerate() {
                    let ctx = chunk_context(id, field, u32::try_from(i).expect("idx"), n);
                    opener
                        .open_detached_append(&d.manifest, i, &ctx, chunk, &mut out)
                        .expect("chunk opens");
                }
                out.to_vec()
            }
        }
    }

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
                    detached: false,
                    inline: Vec::new(),
                    in_header: false,
                },
            )]),
            lifecycle_date: "2026-01-05".into(),
            restricted: true,
            restriction_reason: "contested".into(),
            legal_hold: true,
            legal_hold_reason: "case".into(),
            restriction_reason_sealed: vec![3; 40],
            legal_hold_reason_sealed: vec![4; 40],
            last_ended: "2025-06-01".into(),
            erasure_requested_ms: 5,
            reopened: true,
            closed_on: "2025-01-01".into(),
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

    /// A body of format 1 (written before detached values) opens, and is sealed again in the
    /// current format, which builds from before detached values refuse; a format this build
    /// does not know is refused.
    #[test]
    fn older_formats_open_and_are_sealed_again_in_the_current_one() {
        let key = SecretKey::generate().expect("rng");
        let mut old = body();
        old.format = 1;
        let stored = old.seal(1, &key);
        let opened = RecordBody::open(&[7; 16], &stored, 1, &key).expect("format 1 opens");
        assert_eq!(opened.format, RECORD_FORMAT);
        assert!(DekHeader::open(&[7; 16], &stored, 1, &key).is_ok());
        let resealed = opened.seal(1, &key);
        let again = RecordBody::open(&[7; 16], &resealed, 1, &key).expect("opens");
        assert_eq!(again.format, 2);
        let mut future = body();
        future.format = RECORD_FORMAT + 1;
        let stored = future.seal(1, &key);
        assert!(RecordBody::open(&[7; 16], &stored, 1, &key).is_err());
        assert!(DekHeader::open(&[7; 16], &stored, 1, &key).is_err());
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

    fn arb_dek() -> impl Strategy<Value = StoredDek> {
        (
            1u32..5,
            proptest::collection::vec(any::<u8>(), 0..70),
            any::<i64>(),
            any::<u32>(),
        )
            .prop_map(
                |(kek_version, sealed, created_ms, dek_generation)| StoredDek {
                    kek_version,
                    sealed,
                    created_ms,
                    dek_generation,
                },
            )
    }

    fn arb_deks() -> impl Strategy<Value = BTreeMap<String, StoredDek>> {
        proptest::collection::btree_map(
            proptest::sample::select(vec!["contact", "identity", "financial", "cv", "absence"])
                .prop_map(String::from),
            arb_dek(),
            0..5,
        )
    }

    fn arb_body() -> impl Strategy<Value = RecordBody> {
        let field = (
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..60),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..33),
        )
            .prop_map(|(in_header, chunk, revision, index_tag)| FieldEntry {
                category: "contact".into(),
                revision,
                chunks: 1,
                size: chunk.len() as u64,
                digest: vec![5; 32],
                content_type: String::new(),
                index_tag,
                written_ms: 9,
                inline: if in_header { chunk } else { Vec::new() },
                in_header: false,
                detached: !in_header && revision % 2 == 0,
            });
        (
            arb_deks(),
            proptest::collection::btree_map("[a-z_]{1,12}", field, 0..6),
            any::<u64>(),
            any::<bool>(),
        )
            .prop_map(|(deks, fields, revision, held)| {
                let mut b = body();
                b.deks = deks;
                b.fields = fields;
                b.revision = revision;
                b.legal_hold = held;
                b
            })
    }

    proptest! {
        /// Re-sealing a header through `DekHeader` (data keys only, the rest copied byte for
        /// byte) gives exactly the bytes of a full open, change and seal.
        #[test]
        fn dek_header_reseal_matches_the_full_path(b in arb_body(), new_deks in arb_deks()) {
            let key = SecretKey::generate().expect("rng");
            let stored = b.seal(1, &key);
            let full = RecordBody::open(&[7; 16], &stored, 1, &key).expect("opens");
            let mut header = DekHeader::open(&[7; 16], &stored, 1, &key).expect("opens");
            prop_assert_eq!(&header.deks, &full.deks);
            let mut peeked = BTreeMap::new();
            peek_dek_versions(&stored, |name, version, created| {
                peeked.insert(name.to_string(), (version, created));
            })
            .expect("peek versions");
            let expected: BTreeMap<String, (u32, i64)> = full
                .deks
                .iter()
                .map(|(k, d)| (k.clone(), (d.kek_version, d.created_ms)))
                .collect();
            prop_assert_eq!(peeked, expected);
            // Unchanged, it re-seals to the same bytes.
            prop_assert_eq!(header.seal(1, &key).expect("seal"), stored.clone());
            header.deks = new_deks.clone();
            let spliced = header.seal(1, &key).expect("seal");
            let mut changed = full.clone();
            changed.deks = new_deks;
            prop_assert_eq!(&spliced, &changed.seal(1, &key));
            prop_assert_eq!(RecordBody::open(&[7; 16], &spliced, 1, &key).expect("opens"), changed);
            prop_assert!(DekHeader::open(&[8; 16], &stored, 1, &key).is_err());
            prop_assert!(DekHeader::open(&[7; 16], &stored, 2, &key).is_err());
            let other = SecretKey::generate().expect("rng");
            prop_assert!(DekHeader::open(&[7; 16], &stored, 1, &other).is_err());
        }

        /// `DekHeader` and the full open agree on which damaged headers they accept, and
        /// read the same data keys from them (damage outside the MAC, to header-kept chunks,
        /// is the only kind either accepts).
        #[test]
        fn dek_header_and_the_full_open_agree_on_damage(b in arb_body(), seed in any::<u64>()) {
            let key = SecretKey::generate().expect("rng");
            let stored = b.seal(1, &key);
            let step = usize::try_from(seed % 7).expect("small") + 1;
            for i in (0..stored.len()).step_by(step) {
                for bit in [0x01u8, 0x80] {
                    let mut bad = stored.clone();
                    bad[i] ^= bit;
                    let partial = DekHeader::open(&[7; 16], &bad, 1, &key);
                    let full = RecordBody::open(&[7; 16], &bad, 1, &key);
                    // Both ways: no header reads fine and yet stops the key jobs.
                    prop_assert_eq!(partial.is_ok(), full.is_ok(), "byte {} bit {}", i, bit);
                    if let (Ok(h), Ok(full)) = (partial, full) {
                        prop_assert_eq!(&h.deks, &full.deks);
                    }
                }
            }
            // An unknown group field appended outside the MAC: damage to both.
            let mut grouped = stored.clone();
            grouped.extend_from_slice(&[0xA3, 0x01, 0xA4, 0x01]);
            prop_assert!(DekHeader::open(&[7; 16], &grouped, 1, &key).is_err());
            prop_assert!(RecordBody::open(&[7; 16], &grouped, 1, &key).is_err());
        }

        #[test]
        fn wire_walker_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            for f in WireFields::new(&bytes) {
                if f.is_err() { break; }
            }
            let _ = peek_dek_versions(&bytes, |_, _, _| {});
        }
    }

    proptest! {
        /// A value seals into one envelope up to ENVELOPE_MAX bytes, else detached: its
        /// ciphertext as long as the value, the manifest one header and one nonce ‖ tag per
        /// chunk, the digest over the manifest. Either opens back under the key and context.
        #[test]
        fn fields_round_trip_through_chunks(data in proptest::collection::vec(any::<u8>(), 0..(3 * CHUNK_LEN + 17))) {
            let key = SecretKey::generate().expect("rng");
            let sealing = crypto::SealingKey::new(&key, 3);
            let sealed = seal_field(&sealing, b"id", "cv_document", Zeroizing::new(data.clone())).expect("seal");
            prop_assert_eq!(sealed.size, data.len());
            prop_assert_eq!(open_sealed(&key, b"id", "cv_document", &sealed), data.clone());
            let n = sealed.chunk_count();
            prop_assert_eq!(n, data.len().div_ceil(CHUNK_LEN).max(1));
            match &sealed.value {
                SealedValue::Envelope(envelope) => {
                    prop_assert!(data.len() <= ENVELOPE_MAX);
                    prop_assert!(envelope.len() <= INLINE_MAX);
                    let mut digest = FieldDigest::new();
                    digest.add(envelope).expect("envelope");
                    prop_assert_eq!(digest.finish(), sealed.digest);
                }
                SealedValue::Detached(d) => {
                    prop_assert!(data.len() > ENVELOPE_MAX);
                    prop_assert_eq!(d.ciphertext.len(), data.len());
                    prop_assert_eq!(d.manifest.len(), crypto::HEADER_LEN + n * crypto::SEAL_LEN);
                    prop_assert_eq!(manifest_digest(&d.manifest), sealed.digest);
                    let chunks = detached_chunks(d);
                    prop_assert_eq!(chunks.len(), n);
                    prop_assert_eq!(chunks.concat(), d.ciphertext.to_vec());
                    let opener = crypto::OpeningKey::new(&key);
                    let n32 = u32::try_from(n).expect("count");
                    if n > 1 {
                        // A chunk read in another's place fails authentication.
                        let mut out = Zeroizing::new(Vec::new());
                        prop_assert!(opener.open_detached_append(&d.manifest, 0, &chunk_context(b"id", "cv_document", 0, n32), &chunks[1], &mut out).is_err());
                        prop_assert!(out.is_empty());
                    }
                    // A detached chunk put together as an envelope does not open: the
                    // format byte is part of the AAD.
                    let mut envelope = d.manifest[..crypto::HEADER_LEN].to_vec();
                    envelope[0] = crypto::FORMAT_V1;
                    envelope.extend_from_slice(&d.manifest[crypto::HEADER_LEN..crypto::HEADER_LEN + crypto::NONCE_LEN]);
                    envelope.extend_from_slice(&chunks[0]);
                    envelope.extend_from_slice(&d.manifest[crypto::HEADER_LEN + crypto::NONCE_LEN..crypto::HEADER_LEN + crypto::SEAL_LEN]);
                    prop_assert!(crypto::open(&key, &chunk_context(b"id", "cv_document", 0, n32), &envelope).is_err());
                    // Nor does a chunk under another record's context.
                    let mut out = Zeroizing::new(Vec::new());
                    prop_assert!(opener.open_detached_append(&d.manifest, 0, &chunk_context(b"id2", "cv_document", 0, n32), &chunks[0], &mut out).is_err());
                }
            }
        }

        /// A sealed value reopens (for a retry) only under the key and context it was
        /// sealed under; sealed again under another key, it opens under that key.
        #[test]
        fn sealed_values_reopen_only_under_their_key_and_context(data in proptest::collection::vec(any::<u8>(), 0..(3 * CHUNK_LEN + 17))) {
            let key = SecretKey::generate().expect("rng");
            let sealing = crypto::SealingKey::new(&key, 4);
            let sealed = seal_field(&sealing, b"id", "cv_document", Zeroizing::new(data.clone())).expect("seal");
            let back = reopen_field(&sealing, b"id", "cv_document", &sealed).expect("reopen");
            prop_assert_eq!(back.to_vec(), data.clone());
            let other = SecretKey::generate().expect("rng");
            let other_sealing = crypto::SealingKey::new(&other, 5);
            let again = seal_field(&other_sealing, b"id", "cv_document", back).expect("seal");
            prop_assert_eq!(open_sealed(&other, b"id", "cv_document", &again), data.clone());
            prop_assert!(reopen_field(&crypto::SealingKey::new(&other, 4), b"id", "cv_document", &sealed).is_err());
            prop_assert!(reopen_field(&sealing, b"id2", "cv_document", &sealed).is_err());
            prop_assert!(reopen_field(&sealing, b"id", "cv_photo", &sealed).is_err());
            prop_assert!(reopen_field(&sealing, b"id", "cv_document", &again).is_err());
        }

        /// A pending value sealed by one attempt is sealed again by the next, under that
        /// attempt's key and record id, to the same plaintext.
        #[test]
        fn pending_values_seal_again_for_a_retry(data in proptest::collection::vec(any::<u8>(), 0..(2 * CHUNK_LEN + 5))) {
            let (k1, k2) = (SecretKey::generate().expect("rng"), SecretKey::generate().expect("rng"));
            let mut pending = PendingValue::new(Zeroizing::new(data.clone()));
            prop_assert_eq!(pending.plaintext().expect("not sealed yet").to_vec(), data.clone());
            let first = pending.seal(&crypto::SealingKey::new(&k1, 1), b"id-1", "cv_document").expect("seal");
            prop_assert!(pending.plaintext().is_none());
            prop_assert_eq!(pending.len(), data.len());
            let second = pending.seal(&crypto::SealingKey::new(&k2, 2), b"id-2", "cv_document").expect("seal");
            let third = pending.seal(&crypto::SealingKey::new(&k2, 2), b"id-2", "cv_document").expect("seal");
            for (sealed, key, version, id) in [(&first, &k1, 1, &b"id-1"[..]), (&second, &k2, 2, &b"id-2"[..]), (&third, &k2, 2, &b"id-2"[..])] {
                prop_assert_eq!(sealed.size, data.len());
                prop_assert_eq!(open_sealed(key, id, "cv_document", sealed), data.clone());
                let back = reopen_field(&crypto::SealingKey::new(key, version), id, "cv_document", sealed).expect("opens");
                prop_assert_eq!(back.to_vec(), data.clone());
            }
            prop_assert!(reopen_field(&crypto::SealingKey::new(&k1, 1), b"id-2", "cv_document", &second).is_err());
            // A value lost to a failed seal is never sealed as an empty one.
            let mut spent = PendingValue::Spent;
            prop_assert!(spent.seal(&crypto::SealingKey::new(&k1, 1), b"id-1", "cv_document").is_err());
        }
    }
}
