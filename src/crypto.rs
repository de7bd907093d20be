//! AES-256-GCM sealing, HKDF-SHA256 derivation and HMAC-SHA256, all through `ring`.
//!
//! Pure: no IO, no storage, no policy. Every key is a [`SecretKey`] (zeroized on drop, no
//! `Debug` of its bytes); every ciphertext is a self-describing [`envelope`](self#envelope):
//!
//! ```text
//! byte 0      format version (1)
//! byte 1      algorithm (1 = AES-256-GCM, 96-bit random nonce, 128-bit tag)
//! bytes 2..6  key version, u32 big-endian (which KEK/DEK generation sealed it)
//! bytes 6..18 nonce
//! rest        ciphertext ‖ tag
//! ```
//!
//! A long value is sealed *detached* instead ([`SealingKey::seal_detached`], format 2): its
//! buffer is encrypted in place chunk by chunk and becomes the ciphertext, and a manifest
//! holds the same 6-byte header (format 2) followed by each chunk's nonce ‖ tag. Chunk `i`
//! opens as the envelope `header ‖ nonce_i ‖ chunk_i ‖ tag_i` would.
//!
//! The AEAD's associated data is the 6-byte header followed by the caller's context (record
//! id, field name, …, each length-prefixed), so the header and the context are both
//! authenticated: a flipped bit anywhere, or a ciphertext moved to another record or field,
//! fails to open.

use bytes::Bytes;
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};
use ring::hkdf;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

/// Bytes in every key Kluis handles (AES-256, HMAC-SHA256 and HKDF-SHA256 keys alike).
pub const KEY_LEN: usize = 32;
/// Bytes in an AES-GCM nonce.
pub const NONCE_LEN: usize = 12;
/// Bytes in an AES-GCM tag.
pub const TAG_LEN: usize = 16;
/// Bytes in an envelope header (format, algorithm, key version).
pub const HEADER_LEN: usize = 6;
/// Bytes an envelope adds to its plaintext.
pub const OVERHEAD: usize = HEADER_LEN + NONCE_LEN + TAG_LEN;
/// Format byte of an envelope (header, nonce, ciphertext and tag in one piece).
pub const FORMAT_V1: u8 = 1;
/// Format byte of a detached seal ([`Detached`]): its header begins the manifest and is
/// part of each chunk's AAD, so a chunk sealed detached never opens as an envelope's.
pub const FORMAT_DETACHED: u8 = 2;
/// Bytes of one chunk's entry in a [`Detached`] manifest: nonce ‖ tag.
pub const SEAL_LEN: usize = NONCE_LEN + TAG_LEN;
/// Algorithm id of AES-256-GCM with a random 96-bit nonce.
pub const ALG_AES_256_GCM: u8 = 1;

/// Why a cryptographic operation failed. Deliberately without detail: an AEAD failure says
/// nothing about which byte was wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    /// The ciphertext, its header or its context did not authenticate under the key.
    #[error("ciphertext failed authentication")]
    Authentication,
    /// The envelope names a format or algorithm this build does not know, or is too short.
    #[error("unsupported or malformed envelope")]
    Malformed,
    /// The operating system's random number generator failed.
    #[error("random number generator failed")]
    Random,
}

/// A 256-bit secret. Zeroized on drop; its bytes are reached only through
/// [`SecretKey::expose_secret`]; `Debug` prints no bytes.
pub struct SecretKey(Zeroizing<[u8; KEY_LEN]>);

impl SecretKey {
    /// Wraps key bytes; the caller's copy should be zeroized by the caller.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        SystemRandom::new()
            .fill(bytes.as_mut())
            .map_err(|_| CryptoError::Random)?;
        Ok(Self(bytes))
    }

    /// The raw key bytes. Named so that every use stands out in review.
    pub fn expose_secret(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Parses a key from 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Option<Self> {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        hex::decode_to_slice(text.trim(), bytes.as_mut()).ok()?;
        Some(Self(bytes))
    }

    /// The key as 64 lowercase hex digits, in a zeroizing string.
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(self.0.as_ref()))
    }

    fn aead_key(&self) -> LessSafeKey {
        LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, self.0.as_ref())
                .expect("a 32-byte key is always a valid AES-256-GCM key"),
        )
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(...)")
    }
}

