//! Known-answer and cross-implementation tests of `kluis::crypto` (and the field-chunk sealing in
//! `kluis::record`).
//!
//! - Project Wycheproof vectors (copied unchanged into `tests/vectors/wycheproof/`, see the
//!   README there) for AES-256-GCM, HKDF-SHA256 and HMAC-SHA256, one data-driven `check_*`
//!   function per algorithm.
//! - Properties against an independent AES-GCM implementation, RustCrypto's `aes-gcm` crate:
//!   envelopes sealed by kluis (`ring`) open with `aes-gcm` and the reverse, given only the
//!   envelope layout documented in `src/crypto.rs`.
//!
//! Run `cargo test --test it crypto_vectors -- --nocapture` to see how many vectors were checked.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use kluis::crypto::{
    self, CryptoError, EnvelopeHeader, SealingKey, SecretKey, ALG_AES_256_GCM, FORMAT_DETACHED,
    FORMAT_V1, HEADER_LEN, KEY_LEN, NONCE_LEN, OVERHEAD, TAG_LEN,
};
use kluis::record::{self, SealedValue, CHUNK_LEN};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use zeroize::Zeroizing;

// ---------------------------------------------------------------------------------------------
// Wycheproof files
// ---------------------------------------------------------------------------------------------

const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/wycheproof/");

/// A Wycheproof file: `testGroups[]`, each with parameters and `tests[]`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Suite<G> {
    algorithm: String,
    number_of_tests: usize,
    test_groups: Vec<G>,
}

/// A case's expected outcome. Only `valid` and `invalid` are accepted: a future copy of the
/// vectors with `acceptable` cases fails to parse, so someone decides how to treat them.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Expect {
    Valid,
    Invalid,
}

trait Group {
    fn cases(&self) -> usize;
}

/// Reads a vector file, checking its algorithm name and that every declared test was parsed.
fn load<G: DeserializeOwned + Group>(file: &str, algorithm: &str) -> Vec<G> {
    let path = format!("{VECTORS}{file}");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let suite: Suite<G> =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {path}: {e}"));
    assert_eq!(suite.algorithm, algorithm, "{path}");
    let parsed: usize = suite.test_groups.iter().map(Group::cases).sum();
    assert_eq!(parsed, suite.number_of_tests, "{path}: numberOfTests");
    suite.test_groups
}

fn from_hex<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let text = String::deserialize(d)?;
    hex::decode(text).map_err(serde::de::Error::custom)
}

/// How many cases of a file were checked.
#[derive(Default, Debug)]
struct Tally {
    valid: usize,
    invalid: usize,
    skipped: usize,
}

impl Tally {
    fn count(&mut self, result: Expect) {
        match result {
            Expect::Valid => self.valid += 1,
            Expect::Invalid => self.invalid += 1,
        }
    }

    fn report(&self, what: &str) {
        eprintln!(
            "wycheproof {what}: {} checked ({} valid, {} invalid), {} skipped (other parameters)",
            self.valid + self.invalid,
            self.valid,
            self.invalid,
            self.skipped
        );
        assert!(self.valid > 0, "{what}: no valid case checked");
        assert!(self.invalid > 0, "{what}: no invalid case checked");
    }
}

// ---------------------------------------------------------------------------------------------
// AES-256-GCM
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AeadGroup {
    key_size: usize,
    iv_size: usize,
    tag_size: usize,
    tests: Vec<AeadCase>,
}

