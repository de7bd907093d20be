//! The default policy, table-driven: role × field category × operation → expected status.
//! The table is written out here, not derived from the policy code, so that it can fail.

use kluis::proto::{
    CreateRecordRequest, FindRecordsRequest, GetRecordRequest, UpdateRecordRequest,
};
use tonic::Code;

use crate::helpers::*;

/// One representative field per category, plus a second for blob-typed categories.
const FIELDS: &[(&str, &str)] = &[
    ("contact", "full_name"),
    ("contact", "email"),
    ("personal", "date_of_birth"),
    ("personal", "photo"),
    ("cv", "cv_document"),
    ("cv", "education"),
    ("identity", "bsn"),
    ("identity", "id_scan"),
    ("financial", "iban"),
    ("financial", "wage"),
    ("absence", "absence_periods"),
];

struct Row {
    role: &'static str,
    purpose: &'static str,
    reads: &'static [&'static str],
    writes: &'static [&'static str],
}

/// The table of default roles.
const MATRIX: &[Row] = &[
    Row {
        role: "recruiter",
        purpose: "recruitment",
        reads: &["contact", "personal", "cv"],
        writes: &["contact", "personal", "cv"],
    },
    Row {
        role: "payroll",
        purpose: "payroll",
        reads: &["contact", "identity", "financial"],
        writes: &["identity", "financial"],
    },
    Row {
        role: "absence",
        purpose: "absence_management",
        reads: &["contact", "absence"],
        writes: &["absence"],
    },
    Row {
        role: "privacy_officer",
        purpose: "data_subject_request",
        reads: &[
            "contact",
            "personal",
            "cv",
            "identity",
            "financial",
            "absence",
        ],
        writes: &[],
    },
    Row {
        role: "security_officer",
        purpose: "recruitment",
        reads: &[],
        writes: &[],
    },
    Row {
        role: "auditor",
        purpose: "recruitment",
        reads: &[],
        writes: &[],
    },
];

/// Purposes each role may use (the rest must be refused).
const PURPOSES: &[(&str, &[&str])] = &[
    (
        "recruiter",
        &["recruitment", "talent_pool", "personal_offers"],
    ),
    ("payroll", &["payroll"]),
    ("absence", &["absence_management"]),
    ("privacy_officer", &["data_subject_request"]),
    ("security_officer", &[]),
    ("auditor", &[]),
];

const ALL_PURPOSES: &[&str] = &[
    "recruitment",
    "talent_pool",
    "personal_offers",
    "payroll",
    "absence_management",
    "data_subject_request",
    "marketing",
];

fn expect(allowed: bool) -> Code {
    if allowed {
        Code::Ok
    } else {
        Code::PermissionDenied
    }
}

fn code_of<T>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// A record holding every field of `FIELDS`, written by the roles that may write them.
async fn full_record(vault: &TestVault) -> String {
    let mut recruiter = vault.client("recruiter").await;
    let mut payroll = vault.client("payroll").await;
    let mut absence = vault.client("absence").await;
    let pick = |cats: &[&str]| -> Vec<(&str, kluis::proto::FieldValue)> {
        FIELDS
            .iter()
            .filter(|(c, _)| cats.contains(c))
            .map(|(_, f)| (*f, sample_value(f)))
            .collect()
    };
    let id = recruiter
        .create_record(CreateRecordRequest {
            purpose: "recruitment".into(),
            fields: fields(&pick(&["contact", "personal", "cv"])),
        })
        .await
        .expect("recruiter creates")
        .into_inner()
        .record_id;
    payroll
        .update_record(UpdateRecordRequest {
            record_id: id.clone(),
            purpose: "payroll".into(),
            expected_revision: 0,
            set: fields(&pick(&["identity", "financial"])),
            clear: vec![],
        })
        .await
        .expect("payroll writes");
    absence
        .update_record(UpdateRecordRequest {
            record_id: id.clone(),
            purpose: "absence_management".into(),
            expected_revision: 0,
            set: fields(&pick(&["absence"])),
            clear: vec![],
        })
        .await
        .expect("absence writes");
    id
}