/// Fills `out` from the operating system's CSPRNG.
pub fn random_fill(out: &mut [u8]) -> Result<(), CryptoError> {
    SystemRandom::new()
        .fill(out)
        .map_err(|_| CryptoError::Random)
}

/// Builds an AEAD/MAC context from parts, each prefixed by its length (u32 big-endian), so
/// that `("ab", "c")` and `("a", "bc")` never collide.
pub fn context(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 4).sum());
    context_into(parts, &mut out);
    out
}

/// Appends [`context`]`(parts)` to `out`.
pub fn context_into(parts: &[&[u8]], out: &mut Vec<u8>) {
    for part in parts {
        let len =
            u32::try_from(part.len()).expect("context parts are names and ids, far below 4 GiB");
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(part);
    }
}

/// The parsed header of an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnvelopeHeader {
    /// Envelope format version.
    pub format: u8,
    /// Algorithm id.
    pub algorithm: u8,
    /// Version of the key that sealed it.
    pub key_version: u32,
}

impl EnvelopeHeader {
    /// Reads the header of `sealed` without opening it.
    pub fn parse(sealed: &[u8]) -> Result<Self, CryptoError> {
        if sealed.len() < OVERHEAD {
            return Err(CryptoError::Malformed);
        }
        Self::read(sealed, FORMAT_V1)
    }

    /// Reads the header of a [`Detached`] manifest: format [`FORMAT_DETACHED`], followed by
    /// one or more whole `nonce ‖ tag` entries.
    pub fn parse_manifest(manifest: &[u8]) -> Result<Self, CryptoError> {
        let seals = manifest.len().checked_sub(HEADER_LEN);
        if !seals.is_some_and(|n| n > 0 && n % SEAL_LEN == 0) {
            return Err(CryptoError::Malformed);
        }
        Self::read(manifest, FORMAT_DETACHED)
    }

    /// The header at the start of `bytes` (at least [`HEADER_LEN`] long), if it is of
    /// `format` and AES-256-GCM.
    fn read(bytes: &[u8], format: u8) -> Result<Self, CryptoError> {
        let header = Self {
            format: bytes[0],
            algorithm: bytes[1],
            key_version: u32::from_be_bytes([bytes[2], bytes[3], bytes[4], bytes[5]]),
        };
        if header.format != format || header.algorithm != ALG_AES_256_GCM {
            return Err(CryptoError::Malformed);
        }
        Ok(header)
    }

    fn to_bytes(self) -> [u8; HEADER_LEN] {
        let v = self.key_version.to_be_bytes();
        [self.format, self.algorithm, v[0], v[1], v[2], v[3]]
    }
}

fn aad_bytes(header: &[u8], context: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + context.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(context);
    aad
}

/// Seals `plaintext` under `key` into a fresh envelope with a random nonce; `context` is
/// authenticated but not stored (use [`context`] to build it).
pub fn seal(
    key: &SecretKey,
    key_version: u32,
    context: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    seal_with(&key.aead_key(), key_version, context, plaintext)
}

fn seal_with(
    key: &LessSafeKey,
    key_version: u32,
    context: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let nonce = fresh_nonce()?;
    Ok(seal_with_nonce(key, key_version, nonce, context, plaintext))
}

/// Nonces drawn from the operating system's CSPRNG per call to it (one system call per
/// [`NONCE_POOL`] nonces rather than per nonce: a rewrap seals three data keys per record).
const NONCE_POOL: usize = 256;

/// Random bytes drawn for nonces and not yet used, on this thread. Nonces are public (every
/// envelope carries its own), so this buffer holds nothing secret; each byte is handed out
/// once and the buffer is refilled only when it is used up.
struct NonceBuffer {
    bytes: [u8; NONCE_POOL * NONCE_LEN],
    used: usize,
}

