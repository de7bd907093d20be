//! Cryptographic throughput: raw AES-256-GCM (`ring` and the RustCrypto `aes-gcm` crate),
//! Kluis field sealing (16 KiB chunks sealed in place, a manifest of their nonces and tags, a
//! digest over it), and
//! the envelope work of a typical 20-field record.
//!
//! Run with `cargo bench --bench crypto` (about 2 minutes on 2 cores). After criterion's own
//! output, a summary table is printed from criterion's estimates
//! (`target/criterion/**/new/estimates.json`), including the field-sealing / raw-ring-seal
//! ratio per size. With a filter argument, rows of benchmarks not run show their last estimate.
//!
//! Benchmark ids (criterion group / function / size):
//! - `seal/ring/*`, `open/ring/*`: `ring::aead::LessSafeKey` in place, preallocated buffer.
//! - `seal/aes-gcm-crate/*`, `open/aes-gcm-crate/*`: `aes_gcm::Aes256Gcm` in place, detached tag.
//! - `field_seal/kluis/*`: `kluis::record::seal_field` on an owned buffer (set up untimed),
//!   then `SealedField::stored_chunks`: what the vault does with a blob field's value, the
//!   buffer taken from the decoded request sealed where it lies (16 KiB chunks, a manifest of
//!   nonces and tags, the field digest) and cut into the views the store keeps.
//! - `field_open/kluis/*`: opening those chunks with `kluis::crypto::OpeningKey` after checking
//!   the manifest against the field digest (the crypto part of the vault's read path, without
//!   the store).
//! - `envelope/record20/{encrypt,decrypt}`: 4 category DEKs wrapped under a KEK, 20 short
//!   text fields sealed / opened.

mod common;

/// The allocator of the `kluis` binary (src/main.rs), so that the figures are the server's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use common::{machine_busy, process_cpu};

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce as AesGcmNonce};
use criterion::measurement::WallTime;
use criterion::{BatchSize, BenchmarkGroup, BenchmarkId, Criterion, SamplingMode, Throughput};
use kluis::crypto::{self, SealingKey, SecretKey};
use kluis::record::{self, SealedField, SealedValue};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

/// Sizes of the raw AEAD groups.
const RAW_SIZES: [(usize, &str); 5] = [
    (64, "64B"),
    (KIB, "1KiB"),
    (64 * KIB, "64KiB"),
    (MIB, "1MiB"),
    (8 * MIB, "8MiB"),
];
/// Sizes of the field groups (blob fields).
const FIELD_SIZES: [(usize, &str); 3] = [(64 * KIB, "64KiB"), (MIB, "1MiB"), (8 * MIB, "8MiB")];

const WARM_UP: Duration = Duration::from_millis(800);
const MEASURE: Duration = Duration::from_secs(2);
const SAMPLES: usize = 50;
const SAMPLES_LARGE: usize = 20;
const RECORD_ID: [u8; 16] = *b"bench-record-id!";

fn key_bytes() -> [u8; 32] {
    let mut key = [0u8; 32];
    crypto::random_fill(&mut key).expect("the OS random number generator works");
    key
}

fn data(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8)
        .collect()
}

/// A distinct nonce per call from a counter (never reused under one key within a run).
fn counter_nonce(counter: &mut u64) -> [u8; 12] {
    *counter += 1;
    let mut nonce = [0u8; 12];
    nonce[4..].copy_from_slice(&counter.to_be_bytes());
    nonce
}

/// Fewer samples, each of the same iteration count, for the 8 MiB cases (keeps the run short).
fn size_config(group: &mut BenchmarkGroup<'_, WallTime>, len: usize) {
    group.throughput(Throughput::Bytes(len as u64));
    if len >= 8 * MIB {
        group
            .sample_size(SAMPLES_LARGE)
            .sampling_mode(SamplingMode::Flat);
    } else {
        group.sample_size(SAMPLES).sampling_mode(SamplingMode::Auto);
    }
}

