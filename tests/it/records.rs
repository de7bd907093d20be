//! Records API behaviour: round trips, validation, revisions, search, listing, auth.

use kluis::proto::{
    CreateRecordRequest, FindRecordsRequest, GetRecordRequest, ListRecordsRequest,
    UpdateRecordRequest,
};
use tonic::Code;

use crate::helpers::*;

#[tokio::test]
async fn recruiter_and_payroll_see_their_own_parts_of_one_record() {
    // Arrange
    let vault = spawn_vault().await;
    let mut recruiter = vault.client("recruiter").await;
    let mut payroll = vault.client("payroll").await;
    let created = recruiter
        .create_record(CreateRecordRequest {
            purpose: "recruitment".into(),
            fields: fields(&[
                ("full_name", text("Jan Jansen")),
                ("email", text("Jan.Jansen@Example.nl")),
                ("postcode", text("3311kg")),
                ("cv_document", blob(b"%PDF-1.7 cv", "application/pdf")),
            ]),
        })
        .await
        .expect("create")
        .into_inner();
    assert_eq!(created.revision, 1);
    let id = created.record_id;
    let rev = payroll
        .update_record(UpdateRecordRequest {
            record_id: id.clone(),
            purpose: "payroll".into(),
            expected_revision: 1,
            set: fields(&[
                ("bsn", text("111222333")),
                ("iban", text("nl91 abna 0417 1643 00")),
            ]),
            clear: vec![],
        })
        .await
        .expect("payroll update")
        .into_inner()
        .revision;
    assert_eq!(rev, 2);

    // Act
    let as_recruiter = recruiter
        .get_record(GetRecordRequest {
            record_id: id.clone(),
            purpose: "recruitment".into(),
            field_names: vec![],
        })
        .await
        .expect("get")
        .into_inner();
    let as_payroll = payroll
        .get_record(GetRecordRequest {
            record_id: id.clone(),
            purpose: "payroll".into(),
            field_names: vec![],
        })
        .await
        .expect("get")
        .into_inner();

    // Assert
    let mut names: Vec<_> = as_recruiter.fields.keys().cloned().collect();
    names.sort();
    assert_eq!(names, ["cv_document", "email", "full_name", "postcode"]);
    assert_eq!(text_of(&as_recruiter.fields["postcode"]), "3311 KG");
    // The local part keeps its case; the domain is stored in its IDNA ASCII form, lower case.
    assert_eq!(
        text_of(&as_recruiter.fields["email"]),
        "Jan.Jansen@example.nl"
    );
    let cv = &as_recruiter.fields["cv_document"];
    assert_eq!(cv.content_type, "application/pdf");
    assert!(
        cv.kind
            == Some(kluis::proto::field_value::Kind::Blob(
                b"%PDF-1.7 cv".to_vec()
            ))
    );
    let mut withheld = as_recruiter.withheld.clone();
    withheld.sort();
    assert_eq!(withheld, ["bsn", "iban"]);
    assert_eq!(as_recruiter.revision, 2);

    let mut names: Vec<_> = as_payroll.fields.keys().cloned().collect();
    names.sort();
    assert_eq!(names, ["bsn", "email", "full_name", "iban", "postcode"]);
    assert_eq!(text_of(&as_payroll.fields["iban"]), "NL91ABNA0417164300");
    assert_eq!(as_payroll.withheld, ["cv_document"]);
}