thread_local! {
    static NONCES: std::cell::RefCell<NonceBuffer> = const {
        std::cell::RefCell::new(NonceBuffer {
            bytes: [0u8; NONCE_POOL * NONCE_LEN],
            used: NONCE_POOL * NONCE_LEN,
        })
    };
}

/// A fresh random 96-bit nonce, never handed out before.
pub fn fresh_nonce() -> Result<[u8; NONCE_LEN], CryptoError> {
    NONCES.with(|cell| {
        let mut pool = cell.borrow_mut();
        if pool.used + NONCE_LEN > pool.bytes.len() {
            random_fill(&mut pool.bytes)?;
            pool.used = 0;
        }
        let start = pool.used;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&pool.bytes[start..start + NONCE_LEN]);
        // Never hand out the same bytes twice, even if a refill were to fail later.
        pool.bytes[start..start + NONCE_LEN].fill(0);
        pool.used = start + NONCE_LEN;
        Ok(nonce)
    })
}

/// Seals with a nonce the caller drew at random for this one envelope.
fn seal_with_nonce(
    key: &LessSafeKey,
    key_version: u32,
    nonce: [u8; NONCE_LEN],
    context: &[u8],
    plaintext: &[u8],
) -> Vec<u8> {
    let header = envelope_header(key_version);
    let mut out = Vec::with_capacity(OVERHEAD + plaintext.len());
    append_sealed(
        &mut out,
        key,
        &header,
        nonce,
        &aad_bytes(&header, context),
        plaintext,
    );
    out
}

/// The header of an envelope sealed now under key version `key_version`.
fn envelope_header(key_version: u32) -> [u8; HEADER_LEN] {
    EnvelopeHeader {
        format: FORMAT_V1,
        algorithm: ALG_AES_256_GCM,
        key_version,
    }
    .to_bytes()
}

/// Appends to `out` the envelope of `plaintext` sealed with `nonce` (see [`seal_with_nonce`]);
/// `aad` is `header` ‖ context ([`aad_bytes`]).
fn append_sealed(
    out: &mut Vec<u8>,
    key: &LessSafeKey,
    header: &[u8; HEADER_LEN],
    nonce: [u8; NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
) {
    debug_assert!(aad.starts_with(header), "the AAD begins with the header");
    out.extend_from_slice(header);
    out.extend_from_slice(&nonce);
    let start = out.len();
    out.extend_from_slice(plaintext);
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut out[start..],
        )
        .expect("sealing fails only above ring's 64 GiB input limit");
    out.extend_from_slice(tag.as_ref());
}

/// The part of an envelope that commits to its ciphertext: nonce ‖ tag. Under a key the
/// reader holds and an attacker does not, no other ciphertext verifies with the same nonce and
/// tag, so a MAC over these 28 bytes stands for a MAC over the whole envelope.
pub fn commitment(sealed: &[u8]) -> Result<[&[u8]; 2], CryptoError> {
    if sealed.len() < OVERHEAD {
        return Err(CryptoError::Malformed);
    }
    Ok([
        &sealed[HEADER_LEN..HEADER_LEN + NONCE_LEN],
        &sealed[sealed.len() - TAG_LEN..],
    ])
}

/// Opens an envelope made by [`seal`] under the same key and context.
pub fn open(
    key: &SecretKey,
    context: &[u8],
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    open_with(&key.aead_key(), context, sealed)
}

fn open_with(
    key: &LessSafeKey,
    context: &[u8],
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    EnvelopeHeader::parse(sealed)?;
    let (header, rest) = sealed.split_at(HEADER_LEN);
    let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| CryptoError::Malformed)?;
    let aad = aad_bytes(header, context);
    let mut buf = Zeroizing::new(ciphertext.to_vec());
    let len = key
        .open_in_place(nonce, Aad::from(&aad), buf.as_mut_slice())
        .map_err(|_| CryptoError::Authentication)?
        .len();
    buf.truncate(len);
    Ok(buf)
}

/// A key for sealing many values in a row (one key schedule, many seals).
#[derive(Clone)]
pub struct SealingKey {
    // Shared: a write keeps a clone of the key it sealed each value under, for a retry
    // (`record::PendingValue`), at the cost of a reference count.
    key: std::sync::Arc<LessSafeKey>,
    version: u32,
}