fn bench_seal(c: &mut Criterion) {
    let key_raw = key_bytes();
    let ring_key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key_raw).expect("32-byte key"));
    let rc_key = Aes256Gcm::new_from_slice(&key_raw).expect("32-byte key");
    let mut group = c.benchmark_group("seal");
    group.warm_up_time(WARM_UP).measurement_time(MEASURE);
    for (len, label) in RAW_SIZES {
        size_config(&mut group, len);
        let mut buf = data(len);
        let mut counter = 0u64;
        group.bench_function(BenchmarkId::new("ring", label), |b| {
            b.iter(|| {
                let nonce = Nonce::assume_unique_for_key(counter_nonce(&mut counter));
                let tag = ring_key
                    .seal_in_place_separate_tag(nonce, Aad::empty(), black_box(&mut buf))
                    .expect("seal");
                tag.as_ref()[0]
            });
        });
        let mut buf = data(len);
        let mut counter = 0u64;
        group.bench_function(BenchmarkId::new("aes-gcm-crate", label), |b| {
            b.iter(|| {
                let nonce = counter_nonce(&mut counter);
                let tag = rc_key
                    .encrypt_in_place_detached(
                        AesGcmNonce::from_slice(&nonce),
                        b"",
                        black_box(&mut buf),
                    )
                    .expect("seal");
                tag[0]
            });
        });
    }
    group.finish();
}

fn bench_open(c: &mut Criterion) {
    let key_raw = key_bytes();
    let ring_key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key_raw).expect("32-byte key"));
    let rc_key = Aes256Gcm::new_from_slice(&key_raw).expect("32-byte key");
    let nonce = [7u8; 12];
    let mut group = c.benchmark_group("open");
    group.warm_up_time(WARM_UP).measurement_time(MEASURE);
    for (len, label) in RAW_SIZES {
        size_config(&mut group, len);

        // ring: ciphertext ‖ tag, opened in place on a fresh copy (the copy is not timed).
        let mut sealed = data(len);
        ring_key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::empty(),
                &mut sealed,
            )
            .expect("seal");
        group.bench_function(BenchmarkId::new("ring", label), |b| {
            b.iter_batched(
                || sealed.clone(),
                |mut buf| {
                    let plain = ring_key
                        .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut buf)
                        .expect("open");
                    black_box(plain.len());
                    buf
                },
                BatchSize::LargeInput,
            );
        });

        // aes-gcm crate: ciphertext and detached tag.
        let mut ciphertext = data(len);
        let tag = rc_key
            .encrypt_in_place_detached(AesGcmNonce::from_slice(&nonce), b"", &mut ciphertext)
            .expect("seal");
        group.bench_function(BenchmarkId::new("aes-gcm-crate", label), |b| {
            b.iter_batched(
                || ciphertext.clone(),
                |mut buf| {
                    rc_key
                        .decrypt_in_place_detached(
                            AesGcmNonce::from_slice(&nonce),
                            b"",
                            &mut buf,
                            &tag,
                        )
                        .expect("open");
                    buf
                },
                BatchSize::LargeInput,
            );
        });
    }
    group.finish();
}

/// The crypto part of the vault's read path (`Vault::read_field`) for a detached value: the
/// manifest checked against the field digest, one `OpeningKey` per field, every chunk opened
/// into one zeroizing buffer.
fn open_field(dek: &SecretKey, id: &[u8], name: &str, sealed: &SealedField) -> Vec<u8> {
    let SealedValue::Detached(detached) = &sealed.value else {
        panic!("the benchmark's values are sealed detached");
    };
    assert!(crypto::ct_eq(
        &record::manifest_digest(&detached.manifest),
        &sealed.digest
    ));
    let chunks = record::detached_chunks(detached);
    let n = u32::try_from(chunks.len()).expect("chunk count fits u32");
    let mut out = zeroize::Zeroizing::new(Vec::with_capacity(sealed.size));
    let opener = crypto::OpeningKey::new(dek);
    for (i, chunk) in chunks.iter().enumerate() {
        let ctx = record::chunk_context(id, name, u32::try_from(i).expect("fits u32"), n);
        opener
            .open_detached_append(&detached.manifest, i, &ctx, chunk, &mut out)
            .expect("open");
    }
    std::mem::take(&mut *out)
}