impl Group for AeadGroup {
    fn cases(&self) -> usize {
        self.tests.len()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AeadCase {
    tc_id: u32,
    comment: String,
    flags: Vec<String>,
    #[serde(deserialize_with = "from_hex")]
    key: Vec<u8>,
    #[serde(deserialize_with = "from_hex")]
    iv: Vec<u8>,
    #[serde(deserialize_with = "from_hex")]
    aad: Vec<u8>,
    #[serde(deserialize_with = "from_hex")]
    msg: Vec<u8>,
    #[serde(deserialize_with = "from_hex")]
    ct: Vec<u8>,
    #[serde(deserialize_with = "from_hex")]
    tag: Vec<u8>,
    result: Expect,
}

/// One AES-256-GCM case against kluis's raw seal/open (ring), and against the `aes-gcm` crate,
/// which the properties below use as the reference implementation.
fn check_aes256gcm(case: &AeadCase) {
    let what = format!("tcId {} {:?} {}", case.tc_id, case.flags, case.comment);
    let key: &[u8; KEY_LEN] = case.key.as_slice().try_into().expect("256-bit key");
    let nonce: [u8; NONCE_LEN] = case.iv.as_slice().try_into().expect("96-bit IV");
    assert_eq!(case.tag.len(), TAG_LEN, "{what}");
    let ct_tag = [case.ct.as_slice(), case.tag.as_slice()].concat();

    let sealed = crypto::danger_aes256gcm_seal_with_nonce(key, nonce, &case.aad, &case.msg);
    let opened = crypto::aes256gcm_open_with_nonce(key, nonce, &case.aad, &ct_tag);
    let reference = Aes256Gcm::new_from_slice(key).expect("32-byte key");
    let payload = Payload {
        msg: &case.msg,
        aad: &case.aad,
    };
    let reference_sealed = reference
        .encrypt(Nonce::from_slice(&nonce), payload)
        .expect("aes-gcm seal");
    let payload = Payload {
        msg: &ct_tag,
        aad: &case.aad,
    };
    let reference_opened = reference.decrypt(Nonce::from_slice(&nonce), payload);

    match case.result {
        Expect::Valid => {
            assert_eq!(
                hex::encode(&sealed),
                hex::encode(&ct_tag),
                "{what}: kluis seal"
            );
            let opened = opened.unwrap_or_else(|e| panic!("{what}: kluis open: {e}"));
            assert_eq!(
                hex::encode(opened.as_slice()),
                hex::encode(&case.msg),
                "{what}"
            );
            assert_eq!(reference_sealed, ct_tag, "{what}: aes-gcm seal");
            assert_eq!(
                reference_opened.ok(),
                Some(case.msg.clone()),
                "{what}: aes-gcm open"
            );
        }
        Expect::Invalid => {
            assert_eq!(
                opened.err(),
                Some(CryptoError::Authentication),
                "{what}: kluis open"
            );
            assert_ne!(
                sealed, ct_tag,
                "{what}: kluis seal reproduced an invalid ciphertext"
            );
            assert!(reference_opened.is_err(), "{what}: aes-gcm open");
        }
    }
}

#[test]
fn wycheproof_aes_256_gcm() {
    let mut tally = Tally::default();
    for group in load::<AeadGroup>("aes_gcm_test.json", "AES-GCM") {
        // kluis uses exactly AES-256, 96-bit nonces, 128-bit tags.
        if (group.key_size, group.iv_size, group.tag_size) != (256, 96, 128) {
            tally.skipped += group.tests.len();
            continue;
        }
        for case in &group.tests {
            check_aes256gcm(case);
            tally.count(case.result);
        }
    }
    tally.report("AES-256-GCM (96-bit IV, 128-bit tag)");
}

// ---------------------------------------------------------------------------------------------
// HKDF-SHA256
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HkdfGroup {
    tests: Vec<HkdfCase>,
}

impl Group for HkdfGroup {
    fn cases(&self) -> usize {
        self.tests.len()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HkdfCase {
    tc_id: u32,
    comment: String,
    #[serde(deserialize_with = "from_hex")]
    ikm: Vec<u8>,
    #[serde(deserialize_with = "from_hex")]
    salt: Vec<u8>,
    #[serde(deserialize_with = "from_hex")]
    info: Vec<u8>,
    size: usize,
    #[serde(deserialize_with = "from_hex")]
    okm: Vec<u8>,
    result: Expect,
}

fn check_hkdf_sha256(case: &HkdfCase) {
    let what = format!("tcId {} {}", case.tc_id, case.comment);
    let okm = crypto::hkdf_sha256_len(&case.salt, &case.ikm, &case.info, case.size);
    match case.result {
        Expect::Valid => {
            let okm = okm.unwrap_or_else(|| panic!("{what}: no output"));
            assert_eq!(
                hex::encode(okm.as_slice()),
                hex::encode(&case.okm),
                "{what}"
            );
        }
        Expect::Invalid => assert!(okm.is_none(), "{what}: size {} accepted", case.size),
    }
}

#[test]
fn wycheproof_hkdf_sha256() {
    let mut tally = Tally::default();
    for group in load::<HkdfGroup>("hkdf_sha256_test.json", "HKDF-SHA-256") {
        for case in &group.tests {
            check_hkdf_sha256(case);
            tally.count(case.result);
        }
    }
    tally.report("HKDF-SHA256");
}

// ---------------------------------------------------------------------------------------------
// HMAC-SHA256
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MacGroup {
    tag_size: usize,
    tests: Vec<MacCase>,
}

impl Group for MacGroup {
    fn cases(&self) -> usize {
        self.tests.len()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MacCase {
    tc_id: u32,
    comment: String,
    #[serde(deserialize_with = "from_hex")]
    key: Vec<u8>,
    #[serde(deserialize_with = "from_hex")]
    msg: Vec<u8>,
    #[serde(deserialize_with = "from_hex")]
    tag: Vec<u8>,
    result: Expect,
}

/// One HMAC-SHA256 case; `tag_bytes` is the group's (possibly truncated) tag length.
fn check_hmac_sha256(tag_bytes: usize, case: &MacCase) {
    let what = format!(
        "tcId {} {} (tag {tag_bytes} bytes)",
        case.tc_id, case.comment
    );
    let full = crypto::hmac_sha256_raw(&case.key, &[&case.msg]);
    let tag = &full[..tag_bytes];
    match case.result {
        Expect::Valid => assert_eq!(hex::encode(tag), hex::encode(&case.tag), "{what}"),
        Expect::Invalid => assert_ne!(tag, case.tag.as_slice(), "{what}: modified tag matched"),
    }
}

#[test]
fn wycheproof_hmac_sha256() {
    let mut tally = Tally::default();
    for group in load::<MacGroup>("hmac_sha256_test.json", "HMACSHA256") {
        assert!(
            group.tag_size % 8 == 0 && group.tag_size <= 256,
            "tagSize {}",
            group.tag_size
        );
        for case in &group.tests {
            check_hmac_sha256(group.tag_size / 8, case);
            tally.count(case.result);
        }
    }
    tally.report("HMAC-SHA256");
}

// ---------------------------------------------------------------------------------------------
// Envelopes against the `aes-gcm` crate
// ---------------------------------------------------------------------------------------------

/// The envelope header as documented in `src/crypto.rs`, built independently of kluis.
fn header(key_version: u32) -> [u8; HEADER_LEN] {
    let v = key_version.to_be_bytes();
    [FORMAT_V1, ALG_AES_256_GCM, v[0], v[1], v[2], v[3]]
}

/// The header of a detached value's manifest (format 2), built independently of kluis.
fn detached_header(key_version: u32) -> [u8; HEADER_LEN] {
    let v = key_version.to_be_bytes();
    [2, ALG_AES_256_GCM, v[0], v[1], v[2], v[3]]
}

/// Opens a kluis envelope with the `aes-gcm` crate: AAD = header ‖ context.
fn reference_open(key: &[u8; KEY_LEN], context: &[u8], envelope: &[u8]) -> Option<Vec<u8>> {
    assert!(
        envelope.len() >= OVERHEAD,
        "envelope of {} bytes",
        envelope.len()
    );
    let (head, rest) = envelope.split_at(HEADER_LEN);
    let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
    let aad = [head, context].concat();
    let payload = Payload {
        msg: ciphertext,
        aad: &aad,
    };
    Aes256Gcm::new_from_slice(key)
        .expect("32-byte key")
        .decrypt(Nonce::from_slice(nonce), payload)
        .ok()
}

/// Builds a kluis envelope with the `aes-gcm` crate from an explicit header and nonce.
fn reference_seal(
    key: &[u8; KEY_LEN],
    head: [u8; HEADER_LEN],
    nonce: [u8; NONCE_LEN],
    context: &[u8],
    plaintext: &[u8],
) -> Vec<u8> {
    let aad = [head.as_slice(), context].concat();
    let payload = Payload {
        msg: plaintext,
        aad: &aad,
    };
    let ciphertext = Aes256Gcm::new_from_slice(key)
        .expect("32-byte key")
        .encrypt(Nonce::from_slice(&nonce), payload)
        .expect("aes-gcm seal");
    [head.as_slice(), nonce.as_slice(), &ciphertext].concat()
}

fn context_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..256),
        (vec(any::<u8>(), 16), "[a-z_]{1,24}").prop_map(|(id, field)| crypto::context(&[
            b"kluis/v1/test",
            &id,
            field.as_bytes()
        ])),
    ]
}

fn plaintext() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..4096)
}

/// Field values whose lengths are spread over 0..3 chunks and often sit on a chunk boundary.
fn field_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        0..=(3 * CHUNK_LEN + 17),
        (0..=3usize, 0..=2usize).prop_map(|(k, d)| (k * CHUNK_LEN + d).saturating_sub(1)),
    ]
    .prop_flat_map(|len| vec(any::<u8>(), len))
}