impl SealingKey {
    /// Prepares `key` (of the given version) for repeated sealing.
    pub fn new(key: &SecretKey, version: u32) -> Self {
        Self {
            key: std::sync::Arc::new(key.aead_key()),
            version,
        }
    }

    /// Same as [`seal`] with this key.
    pub fn seal(&self, context: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        seal_with(&self.key, self.version, context, plaintext)
    }

    /// Opens an envelope this key sealed ([`SealingKey::seal`]) under `context`.
    pub fn reopen(&self, context: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let header = EnvelopeHeader::parse(sealed)?;
        if header.key_version != self.version {
            return Err(CryptoError::Malformed);
        }
        open_with(&self.key, context, sealed)
    }

    /// Seals `plaintext` in chunks of `chunk_len` bytes (at least one chunk, even when empty)
    /// where it lies: chunk `i` of `n` is encrypted in place under the context
    /// `context(i, n, out)` appends to `out`, with its own random nonce, and its nonce and tag
    /// go to the manifest ([`Detached`]). No byte of the plaintext is copied: the buffer the
    /// caller owns (a request's value) becomes the ciphertext.
    pub fn seal_detached(
        &self,
        mut plaintext: Zeroizing<Vec<u8>>,
        chunk_len: usize,
        context: impl Fn(u32, u32, &mut Vec<u8>),
    ) -> Result<Detached, CryptoError> {
        if chunk_len == 0 {
            return Err(CryptoError::Malformed);
        }
        let count = plaintext.len().div_ceil(chunk_len).max(1);
        // Below u32::MAX: the count is part of every chunk's context, and the chunk number
        // u32::MAX names the manifest in the store.
        let count32 = u32::try_from(count)
            .ok()
            .filter(|&n| n < u32::MAX)
            .ok_or(CryptoError::Malformed)?;
        let header = EnvelopeHeader {
            format: FORMAT_DETACHED,
            algorithm: ALG_AES_256_GCM,
            key_version: self.version,
        }
        .to_bytes();
        let mut manifest = Vec::with_capacity(HEADER_LEN + count * SEAL_LEN);
        manifest.extend_from_slice(&header);
        // One AAD buffer for every chunk: the header, then each chunk's context in turn.
        let mut aad = header.to_vec();
        for (i, text) in chunks_of(&mut plaintext, chunk_len).enumerate() {
            // From the thread's pool: a system call per 256 nonces, not one per field.
            let nonce = fresh_nonce()?;
            let i32 = u32::try_from(i).expect("chunk index below chunk count");
            aad.truncate(HEADER_LEN);
            context(i32, count32, &mut aad);
            let tag = self
                .key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(&aad),
                    text,
                )
                .expect("sealing fails only above ring's 64 GiB input limit");
            manifest.extend_from_slice(&nonce);
            manifest.extend_from_slice(tag.as_ref());
        }
        // Every plaintext byte is now ciphertext: the buffer leaves its zeroizing wrapper.
        Ok(Detached {
            manifest,
            ciphertext: Bytes::from(std::mem::take(&mut *plaintext)),
        })
    }

    /// Opens what this key sealed with [`SealingKey::seal_detached`] (chunk `i` of `n` under
    /// `context(i, n, out)`) back into one zeroizing buffer: for a write that must seal the
    /// same value again, under another key or for another record.
    pub fn reopen_detached(
        &self,
        sealed: &Detached,
        chunk_len: usize,
        context: impl Fn(u32, u32, &mut Vec<u8>),
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let header = EnvelopeHeader::parse_manifest(&sealed.manifest)?;
        let count = (sealed.manifest.len() - HEADER_LEN) / SEAL_LEN;
        if header.key_version != self.version
            || chunk_len == 0
            || count != sealed.ciphertext.len().div_ceil(chunk_len).max(1)
        {
            return Err(CryptoError::Malformed);
        }
        let count32 = u32::try_from(count).map_err(|_| CryptoError::Malformed)?;
        let mut out = Zeroizing::new(sealed.ciphertext.to_vec());
        let mut aad = sealed.manifest[..HEADER_LEN].to_vec();
        let seals = sealed.manifest[HEADER_LEN..].chunks_exact(SEAL_LEN);
        for (i, (text, seal)) in chunks_of(&mut out, chunk_len).zip(seals).enumerate() {
            let i32 = u32::try_from(i).expect("chunk index below chunk count");
            aad.truncate(HEADER_LEN);
            context(i32, count32, &mut aad);
            let (nonce, tag) = split_seal(seal)?;
            self.key
                .open_in_place_separate_tag(nonce, Aad::from(&aad), tag, text, 0..)
                .map_err(|_| CryptoError::Authentication)?;
        }
        Ok(out)
    }
}