#[tokio::test]
async fn validation_errors_name_the_field_and_rule_and_change_nothing() {
    let vault = spawn_vault().await;
    let mut recruiter = vault.client("recruiter").await;
    let mut payroll = vault.client("payroll").await;
    let cases: Vec<(&str, CreateRecordRequest, Code, Vec<&str>)> = vec![
        (
            "missing purpose",
            CreateRecordRequest {
                purpose: "".into(),
                fields: fields(&[("full_name", text("A"))]),
            },
            Code::InvalidArgument,
            vec!["purpose", "required"],
        ),
        (
            "no fields",
            CreateRecordRequest {
                purpose: "recruitment".into(),
                fields: fields(&[]),
            },
            Code::InvalidArgument,
            vec!["fields"],
        ),
        (
            "unknown field",
            CreateRecordRequest {
                purpose: "recruitment".into(),
                fields: fields(&[("shoe_size", text("44"))]),
            },
            Code::InvalidArgument,
            vec!["fields.shoe_size", "unknown field"],
        ),
        (
            "bad email",
            CreateRecordRequest {
                purpose: "recruitment".into(),
                fields: fields(&[("email", text("not-an-email"))]),
            },
            Code::InvalidArgument,
            vec!["fields.email", "e-mail"],
        ),
        (
            "bad postcode",
            CreateRecordRequest {
                purpose: "recruitment".into(),
                fields: fields(&[("postcode", text("33110KG"))]),
            },
            Code::InvalidArgument,
            vec!["fields.postcode", "postcode"],
        ),
        (
            "bad date",
            CreateRecordRequest {
                purpose: "recruitment".into(),
                fields: fields(&[("date_of_birth", text("1990-02-30"))]),
            },
            Code::InvalidArgument,
            vec!["fields.date_of_birth", "YYYY-MM-DD"],
        ),
        (
            "bad phone",
            CreateRecordRequest {
                purpose: "recruitment".into(),
                fields: fields(&[("phone", text("call me"))]),
            },
            Code::InvalidArgument,
            vec!["fields.phone"],
        ),
        (
            "text too long",
            CreateRecordRequest {
                purpose: "recruitment".into(),
                fields: fields(&[("full_name", text(&"x".repeat(201)))]),
            },
            Code::ResourceExhausted,
            vec!["fields.full_name", "200"],
        ),
        (
            "blob type not allowed",
            CreateRecordRequest {
                purpose: "recruitment".into(),
                fields: fields(&[("cv_document", blob(b"GIF89a", "image/gif"))]),
            },
            Code::InvalidArgument,
            vec!["fields.cv_document", "content_type"],
        ),
        (
            "blob too large",
            CreateRecordRequest {
                purpose: "recruitment".into(),
                fields: fields(&[("photo", blob(&vec![0u8; 16 * 1024 * 1024 + 1], "image/png"))]),
            },
            Code::ResourceExhausted,
            vec!["fields.photo", "16777216"],
        ),
        (
            "text sent as blob",
            CreateRecordRequest {
                purpose: "recruitment".into(),
                fields: fields(&[("city", blob(b"Dordrecht", "text/plain"))]),
            },
            Code::InvalidArgument,
            vec!["fields.city"],
        ),
        (
            "empty value",
            CreateRecordRequest {
                purpose: "recruitment".into(),
                fields: fields(&[(
                    "city",
                    kluis::proto::FieldValue {
                        kind: None,
                        content_type: String::new(),
                    },
                )]),
            },
            Code::InvalidArgument,
            vec!["fields.city", "empty"],
        ),
    ];
    for (name, request, code, needles) in cases {
        // What was submitted, to check that the refusal does not echo it (see below).
        let submitted: Vec<String> = request
            .fields
            .values()
            .filter_map(|v| match &v.kind {
                Some(kluis::proto::field_value::Kind::Text(t)) => Some(t.clone()),
                Some(kluis::proto::field_value::Kind::Blob(b)) => {
                    Some(String::from_utf8_lossy(b).into_owned())
                }
                None => None,
            })
            .collect();
        let result = recruiter.create_record(request).await;
        eprintln!("case {name}");
        let message = result
            .as_ref()
            .err()
            .map(|s| s.message().to_string())
            .unwrap_or_default();
        assert_status(result, code, &needles);
        // The rejected value is never echoed back. Skipped: a value of one character ("A" in
        // "missing purpose", refused for its purpose, not its value): a single letter can be
        // part of any rule text.
        for value in submitted {
            if value.chars().count() <= 1 {
                continue;
            }
            assert!(
                !message.contains(&value),
                "case {name}: {message:?} echoes the rejected value {value:?}"
            );
        }
    }
    let payroll_cases: Vec<(&str, &str, &str, Vec<&str>)> = vec![
        (
            "bsn fails 11-test",
            "bsn",
            "111222334",
            vec!["fields.bsn", "11-test"],
        ),
        (
            "bsn too short",
            "bsn",
            "12345678",
            vec!["fields.bsn", "9 digits"],
        ),
        (
            "iban fails mod-97",
            "iban",
            "NL91ABNA0417164301",
            vec!["fields.iban", "mod-97"],
        ),
        (
            "wage not an amount",
            "wage",
            "lots",
            vec!["fields.wage", "amount"],
        ),
        (
            "unknown enum",
            "id_document_type",
            "library_card",
            vec!["fields.id_document_type", "passport"],
        ),
    ];
    for (name, field, value, needles) in payroll_cases {
        eprintln!("case {name}");
        let result = payroll
            .create_record(CreateRecordRequest {
                purpose: "payroll".into(),
                fields: fields(&[(field, text(value))]),
            })
            .await;
        let message = result
            .as_ref()
            .err()
            .map(|s| s.message().to_string())
            .unwrap_or_default();
        assert_status(result, Code::InvalidArgument, &needles);
        // The rejected value is never echoed back.
        assert!(
            !message.contains(value),
            "case {name}: {message:?} echoes the rejected value {value:?}"
        );
    }

    // Nothing was stored by any rejected request.
    let mut officer = vault.client("privacy_officer").await;
    let list = officer
        .list_records(ListRecordsRequest {
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .expect("list")
        .into_inner();
    assert!(
        list.records.is_empty(),
        "rejected requests stored {} records",
        list.records.len()
    );

    // Bad ids and tokens.
    assert_status(
        recruiter
            .get_record(GetRecordRequest {
                record_id: "nope".into(),
                purpose: "recruitment".into(),
                field_names: vec![],
            })
            .await,
        Code::InvalidArgument,
        &["record_id", "UUID"],
    );
    assert_status(
        officer
            .list_records(ListRecordsRequest {
                page_size: 10,
                page_token: "garbage!".into(),
            })
            .await,
        Code::InvalidArgument,
        &["page_token"],
    );
}

#[tokio::test]
async fn a_request_with_several_bad_fields_is_refused_for_the_first_by_name_every_time() {
    // Arrange: fields that each break a rule, sent in a map (no fixed order on the wire or
    // in the server).
    let vault = spawn_vault().await;
    let mut recruiter = vault.client("recruiter").await;
    let mut payroll = vault.client("payroll").await;
    let bad = || {
        fields(&[
            ("postcode", text("33110KG")),
            ("full_name", text(&"x".repeat(201))),
            ("phone", text("call me")),
            ("date_of_birth", text("1990-02-30")),
            ("email", text("not an address")),
        ])
    };

    // Act: the same requests, sent again and again.
    let mut named = std::collections::BTreeSet::new();
    for _ in 0..12 {
        let create = recruiter
            .create_record(CreateRecordRequest {
                purpose: "recruitment".into(),
                fields: bad(),
            })
            .await
            .expect_err("bad fields");
        named.insert((create.code() as i32, create.message().to_string()));
    }
    let id = recruiter
        .create_record(CreateRecordRequest {
            purpose: "recruitment".into(),
            fields: fields(&[("full_name", text("Jan Jansen"))]),
        })
        .await
        .expect("create")
        .into_inner()
        .record_id;
    let mut updated = std::collections::BTreeSet::new();
    for _ in 0..12 {
        let update = payroll
            .update_record(UpdateRecordRequest {
                record_id: id.clone(),
                purpose: "payroll".into(),
                expected_revision: 1,
                set: fields(&[
                    ("iban", text("NL00 BANK 0000 0000 00")),
                    ("bsn", text("111222334")),
                ]),
                clear: vec![],
            })
            .await
            .expect_err("bad fields");
        updated.insert((update.code() as i32, update.message().to_string()));
    }

    // The same with values of the wrong shape (checked before values are parsed), unknown
    // names, and names read and written without the right.
    let empty = || kluis::proto::FieldValue {
        kind: None,
        content_type: String::new(),
    };
    let typed_text = kluis::proto::FieldValue {
        kind: Some(kluis::proto::field_value::Kind::Text("Jan".into())),
        content_type: "text/plain".into(),
    };
    let mut shapes = std::collections::BTreeSet::new();
    let mut unknown = std::collections::BTreeSet::new();
    let mut reads = std::collections::BTreeSet::new();
    let mut writes = std::collections::BTreeSet::new();
    for i in 0..12 {
        let shape = recruiter
            .create_record(CreateRecordRequest {
                purpose: "recruitment".into(),
                fields: [
                    ("full_name".to_string(), typed_text.clone()),
                    ("street".to_string(), empty()),
                    ("city".to_string(), empty()),
                ]
                .into(),
            })
            .await
            .expect_err("bad shapes");
        shapes.insert(shape.message().to_string());
        let unknowns = recruiter
            .create_record(CreateRecordRequest {
                purpose: "recruitment".into(),
                fields: [
                    ("zzz_unknown".to_string(), empty()),
                    ("aaa_unknown".to_string(), empty()),
                    ("street".to_string(), empty()),
                ]
                .into(),
            })
            .await
            .expect_err("unknown names");
        unknown.insert(unknowns.message().to_string());
        // Every name is checked before any right, whatever order the names came in.
        let names = if i % 2 == 0 {
            vec!["bsn".to_string(), "nope".to_string()]
        } else {
            vec!["nope".to_string(), "bsn".to_string()]
        };
        let read = recruiter
            .get_record(GetRecordRequest {
                record_id: id.clone(),
                purpose: "recruitment".into(),
                field_names: names,
            })
            .await
            .err()
            .expect("an unknown name");
        reads.insert((read.code() as i32, read.message().to_string()));
        let write = recruiter
            .update_record(UpdateRecordRequest {
                record_id: id.clone(),
                purpose: "recruitment".into(),
                expected_revision: 0,
                set: fields(&[("nope", text("x"))]),
                clear: vec!["bsn".into()],
            })
            .await
            .expect_err("an unknown name");
        writes.insert((write.code() as i32, write.message().to_string()));
    }

    // Assert: one answer each, naming the field first by name.
    assert_eq!(shapes.len(), 1, "{shapes:?}");
    assert!(
        shapes
            .iter()
            .all(|m| m.starts_with("fields.city: value is empty")),
        "{shapes:?}"
    );
    assert_eq!(unknown.len(), 1, "{unknown:?}");
    assert!(
        unknown.iter().all(|m| m.starts_with("fields.aaa_unknown")),
        "{unknown:?}"
    );
    assert_eq!(reads.len(), 1, "{reads:?}");
    assert!(
        reads
            .iter()
            .all(|(c, m)| *c == Code::InvalidArgument as i32 && m.starts_with("field_names.nope")),
        "{reads:?}"
    );
    assert_eq!(writes.len(), 1, "{writes:?}");
    assert!(
        writes
            .iter()
            .all(|(c, m)| *c == Code::InvalidArgument as i32 && m.starts_with("set.nope")),
        "{writes:?}"
    );
    // A purpose that needs consent is refused for a create before any name or shape.
    let consent = recruiter
        .create_record(CreateRecordRequest {
            purpose: "talent_pool".into(),
            fields: [
                ("nope".to_string(), empty()),
                ("bsn".to_string(), typed_text.clone()),
            ]
            .into(),
        })
        .await
        .expect_err("no consent");
    assert_eq!(
        consent.code(),
        Code::FailedPrecondition,
        "{}",
        consent.message()
    );
    // The trail names a request's fields in name order, the same for the same request.
    let events = vault
        .audit_events(kluis::proto::QueryEventsRequest::default())
        .await;
    let refused: std::collections::BTreeSet<Vec<String>> = events
        .iter()
        .filter(|e| e.action == "CreateRecord" && e.outcome == "invalid")
        .map(|e| e.field_names.clone())
        .collect();
    assert!(refused.contains(&vec![
        "date_of_birth".to_string(),
        "email".into(),
        "full_name".into(),
        "phone".into(),
        "postcode".into(),
    ]));
    assert!(refused.contains(&vec![
        "city".to_string(),
        "full_name".into(),
        "street".into()
    ]));
    assert!(refused.contains(&vec!["street".to_string(), "<unknown>".into()]));
    assert!(refused.contains(&vec!["bsn".to_string(), "<unknown>".into()]));
    assert_eq!(refused.len(), 4, "{refused:?}");
    assert_eq!(named.len(), 1, "{named:?}");
    let (code, message) = named.pop_first().expect("one answer");
    assert_eq!(code, Code::InvalidArgument as i32, "{message}");
    assert!(message.starts_with("fields.date_of_birth"), "{message}");
    assert_eq!(updated.len(), 1, "{updated:?}");
    let (code, message) = updated.pop_first().expect("one answer");
    assert_eq!(code, Code::InvalidArgument as i32, "{message}");
    assert!(message.starts_with("set.bsn"), "{message}");
}

#[tokio::test]
async fn a_caller_without_the_right_is_denied_whatever_record_id_it_sends() {
    // Arrange: roles without the right each call needs, and ids that are not UUIDs.
    let vault = spawn_vault().await;
    let mut recruiter = vault.client("recruiter").await;
    let mut auditor = vault.client("auditor").await;
    let id = recruiter
        .create_record(CreateRecordRequest {
            purpose: "recruitment".into(),
            fields: fields(&[("full_name", text("Jan Jansen"))]),
        })
        .await
        .expect("create")
        .into_inner()
        .record_id;

    for bad_id in ["x", "111222333", ""] {
        // Act and assert: PERMISSION_DENIED, as with a well-formed id.
        let get = auditor
            .get_record(GetRecordRequest {
                record_id: bad_id.into(),
                purpose: "recruitment".into(),
                field_names: vec![],
            })
            .await
            .err()
            .expect("auditor may not read records");
        assert_eq!(get.code(), Code::PermissionDenied, "{}", get.message());
        let update = recruiter
            .update_record(UpdateRecordRequest {
                record_id: bad_id.into(),
                purpose: "recruitment".into(),
                expected_revision: 0,
                set: fields(&[("bsn", text("111222333"))]),
                clear: vec![],
            })
            .await
            .expect_err("recruiter may not write bsn");
        assert_eq!(
            update.code(),
            Code::PermissionDenied,
            "{}",
            update.message()
        );
        let erase = recruiter
            .erase_record(kluis::proto::EraseRecordRequest {
                record_id: bad_id.into(),
                reason: "asked".into(),
            })
            .await
            .expect_err("recruiter may not erase");
        assert_eq!(erase.code(), Code::PermissionDenied, "{}", erase.message());
        let export = recruiter
            .export_record(kluis::proto::ExportRecordRequest {
                record_id: bad_id.into(),
            })
            .await
            .err()
            .expect("recruiter may not export");
        assert_eq!(
            export.code(),
            Code::PermissionDenied,
            "{}",
            export.message()
        );
        let hold = recruiter
            .set_legal_hold(kluis::proto::SetLegalHoldRequest {
                record_id: bad_id.into(),
                hold: true,
                reason: "case".into(),
            })
            .await
            .expect_err("recruiter may not set a legal hold");
        assert_eq!(hold.code(), Code::PermissionDenied, "{}", hold.message());
    }
    // A stage that needs `set_employment`, by a role that may set the lifecycle but not that.
    for bad_id in ["x", ""] {
        let employed = recruiter
            .set_lifecycle(kluis::proto::SetLifecycleRequest {
                record_id: bad_id.into(),
                stage: "employed".into(),
                date: "2026-11-01".into(),
            })
            .await
            .expect_err("recruiter may not set employment");
        assert_eq!(
            employed.code(),
            Code::PermissionDenied,
            "{}",
            employed.message()
        );
    }
    // A field both set and cleared, by a role that may not write it at all.
    let both = recruiter
        .update_record(UpdateRecordRequest {
            record_id: id.clone(),
            purpose: "recruitment".into(),
            expected_revision: 0,
            set: fields(&[("bsn", text("111222333"))]),
            clear: vec!["bsn".into()],
        })
        .await
        .expect_err("recruiter may not write bsn");
    assert_eq!(both.code(), Code::PermissionDenied, "{}", both.message());
    // With the rights, a bad id is still INVALID_ARGUMENT naming the field.
    let mut officer = vault.client("privacy_officer").await;
    let export = officer
        .export_record(kluis::proto::ExportRecordRequest {
            record_id: "x".into(),
        })
        .await
        .err()
        .expect("not a UUID");
    assert_eq!(export.code(), Code::InvalidArgument, "{}", export.message());
    assert!(
        export.message().starts_with("record_id"),
        "{}",
        export.message()
    );
}

#[tokio::test]
async fn stale_revision_and_unknown_record() {
    let vault = spawn_vault().await;
    let mut recruiter = vault.client("recruiter").await;
    let id = create_with(
        &mut recruiter,
        "recruitment",
        &[("full_name", text("Piet"))],
    )
    .await;
    let update = |rev: u64, name: &str| UpdateRecordRequest {
        record_id: id.clone(),
        purpose: "recruitment".into(),
        expected_revision: rev,
        set: fields(&[("full_name", text(name))]),
        clear: vec![],
    };
    assert_eq!(
        recruiter
            .update_record(update(1, "Piet 2"))
            .await
            .expect("rev 1")
            .into_inner()
            .revision,
        2
    );
    assert_status(
        recruiter.update_record(update(1, "Piet 3")).await,
        Code::FailedPrecondition,
        &["expected_revision is 1", "revision 2"],
    );
    assert_eq!(
        recruiter
            .update_record(update(0, "Piet 4"))
            .await
            .expect("no check")
            .into_inner()
            .revision,
        3
    );
    let got = recruiter
        .get_record(GetRecordRequest {
            record_id: id.clone(),
            purpose: "recruitment".into(),
            field_names: vec!["full_name".into()],
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(text_of(&got.fields["full_name"]), "Piet 4");
    assert_eq!(got.revision, 3);

    let missing = uuid::Uuid::new_v4().to_string();
    assert_status(
        recruiter
            .get_record(GetRecordRequest {
                record_id: missing.clone(),
                purpose: "recruitment".into(),
                field_names: vec![],
            })
            .await,
        Code::NotFound,
        &[&missing],
    );
    assert_status(
        recruiter
            .update_record(UpdateRecordRequest {
                record_id: missing,
                purpose: "recruitment".into(),
                expected_revision: 0,
                set: fields(&[("city", text("Utrecht"))]),
                clear: vec![],
            })
            .await,
        Code::NotFound,
        &[],
    );
    assert_status(
        recruiter
            .update_record(UpdateRecordRequest {
                record_id: id.clone(),
                purpose: "recruitment".into(),
                expected_revision: 0,
                set: fields(&[("city", text("Utrecht"))]),
                clear: vec!["city".into()],
            })
            .await,
        Code::InvalidArgument,
        &["city", "both set and cleared"],
    );
    // A name given twice in `clear` is refused (the event names each field once).
    assert_status(
        recruiter
            .update_record(UpdateRecordRequest {
                record_id: id.clone(),
                purpose: "recruitment".into(),
                expected_revision: 0,
                set: Default::default(),
                clear: vec!["phone".into(), "city".into(), "phone".into()],
            })
            .await,
        Code::InvalidArgument,
        &["clear.phone", "twice"],
    );
}

#[tokio::test]
async fn concurrent_updates_with_the_same_expected_revision_admit_exactly_one() {
    let vault = spawn_vault().await;
    let mut recruiter = vault.client("recruiter").await;
    let id = create_with(
        &mut recruiter,
        "recruitment",
        &[("full_name", text("Race"))],
    )
    .await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut c = vault.client("recruiter").await;
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            c.update_record(UpdateRecordRequest {
                record_id: id,
                purpose: "recruitment".into(),
                expected_revision: 1,
                set: fields(&[("city", text(&format!("City {i}")))]),
                clear: vec![],
            })
            .await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.expect("join") {
            Ok(_) => ok += 1,
            Err(s) => assert_eq!(s.code(), Code::FailedPrecondition),
        }
    }
    assert_eq!(ok, 1);
}

/// Writers racing on one record conflict, and each retries with the value its first attempt
/// sealed in place (opened from those envelopes and sealed again): every write lands, and the
/// record holds exactly one writer's document and city.
#[tokio::test]
async fn racing_updates_without_a_revision_all_land_with_their_own_values() {
    let vault = spawn_vault().await;
    let mut recruiter = vault.client("recruiter").await;
    let id = create_with(
        &mut recruiter,
        "recruitment",
        &[("full_name", text("Race"))],
    )
    .await;
    let doc = |i: usize| {
        let mut d = document(40_000 + 4_099 * u32::try_from(i).expect("small"));
        d[0] = u8::try_from(i).expect("small");
        d
    };
    let writers = 8;
    let mut clients = Vec::new();
    for _ in 0..writers {
        clients.push(vault.client("recruiter").await);
    }
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(writers));
    let mut tasks = Vec::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        let id = id.clone();
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            c.update_record(UpdateRecordRequest {
                record_id: id,
                purpose: "recruitment".into(),
                expected_revision: 0,
                set: fields(&[
                    ("city", text(&format!("City {i}"))),
                    ("cv_document", blob(&doc(i), "application/pdf")),
                ]),
                clear: vec![],
            })
            .await
            .map(|r| r.into_inner().revision)
        }));
    }
    let mut revisions = Vec::new();
    for t in tasks {
        revisions.push(t.await.expect("join").expect("every racing update lands"));
    }
    revisions.sort_unstable();
    assert_eq!(revisions, (2..2 + writers as u64).collect::<Vec<_>>());
    let got = recruiter
        .get_record(GetRecordRequest {
            record_id: id,
            purpose: "recruitment".into(),
            field_names: vec!["city".into(), "cv_document".into()],
        })
        .await
        .expect("get")
        .into_inner();
    let Some(kluis::proto::field_value::Kind::Text(city)) = &got.fields["city"].kind else {
        panic!("city is text");
    };
    let i: usize = city
        .strip_prefix("City ")
        .and_then(|n| n.parse().ok())
        .expect("a writer's city");
    assert!(
        got.fields["cv_document"].kind == Some(kluis::proto::field_value::Kind::Blob(doc(i))),
        "the document is not the one written with {city}"
    );
}