#[tokio::test]
async fn role_field_operation_matrix_of_the_default_policy() {
    let vault = spawn_vault().await;
    let id = full_record(&vault).await;
    let mut checked = 0;
    for row in MATRIX {
        let mut client = vault.client(row.role).await;
        for (category, field) in FIELDS {
            let may_read = row.reads.contains(category);
            let may_write = row.writes.contains(category);
            let ctx = format!("{} {} ({category})", row.role, field);

            let got = client
                .get_record(GetRecordRequest {
                    record_id: id.clone(),
                    purpose: row.purpose.into(),
                    field_names: vec![field.to_string()],
                })
                .await;
            let expected_read = if PURPOSES.iter().any(|(r, p)| *r == row.role && p.is_empty()) {
                Code::PermissionDenied
            } else {
                expect(may_read)
            };
            match got {
                Ok(r) => {
                    assert_eq!(expected_read, Code::Ok, "read {ctx}");
                    let r = r.into_inner();
                    assert_eq!(r.fields.len(), 1, "read {ctx}");
                    // The default policy shows BSN and IBAN masked to the privacy officer
                    // (tests/it/privacy.rs checks the masks); everything else in full.
                    if row.role == "privacy_officer" && matches!(*field, "bsn" | "iban") {
                        assert!(
                            text_of(&r.fields[*field]).starts_with("*****"),
                            "read {ctx}"
                        );
                    } else {
                        assert!(
                            r.fields[*field].kind == sample_value(field).kind,
                            "read {ctx}: value differs"
                        );
                    }
                }
                Err(s) => assert_eq!(s.code(), expected_read, "read {ctx}: {}", s.message()),
            }

            let update = client
                .update_record(UpdateRecordRequest {
                    record_id: id.clone(),
                    purpose: row.purpose.into(),
                    expected_revision: 0,
                    set: fields(&[(field, sample_value(field))]),
                    clear: vec![],
                })
                .await;
            assert_eq!(code_of(update), expect(may_write), "update {ctx}");

            let clear = client
                .update_record(UpdateRecordRequest {
                    record_id: id.clone(),
                    purpose: row.purpose.into(),
                    expected_revision: 0,
                    set: fields(&[]),
                    clear: vec![field.to_string()],
                })
                .await;
            assert_eq!(code_of(clear), expect(may_write), "clear {ctx}");
            if may_write {
                // Put it back for the next rows.
                client
                    .update_record(UpdateRecordRequest {
                        record_id: id.clone(),
                        purpose: row.purpose.into(),
                        expected_revision: 0,
                        set: fields(&[(field, sample_value(field))]),
                        clear: vec![],
                    })
                    .await
                    .expect("restore");
            }

            let create = client
                .create_record(CreateRecordRequest {
                    purpose: row.purpose.into(),
                    fields: fields(&[(field, sample_value(field))]),
                })
                .await;
            assert_eq!(code_of(create), expect(may_write), "create {ctx}");
            checked += 4;
        }
    }
    assert_eq!(checked, MATRIX.len() * FIELDS.len() * 4);
}

#[tokio::test]
async fn get_without_names_returns_exactly_the_readable_fields_and_withholds_the_rest() {
    let vault = spawn_vault().await;
    let id = full_record(&vault).await;
    for row in MATRIX.iter().filter(|r| !r.reads.is_empty()) {
        let mut client = vault.client(row.role).await;
        let got = client
            .get_record(GetRecordRequest {
                record_id: id.clone(),
                purpose: row.purpose.into(),
                field_names: vec![],
            })
            .await
            .expect("get")
            .into_inner();
        let mut returned: Vec<_> = got.fields.keys().map(String::as_str).collect();
        returned.sort_unstable();
        let mut withheld: Vec<_> = got.withheld.iter().map(String::as_str).collect();
        withheld.sort_unstable();
        let mut want_returned: Vec<_> = FIELDS
            .iter()
            .filter(|(c, _)| row.reads.contains(c))
            .map(|(_, f)| *f)
            .collect();
        want_returned.sort_unstable();
        let mut want_withheld: Vec<_> = FIELDS
            .iter()
            .filter(|(c, _)| !row.reads.contains(c))
            .map(|(_, f)| *f)
            .collect();
        want_withheld.sort_unstable();
        assert_eq!(returned, want_returned, "{}", row.role);
        assert_eq!(withheld, want_withheld, "{}", row.role);
    }
}

#[tokio::test]
async fn purposes_are_checked_per_role() {
    let vault = spawn_vault().await;
    let id = full_record(&vault).await;
    // talent_pool rests on consent (tests/it/privacy.rs): give it, so that only the role and
    // purpose decide here.
    vault
        .client("recruiter")
        .await
        .set_consent(kluis::proto::SetConsentRequest {
            record_id: id.clone(),
            purpose: "talent_pool".into(),
            granted: true,
        })
        .await
        .expect("consent");
    for (role, allowed) in PURPOSES {
        let mut client = vault.client(role).await;
        for purpose in ALL_PURPOSES {
            let got = client
                .get_record(GetRecordRequest {
                    record_id: id.clone(),
                    purpose: purpose.to_string(),
                    field_names: vec!["full_name".into()],
                })
                .await;
            let reads_contact = MATRIX
                .iter()
                .any(|r| r.role == *role && r.reads.contains(&"contact"));
            let want = if allowed.contains(purpose) && reads_contact {
                Code::Ok
            } else {
                Code::PermissionDenied
            };
            assert_eq!(code_of(got), want, "{role} / {purpose}");
        }
        let missing = client
            .get_record(GetRecordRequest {
                record_id: id.clone(),
                purpose: String::new(),
                field_names: vec![],
            })
            .await;
        assert_status(missing, Code::InvalidArgument, &["purpose"]);
    }
}

#[tokio::test]
async fn find_needs_read_permission_on_the_fields_category() {
    let vault = spawn_vault().await;
    let id = full_record(&vault).await;
    for row in MATRIX {
        let mut client = vault.client(row.role).await;
        for (field, category, value) in [
            ("email", "contact", "jan.jansen@example.nl"),
            ("bsn", "identity", "111222333"),
        ] {
            let got = client
                .find_records(FindRecordsRequest {
                    purpose: row.purpose.into(),
                    field_name: field.into(),
                    value: value.into(),
                })
                .await;
            let may = row.reads.contains(&category)
                && !PURPOSES.iter().any(|(r, p)| *r == row.role && p.is_empty());
            match got {
                Ok(r) => {
                    assert!(may, "{} found by {field}", row.role);
                    assert!(r.into_inner().record_ids.contains(&id));
                }
                Err(s) => {
                    assert!(!may, "{} find {field}: {}", row.role, s.message());
                    assert_eq!(s.code(), Code::PermissionDenied);
                }
            }
        }
    }
}