/// Chunks of `chunk_len` (not zero) bytes of `buf`, the last one shorter; one empty chunk
/// when `buf` is empty.
fn chunks_of(buf: &mut [u8], chunk_len: usize) -> impl Iterator<Item = &mut [u8]> {
    let extra: Option<&mut [u8]> = if buf.is_empty() { Some(&mut []) } else { None };
    buf.chunks_mut(chunk_len).chain(extra)
}

/// A chunk's nonce and tag from its `nonce ‖ tag` entry in a manifest.
fn split_seal(seal: &[u8]) -> Result<(Nonce, Tag), CryptoError> {
    let (nonce, tag) = seal.split_at(NONCE_LEN);
    Ok((
        Nonce::try_assume_unique_for_key(nonce).map_err(|_| CryptoError::Malformed)?,
        Tag::try_from(tag).map_err(|_| CryptoError::Malformed)?,
    ))
}

/// A value sealed in chunks with [`SealingKey::seal_detached`]: the ciphertext, chunk after
/// chunk, exactly as long as the plaintext; and the manifest, the envelope header (format
/// [`FORMAT_DETACHED`]) followed by each chunk's `nonce ‖ tag` ([`SEAL_LEN`] bytes) in
/// order. Chunk `i` of the ciphertext is `ciphertext[i * chunk_len..]`, at most `chunk_len`
/// bytes. Nothing in it is secret.
#[derive(Clone, Debug)]
pub struct Detached {
    /// Header, then `nonce ‖ tag` per chunk.
    pub manifest: Vec<u8>,
    /// The ciphertext.
    pub ciphertext: Bytes,
}

impl std::fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SealingKey(AES-256-GCM, version {})", self.version)
    }
}

/// A key for opening many envelopes in a row (one key schedule, many opens), appending the
/// plaintexts to one zeroizing buffer without intermediate copies.
pub struct OpeningKey {
    key: LessSafeKey,
}

impl OpeningKey {
    /// Prepares `key` for repeated opening.
    pub fn new(key: &SecretKey) -> Self {
        Self {
            key: key.aead_key(),
        }
    }

    /// Opens `sealed` (made by [`seal`] under the same key and context) and appends its
    /// plaintext to `out`. The ciphertext is decrypted in place inside `out`; on failure `out`
    /// is left as it was. Reserve `plaintext length + TAG_LEN` in `out` beforehand, so that it
    /// never reallocates (a reallocation would leave a plaintext copy behind unzeroized).
    pub fn open_append(
        &self,
        context: &[u8],
        sealed: &[u8],
        out: &mut Zeroizing<Vec<u8>>,
    ) -> Result<(), CryptoError> {
        EnvelopeHeader::parse(sealed)?;
        let (header, rest) = sealed.split_at(HEADER_LEN);
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| CryptoError::Malformed)?;
        let aad = aad_bytes(header, context);
        let start = out.len();
        out.extend_from_slice(ciphertext);
        match self
            .key
            .open_in_place(nonce, Aad::from(&aad), &mut out[start..])
        {
            Ok(plaintext) => {
                let len = plaintext.len();
                out.truncate(start + len);
                Ok(())
            }
            Err(_) => {
                zeroize::Zeroize::zeroize(&mut out[start..]);
                out.truncate(start);
                Err(CryptoError::Authentication)
            }
        }
    }
}