#[tokio::test]
async fn blind_index_finds_by_normalised_value_and_follows_updates() {
    let vault = spawn_vault().await;
    let mut recruiter = vault.client("recruiter").await;
    let mut payroll = vault.client("payroll").await;
    let a = create_with(
        &mut recruiter,
        "recruitment",
        &[("email", text("Anna@Example.NL"))],
    )
    .await;
    let b = create_with(&mut payroll, "payroll", &[("bsn", text("123456782"))]).await;
    let find = |purpose: &str, field: &str, value: &str| FindRecordsRequest {
        purpose: purpose.into(),
        field_name: field.into(),
        value: value.into(),
    };

    // A blank value is missing, whatever the field's type (not a BSN or e-mail rule).
    for (client, purpose, field) in [
        (&mut payroll, "payroll", "bsn"),
        (&mut recruiter, "recruitment", "email"),
    ] {
        for blank in ["", " "] {
            let refused = client
                .find_records(find(purpose, field, blank))
                .await
                .expect_err("blank value");
            assert_eq!(refused.code(), Code::InvalidArgument);
            assert_eq!(
                refused.message(),
                "value: is required (the value to search for)"
            );
        }
    }
    let hits = recruiter
        .find_records(find("recruitment", "email", " anna@example.nl "))
        .await
        .expect("find")
        .into_inner();
    assert_eq!(hits.record_ids, std::slice::from_ref(&a));
    let hits = payroll
        .find_records(find("payroll", "bsn", "123 456 782"))
        .await
        .expect("find")
        .into_inner();
    assert_eq!(hits.record_ids, std::slice::from_ref(&b));

    // Update moves the index entry; clear removes it.
    recruiter
        .update_record(UpdateRecordRequest {
            record_id: a.clone(),
            purpose: "recruitment".into(),
            expected_revision: 0,
            set: fields(&[("email", text("anna@elsewhere.nl"))]),
            clear: vec![],
        })
        .await
        .expect("update");
    assert!(recruiter
        .find_records(find("recruitment", "email", "anna@example.nl"))
        .await
        .expect("find")
        .into_inner()
        .record_ids
        .is_empty());
    assert_eq!(
        recruiter
            .find_records(find("recruitment", "email", "ANNA@elsewhere.nl"))
            .await
            .expect("find")
            .into_inner()
            .record_ids,
        std::slice::from_ref(&a)
    );
    recruiter
        .update_record(UpdateRecordRequest {
            record_id: a.clone(),
            purpose: "recruitment".into(),
            expected_revision: 0,
            set: fields(&[]),
            clear: vec!["email".into()],
        })
        .await
        .expect("clear");
    assert!(recruiter
        .find_records(find("recruitment", "email", "anna@elsewhere.nl"))
        .await
        .expect("find")
        .into_inner()
        .record_ids
        .is_empty());

    // Rights and rules.
    assert_status(
        recruiter
            .find_records(find("recruitment", "bsn", "123456782"))
            .await,
        Code::PermissionDenied,
        &["bsn"],
    );
    assert_status(
        recruiter
            .find_records(find("recruitment", "full_name", "Anna"))
            .await,
        Code::InvalidArgument,
        &["field_name", "not searchable"],
    );
    assert_status(
        payroll
            .find_records(find("payroll", "bsn", "111222334"))
            .await,
        Code::InvalidArgument,
        &["value", "11-test"],
    );
    assert_status(
        payroll.find_records(find("", "bsn", "111222333")).await,
        Code::InvalidArgument,
        &["purpose"],
    );
}

