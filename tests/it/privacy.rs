//! Record processing state through real gRPC (issue 5, first part): lifecycle, consent and
//! objection per purpose, restriction (Art. 18) and legal hold, with their rights and events.

use kluis::proto::{
    CreateRecordRequest, FindRecordsRequest, GetRecordRequest, ListRecordsRequest,
    QueryEventsRequest, SetConsentRequest, SetLegalHoldRequest, SetLifecycleRequest,
    SetRestrictionRequest, UpdateRecordRequest,
};
use tonic::Code;

use crate::helpers::*;

async fn applicant(v: &TestVault, email: &str) -> String {
    v.client("recruiter")
        .await
        .create_record(CreateRecordRequest {
            purpose: "recruitment".into(),
            fields: fields(&[("full_name", text("Anna de Vries")), ("email", text(email))]),
        })
        .await
        .expect("create")
        .into_inner()
        .record_id
}

fn get(id: &str, purpose: &str) -> GetRecordRequest {
    GetRecordRequest {
        record_id: id.into(),
        purpose: purpose.into(),
        field_names: vec![],
    }
}

fn find(purpose: &str, email: &str) -> FindRecordsRequest {
    FindRecordsRequest {
        purpose: purpose.into(),
        field_name: "email".into(),
        value: email.into(),
    }
}