fn bench_field(c: &mut Criterion) {
    let dek = SecretKey::from_bytes(key_bytes());
    let sealing = SealingKey::new(&dek, 1);
    let mut group = c.benchmark_group("field_seal");
    group.warm_up_time(WARM_UP).measurement_time(MEASURE);
    for (len, label) in FIELD_SIZES {
        size_config(&mut group, len);
        let plain = data(len);
        // What the vault does with a blob field's value: the buffer it took from the decoded
        // request (set up untimed, as the raw benchmark's buffer is) is sealed where it lies,
        // and cut into the chunks the store keeps (views, no copy).
        group.bench_function(BenchmarkId::new("kluis", label), |b| {
            b.iter_batched(
                || zeroize::Zeroizing::new(plain.clone()),
                |value| {
                    let sealed =
                        record::seal_field(&sealing, &RECORD_ID, "cv_document", black_box(value))
                            .expect("seal");
                    let chunks = sealed.stored_chunks();
                    (sealed, chunks)
                },
                BatchSize::PerIteration,
            );
        });
    }
    group.finish();

    let mut group = c.benchmark_group("field_open");
    group.warm_up_time(WARM_UP).measurement_time(MEASURE);
    for (len, label) in FIELD_SIZES {
        size_config(&mut group, len);
        let plain = data(len);
        let sealed = record::seal_field(
            &sealing,
            &RECORD_ID,
            "cv_document",
            zeroize::Zeroizing::new(plain.clone()),
        )
        .expect("seal");
        assert_eq!(open_field(&dek, &RECORD_ID, "cv_document", &sealed), plain);
        group.bench_function(BenchmarkId::new("kluis", label), |b| {
            b.iter(|| open_field(&dek, &RECORD_ID, "cv_document", black_box(&sealed)));
        });
    }
    group.finish();
}

/// A typical record: 20 short text fields in 4 categories (values 10–200 bytes; the BSN, as
/// the vault stores it, is 9 digits).
const RECORD20: [(&str, &[(&str, &str)]); 4] = [
    (
        "contact",
        &[
            ("full_name", "Johanna Maria de Vries-Bakker"),
            ("street", "Burgemeester van Roijensingel"),
            ("house_number", "112-bis A2"),
            ("postcode", "8011 CZ Zwolle"),
            ("city", "Hoogezand-Sappemeer"),
            ("country", "the Netherlands"),
            ("email", "johanna.devries-bakker@example.com"),
            ("phone", "+31 (0)6 1234 5678"),
        ],
    ),
    (
        "personal",
        &[
            ("date_of_birth", "1987-03-14"),
            ("gender", "non-binary"),
            ("nationality", "Dutch, Belgian"),
        ],
    ),
    (
        "identity",
        &[
            ("bsn", "111222333"),
            ("id_document_type", "residence_permit"),
            ("id_document_number", "NXC4R7T2L9"),
            ("id_document_expiry", "2031-11-30"),
            (
                "work_permit",
                "Not required: EU/EEA national with unrestricted access to the Dutch labour \
                 market. Residence document checked in person on 2024-02-01 by the branch \
                 office in Zwolle; no restrictions apply.",
            ),
        ],
    ),
    (
        "financial",
        &[
            ("iban", "NL91ABNA0417164300"),
            ("wage", "3125.50 EUR per month"),
            ("payroll_tax_credit", "true (since 2023)"),
            (
                "bank_account_holder",
                "J.M. de Vries-Bakker en/of P. Bakker",
            ),
        ],
    ),
];

const KEK_VERSION: u32 = 1;

fn dek_context(id: &[u8], category: &str) -> Vec<u8> {
    // Same shape as the vault's DEK-wrapping context (label, record, category, KEK version).
    crypto::context(&[
        b"kluis/v1/dek",
        id,
        category.as_bytes(),
        &KEK_VERSION.to_be_bytes(),
    ])
}