#[tokio::test]
async fn list_pages_through_metadata_only() {
    let vault = spawn_vault().await;
    let mut recruiter = vault.client("recruiter").await;
    let mut ids = Vec::new();
    for i in 0..7 {
        ids.push(
            create_with(
                &mut recruiter,
                "recruitment",
                &[("full_name", text(&format!("Person {i}")))],
            )
            .await,
        );
    }
    ids.sort();
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = recruiter
            .list_records(ListRecordsRequest {
                page_size: 3,
                page_token: token,
            })
            .await
            .expect("list")
            .into_inner();
        assert!(page.records.len() <= 3);
        for r in &page.records {
            assert_eq!(r.revision, 1);
            assert_eq!(r.lifecycle, "applicant");
            assert_eq!(r.categories, ["contact"]);
            assert!(r.created_at.ends_with('Z'));
        }
        seen.extend(page.records.into_iter().map(|r| r.record_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        // A token is opaque and tagged (review 10): altered, made up from a record id (the
        // old form), or another listing's, it is refused and pages nothing.
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut raw = b64.decode(&token).expect("base64url");
        let mut altered = raw.clone();
        altered[0] ^= 1;
        raw.truncate(16);
        let events_like = b64.encode(5u64.to_be_bytes());
        for bad in [b64.encode(&altered), b64.encode(&raw), events_like] {
            assert_status(
                recruiter
                    .list_records(ListRecordsRequest {
                        page_size: 3,
                        page_token: bad,
                    })
                    .await,
                Code::InvalidArgument,
                &["page_token", "ListRecords"],
            );
        }
    }
    assert_eq!(seen, ids);
    let mut auditor = vault.client("auditor").await;
    assert_status(
        auditor
            .list_records(ListRecordsRequest {
                page_size: 0,
                page_token: String::new(),
            })
            .await,
        Code::PermissionDenied,
        &["auditor"],
    );
}

#[tokio::test]
async fn missing_and_bad_tokens_are_unauthenticated() {
    let vault = spawn_vault().await;
    let request = || GetRecordRequest {
        record_id: uuid::Uuid::new_v4().to_string(),
        purpose: "recruitment".into(),
        field_names: vec![],
    };
    let mut none = vault.client_with_token(None).await;
    assert_status(
        none.get_record(request()).await,
        Code::Unauthenticated,
        &["Bearer"],
    );
    let mut bad = vault
        .client_with_token(Some("Bearer kluis_not-a-real-token"))
        .await;
    assert_status(
        bad.get_record(request()).await,
        Code::Unauthenticated,
        &["invalid"],
    );
    let mut basic = vault.client_with_token(Some("Basic dXNlcjpwYXNz")).await;
    assert_status(
        basic.get_record(request()).await,
        Code::Unauthenticated,
        &["Bearer"],
    );
    let mut create = vault.client_with_token(None).await;
    assert_status(
        create
            .create_record(CreateRecordRequest {
                purpose: "recruitment".into(),
                fields: fields(&[("city", text("Delft"))]),
            })
            .await,
        Code::Unauthenticated,
        &[],
    );
}

#[tokio::test]
async fn sixteen_mib_documents_round_trip_and_sled_blob_files_stay_unused() {
    let vault = spawn_vault().await;
    let mut recruiter = vault.client("recruiter").await;
    let doc = document(16 * 1024 * 1024);
    let id = create_with(
        &mut recruiter,
        "recruitment",
        &[
            ("cv_document", blob(&doc, "application/pdf")),
            ("photo", blob(&doc[..3_000_000], "image/jpeg")),
        ],
    )
    .await;
    let got = recruiter
        .get_record(GetRecordRequest {
            record_id: id.clone(),
            purpose: "recruitment".into(),
            field_names: vec!["cv_document".into()],
        })
        .await
        .expect("get")
        .into_inner();
    assert!(
        got.fields["cv_document"].kind == Some(kluis::proto::field_value::Kind::Blob(doc.clone())),
        "16 MiB document differs"
    );
    assert!(!got.fields.contains_key("photo"));
    // Replace it: the old chunks go.
    recruiter
        .update_record(UpdateRecordRequest {
            record_id: id,
            purpose: "recruitment".into(),
            expected_revision: 0,
            set: fields(&[("cv_document", blob(&doc[..1000], "text/plain"))]),
            clear: vec![],
        })
        .await
        .expect("update");
    let blobs = data_dir(&vault.dir).join("blobs");
    let count = std::fs::read_dir(&blobs).map(|d| d.count()).unwrap_or(0);
    assert_eq!(count, 0, "sled wrote {count} unsynced blob files");
}

#[tokio::test]
async fn health_and_reflection_run_beside_records() {
    let vault = spawn_vault().await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", vault.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in ["kluis.v1.Records", "kluis.v1.Audit", "kluis.v1.Keys"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health")
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service}"
        );
    }
}