impl OpeningKey {
    /// Opens chunk `chunk` of a value sealed with [`SealingKey::seal_detached`] under the
    /// same key: `ciphertext` is that chunk, `manifest` the value's manifest (checked with
    /// [`EnvelopeHeader::parse_manifest`] by the caller), `context` the chunk's context. The
    /// plaintext is appended to `out`, decrypted in place there; on failure `out` is left as
    /// it was. Reserve the plaintext's length in `out` beforehand, so that it never
    /// reallocates (a reallocation would leave a plaintext copy behind unzeroized).
    pub fn open_detached_append(
        &self,
        manifest: &[u8],
        chunk: usize,
        context: &[u8],
        ciphertext: &[u8],
        out: &mut Zeroizing<Vec<u8>>,
    ) -> Result<(), CryptoError> {
        let at = chunk
            .checked_mul(SEAL_LEN)
            .and_then(|at| at.checked_add(HEADER_LEN))
            .filter(|&at| at + SEAL_LEN <= manifest.len() && manifest.len() >= HEADER_LEN)
            .ok_or(CryptoError::Malformed)?;
        let (nonce, tag) = split_seal(&manifest[at..at + SEAL_LEN])?;
        let aad = aad_bytes(&manifest[..HEADER_LEN], context);
        let start = out.len();
        out.extend_from_slice(ciphertext);
        match self.key.open_in_place_separate_tag(
            nonce,
            Aad::from(&aad),
            tag,
            &mut out[start..],
            0..,
        ) {
            Ok(_) => Ok(()),
            Err(_) => {
                zeroize::Zeroize::zeroize(&mut out[start..]);
                out.truncate(start);
                Err(CryptoError::Authentication)
            }
        }
    }
}

impl std::fmt::Debug for OpeningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OpeningKey(AES-256-GCM)")
    }
}

/// HKDF-SHA256: derives a 256-bit key from `ikm` with `salt` and `info` (the label).
pub fn hkdf_sha256(salt: &[u8], ikm: &SecretKey, info: &[&[u8]]) -> SecretKey {
    hkdf_sha256_raw(salt, ikm.expose_secret(), info)
}

/// HKDF-SHA256 over raw input keying material (used by known-answer tests and key loading).
pub fn hkdf_sha256_raw(salt: &[u8], ikm: &[u8], info: &[&[u8]]) -> SecretKey {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(ikm);
    let okm = prk
        .expand(info, hkdf::HKDF_SHA256)
        .expect("32 bytes is within HKDF-SHA256's 255 × 32 output limit");
    let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
    okm.fill(bytes.as_mut())
        .expect("output length equals HKDF_SHA256's length");
    SecretKey(bytes)
}

/// HKDF-SHA256 with an arbitrary output length (known-answer tests only need this form).
pub fn hkdf_sha256_len(
    salt: &[u8],
    ikm: &[u8],
    info: &[u8],
    len: usize,
) -> Option<Zeroizing<Vec<u8>>> {
    struct Len(usize);
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(ikm);
    let info = [info];
    let okm = prk.expand(&info, Len(len)).ok()?;
    let mut out = Zeroizing::new(vec![0u8; len]);
    okm.fill(out.as_mut_slice()).ok()?;
    Some(out)
}

/// HMAC-SHA256 of the concatenation of `parts`.
pub fn hmac_sha256(key: &SecretKey, parts: &[&[u8]]) -> [u8; 32] {
    hmac_sha256_raw(key.expose_secret(), parts)
}

