//! Stored data that was tampered with surfaces as DATA_LOSS naming record and field, never a
//! panic, and never spreads to other records. A wrong master key refuses start-up.

use kluis::proto::{CreateRecordRequest, GetRecordRequest};
use kluis::record::{self, StoredRecord};
use kluis::store::{Batch, Keyspace, SledStore, Store};
use prost::Message;
use tonic::Code;

use crate::helpers::*;

/// The recruiter's search by e-mail address.
async fn find_email(vault: &TestVault, email: &str) -> Vec<String> {
    vault
        .client("recruiter")
        .await
        .find_records(kluis::proto::FindRecordsRequest {
            purpose: "recruitment".into(),
            field_name: "email".into(),
            value: email.into(),
        })
        .await
        .expect("find")
        .into_inner()
        .record_ids
}

async fn create(vault: &TestVault, email: &str) -> String {
    let mut c = vault.client("recruiter").await;
    c.create_record(CreateRecordRequest {
        purpose: "recruitment".into(),
        fields: fields(&[("email", text(email)), ("full_name", text("Someone"))]),
    })
    .await
    .expect("create")
    .into_inner()
    .record_id
}

async fn get(
    vault: &TestVault,
    id: &str,
    names: &[&str],
) -> Result<kluis::proto::GetRecordResponse, tonic::Status> {
    let mut c = vault.client("recruiter").await;
    c.get_record(GetRecordRequest {
        record_id: id.into(),
        purpose: "recruitment".into(),
        field_names: names.iter().map(|s| s.to_string()).collect(),
    })
    .await
    .map(|r| r.into_inner())
}

/// The chunk entries of `field` in record `id` in the `fields` keyspace (fields too large to
/// live in the header).
async fn chunks(store: &SledStore, id: &str, field: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut entries = stored_entries(store, id, field).await;
    entries.retain(|(key, _)| !key.ends_with(&record::MANIFEST_CHUNK.to_be_bytes()));
    entries
}

/// Every `fields` entry of `field` in record `id`: its chunks and, for a value sealed
/// detached, its manifest (chunk number `u32::MAX`, last).
async fn stored_entries(store: &SledStore, id: &str, field: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    let uuid = uuid::Uuid::parse_str(id).expect("uuid");
    let mut prefix = uuid.as_bytes().to_vec();
    prefix.extend_from_slice(field.as_bytes());
    prefix.push(0);
    store
        .scan(Keyspace::Fields, &prefix, None, 100)
        .await
        .expect("scan")
}

/// The stored header of record `id`, decoded but not checked.
async fn stored_header(store: &SledStore, id: &str) -> StoredRecord {
    let uuid = uuid::Uuid::parse_str(id).expect("uuid");
    let raw = store
        .get(Keyspace::Records, uuid.as_bytes())
        .await
        .expect("get")
        .expect("header");
    StoredRecord::decode(raw.as_slice()).expect("decode header")
}

/// The first chunk envelope of `field` in record `id`, wherever it is stored: in the record
/// header (short values) or in the `fields` keyspace.
async fn first_chunk(store: &SledStore, id: &str, field: &str) -> Vec<u8> {
    let header = stored_header(store, id).await;
    match header.inline.get(field) {
        Some(chunk) => chunk.clone(),
        None => chunks(store, id, field).await.remove(0).1,
    }
}

/// Replaces the first chunk envelope of `field` in record `id` where it is stored.
async fn set_first_chunk(store: &SledStore, id: &str, field: &str, chunk: Vec<u8>) {
    let uuid = uuid::Uuid::parse_str(id).expect("uuid");
    let mut header = stored_header(store, id).await;
    let mut batch = Batch::default();
    if let Some(slot) = header.inline.get_mut(field) {
        *slot = chunk;
        batch.put(
            Keyspace::Records,
            uuid.as_bytes().to_vec(),
            header.encode_to_vec(),
        );
    } else {
        let (key, _) = chunks(store, id, field).await.remove(0);
        batch.put(Keyspace::Fields, key, chunk);
    }
    store.commit(batch).await.expect("tamper");
}