#[tokio::test]
async fn restart_keeps_data_and_indexes() {
    let mut vault = spawn_vault().await;
    let mut payroll = vault.client("payroll").await;
    let id = create_with(
        &mut payroll,
        "payroll",
        &[("bsn", text("111222333")), ("wage", text("2500"))],
    )
    .await;
    vault.restart().await;
    let mut payroll = vault.client("payroll").await;
    let got = payroll
        .get_record(GetRecordRequest {
            record_id: id.clone(),
            purpose: "payroll".into(),
            field_names: vec![],
        })
        .await
        .expect("get after restart")
        .into_inner();
    assert_eq!(text_of(&got.fields["bsn"]), "111222333");
    assert_eq!(text_of(&got.fields["wage"]), "2500.00");
    let hits = payroll
        .find_records(FindRecordsRequest {
            purpose: "payroll".into(),
            field_name: "bsn".into(),
            value: "111222333".into(),
        })
        .await
        .expect("find after restart")
        .into_inner();
    assert_eq!(hits.record_ids, [id]);
}

#[tokio::test]
async fn reflection_lists_the_services_in_v1_and_v1alpha() {
    use tonic_reflection::pb::{v1, v1alpha};
    let vault = spawn_vault().await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", vault.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");

    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("v1 reflection")
        .into_inner();
    let response = stream
        .message()
        .await
        .expect("message")
        .expect("a response");
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("not a service list");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"kluis.v1.Records".to_string()), "{names:?}");
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );

    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("v1alpha reflection")
        .into_inner();
    assert!(stream.message().await.expect("message").is_some());
}