struct SealedCategory {
    category: &'static str,
    wrapped_dek: Vec<u8>,
    fields: Vec<(&'static str, SealedField)>,
}

fn encrypt_record(kek: &SecretKey, id: &[u8]) -> Vec<SealedCategory> {
    RECORD20
        .iter()
        .map(|(category, fields)| {
            let dek = SecretKey::generate().expect("rng");
            let wrapped_dek = crypto::seal(
                kek,
                KEK_VERSION,
                &dek_context(id, category),
                dek.expose_secret(),
            )
            .expect("wrap");
            let sealing = SealingKey::new(&dek, 1);
            let fields = fields
                .iter()
                .map(|(name, value)| {
                    // The vault seals the parsed value's own buffer.
                    let value = zeroize::Zeroizing::new(value.as_bytes().to_vec());
                    let sealed = record::seal_field(&sealing, id, name, value).expect("seal");
                    (*name, sealed)
                })
                .collect();
            SealedCategory {
                category,
                wrapped_dek,
                fields,
            }
        })
        .collect()
}

fn decrypt_record(kek: &SecretKey, id: &[u8], sealed: &[SealedCategory]) -> usize {
    let mut total = 0;
    for cat in sealed {
        let dek_bytes =
            crypto::open(kek, &dek_context(id, cat.category), &cat.wrapped_dek).expect("unwrap");
        let dek = SecretKey::from_bytes(dek_bytes.as_slice().try_into().expect("32-byte DEK"));
        for (name, field) in &cat.fields {
            // Short values: one envelope each.
            let SealedValue::Envelope(envelope) = &field.value else {
                panic!("{name}: a short value is one envelope");
            };
            let plain =
                crypto::open(&dek, &record::chunk_context(id, name, 0, 1), envelope).expect("open");
            total += plain.len();
        }
    }
    total
}

/// Checks the record's shape (20 fields, value sizes) and returns its plaintext size; fails
/// before any measurement starts.
fn check_record20() -> usize {
    let mut field_count = 0;
    let mut plaintext_bytes = 0;
    for (_, fields) in RECORD20 {
        for (name, value) in fields {
            // 10–200 bytes, except the BSN: a normalised BSN is always 9 digits.
            let min = if *name == "bsn" { 9 } else { 10 };
            assert!(
                (min..=200).contains(&value.len()),
                "{name}: {} bytes",
                value.len()
            );
            field_count += 1;
            plaintext_bytes += value.len();
        }
    }
    assert_eq!(field_count, 20);
    let kek = SecretKey::from_bytes(key_bytes());
    let sealed = encrypt_record(&kek, &RECORD_ID);
    assert_eq!(decrypt_record(&kek, &RECORD_ID, &sealed), plaintext_bytes);
    plaintext_bytes
}

fn bench_record20(c: &mut Criterion) {
    let plaintext_bytes = check_record20();
    let kek = SecretKey::from_bytes(key_bytes());
    let id = RECORD_ID;
    let sealed = encrypt_record(&kek, &id);

    let mut group = c.benchmark_group("envelope");
    group
        .warm_up_time(WARM_UP)
        .measurement_time(MEASURE)
        .sample_size(SAMPLES)
        .throughput(Throughput::Bytes(plaintext_bytes as u64));
    group.bench_function(BenchmarkId::new("record20", "encrypt"), |b| {
        b.iter(|| encrypt_record(&kek, black_box(&id)));
    });
    group.bench_function(BenchmarkId::new("record20", "decrypt"), |b| {
        b.iter(|| decrypt_record(&kek, black_box(&id), black_box(&sealed)));
    });
    group.finish();
}

/// Criterion's output directory (`$CRITERION_HOME`, else `$CARGO_TARGET_DIR/criterion`, else
/// `target/criterion`, relative to the package root where `cargo bench` runs benches).
fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from);
    target.join("criterion")
}