#[tokio::test]
async fn a_flipped_byte_in_a_field_is_data_loss_and_other_records_stay_readable() {
    let mut vault = spawn_vault().await;
    let a = create(&vault, "a@example.nl").await;
    let b = create(&vault, "b@example.nl").await;
    vault.stop().await;
    {
        let store = SledStore::open(&data_dir(&vault.dir)).expect("open store");
        let mut value = first_chunk(&store, &a, "email").await;
        let last = value.len() - 1;
        value[last] ^= 0x01;
        set_first_chunk(&store, &a, "email", value).await;
    }
    vault.start().await.expect("restart");

    let err = get(&vault, &a, &[]).await.err().expect("tampered");
    assert_eq!(err.code(), Code::DataLoss);
    assert!(
        err.message().contains(&a) && err.message().contains("email"),
        "{}",
        err.message()
    );
    // The untouched field of the same record is still readable on its own.
    let ok = get(&vault, &a, &["full_name"]).await.expect("other field");
    assert_eq!(text_of(&ok.fields["full_name"]), "Someone");
    let ok = get(&vault, &b, &[]).await.expect("other record");
    assert_eq!(text_of(&ok.fields["email"]), "b@example.nl");
}

#[tokio::test]
async fn ciphertext_swapped_between_records_is_data_loss() {
    let mut vault = spawn_vault().await;
    let a = create(&vault, "a@example.nl").await;
    let b = create(&vault, "b@example.nl").await;
    vault.stop().await;
    {
        let store = SledStore::open(&data_dir(&vault.dir)).expect("open store");
        let a_value = first_chunk(&store, &a, "email").await;
        set_first_chunk(&store, &b, "email", a_value).await;
    }
    vault.start().await.expect("restart");
    let err = get(&vault, &b, &["email"]).await.err().expect("swapped");
    assert_eq!(err.code(), Code::DataLoss);
    assert!(
        err.message().contains(&b) && err.message().contains("email"),
        "{}",
        err.message()
    );
    assert_eq!(
        text_of(&get(&vault, &a, &["email"]).await.expect("a intact").fields["email"]),
        "a@example.nl"
    );
}

/// The blind index is not MACed, but a hit counts only if the record's MACed header holds the
/// searched tag: an index entry planted in the store (pointing a search for one person at
/// another person's record) is left out of FindRecords.
#[tokio::test]
async fn a_planted_index_entry_does_not_make_a_search_return_another_record() {
    let mut vault = spawn_vault().await;
    let a = create(&vault, "a@example.nl").await;
    let b = create(&vault, "b@example.nl").await;
    vault.stop().await;
    {
        let store = SledStore::open(&data_dir(&vault.dir)).expect("open store");
        let a_id = uuid::Uuid::parse_str(&a).expect("uuid");
        let b_id = uuid::Uuid::parse_str(&b).expect("uuid");
        let entries = store
            .scan(Keyspace::Index, b"email\0", None, 100)
            .await
            .expect("scan index");
        let (a_key, _) = entries
            .into_iter()
            .find(|(k, _)| k.ends_with(a_id.as_bytes()))
            .expect("a's email index entry");
        // The same tag (a's address), pointing at b.
        let mut planted = a_key[..a_key.len() - 16].to_vec();
        planted.extend_from_slice(b_id.as_bytes());
        let mut batch = Batch::default();
        batch.put(Keyspace::Index, planted, Vec::new());
        store.commit(batch).await.expect("plant");
    }
    vault.start().await.expect("restart");
    let found = find_email(&vault, "a@example.nl").await;
    assert_eq!(
        found,
        vec![a.clone()],
        "only the record whose header holds the tag"
    );
    // b is still found by its own address.
    let found = find_email(&vault, "b@example.nl").await;
    assert_eq!(found, vec![b]);
}