#[tokio::test]
async fn a_request_over_max_request_bytes_is_resource_exhausted_and_changes_nothing() {
    let mut v = spawn_vault().await;
    v.stop().await;
    v.tweak = Some(|s| s.max_request_bytes = 1024 * 1024);
    v.start().await.expect("restart with a 1 MiB request limit");
    let mut recruiter = v.client("recruiter").await;
    // Within every field's own limit (16 MiB), over the whole request's.
    let refused = recruiter
        .create_record(CreateRecordRequest {
            purpose: "recruitment".into(),
            fields: fields(&[(
                "cv_document",
                blob(&vec![b'%'; 2 * 1024 * 1024], "application/pdf"),
            )]),
        })
        .await;
    assert_status(
        refused,
        Code::ResourceExhausted,
        &["request too large", "1048576", "max_request_bytes"],
    );
    // The refusal of an authenticated caller is in the audit trail like any other.
    let events = v
        .audit_events(kluis::proto::QueryEventsRequest::default())
        .await;
    assert!(
        events.iter().any(|e| e.action == "CreateRecord"
            && e.principal == "test-recruiter"
            && e.outcome == "invalid"
            && e.record_id.is_empty()),
        "{events:?}"
    );
    let listed = recruiter
        .list_records(ListRecordsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(listed.records.is_empty(), "nothing was created");
    // Under the limit the same call goes through.
    recruiter
        .create_record(CreateRecordRequest {
            purpose: "recruitment".into(),
            fields: fields(&[("cv_document", blob(b"%PDF-1.7 cv", "application/pdf"))]),
        })
        .await
        .expect("a small request is served");
}

/// Purpose and rights come before values: a caller who may not write a field is denied,
/// whatever shape its value has; one who may gets the precise shape error.
#[tokio::test]
async fn rights_are_checked_before_the_shape_of_values() {
    let v = spawn_vault().await;
    let odd = kluis::proto::FieldValue {
        kind: Some(kluis::proto::field_value::Kind::Text("Zwolle".into())),
        content_type: "text/plain".into(),
    };
    let request = |purpose: &str| CreateRecordRequest {
        purpose: purpose.into(),
        fields: [("city".to_string(), odd.clone())].into_iter().collect(),
    };
    // The absence role may not write `city` (contact).
    assert_status(
        v.client("absence")
            .await
            .create_record(request("absence_management"))
            .await,
        Code::PermissionDenied,
        &["city"],
    );
    // Nor may a role use a purpose it does not have.
    assert_status(
        v.client("auditor")
            .await
            .create_record(request("recruitment"))
            .await,
        Code::PermissionDenied,
        &["recruitment"],
    );
    assert_status(
        v.client("recruiter")
            .await
            .create_record(request("recruitment"))
            .await,
        Code::InvalidArgument,
        &["fields.city", "content_type"],
    );
    let empty = CreateRecordRequest {
        purpose: "absence_management".into(),
        fields: [("city".to_string(), kluis::proto::FieldValue::default())]
            .into_iter()
            .collect(),
    };
    assert_status(
        v.client("absence").await.create_record(empty).await,
        Code::PermissionDenied,
        &["city"],
    );
    // A badly shaped `set` value does not hide a `clear` of a field the role may not write.
    let id = v
        .client("recruiter")
        .await
        .create_record(CreateRecordRequest {
            purpose: "recruitment".into(),
            fields: [("city".to_string(), text("Zwolle"))].into_iter().collect(),
        })
        .await
        .expect("create")
        .into_inner()
        .record_id;
    assert_status(
        v.client("recruiter")
            .await
            .update_record(UpdateRecordRequest {
                record_id: id,
                purpose: "recruitment".into(),
                expected_revision: 0,
                set: [("city".to_string(), odd.clone())].into_iter().collect(),
                clear: vec!["bsn".into()],
            })
            .await,
        Code::PermissionDenied,
        &["bsn"],
    );
}

#[tokio::test]
async fn record_ids_in_any_uuid_spelling_name_the_record_and_clearing_an_absent_field_counts() {
    let v = spawn_vault().await;
    let mut recruiter = v.client("recruiter").await;
    let id = create_with(
        &mut recruiter,
        "recruitment",
        &[("full_name", text("Sam Smit"))],
    )
    .await;
    let simple = id.replace('-', "");
    for spelling in [
        id.to_uppercase(),
        simple.clone(),
        format!("{{{id}}}"),
        format!("urn:uuid:{id}"),
    ] {
        let read = recruiter
            .get_record(GetRecordRequest {
                record_id: spelling.clone(),
                purpose: "recruitment".into(),
                field_names: vec!["full_name".into(), "full_name".into()],
            })
            .await
            .unwrap_or_else(|e| panic!("{spelling}: {e}"))
            .into_inner();
        assert_eq!(read.record_id, id, "answers carry the canonical form");
        assert_eq!(read.fields.len(), 1);
    }
    // Clearing a field the record does not hold: accepted, and a new revision.
    let updated = recruiter
        .update_record(UpdateRecordRequest {
            record_id: simple,
            purpose: "recruitment".into(),
            expected_revision: 1,
            set: fields(&[]),
            clear: vec!["email".into()],
        })
        .await
        .expect("clear an absent field")
        .into_inner();
    assert_eq!(updated.revision, 2);
    // The trail names the record in its canonical form whatever the spelling.
    let events = v
        .audit_events(kluis::proto::QueryEventsRequest::default())
        .await;
    assert!(events
        .iter()
        .filter(|e| e.action == "GetRecord" || e.action == "UpdateRecord")
        .all(|e| e.record_id == id && e.outcome == "ok"));
}