fn consent(id: &str, purpose: &str, granted: bool) -> SetConsentRequest {
    SetConsentRequest {
        record_id: id.into(),
        purpose: purpose.into(),
        granted,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_stages_with_dates_rights_and_validation() {
    let v = spawn_vault().await;
    let id = applicant(&v, "anna@example.nl").await;
    let mut recruiter = v.client("recruiter").await;
    // Closed recently: its data is within its 28 days when payroll hires her (data past its
    // period gets no new clock).
    let closed = day_from_today(-10);
    let meta = recruiter
        .set_lifecycle(SetLifecycleRequest {
            record_id: id.clone(),
            stage: "procedure_closed".into(),
            date: closed,
        })
        .await
        .expect("recruiter closes the procedure")
        .into_inner();
    assert_eq!(
        (meta.lifecycle_stage.as_str(), meta.revision),
        ("procedure_closed", 2)
    );
    // The employment dates start the legal duties to keep BSN and payroll data (and the
    // clocks that erase them): only a role with `set_employment` (payroll) sets them.
    for stage in ["employed", "ended"] {
        assert_status(
            recruiter
                .set_lifecycle(SetLifecycleRequest {
                    record_id: id.clone(),
                    stage: stage.into(),
                    date: "2026-01-05".into(),
                })
                .await,
            Code::PermissionDenied,
            &["recruiter", stage, "set_employment"],
        );
    }
    let mut payroll = v.client("payroll").await;
    // Only an employment can end.
    assert_status(
        payroll
            .set_lifecycle(SetLifecycleRequest {
                record_id: id.clone(),
                stage: "ended".into(),
                date: "2026-01-05".into(),
            })
            .await,
        Code::FailedPrecondition,
        &["stage", "only an employment can end"],
    );
    let meta = payroll
        .set_lifecycle(SetLifecycleRequest {
            record_id: id.clone(),
            stage: "employed".into(),
            date: "2026-01-05".into(),
        })
        .await
        .expect("payroll sets the stage")
        .into_inner();
    assert_eq!(
        (
            meta.lifecycle_stage.as_str(),
            meta.lifecycle.as_str(),
            meta.lifecycle_date.as_str(),
            meta.revision
        ),
        ("employed", "employed", "2026-01-05", 3)
    );
    let meta = payroll
        .set_lifecycle(SetLifecycleRequest {
            record_id: id.clone(),
            stage: "ended".into(),
            date: "2026-10-31".into(),
        })
        .await
        .expect("payroll sets the stage")
        .into_inner();
    assert_eq!(meta.lifecycle_stage, "ended");
    // A former employee's record never becomes an applicant's again (that would drop the
    // duty to keep BSN and payroll data), and an employment cannot end before it began.
    for stage in ["procedure_closed", "applicant"] {
        assert_status(
            recruiter
                .set_lifecycle(SetLifecycleRequest {
                    record_id: id.clone(),
                    stage: stage.into(),
                    date: "2026-11-01".into(),
                })
                .await,
            Code::FailedPrecondition,
            &["stage", "legal duty", stage],
        );
    }
    let rehired = payroll
        .set_lifecycle(SetLifecycleRequest {
            record_id: id.clone(),
            stage: "employed".into(),
            date: "2026-11-02".into(),
        })
        .await
        .expect("rehired")
        .into_inner();
    assert_eq!(rehired.lifecycle_stage, "employed");
    assert_status(
        payroll
            .set_lifecycle(SetLifecycleRequest {
                record_id: id.clone(),
                stage: "ended".into(),
                date: "2026-11-01".into(),
            })
            .await,
        Code::FailedPrecondition,
        &["date", "2026-11-02", "before it began"],
    );
    // Nor can a rehire be dated back to before the last end (ended → employed 1990 → ended
    // 1990 would date the end, and the duties counted from it, 36 years earlier).
    assert_status(
        payroll
            .set_lifecycle(SetLifecycleRequest {
                record_id: id.clone(),
                stage: "employed".into(),
                date: "1990-01-01".into(),
            })
            .await,
        Code::FailedPrecondition,
        &[
            "date",
            "2026-10-31",
            "cannot begin before the last one ended",
        ],
    );
    // Dates are bounded: nothing before 1900, an employment at most a year ahead, a procedure
    // not closed in the future (that would keep applicant data past its maximum period).
    for (mut client, stage, date, rule) in [
        (
            payroll.clone(),
            "employed",
            "1899-12-31".to_string(),
            "1900-01-01 or later",
        ),
        (
            payroll.clone(),
            "employed",
            "-001-01-01".to_string(),
            "date",
        ),
        (
            payroll.clone(),
            "employed",
            day_from_today(400),
            "366 days ahead",
        ),
        (
            recruiter.clone(),
            "procedure_closed",
            day_from_today(2),
            "after today",
        ),
        (
            recruiter.clone(),
            "procedure_closed",
            "9999-12-31".to_string(),
            "after today",
        ),
    ] {
        assert_status(
            client
                .set_lifecycle(SetLifecycleRequest {
                    record_id: id.clone(),
                    stage: stage.into(),
                    date: date.clone(),
                })
                .await,
            Code::InvalidArgument,
            &["date", rule],
        );
    }
    for role in ["absence", "privacy_officer", "security_officer", "auditor"] {
        assert_status(
            v.client(role)
                .await
                .set_lifecycle(SetLifecycleRequest {
                    record_id: id.clone(),
                    stage: "employed".into(),
                    date: "2026-01-05".into(),
                })
                .await,
            Code::PermissionDenied,
            &["SetLifecycle", "set_lifecycle"],
        );
    }
    let bad = |stage: &str, date: &str, record: &str| SetLifecycleRequest {
        record_id: record.into(),
        stage: stage.into(),
        date: date.into(),
    };
    assert_status(
        recruiter
            .set_lifecycle(bad("hired", "2026-01-05", &id))
            .await,
        Code::InvalidArgument,
        &["stage", "applicant, procedure_closed, employed, ended"],
    );
    // Exactly YYYY-MM-DD: chrono alone takes the padded forms (10 bytes each), which compared
    // as text before every real date and got past the rules above (review 10).
    let padded = [
        " 2026-1-05",
        "+2026-1-05",
        "\t2026-1-05",
        "\n2026-1-05",
        "2026- 1-05",
        "2026-01- 5",
        "  2026-1-5",
        "2026-01-05 ",
        "２026-01-05",
    ];
    for date in ["", "2026-13-01", "5 Jan 2026", "2026-1-5"]
        .into_iter()
        .chain(padded)
    {
        assert_status(
            payroll.set_lifecycle(bad("ended", date, &id)).await,
            Code::InvalidArgument,
            &["date", "YYYY-MM-DD"],
        );
    }
    // A bad id is a value: a role with the right hears of it, one without is denied.
    assert_status(
        payroll
            .set_lifecycle(bad("employed", "2026-01-05", "123"))
            .await,
        Code::InvalidArgument,
        &["record_id"],
    );
    assert_status(
        recruiter
            .set_lifecycle(bad("employed", "2026-01-05", "123"))
            .await,
        Code::PermissionDenied,
        &["set_employment"],
    );
    assert_status(
        payroll
            .set_lifecycle(bad(
                "employed",
                "2026-01-05",
                "00000000-0000-4000-8000-000000000000",
            ))
            .await,
        Code::NotFound,
        &[],
    );
    // Nothing above changed the record.
    let listed = listed(&mut recruiter).await;
    assert_eq!(listed[0].lifecycle_stage, "employed");
    assert_eq!(listed[0].revision, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_gates_talent_pool_and_an_objection_stops_personal_offers() {
    let v = spawn_vault().await;
    let id = applicant(&v, "bram@example.nl").await;
    let mut recruiter = v.client("recruiter").await;
    // A consent-based purpose cannot create or read without consent.
    assert_status(
        recruiter
            .create_record(CreateRecordRequest {
                purpose: "talent_pool".into(),
                fields: fields(&[("full_name", text("X"))]),
            })
            .await,
        Code::FailedPrecondition,
        &["talent_pool", "consent"],
    );
    assert_status(
        recruiter.get_record(get(&id, "talent_pool")).await,
        Code::FailedPrecondition,
        &["consent", "not recorded"],
    );
    let found = recruiter
        .find_records(find("talent_pool", "bram@example.nl"))
        .await
        .expect("find")
        .into_inner();
    assert!(found.record_ids.is_empty());

    let meta = recruiter
        .set_consent(consent(&id, "talent_pool", true))
        .await
        .expect("consent given")
        .into_inner();
    let c = &meta.consents[0];
    assert_eq!((c.purpose.as_str(), c.granted), ("talent_pool", true));
    assert!(c.changed.is_some());
    recruiter
        .get_record(get(&id, "talent_pool"))
        .await
        .expect("talent pool read with consent");
    assert_eq!(
        recruiter
            .find_records(find("talent_pool", "bram@example.nl"))
            .await
            .expect("find")
            .into_inner()
            .record_ids,
        vec![id.clone()]
    );
    // Withdrawal (here by the privacy officer) takes effect at once.
    v.client("privacy_officer")
        .await
        .set_consent(consent(&id, "talent_pool", false))
        .await
        .expect("withdrawn");
    assert_status(
        recruiter.get_record(get(&id, "talent_pool")).await,
        Code::FailedPrecondition,
        &["withdrawn"],
    );
    recruiter
        .get_record(get(&id, "recruitment"))
        .await
        .expect("recruitment does not rest on consent");

    // Objection to a legitimate-interest purpose.
    recruiter
        .get_record(get(&id, "personal_offers"))
        .await
        .expect("allowed before the objection");
    recruiter
        .set_consent(consent(&id, "personal_offers", false))
        .await
        .expect("objection recorded");
    assert_status(
        recruiter.get_record(get(&id, "personal_offers")).await,
        Code::FailedPrecondition,
        &["objected", "personal_offers"],
    );
    assert_status(
        recruiter
            .update_record(UpdateRecordRequest {
                record_id: id.clone(),
                purpose: "personal_offers".into(),
                expected_revision: 0,
                set: fields(&[("full_name", text("Y"))]),
                clear: vec![],
            })
            .await,
        Code::FailedPrecondition,
        &["objected"],
    );

    // Purposes without consent or objection, unknown purposes, other roles.
    assert_status(
        recruiter
            .set_consent(consent(&id, "recruitment", true))
            .await,
        Code::InvalidArgument,
        &["purpose", "neither consent nor legitimate interest"],
    );
    assert_status(
        recruiter.set_consent(consent(&id, "marketing", true)).await,
        Code::InvalidArgument,
        &["purpose", "unknown"],
    );
    assert_status(
        v.client("payroll")
            .await
            .set_consent(consent(&id, "talent_pool", true))
            .await,
        Code::PermissionDenied,
        &["set_consent"],
    );

    // Each change is an event with the record and the purpose.
    let events = v
        .audit_events(QueryEventsRequest {
            record_id: id.clone(),
            ..Default::default()
        })
        .await;
    let consents: Vec<_> = events
        .iter()
        .filter(|e| e.action == "SetConsent")
        .map(|e| (e.principal.as_str(), e.purpose.as_str(), e.outcome.as_str()))
        .collect();
    assert_eq!(
        consents,
        vec![
            ("test-recruiter", "talent_pool", "ok"),
            ("test-privacy_officer", "talent_pool", "ok"),
            ("test-recruiter", "personal_offers", "ok"),
            ("test-recruiter", "recruitment", "invalid"),
            ("test-recruiter", "<unknown>", "invalid"),
            ("test-payroll", "talent_pool", "denied"),
        ]
    );
}

/// The review's case: a closed procedure whose subject withdrew consent and objected. The
/// recruiter must not reach the record by naming `recruitment` instead (its contract basis
/// ended with the procedure), while the privacy officer still can, and a rehire restores it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recruitment_ends_with_the_procedure_so_withdrawal_and_objection_hold() {
    let v = spawn_vault().await;
    let id = applicant(&v, "closed@example.nl").await;
    let today = day_from_today(0);
    let mut recruiter = v.client("recruiter").await;
    recruiter
        .get_record(get(&id, "recruitment"))
        .await
        .expect("an applicant in procedure");
    recruiter
        .set_consent(consent(&id, "talent_pool", false))
        .await
        .expect("withdrawn");
    recruiter
        .set_consent(consent(&id, "personal_offers", false))
        .await
        .expect("objected");
    recruiter
        .set_lifecycle(SetLifecycleRequest {
            record_id: id.clone(),
            stage: "procedure_closed".into(),
            date: today.clone(),
        })
        .await
        .expect("closed");
    for purpose in ["talent_pool", "personal_offers", "recruitment"] {
        let refused = recruiter.get_record(get(&id, purpose)).await.err();
        assert_eq!(
            refused.as_ref().map(|s| s.code()),
            Some(Code::FailedPrecondition),
            "{purpose}: {refused:?}"
        );
        let found = recruiter
            .find_records(find(purpose, "closed@example.nl"))
            .await
            .expect("find")
            .into_inner()
            .record_ids;
        assert!(found.is_empty(), "{purpose}: {found:?}");
    }
    assert_status(
        recruiter.get_record(get(&id, "recruitment")).await,
        Code::FailedPrecondition,
        &[
            "lifecycle stage `procedure_closed`",
            "recruitment",
            "applicant, employed",
        ],
    );
    assert_status(
        recruiter
            .update_record(UpdateRecordRequest {
                record_id: id.clone(),
                purpose: "recruitment".into(),
                expected_revision: 0,
                set: fields(&[("full_name", text("Z"))]),
                clear: vec![],
            })
            .await,
        Code::FailedPrecondition,
        &["procedure_closed", "recruitment"],
    );
    // Nor can the recruiter reopen the procedure to reach it again.
    assert_status(
        recruiter
            .set_lifecycle(SetLifecycleRequest {
                record_id: id.clone(),
                stage: "applicant".into(),
                date: today.clone(),
            })
            .await,
        Code::FailedPrecondition,
        &[
            "stage",
            "withdrew consent for `talent_pool`",
            "CreateRecord",
        ],
    );
    // The privacy officer answers the subject's requests all the same.
    v.client("privacy_officer")
        .await
        .get_record(get(&id, "data_subject_request"))
        .await
        .expect("data subject request");
    // Hired after all: employment is a contract again.
    v.client("payroll")
        .await
        .set_lifecycle(SetLifecycleRequest {
            record_id: id.clone(),
            stage: "employed".into(),
            date: today.clone(),
        })
        .await
        .expect("hired");
    recruiter
        .get_record(get(&id, "recruitment"))
        .await
        .expect("an employee is placed under recruitment");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lifecycle_date_never_puts_another_roles_data_past_its_period_at_once() {
    // Lifecycle dates start the clocks that erase every category. Backdated, they had the
    // sweeper erase data the caller may neither read nor write: the recruiter closing the
    // procedure of payroll's employee record in 2020 (review 10), payroll ending an
    // applicant's "employment" in 1900 (review 11).
    let v = spawn_vault().await;
    let mut payroll = v.client("payroll").await;
    let mut recruiter = v.client("recruiter").await;
    let employee = payroll_record(&mut payroll).await;
    let candidate = applicant(&v, "closing@example.nl").await;
    let step = |id: &str, stage: &str, date: &str| SetLifecycleRequest {
        record_id: id.into(),
        stage: stage.into(),
        date: date.into(),
    };
    assert_status(
        recruiter
            .set_lifecycle(step(&employee.record_id, "procedure_closed", "2020-01-01"))
            .await,
        Code::PermissionDenied,
        &[
            "date",
            "recruiter",
            "category financial, due on 2020-01-29",
            "category identity",
            "less than 28 days",
        ],
    );
    // Nor just far enough back that the erasure falls due tomorrow, nor through a consent
    // that keeps the data a year but can be withdrawn (review 12).
    let yesterday = day_from_today(-1);
    assert_status(
        recruiter
            .set_lifecycle(step(&employee.record_id, "procedure_closed", &yesterday))
            .await,
        Code::PermissionDenied,
        &[
            "date",
            "recruiter",
            "category identity",
            "less than 28 days",
        ],
    );
    recruiter
        .set_consent(consent(&employee.record_id, "talent_pool", true))
        .await
        .expect("consent recorded");
    let long_ago = day_from_today(-300);
    assert_status(
        recruiter
            .set_lifecycle(step(&employee.record_id, "procedure_closed", &long_ago))
            .await,
        Code::PermissionDenied,
        &[
            "date",
            "category identity",
            "without consent for `talent_pool`",
        ],
    );
    payroll
        .set_lifecycle(step(&candidate, "employed", "1900-01-01"))
        .await
        .expect("an employment starts no clock for contact data");
    assert_status(
        payroll
            .set_lifecycle(step(&candidate, "ended", "1900-01-02"))
            .await,
        Code::PermissionDenied,
        &[
            "date",
            "payroll",
            "category contact, due on 1902-01-02",
            "less than 28 days",
        ],
    );
    // Nothing changed by the refusals: payroll still reads its fields, the employee record
    // is still an applicant's, the candidate still employed.
    let listed = listed(&mut recruiter).await;
    for (id, revision, stage) in [
        (&employee.record_id, employee.revision + 1, "applicant"),
        (&candidate, 2, "employed"),
    ] {
        let meta = listed.iter().find(|r| &r.record_id == id).expect("listed");
        assert_eq!(
            (meta.revision, meta.lifecycle_stage.as_str()),
            (revision, stage)
        );
    }
    let read = payroll
        .get_record(get(&employee.record_id, "payroll"))
        .await
        .expect("read")
        .into_inner();
    assert_eq!(read.fields.len(), 2);
    // Dated when it happened, the same steps pass: a hire that fell through is closed, its
    // BSN going with the rest 28 days on; an employment ends.
    let today = day_from_today(0);
    recruiter
        .set_lifecycle(step(&employee.record_id, "procedure_closed", &today))
        .await
        .expect("the recruiter closes a procedure today");
    payroll
        .set_lifecycle(step(&candidate, "ended", &today))
        .await
        .expect("payroll ends an employment today");
    // A role dates what is all its own as it likes (a correction).
    let own = applicant(&v, "own@example.nl").await;
    recruiter
        .set_lifecycle(step(&own, "procedure_closed", "2020-01-01"))
        .await
        .expect("the recruiter backdates its own applicant's close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_lifecycle_change_gives_data_past_its_period_a_new_clock() {
    // Payroll's own employee record, held (so the sweeper leaves it), with an employment
    // that ended in 2015: identity (5 years) and financial (7) are past their periods. An
    // end moved later, or an employment dated ahead, would start their clocks anew
    // (review 11); like a reopened procedure or a consent, both are refused.
    let v = spawn_vault().await;
    let mut payroll = v.client("payroll").await;
    let id = payroll_record(&mut payroll).await.record_id;
    v.client("privacy_officer")
        .await
        .set_legal_hold(SetLegalHoldRequest {
            record_id: id.clone(),
            hold: true,
            reason: "labour court case 2026/114".into(),
        })
        .await
        .expect("held");
    let step = |stage: &str, date: &str| SetLifecycleRequest {
        record_id: id.clone(),
        stage: stage.into(),
        date: date.into(),
    };
    for (stage, date) in [("employed", "2010-01-04"), ("ended", "2015-01-01")] {
        payroll
            .set_lifecycle(step(stage, date))
            .await
            .unwrap_or_else(|e| panic!("{stage}: {e:?}"));
    }
    let ahead = day_from_today(300);
    let today = day_from_today(0);
    // Whatever the date: an end dated just before financial fell due (2022-01-01) would
    // keep it to 2026-12-31 (review 12).
    for date in [today.as_str(), "2019-12-31"] {
        assert_status(
            payroll.set_lifecycle(step("ended", date)).await,
            Code::FailedPrecondition,
            &["date", "past its maximum retention period", "new clock"],
        );
    }
    let meta = listed_one(&mut payroll, &id).await;
    assert_eq!(
        (meta.lifecycle_stage.as_str(), meta.lifecycle_date.as_str()),
        ("ended", "2015-01-01")
    );
    // Nor an employment dated ahead, which would stop every clock.
    assert_status(
        payroll.set_lifecycle(step("employed", &ahead)).await,
        Code::FailedPrecondition,
        &["date", "past its maximum retention period", "new clock"],
    );
}

/// A closed procedure is reopened once (a mistaken close, or a resumed procedure), even
/// after an objection to marketing; a second reopening, which would restart the retention
/// clock once more, is refused (review 8).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_procedure_is_reopened_at_most_once() {
    let v = spawn_vault().await;
    let id = applicant(&v, "reopened@example.nl").await;
    let today = day_from_today(0);
    let mut recruiter = v.client("recruiter").await;
    recruiter
        .set_consent(consent(&id, "personal_offers", false))
        .await
        .expect("objected to marketing");
    let stage = |stage: &str| SetLifecycleRequest {
        record_id: id.clone(),
        stage: stage.into(),
        date: today.clone(),
    };
    for step in ["procedure_closed", "applicant", "procedure_closed"] {
        recruiter
            .set_lifecycle(stage(step))
            .await
            .unwrap_or_else(|e| panic!("{step}: {e:?}"));
    }
    assert_status(
        recruiter.set_lifecycle(stage("applicant")).await,
        Code::FailedPrecondition,
        &["stage", "reopened once already", "CreateRecord"],
    );
    let meta = listed_one(&mut recruiter, &id).await;
    assert_eq!(meta.lifecycle_stage, "procedure_closed");
}

/// A closed applicant hired: the employment begins before the closed procedure's data falls
/// due, or a start dated ahead (and moved on again and again) would keep it with no clock in
/// place of the once-only reopening (review 12).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hire_after_a_closed_procedure_begins_before_its_data_falls_due() {
    let v = spawn_vault().await;
    let id = applicant(&v, "hired-later@example.nl").await;
    let mut recruiter = v.client("recruiter").await;
    let mut payroll = v.client("payroll").await;
    let step = |stage: &str, date: &str| lifecycle(&id, stage, date);
    recruiter
        .set_lifecycle(step("procedure_closed", &day_from_today(-20)))
        .await
        .expect("closed 20 days ago");
    let due = day_from_today(8);
    for ahead in [day_from_today(9), day_from_today(365)] {
        assert_status(
            payroll.set_lifecycle(step("employed", &ahead)).await,
            Code::FailedPrecondition,
            &["date", &format!("falls due on {due}"), "stage `applicant`"],
        );
    }
    payroll
        .set_lifecycle(step("employed", &due))
        .await
        .expect("a start on the due date");
    // Moved on later: the same bound, kept across the stage change.
    assert_status(
        payroll
            .set_lifecycle(step("employed", &day_from_today(30)))
            .await,
        Code::FailedPrecondition,
        &["date", &format!("falls due on {due}")],
    );
    payroll
        .set_lifecycle(step("employed", &day_from_today(2)))
        .await
        .expect("moved earlier");
    let meta = listed_one(&mut payroll, &id).await;
    assert_eq!(
        (meta.lifecycle_stage.as_str(), meta.lifecycle_date.as_str()),
        ("employed", day_from_today(2).as_str())
    );
    // An employment that has not begun does not end (review 14: ending it ahead, then
    // rehiring ahead, moved the clocks on again and again).
    assert_status(
        payroll
            .set_lifecycle(step("ended", &day_from_today(5)))
            .await,
        Code::FailedPrecondition,
        &["stage", "cannot end before it began", "procedure_closed"],
    );
    // A hire that fell through before it began closes the procedure again (review 15:
    // ending it made the applicant a former employee, kept for years).
    payroll
        .set_lifecycle(step("procedure_closed", &day_from_today(0)))
        .await
        .expect("the hire fell through");
    // That close restarted the closed procedure's clock, as a reopening does: once (review
    // 30: hired ahead and fallen through again and again, the 28 days had no end).
    assert_status(
        recruiter
            .set_lifecycle(step("applicant", &day_from_today(0)))
            .await,
        Code::FailedPrecondition,
        &["stage", "reopened once already", "CreateRecord"],
    );
    // An end already past is corrected at most to today, never moved ahead (review 15: a
    // year ahead restarted every clock).
    let former = payroll_record(&mut payroll).await.record_id;
    let former_step = |stage: &str, date: String| lifecycle(&former, stage, &date);
    for (stage, days) in [("employed", -900), ("ended", -700)] {
        payroll
            .set_lifecycle(former_step(stage, day_from_today(days)))
            .await
            .unwrap_or_else(|e| panic!("{stage}: {e:?}"));
    }
    assert_status(
        payroll
            .set_lifecycle(former_step("ended", day_from_today(366)))
            .await,
        Code::FailedPrecondition,
        &["date", "corrected at most to today"],
    );
    payroll
        .set_lifecycle(former_step("ended", day_from_today(-650)))
        .await
        .expect("a correction, later but past");
    // The bound is counted without the consent that can be withdrawn (review 14: a hire
    // within the consent's year kept its start after the withdrawal).
    let pooled = applicant(&v, "pooled-hire@example.nl").await;
    recruiter
        .set_consent(consent(&pooled, "talent_pool", true))
        .await
        .expect("consent");
    recruiter
        .set_lifecycle(lifecycle(&pooled, "procedure_closed", &day_from_today(-20)))
        .await
        .expect("closed");
    assert_status(
        payroll
            .set_lifecycle(lifecycle(&pooled, "employed", &day_from_today(30)))
            .await,
        Code::FailedPrecondition,
        &["date", &format!("falls due on {due}"), "without consent"],
    );
    // Reopened first, the procedure is open again (once): the start may lie further ahead.
    let other = applicant(&v, "reopened-hire@example.nl").await;
    let step = |stage: &str, date: &str| lifecycle(&other, stage, date);
    for (stage, date) in [
        ("procedure_closed", day_from_today(-20)),
        ("applicant", day_from_today(0)),
    ] {
        recruiter
            .set_lifecycle(step(stage, &date))
            .await
            .unwrap_or_else(|e| panic!("{stage}: {e:?}"));
    }
    payroll
        .set_lifecycle(step("employed", &day_from_today(90)))
        .await
        .expect("a reopened procedure's hire starts in three months");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restricted_record_is_only_stored_until_the_restriction_is_lifted() {
    let v = spawn_vault().await;
    let id = applicant(&v, "cas@example.nl").await;
    let mut po = v.client("privacy_officer").await;
    let mut recruiter = v.client("recruiter").await;
    assert_status(
        po.set_restriction(SetRestrictionRequest {
            record_id: id.clone(),
            restricted: true,
            reason: "  ".into(),
        })
        .await,
        Code::InvalidArgument,
        &["reason", "required"],
    );
    assert_status(
        recruiter
            .set_restriction(SetRestrictionRequest {
                record_id: id.clone(),
                restricted: true,
                reason: "x".into(),
            })
            .await,
        Code::PermissionDenied,
        &["set_restriction"],
    );
    let meta = po
        .set_restriction(SetRestrictionRequest {
            record_id: id.clone(),
            restricted: true,
            reason: "accuracy contested (Art. 18(1)(a))".into(),
        })
        .await
        .expect("restrict")
        .into_inner();
    assert!(meta.restricted);

    assert_status(
        recruiter.get_record(get(&id, "recruitment")).await,
        Code::FailedPrecondition,
        &["restricted", &id],
    );
    assert_status(
        recruiter
            .update_record(UpdateRecordRequest {
                record_id: id.clone(),
                purpose: "recruitment".into(),
                expected_revision: 0,
                set: fields(&[("full_name", text("Z"))]),
                clear: vec![],
            })
            .await,
        Code::FailedPrecondition,
        &["restricted"],
    );
    assert_status(
        recruiter
            .set_lifecycle(SetLifecycleRequest {
                record_id: id.clone(),
                stage: "procedure_closed".into(),
                date: "2026-11-01".into(),
            })
            .await,
        Code::FailedPrecondition,
        &["restricted"],
    );
    assert!(recruiter
        .find_records(find("recruitment", "cas@example.nl"))
        .await
        .expect("find")
        .into_inner()
        .record_ids
        .is_empty());
    let listed = listed(&mut recruiter).await;
    assert!(listed[0].restricted, "listing shows the state, not data");
    // The privacy officer can still read it for the data subject.
    po.get_record(get(&id, "data_subject_request"))
        .await
        .expect("data subject request");

    po.set_restriction(SetRestrictionRequest {
        record_id: id.clone(),
        restricted: false,
        reason: String::new(),
    })
    .await
    .expect("lift");
    recruiter
        .get_record(get(&id, "recruitment"))
        .await
        .expect("processing again");
    assert_eq!(
        recruiter
            .find_records(find("recruitment", "cas@example.nl"))
            .await
            .expect("find")
            .into_inner()
            .record_ids,
        vec![id.clone()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legal_hold_is_set_and_lifted_by_the_privacy_officer_only() {
    let mut v = spawn_vault().await;
    let id = applicant(&v, "dirk@example.nl").await;
    let mut po = v.client("privacy_officer").await;
    assert_status(
        po.set_legal_hold(SetLegalHoldRequest {
            record_id: id.clone(),
            hold: true,
            reason: String::new(),
        })
        .await,
        Code::InvalidArgument,
        &["reason"],
    );
    assert_status(
        po.set_legal_hold(SetLegalHoldRequest {
            record_id: id.clone(),
            hold: true,
            reason: "x".repeat(501),
        })
        .await,
        Code::InvalidArgument,
        &["reason", "500"],
    );
    // One line, no control or invisible format characters.
    for bad in ["case\n2026", "case \u{1b}[31m", "case \u{202e}6202"] {
        assert_status(
            po.set_legal_hold(SetLegalHoldRequest {
                record_id: id.clone(),
                hold: true,
                reason: bad.into(),
            })
            .await,
            Code::InvalidArgument,
            &["reason", "control"],
        );
    }
    assert_status(
        v.client("payroll")
            .await
            .set_legal_hold(SetLegalHoldRequest {
                record_id: id.clone(),
                hold: true,
                reason: "court case".into(),
            })
            .await,
        Code::PermissionDenied,
        &["set_legal_hold"],
    );
    let meta = po
        .set_legal_hold(SetLegalHoldRequest {
            record_id: id.clone(),
            hold: true,
            reason: "labour court case 2026/113".into(),
        })
        .await
        .expect("hold")
        .into_inner();
    assert!(meta.legal_hold);
    // A hold does not stop processing; it survives a restart.
    v.client("recruiter")
        .await
        .get_record(get(&id, "recruitment"))
        .await
        .expect("read under hold");
    v.restart().await;
    let mut po = v.client("privacy_officer").await;
    let listed = listed(&mut po).await;
    assert!(listed[0].legal_hold);
    // The reason is kept (sealed) and given to the data subject in the export.
    let doc = exported(&mut po, &id).await;
    assert_eq!(doc["legal_hold"], true);
    assert_eq!(doc["legal_hold_reason"], "labour court case 2026/113");
    assert_eq!(doc["restriction_reason"], "");
    // No clock runs for an applicant in procedure: the export says which rule will set one.
    for r in doc["retention"].as_array().expect("retention") {
        assert!(r["erase_on"].is_null(), "{r}");
        let rule = r["rule"].as_str().unwrap_or_default();
        assert!(
            rule.contains("application procedure is open") && rule.contains("28 days"),
            "{r}"
        );
    }
    let meta = po
        .set_legal_hold(SetLegalHoldRequest {
            record_id: id.clone(),
            hold: false,
            reason: String::new(),
        })
        .await
        .expect("lift")
        .into_inner();
    assert!(!meta.legal_hold);
    let doc = exported(&mut po, &id).await;
    assert_eq!(
        doc["legal_hold_reason"], "",
        "a lifted hold keeps no reason"
    );
}

/// A request moving record `id` to `stage` as of `date`.
fn lifecycle(id: &str, stage: &str, date: &str) -> SetLifecycleRequest {
    SetLifecycleRequest {
        record_id: id.into(),
        stage: stage.into(),
        date: date.into(),
    }
}

/// The day `offset` days from today (UTC), as `YYYY-MM-DD`.
fn day_from_today(offset: i64) -> String {
    (chrono::Utc::now().date_naive() + chrono::Duration::days(offset))
        .format("%Y-%m-%d")
        .to_string()
}

/// An employee record payroll creates with BSN and IBAN alone (identity and financial).
async fn payroll_record(payroll: &mut Client) -> kluis::proto::CreateRecordResponse {
    payroll
        .create_record(CreateRecordRequest {
            purpose: "payroll".into(),
            fields: fields(&[
                ("bsn", text("111222333")),
                ("iban", text("NL91ABNA0417164300")),
            ]),
        })
        .await
        .expect("payroll creates")
        .into_inner()
}

/// Record `id`'s metadata, as `client` lists it.
async fn listed_one(client: &mut Client, id: &str) -> kluis::proto::RecordMeta {
    listed(client)
        .await
        .into_iter()
        .find(|r| r.record_id == id)
        .expect("listed")
}

/// Every record's metadata, as `client` lists it (one page).
async fn listed(client: &mut Client) -> Vec<kluis::proto::RecordMeta> {
    client
        .list_records(ListRecordsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .records
}

/// The export document of record `id`, as the privacy officer `po` gets it.
async fn exported(po: &mut Client, id: &str) -> serde_json::Value {
    let json = po
        .export_record(kluis::proto::ExportRecordRequest {
            record_id: id.into(),
        })
        .await
        .expect("export")
        .into_inner()
        .json
        .clone();
    serde_json::from_str(&json).expect("json")
}

fn erase(id: &str) -> kluis::proto::EraseRecordRequest {
    kluis::proto::EraseRecordRequest {
        record_id: id.into(),
        reason: "data subject request 2026-11-25".into(),
    }
}

/// An applicant with contact + personal data, later given identity + financial data by payroll.
async fn employee(v: &TestVault, email: &str, stage: &str, date: &str) -> String {
    let id = applicant(v, email).await;
    v.client("payroll")
        .await
        .update_record(UpdateRecordRequest {
            record_id: id.clone(),
            purpose: "payroll".into(),
            expected_revision: 0,
            set: fields(&[
                ("bsn", text("111222333")),
                ("iban", text("NL91ABNA0417164300")),
            ]),
            clear: vec![],
        })
        .await
        .expect("payroll data");
    let mut payroll = v.client("payroll").await;
    if stage == "ended" {
        // Only an employment can end.
        payroll
            .set_lifecycle(SetLifecycleRequest {
                record_id: id.clone(),
                stage: "employed".into(),
                date: "2015-01-05".into(),
            })
            .await
            .expect("employed");
    }
    payroll
        .set_lifecycle(SetLifecycleRequest {
            record_id: id.clone(),
            stage: stage.into(),
            date: date.into(),
        })
        .await
        .expect("stage");
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_removes_what_no_duty_keeps_and_names_what_stays() {
    let v = spawn_vault().await;
    let mut po = v.client("privacy_officer").await;
    let mut recruiter = v.client("recruiter").await;

    // An applicant: everything goes, the record answers NOT_FOUND, the index forgets it.
    let id = applicant(&v, "eva@example.nl").await;
    let out = po
        .erase_record(erase(&id))
        .await
        .expect("erase")
        .into_inner();
    assert_eq!(out.erased_categories, vec!["contact"]);
    assert!(out.retained.is_empty());
    assert_status(
        recruiter.get_record(get(&id, "recruitment")).await,
        Code::NotFound,
        &[],
    );
    assert!(recruiter
        .find_records(find("recruitment", "eva@example.nl"))
        .await
        .expect("find")
        .into_inner()
        .record_ids
        .is_empty());
    let uuid = uuid::Uuid::parse_str(&id).expect("uuid");
    let store = v.vault().store();
    use kluis::store::{Keyspace, Store};
    assert!(store
        .scan(Keyspace::Fields, uuid.as_bytes(), None, 10)
        .await
        .expect("scan")
        .is_empty());
    let index = store
        .scan(Keyspace::Index, b"", None, usize::MAX)
        .await
        .expect("scan");
    assert!(index.iter().all(|(k, _)| !k.ends_with(uuid.as_bytes())));

    // Still employed: identity and financial stay (employment_ongoing, no end date yet).
    let id = employee(&v, "finn@example.nl", "employed", "2026-01-05").await;
    let out = po
        .erase_record(erase(&id))
        .await
        .expect("erase")
        .into_inner();
    assert_eq!(out.erased_categories, vec!["contact"]);
    let kept: Vec<_> = out
        .retained
        .iter()
        .map(|r| (r.category.as_str(), r.until.as_str(), r.basis.as_str()))
        .collect();
    assert_eq!(
        kept,
        vec![
            ("financial", "", "employment_ongoing"),
            ("identity", "", "employment_ongoing")
        ]
    );
    let got = v
        .client("payroll")
        .await
        .get_record(get(&id, "payroll"))
        .await
        .expect("payroll still reads what is kept")
        .into_inner();
    let mut names: Vec<_> = got.fields.keys().cloned().collect();
    names.sort();
    assert_eq!(names, vec!["bsn", "iban"]);
    assert!(
        got.withheld.is_empty(),
        "erased fields are gone, not withheld"
    );

    // A former employee: identity until 5 years, financial until 7 years after the end.
    // (An end recent enough that the recruiter's contact data is not yet past its two years:
    // payroll may not date an end that would have the sweeper erase it at once.)
    let ended = chrono::Utc::now().date_naive() - chrono::Days::new(150);
    let after = |months: u32| {
        (ended + chrono::Months::new(months))
            .format("%Y-%m-%d")
            .to_string()
    };
    let ended = ended.format("%Y-%m-%d").to_string();
    let id = employee(&v, "gijs@example.nl", "ended", &ended).await;
    let out = po
        .erase_record(erase(&id))
        .await
        .expect("erase")
        .into_inner();
    let kept: Vec<_> = out
        .retained
        .iter()
        .map(|r| (r.category.as_str(), r.until.as_str()))
        .collect();
    assert_eq!(
        kept,
        vec![
            ("financial", after(7 * 12).as_str()),
            ("identity", after(5 * 12).as_str())
        ]
    );
    assert!(out.retained.iter().all(|r| !r.basis.is_empty()));
    // What stays is kept for the duty only: no new data, no consent for other processing.
    assert_status(
        v.client("recruiter")
            .await
            .update_record(UpdateRecordRequest {
                record_id: id.clone(),
                purpose: "personal_offers".into(),
                expected_revision: 0,
                set: fields(&[("email", text("gijs@example.nl"))]),
                clear: vec![],
            })
            .await,
        Code::FailedPrecondition,
        &["asked for erasure", "legal duty"],
    );
    assert_status(
        v.client("recruiter")
            .await
            .set_consent(consent(&id, "talent_pool", true))
            .await,
        Code::FailedPrecondition,
        &["asked for erasure"],
    );
    let doc = exported(&mut po, &id).await;
    assert!(doc["erasure_requested"].is_string(), "{doc}");

    // Erasure events name fields, never values; the trail outlives the data.
    let events = v
        .audit_events(QueryEventsRequest {
            record_id: id.clone(),
            ..Default::default()
        })
        .await;
    let e = events
        .iter()
        .find(|e| e.action == "EraseRecord")
        .expect("erase event");
    assert_eq!(
        (e.purpose.as_str(), e.outcome.as_str()),
        ("data_subject_request", "ok")
    );
    let mut erased = e.field_names.clone();
    erased.sort();
    assert_eq!(erased, vec!["email", "full_name"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legal_hold_blocks_erasure_and_only_the_privacy_officer_erases() {
    let v = spawn_vault().await;
    let id = applicant(&v, "hans@example.nl").await;
    let mut po = v.client("privacy_officer").await;
    // The right the role lacks is named, not the purpose erasure runs under (the caller
    // sent none).
    for role in [
        "recruiter",
        "payroll",
        "absence",
        "security_officer",
        "auditor",
    ] {
        let refused = v
            .client(role)
            .await
            .erase_record(erase(&id))
            .await
            .expect_err("no erase right");
        assert_eq!(refused.code(), Code::PermissionDenied, "{role}");
        assert_eq!(
            refused.message(),
            format!(
                "role `{role}` may not call EraseRecord (policy right records = [\"erase\"] is not granted)"
            )
        );
    }
    assert_status(
        po.erase_record(kluis::proto::EraseRecordRequest {
            record_id: id.clone(),
            reason: String::new(),
        })
        .await,
        Code::InvalidArgument,
        &["reason"],
    );
    assert_status(
        po.erase_record(erase("nope")).await,
        Code::InvalidArgument,
        &["record_id"],
    );
    po.set_legal_hold(SetLegalHoldRequest {
        record_id: id.clone(),
        hold: true,
        reason: "claim pending".into(),
    })
    .await
    .expect("hold");
    assert_status(
        po.erase_record(erase(&id)).await,
        Code::FailedPrecondition,
        &["legal hold"],
    );
    v.client("recruiter")
        .await
        .get_record(get(&id, "recruitment"))
        .await
        .expect("nothing was erased");
    po.set_legal_hold(SetLegalHoldRequest {
        record_id: id.clone(),
        hold: false,
        reason: String::new(),
    })
    .await
    .expect("lift");
    // A restricted record can still be erased.
    po.set_restriction(SetRestrictionRequest {
        record_id: id.clone(),
        restricted: true,
        reason: "objection pending".into(),
    })
    .await
    .expect("restrict");
    po.erase_record(erase(&id)).await.expect("erase");
    assert_status(po.erase_record(erase(&id)).await, Code::NotFound, &[]);
}

/// The injected clock of the sweeper test: days since 1970-01-01.
static SWEEP_TODAY: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

fn set_today(date: &str) {
    let d = chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d").expect("date");
    let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).expect("epoch");
    SWEEP_TODAY.store((d - epoch).num_days(), std::sync::atomic::Ordering::SeqCst);
}

/// Waits until the sweeper erased `field` of record `id` (read as `role` for `purpose`);
/// returns the fields still there then.
async fn until_field_gone(
    v: &TestVault,
    id: &str,
    role: &str,
    purpose: &str,
    field: &str,
) -> std::collections::HashMap<String, kluis::proto::FieldValue> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let got = v
            .client(role)
            .await
            .get_record(get(id, purpose))
            .await
            .expect("readable")
            .into_inner();
        if !got.fields.contains_key(field) {
            return got.fields;
        }
        assert!(std::time::Instant::now() < deadline, "{field} not swept");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

async fn until_gone(v: &TestVault, id: &str, role: &str, purpose: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match v.client(role).await.get_record(get(id, purpose)).await {
            Err(s) if s.code() == Code::NotFound => return,
            _ => {}
        }
        assert!(std::time::Instant::now() < deadline, "{id} was not swept");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Makes an applicant whose procedure closed on 2025-01-10 (its 4 weeks ended before any date
/// the sweeper test sets) and waits until the sweeper erased it; returns its id. A pass
/// (server.rs `spawn_sweeper`, sweeper.rs `sweep`) reads the clock, walks every header, then
/// erases what was due, one record after another, and passes never overlap. So the pass that
/// erased this record read it, and began after this call began; and every pass that began
/// before this call has finished all its erasures.
async fn sentinel_swept(v: &TestVault) -> String {
    let id = applicant(v, "sentinel@example.nl").await;
    v.client("recruiter")
        .await
        .set_lifecycle(SetLifecycleRequest {
            record_id: id.clone(),
            stage: "procedure_closed".into(),
            date: "2025-01-10".into(),
        })
        .await
        .expect("closed long ago");
    until_gone(v, &id, "recruiter", "personal_offers").await;
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_erases_each_category_when_its_period_ends() {
    set_today("2026-01-20");
    let mut v = spawn_vault().await;
    let plain = applicant(&v, "a@example.nl").await;
    let pooled = applicant(&v, "b@example.nl").await;
    let held = applicant(&v, "d@example.nl").await;
    let damaged = applicant(&v, "e@example.nl").await;
    let restricted = applicant(&v, "f@example.nl").await;
    let mut recruiter = v.client("recruiter").await;
    // Consent first: the vault runs on the real clock until the restart below, by which a
    // procedure closed on 2026-01-10 is long past its 4 weeks (no consent may revive it).
    recruiter
        .set_consent(consent(&pooled, "talent_pool", true))
        .await
        .expect("consent");
    for id in [&plain, &pooled, &held, &damaged, &restricted] {
        recruiter
            .set_lifecycle(SetLifecycleRequest {
                record_id: id.clone(),
                stage: "procedure_closed".into(),
                date: "2026-01-10".into(),
            })
            .await
            .expect("closed");
    }
    v.client("privacy_officer")
        .await
        .set_legal_hold(SetLegalHoldRequest {
            record_id: held.clone(),
            hold: true,
            reason: "claim".into(),
        })
        .await
        .expect("hold");
    v.client("privacy_officer")
        .await
        .set_restriction(SetRestrictionRequest {
            record_id: restricted.clone(),
            restricted: true,
            reason: "accuracy contested".into(),
        })
        .await
        .expect("restrict");
    let former = employee(&v, "c@example.nl", "ended", "2026-03-31").await;
    // A former employee whose record is restricted when they ask for erasure: their own
    // request wins over the restriction once the duties end (review 16: the restriction kept
    // the BSN past its duty for as long as nobody lifted it).
    let asked = employee(&v, "g@example.nl", "ended", "2026-04-30").await;
    let mut po = v.client("privacy_officer").await;
    po.set_restriction(SetRestrictionRequest {
        record_id: asked.clone(),
        restricted: true,
        reason: "accuracy contested".into(),
    })
    .await
    .expect("restrict");
    po.erase_record(erase(&asked)).await.expect("erase");

    // The sweeper runs with the injected clock, every second.
    v.tweak = Some(|s| {
        s.clock = std::sync::Arc::new(|| {
            chrono::NaiveDate::from_ymd_opt(1970, 1, 1).expect("epoch")
                + chrono::Days::new(SWEEP_TODAY.load(std::sync::atomic::Ordering::SeqCst) as u64)
        });
        s.retention.sweep_interval_secs = 1;
        // The clock moves by years here, on purpose.
        s.retention.sweep_max_gap_days = u32::MAX;
    });
    v.stop().await;
    // One record's header is damaged: it must not stop the sweeps of every other record.
    damage_header(&v, &damaged).await;
    v.start().await.expect("restart");
    // A whole pass under the injected clock (set before the start): the first sentinel is
    // erased by such a pass, and the second, made once the first was gone, by a later one;
    // so the first sentinel's pass has finished.
    let sentinel_1 = sentinel_swept(&v).await;
    let sentinel_2 = sentinel_swept(&v).await;
    v.client("recruiter")
        .await
        .get_record(get(&plain, "personal_offers"))
        .await
        .expect("within 4 weeks: kept");

    // 4 weeks after the procedure closed: the applicant goes; consent and hold keep the others.
    set_today("2026-02-07");
    until_gone(&v, &plain, "recruiter", "personal_offers").await;
    // `plain` went in a pass under the new date; a sentinel made after that is erased by a
    // later pass, so that pass has finished (every record it found due is gone).
    let sentinel_3 = sentinel_swept(&v).await;
    v.client("recruiter")
        .await
        .get_record(get(&pooled, "talent_pool"))
        .await
        .expect("talent pool (consent) kept");
    v.client("recruiter")
        .await
        .get_record(get(&held, "personal_offers"))
        .await
        .expect("legal hold kept");
    // A restricted record is only stored (Art. 18): the sweeper leaves it too.
    v.client("privacy_officer")
        .await
        .get_record(get(&restricted, "data_subject_request"))
        .await
        .expect("restriction kept");

    // A year with consent.
    set_today("2027-01-10");
    until_gone(&v, &pooled, "recruiter", "personal_offers").await;

    // Former employee: contact after 2 years, identity after 5, financial after 7.
    set_today("2028-03-31");
    let kept = until_field_gone(&v, &former, "payroll", "payroll", "email").await;
    assert!(kept.contains_key("bsn") && kept.contains_key("iban"));
    set_today("2031-03-31");
    let kept = until_field_gone(&v, &former, "payroll", "payroll", "bsn").await;
    assert!(kept.contains_key("iban"), "financial kept 7 years");
    set_today("2031-04-30");
    let kept = until_field_gone(&v, &asked, "privacy_officer", "data_subject_request", "bsn").await;
    assert!(kept.contains_key("iban"), "financial kept 7 years");
    set_today("2033-03-31");
    until_gone(&v, &former, "payroll", "payroll").await;
    set_today("2033-04-30");
    until_gone(&v, &asked, "privacy_officer", "data_subject_request").await;
    // As above: the pass that erased `asked` (under the last date) has finished.
    let sentinel_4 = sentinel_swept(&v).await;
    v.client("recruiter")
        .await
        .get_record(get(&held, "personal_offers"))
        .await
        .expect("legal hold still kept");

    let events = v
        .audit_events(QueryEventsRequest {
            principal: "system:retention".into(),
            ..Default::default()
        })
        .await;
    let swept: Vec<_> = events
        .iter()
        .map(|e| (e.record_id.as_str(), e.action.as_str()))
        .collect();
    assert_eq!(
        swept,
        vec![
            (sentinel_1.as_str(), "EraseRecord"),
            (sentinel_2.as_str(), "EraseRecord"),
            (plain.as_str(), "EraseRecord"),
            (sentinel_3.as_str(), "EraseRecord"),
            (pooled.as_str(), "EraseRecord"),
            (former.as_str(), "EraseRecord"),
            (former.as_str(), "EraseRecord"),
            (asked.as_str(), "EraseRecord"),
            (former.as_str(), "EraseRecord"),
            (asked.as_str(), "EraseRecord"),
            (sentinel_4.as_str(), "EraseRecord"),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_returns_every_field_metadata_deadlines_and_access_history() {
    use base64::Engine;
    let v = spawn_vault().await;
    let cv: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
    let id = v
        .client("recruiter")
        .await
        .create_record(CreateRecordRequest {
            purpose: "recruitment".into(),
            fields: fields(&[
                ("full_name", text("Ilse Bakker")),
                ("email", text("ilse@example.nl")),
                ("cv_document", blob(&cv, "application/pdf")),
            ]),
        })
        .await
        .expect("create")
        .into_inner()
        .record_id;
    v.client("payroll")
        .await
        .update_record(UpdateRecordRequest {
            record_id: id.clone(),
            purpose: "payroll".into(),
            expected_revision: 0,
            set: fields(&[("bsn", text("111222333"))]),
            clear: vec![],
        })
        .await
        .expect("payroll");
    for (stage, date) in [("employed", "2025-02-01"), ("ended", "2026-03-31")] {
        v.client("payroll")
            .await
            .set_lifecycle(SetLifecycleRequest {
                record_id: id.clone(),
                stage: stage.into(),
                date: date.into(),
            })
            .await
            .expect(stage);
    }
    let mut recruiter = v.client("recruiter").await;
    recruiter
        .set_consent(consent(&id, "talent_pool", false))
        .await
        .expect("withdrawal");
    // A former employee: `recruitment` no longer applies; an offer of new work may.
    recruiter
        .get_record(GetRecordRequest {
            record_id: id.clone(),
            purpose: "personal_offers".into(),
            field_names: vec!["email".into()],
        })
        .await
        .expect("read");
    let mut po = v.client("privacy_officer").await;
    // Exportable while restricted too.
    po.set_restriction(SetRestrictionRequest {
        record_id: id.clone(),
        restricted: true,
        reason: "access request under review".into(),
    })
    .await
    .expect("restrict");

    for role in ["recruiter", "payroll", "auditor", "security_officer"] {
        let refused = v
            .client(role)
            .await
            .export_record(kluis::proto::ExportRecordRequest {
                record_id: id.clone(),
            })
            .await
            .err()
            .expect("no export right");
        assert_eq!(refused.code(), Code::PermissionDenied, "{role}");
        assert_eq!(
            refused.message(),
            format!(
                "role `{role}` may not call ExportRecord (policy right records = [\"export\"] is not granted)"
            )
        );
    }
    let json = po
        .export_record(kluis::proto::ExportRecordRequest {
            record_id: id.clone(),
        })
        .await
        .expect("export")
        .into_inner()
        .json
        .clone();
    let doc: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(doc["format"], "kluis.record-export");
    assert_eq!(doc["version"], 1);
    assert_eq!(doc["record_id"], id.as_str());
    assert_eq!(doc["lifecycle"]["stage"], "ended");
    assert_eq!(doc["lifecycle"]["date"], "2026-03-31");
    assert_eq!(doc["restricted"], true);
    assert_eq!(doc["fields"]["full_name"]["text"], "Ilse Bakker");
    assert_eq!(doc["fields"]["bsn"]["text"], "111222333", "never masked");
    assert_eq!(
        doc["fields"]["cv_document"]["content_type"],
        "application/pdf"
    );
    let back = base64::engine::general_purpose::STANDARD
        .decode(
            doc["fields"]["cv_document"]["blob_base64"]
                .as_str()
                .expect("b64"),
        )
        .expect("base64");
    assert_eq!(back, cv);
    let consents = doc["consents"].as_array().expect("consents");
    assert_eq!(consents[0]["purpose"], "talent_pool");
    assert_eq!(consents[0]["granted"], false);
    let retention = doc["retention"].as_array().expect("retention");
    let identity = retention
        .iter()
        .find(|r| r["category"] == "identity")
        .expect("identity deadline");
    assert_eq!(identity["keep_until"], "2031-03-31");
    assert_eq!(identity["erase_on"], "2031-03-31");
    assert!(identity["rule"].is_null(), "a clock runs: {identity}");
    let history = doc["access_history"].as_array().expect("history");
    let actions: Vec<_> = history
        .iter()
        .map(|h| {
            (
                h["principal"].as_str().expect("p"),
                h["action"].as_str().expect("a"),
            )
        })
        .collect();
    assert_eq!(
        actions,
        vec![
            ("test-recruiter", "CreateRecord"),
            ("test-payroll", "UpdateRecord"),
            ("test-payroll", "SetLifecycle"),
            ("test-payroll", "SetLifecycle"),
            ("test-recruiter", "SetConsent"),
            ("test-recruiter", "GetRecord"),
            ("test-privacy_officer", "SetRestriction"),
            // The refused export attempts are part of the history too.
            ("test-recruiter", "ExportRecord"),
            ("test-payroll", "ExportRecord"),
            ("test-auditor", "ExportRecord"),
            ("test-security_officer", "ExportRecord"),
        ]
    );
    assert!(history[7..].iter().all(|h| h["outcome"] == "denied"));
    let read = &history[5];
    assert_eq!(read["fields"], serde_json::json!(["email"]));
    assert_eq!(read["purpose"], "personal_offers");
    assert!(!history
        .iter()
        .any(|h| h.to_string().contains("Ilse") || h.to_string().contains("111222333")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_show_bsn_and_iban_masked_but_payroll_and_exports_see_them_in_full() {
    let v = spawn_vault().await;
    let id = employee(&v, "jan@example.nl", "employed", "2026-01-05").await;
    let mut po = v.client("privacy_officer").await;
    let got = po
        .get_record(get(&id, "data_subject_request"))
        .await
        .expect("read")
        .into_inner();
    assert_eq!(text_of(&got.fields["bsn"]), "*****2333");
    assert_eq!(text_of(&got.fields["iban"]), "**************4300");
    assert_eq!(
        text_of(&got.fields["email"]),
        "jan@example.nl",
        "not masked"
    );
    let payroll = v
        .client("payroll")
        .await
        .get_record(get(&id, "payroll"))
        .await
        .expect("read")
        .into_inner();
    assert_eq!(text_of(&payroll.fields["bsn"]), "111222333");
    assert_eq!(text_of(&payroll.fields["iban"]), "NL91ABNA0417164300");
    let json = po
        .export_record(kluis::proto::ExportRecordRequest {
            record_id: id.clone(),
        })
        .await
        .expect("export")
        .into_inner()
        .json
        .clone();
    let doc: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(
        doc["fields"]["bsn"]["text"], "111222333",
        "exports are never masked"
    );
    // The export's history tells the masked read from the full one (review 29).
    let reads: Vec<(&str, Vec<&str>)> = doc["access_history"]
        .as_array()
        .expect("history")
        .iter()
        .filter(|h| h["action"] == "GetRecord")
        .map(|h| {
            let masked = h["masked_fields"].as_array().expect("masked_fields");
            (
                h["principal"].as_str().expect("principal"),
                masked.iter().map(|m| m.as_str().expect("name")).collect(),
            )
        })
        .collect();
    assert_eq!(
        reads,
        vec![
            ("test-privacy_officer", vec!["bsn", "iban"]),
            ("test-payroll", vec![]),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rectification_names_who_read_the_changed_fields_since_they_last_changed() {
    let v = spawn_vault().await;
    let id = applicant(&v, "karin@example.nl").await;
    let read = |names: &[&str]| GetRecordRequest {
        record_id: id.clone(),
        purpose: String::new(),
        field_names: names.iter().map(|n| n.to_string()).collect(),
    };
    let mut payroll = v.client("payroll").await;
    payroll
        .get_record(GetRecordRequest {
            purpose: "payroll".into(),
            ..read(&["email"])
        })
        .await
        .expect("payroll reads the email");
    v.client("absence")
        .await
        .get_record(GetRecordRequest {
            purpose: "absence_management".into(),
            ..read(&[])
        })
        .await
        .expect("absence reads every contact field");
    v.client("privacy_officer")
        .await
        .get_record(GetRecordRequest {
            purpose: "data_subject_request".into(),
            ..read(&["full_name"])
        })
        .await
        .expect("privacy officer reads only the name");
    // A refused read is no recipient.
    assert_status(
        payroll
            .get_record(GetRecordRequest {
                purpose: "recruitment".into(),
                ..read(&["email"])
            })
            .await,
        Code::PermissionDenied,
        &[],
    );
    let mut recruiter = v.client("recruiter").await;
    recruiter
        .get_record(GetRecordRequest {
            purpose: "recruitment".into(),
            ..read(&["email"])
        })
        .await
        .expect("the recruiter's own read");
    let change = |email: &str| UpdateRecordRequest {
        record_id: id.clone(),
        purpose: "recruitment".into(),
        expected_revision: 0,
        set: fields(&[("email", text(email))]),
        clear: vec![],
    };
    let out = recruiter
        .update_record(change("karin.b@example.nl"))
        .await
        .expect("rectify")
        .into_inner();
    assert_eq!(out.notify, vec!["test-absence", "test-payroll"]);
    // Nobody read the new value yet.
    let out = recruiter
        .update_record(change("karin.bos@example.nl"))
        .await
        .expect("rectify again")
        .into_inner();
    assert!(out.notify.is_empty(), "{:?}", out.notify);
}

/// An export larger than an answer may be (twice `max_request_bytes`) is refused before its
/// event is written, with RESOURCE_EXHAUSTED naming the setting, not sent as `ok` and then
/// dropped by the transport.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_too_large_to_send_is_refused_naming_the_setting() {
    let mut v = spawn_vault().await;
    v.tweak = Some(|s| s.max_request_bytes = 64 * 1024);
    v.restart().await;
    let mut recruiter = v.client("recruiter").await;
    let bytes = vec![7u8; 60 * 1024];
    let id = create_with(
        &mut recruiter,
        "recruitment",
        &[("photo", blob(&bytes, "image/png"))],
    )
    .await;
    for (name, kind) in [
        ("intro_video", "video/mp4"),
        ("cv_document", "application/pdf"),
    ] {
        recruiter
            .update_record(UpdateRecordRequest {
                record_id: id.clone(),
                purpose: "recruitment".into(),
                expected_revision: 0,
                set: fields(&[(name, blob(&bytes, kind))]),
                clear: vec![],
            })
            .await
            .expect("add a blob");
    }
    let mut po = v.client("privacy_officer").await;
    assert_status(
        po.export_record(kluis::proto::ExportRecordRequest {
            record_id: id.clone(),
        })
        .await,
        Code::ResourceExhausted,
        &["export", "max_request_bytes"],
    );
    let events = v
        .audit_events(QueryEventsRequest {
            record_id: id.clone(),
            ..Default::default()
        })
        .await;
    let export = events
        .iter()
        .find(|e| e.action == "ExportRecord")
        .expect("the export's event");
    assert_ne!(export.outcome, "ok", "{export:?}");

    // The same for a read: every blob at once is more than an answer may hold; one is not.
    assert_status(
        recruiter
            .get_record(GetRecordRequest {
                record_id: id.clone(),
                purpose: "recruitment".into(),
                field_names: vec![],
            })
            .await,
        Code::ResourceExhausted,
        &["field_names", "max_request_bytes"],
    );
    let one = recruiter
        .get_record(GetRecordRequest {
            record_id: id.clone(),
            purpose: "recruitment".into(),
            field_names: vec!["photo".into()],
        })
        .await
        .expect("one blob fits")
        .into_inner();
    assert_eq!(one.fields.len(), 1);
    let reads: Vec<String> = v
        .audit_events(QueryEventsRequest {
            record_id: id.clone(),
            ..Default::default()
        })
        .await
        .into_iter()
        .filter(|e| e.action == "GetRecord")
        .map(|e| e.outcome)
        .collect();
    assert_eq!(
        reads,
        ["invalid", "ok"],
        "the refused read is not recorded as ok"
    );
}

/// The day of the last sweep 30 days back (the vault was down, or the clock had jumped):
/// the sweeper pauses, erasing nothing, until an operator confirms the date with `kluis
/// retention resume` (server stopped); then it sweeps as of that date.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_far_past_the_last_sweep_pauses_the_sweeper_until_the_date_is_confirmed() {
    let mut v = spawn_vault().await;
    v.stop().await;
    // Taken once: the test may run across midnight (UTC).
    let last_sweep = day_from_today(-30);
    {
        let store = kluis::store::SledStore::open(&data_dir(&v.dir)).expect("open");
        let mut b = kluis::store::Batch::default();
        b.put(
            kluis::store::Keyspace::Meta,
            kluis::sweeper::META_SWEEP_DAY.to_vec(),
            last_sweep.clone().into_bytes(),
        );
        kluis::store::Store::commit(&store, b)
            .await
            .expect("last sweep 30 days back");
    }
    v.tweak = Some(|s| s.retention.sweep_interval_secs = 1);
    v.start().await.expect("restart");
    // Closed 40 days ago: due 12 days ago, in every pass of the next seconds.
    let id = applicant(&v, "clock@example.nl").await;
    v.client("recruiter")
        .await
        .set_lifecycle(lifecycle(&id, "procedure_closed", &day_from_today(-40)))
        .await
        .expect("closed 40 days ago");
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    v.client("recruiter")
        .await
        .get_record(get(&id, "personal_offers"))
        .await
        .expect("nothing erased while the sweeper is paused");
    v.stop().await;
    let today = chrono::Utc::now().date_naive();

    // The operator confirms the date (offline); the audit trail names them.
    let home = v.dir.path().join("operator");
    std::fs::create_dir_all(home.join("keys")).expect("keys dir");
    let key = home.join("keys/master.key");
    std::fs::write(&key, v.master_hex()).expect("key file");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("0600");
    let data = data_dir(&v.dir);
    let resume = |at: String| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kluis"))
            .args(["retention", "resume", "--dev", "--at", &at, "--data-dir"])
            .arg(&data)
            .current_dir(&home)
            .env_remove("KLUIS_MASTER_KEY")
            .output()
            .expect("run kluis");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), text)
    };
    // A date the clock has not reached (a typo) is refused: it would turn the pause off.
    let (code, text) = resume(day_from_today(10));
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("after this machine's date"), "{text}");
    // So is one the clock has left behind (review 24: 1899 was recorded).
    for past in [day_from_today(-10), "1899-01-01".to_string()] {
        let (code, text) = resume(past);
        assert_eq!(code, Some(2), "{text}");
        assert!(text.contains("before this machine's date"), "{text}");
    }
    let (code, text) = resume(today.to_string());
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains(&format!("Confirmed {today}")), "{text}");

    v.start().await.expect("restart");
    until_gone(&v, &id, "recruiter", "personal_offers").await;
    let events = v
        .audit_events(QueryEventsRequest {
            principal: String::new(),
            ..Default::default()
        })
        .await;
    let confirmed: Vec<_> = events
        .iter()
        .filter(|e| e.action == "ResumeRetentionSweeps" && e.principal.starts_with("cli:"))
        .map(|e| e.field_names.clone())
        .collect();
    assert_eq!(
        confirmed,
        vec![vec![
            format!("previous:{last_sweep}"),
            format!("confirmed:{today}")
        ]],
        "the confirmation is audited once, with both days"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_erasure_request_no_procedure_reopens_no_employment_begins_and_no_duty_outlives_itself(
) {
    let v = spawn_vault().await;
    let mut po = v.client("privacy_officer").await;
    let mut payroll = v.client("payroll").await;
    let mut recruiter = v.client("recruiter").await;
    // A hire dated ahead keeps BSN and IBAN at the subject's request…
    let id = employee(&v, "hire-ahead@example.nl", "employed", &day_from_today(30)).await;
    let erased = po
        .erase_record(erase(&id))
        .await
        .expect("erase")
        .into_inner();
    assert_eq!(erased.retained.len(), 2, "{erased:?}");
    // The start may move earlier, never later (review 17: moved on again and again, it kept
    // them with no clock).
    assert_status(
        payroll
            .set_lifecycle(lifecycle(&id, "employed", &day_from_today(60)))
            .await,
        Code::FailedPrecondition,
        &["date", "asked for erasure", "may move no later than"],
    );
    payroll
        .set_lifecycle(lifecycle(&id, "employed", &day_from_today(20)))
        .await
        .expect("an earlier start");
    // …and the hire falls through: no duty keeps them any more, so they are due at once
    // (review 16: the closed procedure's clock gave them 28 days, or a year with consent).
    payroll
        .set_lifecycle(lifecycle(&id, "procedure_closed", &day_from_today(0)))
        .await
        .expect("the hire fell through");
    let doc = exported(&mut po, &id).await;
    for entry in doc["retention"].as_array().expect("retention") {
        assert_eq!(
            entry["erase_on"].as_str(),
            Some(day_from_today(0).as_str()),
            "{entry}"
        );
    }
    // Nor does the procedure reopen, or an employment begin, on the record (review 16: a
    // reopened procedure kept the BSN with no clock at all).
    assert_status(
        recruiter
            .set_lifecycle(lifecycle(&id, "applicant", &day_from_today(0)))
            .await,
        Code::FailedPrecondition,
        &[
            "stage",
            "asked for erasure",
            "a new application or employment is a new record",
        ],
    );
    assert_status(
        payroll
            .set_lifecycle(lifecycle(&id, "employed", &day_from_today(10)))
            .await,
        Code::FailedPrecondition,
        &[
            "stage",
            "asked for erasure",
            "cannot become `employed` again",
        ],
    );
    let after = exported(&mut po, &id).await;
    assert_eq!(after["lifecycle"]["stage"], "procedure_closed");
    assert_eq!(after["lifecycle"]["reopened"], false);

    // The export names the dates the lifecycle rules use (review 16): the last employment's
    // end, kept across a rehire.
    let rehired = employee(&v, "rehired@example.nl", "ended", "2025-06-30").await;
    payroll
        .set_lifecycle(lifecycle(&rehired, "employed", "2026-11-01"))
        .await
        .expect("rehired");
    let doc = exported(&mut po, &rehired).await;
    assert_eq!(
        doc["lifecycle"],
        serde_json::json!({
            "stage": "employed",
            "date": "2026-11-01",
            "last_employment_ended": "2025-06-30",
            "procedure_closed_on": null,
            "reopened": false,
        })
    );
}