/// HMAC-SHA256 under raw key bytes of any length.
pub fn hmac_sha256_raw(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut ctx = hmac::Context::with_key(&key);
    for part in parts {
        ctx.update(part);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

/// Checks an HMAC-SHA256 tag in constant time.
pub fn hmac_sha256_verify(key: &SecretKey, parts: &[&[u8]], tag: &[u8]) -> bool {
    let expected = hmac_sha256(key, parts);
    ct_eq(&expected, tag)
}

/// Constant-time equality of two byte strings (length is not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// SHA-256 of the concatenation of `parts`.
pub fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in parts {
        ctx.update(part);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Raw AES-256-GCM with an explicit nonce, for known-answer tests against published vectors.
/// Named `danger_` because a caller-chosen nonce must never repeat under one key.
pub fn danger_aes256gcm_seal_with_nonce(
    key: &[u8; KEY_LEN],
    nonce: [u8; NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> Vec<u8> {
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, key).expect("a 32-byte key is a valid AES-256 key"),
    );
    let mut buf = plaintext.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        &mut buf,
    )
    .expect("sealing cannot fail below ring's 64 GiB input limit");
    buf
}

/// Raw AES-256-GCM open of `ciphertext ‖ tag` with an explicit nonce (known-answer tests).
pub fn aes256gcm_open_with_nonce(
    key: &[u8; KEY_LEN],
    nonce: [u8; NONCE_LEN],
    aad: &[u8],
    ciphertext_and_tag: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, key).expect("a 32-byte key is a valid AES-256 key"),
    );
    let mut buf = Zeroizing::new(ciphertext_and_tag.to_vec());
    let len = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            buf.as_mut_slice(),
        )
        .map_err(|_| CryptoError::Authentication)?
        .len();
    buf.truncate(len);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nonces come from a per-thread buffer refilled from the system generator: across many
    /// refills, and on several threads at once, no nonce is ever handed out twice.
    #[test]
    fn pooled_nonces_never_repeat() {
        let draw = || {
            (0..NONCE_POOL * 9 + 5)
                .map(|_| fresh_nonce().expect("rng"))
                .collect::<Vec<_>>()
        };
        let others: Vec<_> = (0..3).map(|_| std::thread::spawn(draw)).collect();
        let mut all = draw();
        for t in others {
            all.extend(t.join().expect("thread"));
        }
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n);
        assert!(!all.contains(&[0u8; NONCE_LEN]));
    }

    #[test]
    fn seal_open_round_trip_and_context_binding() {
        let key = SecretKey::generate().expect("rng");
        let ctx = context(&[b"record", b"field"]);
        let sealed = seal(&key, 7, &ctx, b"hello").expect("seal");
        assert_eq!(
            EnvelopeHeader::parse(&sealed).expect("header").key_version,
            7
        );
        assert_eq!(
            open(&key, &ctx, &sealed).expect("open").as_slice(),
            b"hello"
        );
        let other = context(&[b"record", b"other"]);
        assert_eq!(
            open(&key, &other, &sealed),
            Err(CryptoError::Authentication)
        );
    }

    #[test]
    fn opening_key_appends_and_leaves_out_untouched_on_failure() {
        let key = SecretKey::generate().expect("rng");
        let sealing = SealingKey::new(&key, 1);
        let a = sealing.seal(b"a", b"hello ").expect("seal");
        let b = sealing.seal(b"b", b"world").expect("seal");
        let opener = OpeningKey::new(&key);
        let mut out = Zeroizing::new(Vec::with_capacity(11 + TAG_LEN));
        opener.open_append(b"a", &a, &mut out).expect("open a");
        assert_eq!(
            opener.open_append(b"a", &b, &mut out),
            Err(CryptoError::Authentication)
        );
        opener.open_append(b"b", &b, &mut out).expect("open b");
        assert_eq!(out.as_slice(), b"hello world");
    }

    /// A detached seal: ciphertext as long as the plaintext, one nonce ‖ tag per chunk; it
    /// reopens under its key, version and contexts only, and any altered byte of manifest or
    /// ciphertext fails.
    #[test]
    fn detached_seals_reopen_and_refuse_alteration() {
        let key = SecretKey::generate().expect("rng");
        let sealing = SealingKey::new(&key, 9);
        let ctx = |i: u32, n: u32, out: &mut Vec<u8>| {
            out.extend_from_slice(&i.to_be_bytes());
            out.extend_from_slice(&n.to_be_bytes());
        };
        for len in [0usize, 1, 63, 64, 65, 200] {
            let plain: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let sealed = sealing
                .seal_detached(Zeroizing::new(plain.clone()), 64, ctx)
                .expect("seal");
            let count = len.div_ceil(64).max(1);
            assert_eq!(sealed.ciphertext.len(), len);
            assert_eq!(sealed.manifest.len(), HEADER_LEN + count * SEAL_LEN);
            let header = EnvelopeHeader::parse_manifest(&sealed.manifest).expect("manifest");
            assert_eq!((header.format, header.key_version), (FORMAT_DETACHED, 9));
            if len > 0 {
                assert_ne!(sealed.ciphertext.as_ref(), plain.as_slice());
            }
            let back = sealing.reopen_detached(&sealed, 64, ctx).expect("reopen");
            assert_eq!(back.as_slice(), plain.as_slice());
            // The opening key, chunk by chunk.
            let opener = OpeningKey::new(&key);
            let mut out = Zeroizing::new(Vec::with_capacity(len));
            for (i, chunk) in chunks_of(&mut sealed.ciphertext.to_vec(), 64).enumerate() {
                let mut aad = Vec::new();
                ctx(i as u32, count as u32, &mut aad);
                opener
                    .open_detached_append(&sealed.manifest, i, &aad, chunk, &mut out)
                    .expect("chunk");
            }
            assert_eq!(out.as_slice(), plain.as_slice());
            assert_eq!(
                opener.open_detached_append(&sealed.manifest, count, b"", b"", &mut out),
                Err(CryptoError::Malformed)
            );
            // Every altered byte of the manifest, and of the ciphertext, fails.
            for at in 0..sealed.manifest.len() {
                let mut bad = sealed.clone();
                bad.manifest[at] ^= 0x40;
                assert!(
                    sealing.reopen_detached(&bad, 64, ctx).is_err(),
                    "manifest {at}"
                );
            }
            for at in 0..len {
                let mut bytes = sealed.ciphertext.to_vec();
                bytes[at] ^= 1;
                let bad = Detached {
                    manifest: sealed.manifest.clone(),
                    ciphertext: Bytes::from(bytes),
                };
                assert_eq!(
                    sealing.reopen_detached(&bad, 64, ctx),
                    Err(CryptoError::Authentication),
                    "ciphertext {at}"
                );
            }
            // Not under another key version, chunk size or context.
            assert!(SealingKey::new(&key, 8)
                .reopen_detached(&sealed, 64, ctx)
                .is_err());
            if len > 64 {
                assert!(sealing.reopen_detached(&sealed, 32, ctx).is_err());
            }
            let other = |i: u32, n: u32, out: &mut Vec<u8>| ctx(i, n + 1, out);
            assert!(sealing.reopen_detached(&sealed, 64, other).is_err());
        }
        // A manifest needs its header and whole nonce ‖ tag entries, format 2.
        for bad in [
            vec![FORMAT_DETACHED, ALG_AES_256_GCM, 0, 0, 0, 1],
            [
                &[FORMAT_DETACHED, ALG_AES_256_GCM, 0, 0, 0, 1][..],
                &[0; SEAL_LEN - 1],
            ]
            .concat(),
            [
                &[FORMAT_V1, ALG_AES_256_GCM, 0, 0, 0, 1][..],
                &[0; SEAL_LEN],
            ]
            .concat(),
        ] {
            assert_eq!(
                EnvelopeHeader::parse_manifest(&bad),
                Err(CryptoError::Malformed)
            );
        }
    }

    #[test]
    fn header_is_authenticated() {
        let key = SecretKey::generate().expect("rng");
        let mut sealed = seal(&key, 1, b"", b"x").expect("seal");
        sealed[5] ^= 1; // key version 1 → 0
        assert_eq!(open(&key, b"", &sealed), Err(CryptoError::Authentication));
    }

    #[test]
    fn context_parts_do_not_collide() {
        assert_ne!(context(&[b"ab", b"c"]), context(&[b"a", b"bc"]));
    }

    #[test]
    fn debug_prints_no_key_bytes() {
        let key = SecretKey::from_bytes([0xAB; 32]);
        let shown = format!("{key:?}");
        assert!(!shown.contains("ab") && !shown.contains("171"));
    }
}