/// Time per iteration in nanoseconds, as criterion reports it (slope if sampled linearly,
/// mean otherwise), from the last run of `group/function/param`.
fn estimate_ns(group: &str, function: &str, param: &str) -> Option<f64> {
    let path = criterion_dir()
        .join(group)
        .join(function)
        .join(param)
        .join("new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let pick = |k: &str| json.get(k)?.get("point_estimate")?.as_f64();
    pick("slope").or_else(|| pick("mean"))
}

fn gib_per_s(len: usize, ns: f64) -> f64 {
    len as f64 / (ns * 1e-9) / (1024.0 * 1024.0 * 1024.0)
}

fn fmt_gib(len: usize, ns: Option<f64>) -> String {
    ns.map_or_else(|| "-".into(), |ns| format!("{:.2}", gib_per_s(len, ns)))
}

fn summary() {
    println!();
    println!(
        "== summary (GiB/s; latest criterion estimate of each benchmark in {}) ==",
        criterion_dir().display()
    );
    println!(
        "{:>6}  {:>9} {:>9} {:>9} {:>9}  {:>10} {:>7}  {:>10} {:>7}",
        "size",
        "seal ring",
        "seal rc",
        "open ring",
        "open rc",
        "field_seal",
        "fs/ring",
        "field_open",
        "fo/ring"
    );
    let ratio = |ring: Option<f64>, ours: Option<f64>| match (ring, ours) {
        (Some(r), Some(f)) => format!("{:.2}", r / f),
        _ => "-".into(),
    };
    for (len, label) in RAW_SIZES {
        let field = FIELD_SIZES.iter().any(|(l, _)| *l == len);
        let field_est = |group: &str| field.then(|| estimate_ns(group, "kluis", label)).flatten();
        let (seal_ring, open_ring) = (
            estimate_ns("seal", "ring", label),
            estimate_ns("open", "ring", label),
        );
        let (field_seal, field_open) = (field_est("field_seal"), field_est("field_open"));
        println!(
            "{:>6}  {:>9} {:>9} {:>9} {:>9}  {:>10} {:>7}  {:>10} {:>7}",
            label,
            fmt_gib(len, seal_ring),
            fmt_gib(len, estimate_ns("seal", "aes-gcm-crate", label)),
            fmt_gib(len, open_ring),
            fmt_gib(len, estimate_ns("open", "aes-gcm-crate", label)),
            fmt_gib(len, field_seal),
            ratio(seal_ring, field_seal),
            fmt_gib(len, field_open),
            ratio(open_ring, field_open),
        );
    }
    for op in ["encrypt", "decrypt"] {
        if let Some(ns) = estimate_ns("envelope", "record20", op) {
            println!("envelope/record20/{op}: {:.2} µs per record", ns / 1000.0);
        }
    }
    println!(
        "(rc = aes-gcm crate; fs/ring = field_seal/kluis ÷ seal/ring throughput, target ≥ 0.80 \
         from 64 KiB; fo/ring = field_open/kluis ÷ open/ring)"
    );
}

fn main() {
    // As the `kluis` binary does at start (src/main.rs).
    if let Err(e) = kluis::server::no_huge_pages() {
        eprintln!("crypto bench: could not turn off transparent huge pages: {e}");
    }
    check_record20();
    let started = std::time::Instant::now();
    let (cpu_start, busy_start) = (process_cpu(), machine_busy());
    let mut c = Criterion::default().without_plots().configure_from_args();
    bench_seal(&mut c);
    bench_open(&mut c);
    bench_field(&mut c);
    bench_record20(&mut c);
    c.final_summary();
    // Under `cargo test --benches` criterion only checks that each benchmark runs once.
    if std::env::args().any(|a| a == "--bench") {
        summary();
        if let (Some(c0), Some(c1), Some(b0), Some(b1)) =
            (cpu_start, process_cpu(), busy_start, machine_busy())
        {
            let secs = started.elapsed().as_secs_f64();
            let other = (b1.saturating_sub(b0).as_secs_f64() - c1.saturating_sub(c0).as_secs_f64())
                .max(0.0)
                / secs;
            println!(
                "rest of the machine during this run: {other:.2} cores on average (criterion runs on \
                 one core; well above 0.1 means the figures are disturbed)"
            );
        }
    }
}