#[tokio::test]
async fn headers_swapped_or_rolled_back_are_data_loss() {
    let mut vault = spawn_vault().await;
    let a = create(&vault, "a@example.nl").await;
    let b = create(&vault, "b@example.nl").await;
    vault.stop().await;
    {
        let store = SledStore::open(&data_dir(&vault.dir)).expect("open store");
        let a_id = uuid::Uuid::parse_str(&a).expect("uuid");
        let b_id = uuid::Uuid::parse_str(&b).expect("uuid");
        let a_header = store
            .get(Keyspace::Records, a_id.as_bytes())
            .await
            .expect("get")
            .expect("a");
        let mut batch = Batch::default();
        batch.put(Keyspace::Records, b_id.as_bytes().to_vec(), a_header);
        store.commit(batch).await.expect("swap headers");
    }
    vault.start().await.expect("restart");
    let err = get(&vault, &b, &[]).await.err().expect("swapped header");
    assert_eq!(err.code(), Code::DataLoss);
    assert!(
        err.message().contains(&b) && err.message().contains("header"),
        "{}",
        err.message()
    );
    // Listing leaves the damaged record out and still lists the others, page after page.
    let mut c = vault.client("recruiter").await;
    let mut listed = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_records(kluis::proto::ListRecordsRequest {
                page_size: 1,
                page_token: token.clone(),
            })
            .await
            .expect("list")
            .into_inner();
        listed.extend(page.records.into_iter().map(|r| r.record_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(listed, vec![a]);
}

#[tokio::test]
async fn a_field_rolled_back_to_an_older_ciphertext_is_data_loss() {
    let mut vault = spawn_vault().await;
    let a = create(&vault, "old@example.nl").await;
    vault.stop().await;
    let old = {
        let store = SledStore::open(&data_dir(&vault.dir)).expect("open store");
        first_chunk(&store, &a, "email").await
    };
    vault.start().await.expect("restart");
    let mut c = vault.client("recruiter").await;
    c.update_record(kluis::proto::UpdateRecordRequest {
        record_id: a.clone(),
        purpose: "recruitment".into(),
        expected_revision: 0,
        set: fields(&[("email", text("new@example.nl"))]),
        clear: vec![],
    })
    .await
    .expect("update");
    vault.stop().await;
    {
        // Same record, same field, same DEK, valid AEAD: only the header's digest catches it.
        let store = SledStore::open(&data_dir(&vault.dir)).expect("open store");
        set_first_chunk(&store, &a, "email", old).await;
    }
    vault.start().await.expect("restart");
    let err = get(&vault, &a, &["email"])
        .await
        .err()
        .expect("rolled back");
    assert_eq!(err.code(), Code::DataLoss);
}

#[tokio::test]
async fn a_wrong_master_key_refuses_to_start() {
    let mut vault = spawn_vault().await;
    create(&vault, "a@example.nl").await;
    vault.stop().await;
    let other = kluis::crypto::SecretKey::generate()
        .expect("rng")
        .to_hex()
        .to_string();
    let err = match vault.start_with_master(&other).await {
        Ok(_) => panic!("started with a wrong master key"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("master key does not match"), "{err}");
    // It names the key's source and the data directory (review 30).
    assert!(
        err.contains("(master key from the key given; data directory ")
            && err.contains(&vault.dir.path().display().to_string()),
        "{err}"
    );
    vault.start().await.expect("the right key still works");
}

/// A store remembers the key its checkpoints are signed with: an instance with another
/// signing key (a replaced key file, or an instance set up on its own) refuses to start
/// instead of signing checkpoints the others would take for forgeries.
#[tokio::test]
async fn another_audit_signing_key_refuses_to_start() {
    let mut vault = spawn_vault().await;
    create(&vault, "a@example.nl").await;
    vault.stop().await;
    let key = vault.dir.path().join("keys").join("audit-signing.key");
    let original = std::fs::read(&key).expect("signing key");
    let public =
        std::fs::read(vault.dir.path().join("keys").join("audit-signing.pub")).expect("public key");
    // Lost: not made afresh over a signed store.
    std::fs::remove_file(&key).expect("remove");
    let err = match vault.start().await {
        Ok(()) => panic!("started without its signing key"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("is missing") && err.contains("restore the file"),
        "{err}"
    );
    assert!(!key.exists(), "no new key was made");
    // Replaced by another key.
    let other = tempfile::tempdir().expect("tempdir");
    kluis::audit::Signer::load_or_create(&other.path().join("k"), true).expect("other key");
    std::fs::copy(other.path().join("k"), &key).expect("replace");
    let err = match vault.start().await {
        Ok(()) => panic!("started with another signing key"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("is not the key this store's checkpoints are signed with")
            && err.contains("audit-signing.key"),
        "{err}"
    );
    // A store from before the key was recorded (no `audit/signing-key`), with its key file
    // lost: its checkpoints still refuse a fresh key.
    std::fs::remove_file(&key).expect("remove");
    {
        let store = SledStore::open(&data_dir(&vault.dir)).expect("open store");
        let mut b = Batch::default();
        b.delete(Keyspace::Meta, kluis::audit::META_SIGNING_KEY.to_vec());
        store.commit(b).await.expect("drop the recorded key");
    }
    let err = match vault.start().await {
        Ok(()) => panic!("started without its signing key"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("holds audit checkpoints signed with it"),
        "{err}"
    );
    assert!(!key.exists(), "no new key was made");
    std::fs::write(&key, original).expect("restore");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    assert_eq!(
        std::fs::read(vault.dir.path().join("keys").join("audit-signing.pub")).expect("public"),
        public,
        "the public key file was left alone"
    );
    vault.start().await.expect("the original key still works");
}

/// Role-scoped decryption is cryptographic: with the identity data key and an identity field
/// destroyed in the store, a recruiter's read (which never unwraps that key) still succeeds,
/// while payroll's read of the same record reports the damage.
#[tokio::test]
async fn reads_never_touch_keys_or_fields_of_categories_they_do_not_return() {
    let mut vault = spawn_vault().await;
    let a = create(&vault, "scoped@example.nl").await;
    let mut payroll = vault.client("payroll").await;
    payroll
        .update_record(kluis::proto::UpdateRecordRequest {
            record_id: a.clone(),
            purpose: "payroll".into(),
            expected_revision: 0,
            set: fields(&[("bsn", text("111222333"))]),
            clear: vec![],
        })
        .await
        .expect("payroll adds bsn");
    vault.stop().await;
    {
        let store = SledStore::open(&data_dir(&vault.dir)).expect("open store");
        set_first_chunk(&store, &a, "bsn", vec![0u8; 64]).await;
    }
    vault.start().await.expect("restart");
    let got = get(&vault, &a, &[])
        .await
        .expect("recruiter read unaffected");
    assert_eq!(text_of(&got.fields["email"]), "scoped@example.nl");
    assert_eq!(got.withheld, ["bsn"]);
    let mut payroll = vault.client("payroll").await;
    let err = payroll
        .get_record(GetRecordRequest {
            record_id: a.clone(),
            purpose: "payroll".into(),
            field_names: vec![],
        })
        .await
        .err()
        .expect("payroll sees the damage");
    assert_eq!(err.code(), Code::DataLoss);
    assert!(err.message().contains("bsn"), "{}", err.message());
}

/// Values too large for the header live as chunks in the `fields` keyspace, sealed detached
/// (ciphertext only, nonces and tags in a manifest): a flipped byte in one chunk, a chunk
/// swapped in from another record, a flipped byte of the manifest, another record's manifest
/// or none at all is DATA_LOSS naming the field, and the record's short fields (kept in its
/// header) stay readable.
#[tokio::test]
async fn a_damaged_chunk_of_a_large_field_is_data_loss_naming_the_field() {
    let mut vault = spawn_vault().await;
    let mut c = vault.client("recruiter").await;
    let mut ids = Vec::new();
    for n in 0..5u8 {
        let cv: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8 ^ n).collect();
        let id = create_with(
            &mut c,
            "recruitment",
            &[
                ("full_name", text("Someone")),
                ("cv_document", blob(&cv, "application/pdf")),
            ],
        )
        .await;
        ids.push(id);
    }
    vault.stop().await;
    {
        let store = SledStore::open(&data_dir(&vault.dir)).expect("open store");
        let mut stored = Vec::new();
        for id in &ids {
            let entries = stored_entries(&store, id, "cv_document").await;
            assert_eq!(
                entries.len(),
                4,
                "40 000 bytes are three 16 KiB chunks and a manifest"
            );
            let manifest = entries[3].clone();
            assert!(manifest.0.ends_with(&[0xff; 4]));
            assert_eq!(manifest.1.len(), 6 + 3 * 28, "header and three nonce ‖ tag");
            // The chunks hold the ciphertext alone: 16 384 + 16 384 + 7 232 bytes.
            let sizes: Vec<usize> = entries[..3].iter().map(|(_, v)| v.len()).collect();
            assert_eq!(sizes, [16_384, 16_384, 7_232]);
            stored.push(entries);
        }
        let mut batch = Batch::default();
        // a: one flipped byte in its second chunk.
        let (key, mut value) = stored[0][1].clone();
        value[40] ^= 0x80;
        batch.put(Keyspace::Fields, key, value);
        // b: a's first chunk in place of its own.
        batch.put(
            Keyspace::Fields,
            stored[1][0].0.clone(),
            stored[0][0].1.clone(),
        );
        // c: one flipped byte in its manifest (the second chunk's tag).
        let (key, mut value) = stored[2][3].clone();
        value[6 + 28 + 20] ^= 1;
        batch.put(Keyspace::Fields, key, value);
        // d: a's manifest in place of its own.
        batch.put(
            Keyspace::Fields,
            stored[3][3].0.clone(),
            stored[0][3].1.clone(),
        );
        // e: no manifest.
        batch.delete(Keyspace::Fields, stored[4][3].0.clone());
        store.commit(batch).await.expect("tamper");
    }
    vault.start().await.expect("restart");
    for id in &ids {
        let err = get(&vault, id, &["cv_document"])
            .await
            .err()
            .expect("damaged");
        assert_eq!(err.code(), Code::DataLoss);
        assert!(
            err.message().contains(id.as_str()) && err.message().contains("cv_document"),
            "{}",
            err.message()
        );
        let ok = get(&vault, id, &["full_name"]).await.expect("short field");
        assert_eq!(text_of(&ok.fields["full_name"]), "Someone");
    }
}

/// One damaged record does not make the others with the same value unfindable, and a search
/// never names it: it is left out (reading it answers DATA_LOSS).
#[tokio::test]
async fn a_damaged_record_is_left_out_of_a_search() {
    let mut vault = spawn_vault().await;
    let damaged = create(&vault, "shared@example.nl").await;
    let intact = create(&vault, "shared@example.nl").await;
    vault.stop().await;
    damage_header(&vault, &damaged).await;
    vault.start().await.expect("restart");
    let found = find_email(&vault, "shared@example.nl").await;
    assert_eq!(found, vec![intact.clone()]);
    let err = get(&vault, &damaged, &["email"])
        .await
        .err()
        .expect("damaged");
    assert_eq!(err.code(), Code::DataLoss);
    get(&vault, &intact, &["email"])
        .await
        .expect("intact reads");
}

/// Records a search leaves out (restricted ones here) do not shorten its answer: with 1002
/// records holding the value and two of them restricted, it still answers the 1000 others
/// (the index entries are read past the first 1000).
#[tokio::test]
async fn records_left_out_of_a_search_do_not_shorten_its_answer() {
    let vault = spawn_vault().await;
    let mut tasks = Vec::new();
    for t in 0..8 {
        let mut c = vault.client("recruiter").await;
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in (t..1002).step_by(8) {
                ids.push(
                    create_with(&mut c, "recruitment", &[("email", text("many@example.nl"))]).await,
                );
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.expect("join"));
    }
    assert_eq!(ids.len(), 1002);
    let mut po = vault.client("privacy_officer").await;
    for id in &ids[..2] {
        po.set_restriction(kluis::proto::SetRestrictionRequest {
            record_id: id.clone(),
            restricted: true,
            reason: "contested accuracy".into(),
        })
        .await
        .expect("restrict");
    }
    let found = find_email(&vault, "many@example.nl").await;
    assert_eq!(found.len(), 1000);
    assert!(!found.contains(&ids[0]) && !found.contains(&ids[1]));
}