/// `crypto::context` as documented: each part prefixed by its length, u32 big-endian.
fn documented_context(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for part in parts {
        out.extend_from_slice(&u32::try_from(part.len()).expect("short part").to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

proptest! {
    #[test]
    fn kluis_envelope_opens_with_aes_gcm_crate(
        key in any::<[u8; KEY_LEN]>(),
        version in any::<u32>(),
        ctx in context_bytes(),
        pt in plaintext(),
    ) {
        let sealed = crypto::seal(&SecretKey::from_bytes(key), version, &ctx, &pt).expect("seal");
        prop_assert_eq!(sealed.len(), OVERHEAD + pt.len());
        prop_assert_eq!(&sealed[..HEADER_LEN], &header(version)[..]);
        prop_assert_eq!(reference_open(&key, &ctx, &sealed), Some(pt));
    }

    #[test]
    fn aes_gcm_crate_envelope_opens_with_kluis(
        key in any::<[u8; KEY_LEN]>(),
        version in any::<u32>(),
        nonce in any::<[u8; NONCE_LEN]>(),
        ctx in context_bytes(),
        pt in plaintext(),
    ) {
        let envelope = reference_seal(&key, header(version), nonce, &ctx, &pt);
        let parsed = EnvelopeHeader::parse(&envelope).expect("header");
        prop_assert_eq!(parsed.key_version, version);
        let opened = crypto::open(&SecretKey::from_bytes(key), &ctx, &envelope).expect("open");
        prop_assert_eq!(opened.as_slice(), pt.as_slice());
        // Byte for byte the same ciphertext from ring under the same nonce and AAD.
        let aad = [header(version).as_slice(), &ctx].concat();
        let ring = crypto::danger_aes256gcm_seal_with_nonce(&key, nonce, &aad, &pt);
        prop_assert_eq!(&envelope[HEADER_LEN + NONCE_LEN..], ring.as_slice());
    }

    #[test]
    fn open_inverts_seal(
        key in any::<[u8; KEY_LEN]>(),
        version in any::<u32>(),
        ctx in context_bytes(),
        pt in plaintext(),
    ) {
        let key = SecretKey::from_bytes(key);
        let sealed = crypto::seal(&key, version, &ctx, &pt).expect("seal");
        prop_assert_eq!(EnvelopeHeader::parse(&sealed).expect("header").key_version, version);
        let opened = crypto::open(&key, &ctx, &sealed).expect("open");
        prop_assert_eq!(opened.as_slice(), pt.as_slice());
    }

    #[test]
    fn flipping_any_bit_fails_to_open(
        key in any::<[u8; KEY_LEN]>(),
        version in any::<u32>(),
        ctx in context_bytes(),
        pt in plaintext(),
        bit in any::<Index>(),
    ) {
        let key = SecretKey::from_bytes(key);
        let mut sealed = crypto::seal(&key, version, &ctx, &pt).expect("seal");
        let bit = bit.index(sealed.len() * 8);
        sealed[bit / 8] ^= 1 << (bit % 8);
        let err = crypto::open(&key, &ctx, &sealed).err();
        prop_assert!(
            matches!(err, Some(CryptoError::Authentication | CryptoError::Malformed)),
            "bit {} of {}: {:?}", bit, sealed.len() * 8, err
        );
        if bit / 8 >= 2 {
            // Key version, nonce, ciphertext and tag are well-formed whatever their value: only
            // authentication can reject them.
            prop_assert_eq!(err, Some(CryptoError::Authentication), "bit {}", bit);
        }
    }

    #[test]
    fn another_context_or_key_fails_to_open(
        key in any::<[u8; KEY_LEN]>(),
        other_key in any::<[u8; KEY_LEN]>(),
        version in any::<u32>(),
        ctx in context_bytes(),
        other_ctx in context_bytes(),
        pt in plaintext(),
    ) {
        prop_assume!(ctx != other_ctx && key != other_key);
        let sealed = crypto::seal(&SecretKey::from_bytes(key), version, &ctx, &pt).expect("seal");
        let key = SecretKey::from_bytes(key);
        let err = crypto::open(&key, &other_ctx, &sealed).err();
        prop_assert_eq!(err, Some(CryptoError::Authentication));
        prop_assert_eq!(reference_open(key.expose_secret(), &other_ctx, &sealed), None);
        let err = crypto::open(&SecretKey::from_bytes(other_key), &ctx, &sealed).err();
        prop_assert_eq!(err, Some(CryptoError::Authentication));
    }
}

proptest! {
    // Up to ~48 KiB per case through a debug-build software reference: fewer cases.
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn field_chunks_open_with_aes_gcm_crate(
        key in any::<[u8; KEY_LEN]>(),
        version in any::<u32>(),
        id in any::<[u8; 16]>(),
        field in "[a-z][a-z_]{0,23}",
        data in field_value(),
    ) {
        let sealing = SealingKey::new(&SecretKey::from_bytes(key), version);
        let sealed = record::seal_field(&sealing, &id, &field, Zeroizing::new(data.clone())).expect("seal");
        let count = data.len().div_ceil(CHUNK_LEN).max(1);
        prop_assert_eq!(sealed.chunk_count(), count);
        let n = u32::try_from(count).expect("count");
        // Each chunk as an envelope: header ‖ nonce ‖ ciphertext ‖ tag. A detached value
        // keeps the ciphertext in its chunks and header, nonces and tags in its manifest:
        // header (format 2) ‖ (nonce ‖ tag) per chunk.
        let (head, envelopes): ([u8; HEADER_LEN], Vec<Vec<u8>>) = match &sealed.value {
            SealedValue::Envelope(envelope) => {
                prop_assert!(data.len() <= record::ENVELOPE_MAX);
                (header(version), vec![envelope.clone()])
            }
            SealedValue::Detached(d) => {
                prop_assert!(data.len() > record::ENVELOPE_MAX);
                prop_assert_eq!(d.manifest.len(), HEADER_LEN + count * (NONCE_LEN + TAG_LEN));
                prop_assert_eq!(d.ciphertext.len(), data.len());
                let seals = d.manifest[HEADER_LEN..].chunks_exact(NONCE_LEN + TAG_LEN);
                let envelopes = d
                    .ciphertext
                    .chunks(CHUNK_LEN)
                    .zip(seals)
                    .map(|(ct, seal)| [&d.manifest[..HEADER_LEN], &seal[..NONCE_LEN], ct, &seal[NONCE_LEN..]].concat())
                    .collect();
                (detached_header(version), envelopes)
            }
        };
        prop_assert_eq!(envelopes.len(), count);
        let mut joined = Vec::with_capacity(data.len());
        for (i, chunk) in envelopes.iter().enumerate() {
            let i = u32::try_from(i).expect("index");
            let ctx = record::chunk_context(&id, &field, i, n);
            let parts: [&[u8]; 5] =
                [b"kluis/v1/field", &id, field.as_bytes(), &i.to_be_bytes(), &n.to_be_bytes()];
            prop_assert_eq!(&ctx, &documented_context(&parts));
            prop_assert_eq!(&chunk[..HEADER_LEN], &head[..]);
            let opened = reference_open(&key, &ctx, chunk);
            prop_assert!(opened.is_some(), "chunk {} of {} did not open", i, n);
            joined.extend_from_slice(&opened.unwrap_or_default());
            // Bound to its position and to the chunk count.
            let moved = record::chunk_context(&id, &field, i + 1, n);
            prop_assert_eq!(reference_open(&key, &moved, chunk), None);
            let recounted = record::chunk_context(&id, &field, i, n + 1);
            prop_assert_eq!(reference_open(&key, &recounted, chunk), None);
            // And to its format: the same parts under the other format's header fail.
            let mut other = chunk.clone();
            other[0] = if other[0] == FORMAT_V1 { FORMAT_DETACHED } else { FORMAT_V1 };
            prop_assert_eq!(reference_open(&key, &ctx, &other), None);
        }
        prop_assert_eq!(joined, data);
        // The digest commits to every chunk's nonce ‖ tag (bytes 6..18 and the last 16), in order.
        let parts: Vec<&[u8]> = envelopes
            .iter()
            .flat_map(|c| [&c[HEADER_LEN..HEADER_LEN + NONCE_LEN], &c[c.len() - TAG_LEN..]])
            .collect();
        prop_assert_eq!(sealed.digest, crypto::sha256(&parts));
    }
}

/// Exhaustive over one small envelope: every single-bit flip, every truncation and an appended
/// byte fail; an authentic envelope with an unknown format or algorithm is refused as malformed.
#[test]
fn every_bit_flip_and_truncation_of_an_envelope_fails() {
    let key = SecretKey::from_bytes([0x42; KEY_LEN]);
    let ctx = crypto::context(&[b"record", b"field"]);
    let sealed = crypto::seal(&key, 0x0102_0304, &ctx, b"x").expect("seal");
    assert_eq!(sealed.len(), OVERHEAD + 1);
    for bit in 0..sealed.len() * 8 {
        let mut bad = sealed.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        let expected = if bit / 8 < 2 {
            CryptoError::Malformed
        } else {
            CryptoError::Authentication
        };
        assert_eq!(
            crypto::open(&key, &ctx, &bad).err(),
            Some(expected),
            "bit {bit}"
        );
    }
    for len in 0..sealed.len() {
        // Shorter than the overhead: not an envelope. Otherwise the tag is in the wrong place.
        let expected = if len < OVERHEAD {
            CryptoError::Malformed
        } else {
            CryptoError::Authentication
        };
        let err = crypto::open(&key, &ctx, &sealed[..len]).err();
        assert_eq!(err, Some(expected), "truncated to {len}");
    }
    let mut longer = sealed.clone();
    longer.push(0);
    assert_eq!(
        crypto::open(&key, &ctx, &longer).err(),
        Some(CryptoError::Authentication)
    );

    for (byte, value) in [(0, FORMAT_V1 + 1), (1, ALG_AES_256_GCM + 1)] {
        let mut head = header(7);
        head[byte] = value;
        let envelope = reference_seal(key.expose_secret(), head, [9; NONCE_LEN], &ctx, b"x");
        assert_eq!(
            crypto::open(&key, &ctx, &envelope).err(),
            Some(CryptoError::Malformed),
            "header byte {byte} = {value}"
        );
    }
}
