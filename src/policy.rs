//! Who may do what: roles with per-category read/write rights and allowed purposes, and
//! principals (callers) mapped to roles. Deny by default: anything not granted is refused.
//!
//! The policy keeps only SHA-256 hashes of bearer tokens. Tokens are 256-bit random values, so
//! a plain hash is enough (no password stretching needed), and lookups compare every stored
//! hash in constant time without stopping early.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::Deserialize;
use zeroize::Zeroizing;

use crate::crypto;
use crate::schema::Category;

/// The shipped default policy (roles and purposes; no principals).
pub const DEFAULT_POLICY_TOML: &str = include_str!("../config/policy.toml");

/// The default role names, fixed: clients and scripts depend on them.
pub const DEFAULT_ROLES: [&str; 6] = [
    "recruiter",
    "payroll",
    "absence",
    "privacy_officer",
    "security_officer",
    "auditor",
];

/// A role's rights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    /// The role's name.
    pub name: String,
    /// Categories it may read.
    pub read: BTreeSet<Category>,
    /// Categories it may write.
    pub write: BTreeSet<Category>,
    /// Purposes it may state.
    pub purposes: BTreeSet<String>,
    /// What it may do with the audit trail.
    pub audit: BTreeSet<AuditRight>,
    /// What it may do with the keys.
    pub keys: BTreeSet<KeyRight>,
    /// Which record-state operations it may call.
    pub records: BTreeSet<RecordRight>,
    /// Categories and field names it may read only masked (this wins over `read`, within it).
    pub masked: BTreeSet<String>,
}

/// A right over a record's processing state (service `Records`). None reads field values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordRight {
    /// `SetLifecycle` (the applicant stages; `employed` and `ended` need
    /// [`RecordRight::SetEmployment`] too).
    SetLifecycle,
    /// `SetLifecycle` to `employed` or `ended`: the stages whose dates start the legal duties
    /// to keep identity and financial data, and the clocks after which they are erased.
    SetEmployment,
    /// `SetConsent`.
    SetConsent,
    /// `SetRestriction`.
    SetRestriction,
    /// `SetLegalHold`.
    SetLegalHold,
    /// `EraseRecord`.
    Erase,
    /// `ExportRecord`.
    Export,
}

impl RecordRight {
    /// The right's name in the policy file.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordRight::SetLifecycle => "set_lifecycle",
            RecordRight::SetEmployment => "set_employment",
            RecordRight::SetConsent => "set_consent",
            RecordRight::SetRestriction => "set_restriction",
            RecordRight::SetLegalHold => "set_legal_hold",
            RecordRight::Erase => "erase",
            RecordRight::Export => "export",
        }
    }
}

/// A right over the key hierarchy (service `Keys`). None of them reads record data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyRight {
    /// `GetKeyStatus`.
    Status,
    /// `RotateKey`.
    Rotate,
    /// `Rewrap`.
    Rewrap,
    /// `Rekey`.
    Rekey,
    /// `RetireKeyVersion`.
    Retire,
}

impl KeyRight {
    /// The right's name in the policy file.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyRight::Status => "status",
            KeyRight::Rotate => "rotate",
            KeyRight::Rewrap => "rewrap",
            KeyRight::Rekey => "rekey",
            KeyRight::Retire => "retire",
        }
    }
}

/// A right over the audit trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditRight {
    /// Query events with any filter (`QueryEvents`).
    Query,
    /// Query only the events of one named record (a data subject's access request).
    QueryByRecord,
    /// Verify the chain (`VerifyChain`).
    Verify,
}

impl Role {
    /// Whether the role may read `category` in full (some of its fields may still be masked:
    /// see [`Role::masks`]).
    pub fn may_read(&self, category: Category) -> bool {
        self.read.contains(&category)
    }

    /// Whether the role sees field `field` of `category` only masked, if it may read it at all:
    /// `masked` narrows `read` and grants nothing (review 30: a role with `masked = ["bsn"]`
    /// and no read right on identity got the last digits of every BSN, and the service
    /// unwrapped identity's data keys to make them). [`Policy::check_masked`] refuses such an
    /// entry at start.
    pub fn masks(&self, category: Category, field: &str) -> bool {
        self.masked.contains(category.as_str()) || self.masked.contains(field)
    }

    /// Whether the role may search by field `field` of `category` (`FindRecords`): it reads
    /// the field in full, or sees it masked but may export records unmasked anyway. A role
    /// that sees a short value masked (a BSN's last 4 digits) could otherwise unmask it by
    /// searching every value the mask leaves open (about 9 100 BSNs, seconds; review 16).
    pub fn may_search(&self, category: Category, field: &str) -> bool {
        self.may_read(category)
            && (!self.masks(category, field) || self.records.contains(&RecordRight::Export))
    }

    /// Whether the role may write `category`.
    pub fn may_write(&self, category: Category) -> bool {
        self.write.contains(&category)
    }

    /// Whether the role may state `purpose`.
    pub fn may_use(&self, purpose: &str) -> bool {
        self.purposes.contains(purpose)
    }
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The principal's name (from the policy).
    pub principal: Arc<str>,
    /// Its role.
    pub role: Arc<Role>,
}

/// A purpose and its legal basis.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Purpose {
    /// The GDPR Art. 6 basis: consent, contract, legal_obligation, vital_interest,
    /// public_task or legitimate_interest.
    pub legal_basis: LegalBasis,
    /// Whether a record may be processed for this purpose only with its subject's consent
    /// (`SetConsent`).
    #[serde(default)]
    pub requires_consent: bool,
    /// The lifecycle stages in which a record may be processed for this purpose (empty: any).
    /// A contract basis ends with the procedure it served: the default policy allows
    /// `recruitment` only for `applicant` and `employed` records, so that a closed
    /// procedure's data is reached only through the purposes that still hold (consent,
    /// legitimate interest not objected to), whose withdrawal and objection then stop it.
    #[serde(default)]
    pub stages: Option<Vec<String>>,
}

/// The lifecycle stages of a record, in order.
pub const LIFECYCLE_STAGES: [&str; 4] = ["applicant", "procedure_closed", "employed", "ended"];

impl Purpose {
    /// Whether a record in lifecycle stage `stage` may be processed for this purpose.
    pub fn applies_in(&self, stage: &str) -> bool {
        self.stages
            .as_ref()
            .is_none_or(|stages| stages.iter().any(|s| s == stage))
    }
}

/// GDPR Art. 6(1) legal bases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LegalBasis {
    /// (a) consent.
    Consent,
    /// (b) performance of a contract.
    Contract,
    /// (c) legal obligation.
    LegalObligation,
    /// (d) vital interest.
    VitalInterest,
    /// (e) public task.
    PublicTask,
    /// (f) legitimate interest.
    LegitimateInterest,
}

/// The whole policy.
#[derive(Debug, Clone)]
pub struct Policy {
    roles: BTreeMap<String, Arc<Role>>,
    purposes: BTreeMap<String, Purpose>,
    tokens: Vec<([u8; 32], Caller)>,
    certs: BTreeMap<String, Caller>,
}

/// A policy file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The TOML did not parse.
    #[error("policy is not valid TOML of the expected shape: {0}")]
    Toml(String),
    /// A rule is broken (named in the message).
    #[error("policy: {0}")]
    Rule(String),
}

impl PolicyError {
    /// What is wrong, for a message that already names the policy file: `<path>: <detail>`.
    pub fn detail(&self) -> String {
        match self {
            PolicyError::Toml(e) => format!("not valid TOML of the expected shape: {e}"),
            PolicyError::Rule(m) => m.clone(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    purposes: BTreeMap<String, Purpose>,
    #[serde(default)]
    roles: BTreeMap<String, RoleFile>,
    #[serde(default)]
    principals: Vec<PrincipalFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleFile {
    #[serde(default)]
    read: Vec<String>,
    #[serde(default)]
    write: Vec<String>,
    #[serde(default)]
    purposes: Vec<String>,
    #[serde(default)]
    audit: Vec<AuditRight>,
    #[serde(default)]
    keys: Vec<KeyRight>,
    #[serde(default)]
    records: Vec<RecordRight>,
    #[serde(default)]
    masked: Vec<String>,
}

/// A principal entry as written in the policy file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PrincipalFile {
    name: String,
    role: String,
    #[serde(default)]
    token_sha256: Option<String>,
    #[serde(default)]
    cert_cn: Option<String>,
}

fn categories(role: &str, what: &str, names: &[String]) -> Result<BTreeSet<Category>, PolicyError> {
    let mut out = BTreeSet::new();
    for name in names {
        if name == "all" {
            out.extend(Category::ALL);
        } else {
            out.insert(Category::parse(name).ok_or_else(|| {
                PolicyError::Rule(format!(
                    "role `{}`: {what} names unknown category `{}`",
                    role.escape_default(),
                    name.escape_default()
                ))
            })?);
        }
    }
    Ok(out)
}

/// Whether `name` is an identifier as principal and role names must be: 1 to 64 ASCII letters,
/// digits, `-`, `_`, `.` or `@`. Both go into every log line and audit event.
fn is_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
}

/// What [`is_identifier`] asks, for messages.
const IDENTIFIER_RULE: &str = "a name is 1 to 64 ASCII letters, digits, `-`, `_`, `.` or `@`";

impl Policy {
    /// Parses a policy from TOML and checks that every reference resolves.
    pub fn from_toml(text: &str) -> Result<Policy, PolicyError> {
        let file: PolicyFile = toml::from_str(text)
            .map_err(|e| PolicyError::Toml(crate::config::toml_error(&e, text)))?;
        for (name, p) in &file.purposes {
            // A purpose goes into every audit event, as role and principal names do (review
            // 22: an empty name, a trailing space and a bidi override were taken).
            if !is_identifier(name) {
                return Err(PolicyError::Rule(format!(
                    "purpose `{}`: {IDENTIFIER_RULE}",
                    name.escape_default()
                )));
            }
            // Deny by default: processing on consent needs the subject's recorded consent,
            // and a withdrawal must stop it.
            if p.legal_basis == LegalBasis::Consent && !p.requires_consent {
                return Err(PolicyError::Rule(format!(
                    "purpose `{}`: legal_basis = \"consent\" needs requires_consent = true (processing on consent needs the data subject's recorded consent, and its withdrawal must stop it)",
                    name.escape_default()
                )));
            }
            let stages = p.stages.as_deref().unwrap_or_default();
            if p.stages.as_ref().is_some_and(Vec::is_empty) {
                return Err(PolicyError::Rule(format!(
                    "purpose `{}`: stages = [] allows no lifecycle stage; leave `stages` out for every stage",
                    name.escape_default()
                )));
            }
            // The data subject's requests are answered whatever the record's stage: export
            // and erasure do not look at stages, so a read limited by them would be odd.
            if name == "data_subject_request" && p.stages.is_some() {
                return Err(PolicyError::Rule(
                    "purpose `data_subject_request`: stages may not be set (a data subject's requests are answered in every lifecycle stage)".into(),
                ));
            }
            for stage in stages {
                if !LIFECYCLE_STAGES.contains(&stage.as_str()) {
                    return Err(PolicyError::Rule(format!(
                        "purpose `{}`: stages: `{}` is not a lifecycle stage (one of {})",
                        name.escape_default(),
                        stage.escape_default(),
                        LIFECYCLE_STAGES.join(", ")
                    )));
                }
            }
        }
        let mut roles = BTreeMap::new();
        for (name, r) in file.roles {
            if !is_identifier(&name) {
                return Err(PolicyError::Rule(format!(
                    "role `{}`: {IDENTIFIER_RULE}",
                    name.escape_default()
                )));
            }
            for p in &r.purposes {
                if !file.purposes.contains_key(p) {
                    return Err(PolicyError::Rule(format!(
                        "role `{}` names undefined purpose `{}`",
                        name.escape_default(),
                        p.escape_default()
                    )));
                }
            }
            let role = Role {
                read: categories(&name, "read", &r.read)?,
                write: categories(&name, "write", &r.write)?,
                purposes: r.purposes.into_iter().collect(),
                audit: r.audit.into_iter().collect(),
                keys: r.keys.into_iter().collect(),
                records: r.records.into_iter().collect(),
                masked: r.masked.into_iter().collect(),
                name: name.clone(),
            };
            roles.insert(name, Arc::new(role));
        }
        let mut policy = Policy {
            roles,
            purposes: file.purposes,
            tokens: Vec::new(),
            certs: BTreeMap::new(),
        };
        let mut named: BTreeMap<String, String> = BTreeMap::new();
        for p in file.principals {
            // A name stands for one caller in every audit event and log line: it is an
            // identifier, never one of the vault's own actors (`system:…`, `cli:…`), and names
            // one role (a principal may have a token and a certificate, under one role).
            if !is_identifier(&p.name) {
                return Err(PolicyError::Rule(format!(
                    "principal `{}`: {IDENTIFIER_RULE} (`:` is kept for the vault's own actors, e.g. `system:retention`)",
                    p.name.escape_default()
                )));
            }
            if let Some(other) = named.insert(p.name.clone(), p.role.clone()) {
                if other != p.role {
                    return Err(PolicyError::Rule(format!(
                        "principal `{}` is mapped to two roles (`{}` and `{}`): one name, one role",
                        p.name.escape_default(),
                        other.escape_default(),
                        p.role.escape_default()
                    )));
                }
            }
            match (p.token_sha256, p.cert_cn) {
                (Some(hash), None) => {
                    let mut bytes = [0u8; 32];
                    hex::decode_to_slice(hash.trim(), &mut bytes).map_err(|_| {
                        PolicyError::Rule(format!(
                            "principal `{}`: token_sha256 must be 64 hex digits",
                            p.name
                        ))
                    })?;
                    policy.add_token_hash(&p.name, &p.role, bytes)?;
                }
                (None, Some(cn)) => policy.add_cert_principal(&p.name, &p.role, &cn)?,
                _ => {
                    return Err(PolicyError::Rule(format!(
                        "principal `{}` needs exactly one of token_sha256 or cert_cn",
                        p.name
                    )))
                }
            }
        }
        Ok(policy)
    }

    /// The shipped default policy: the six default roles, no principals.
    pub fn default_policy() -> Policy {
        Policy::from_toml(DEFAULT_POLICY_TOML).expect("the compiled-in default policy is valid")
    }

    fn caller(&self, name: &str, role: &str) -> Result<Caller, PolicyError> {
        let role = self.roles.get(role).ok_or_else(|| {
            PolicyError::Rule(format!(
                "principal `{}` names undefined role `{}`",
                name.escape_default(),
                role.escape_default()
            ))
        })?;
        Ok(Caller {
            principal: Arc::from(name),
            role: Arc::clone(role),
        })
    }

    /// Adds a principal authenticated by a bearer token with the given SHA-256.
    pub fn add_token_hash(
        &mut self,
        name: &str,
        role: &str,
        hash: [u8; 32],
    ) -> Result<(), PolicyError> {
        let caller = self.caller(name, role)?;
        if self.tokens.iter().any(|(h, _)| crypto::ct_eq(h, &hash)) {
            return Err(PolicyError::Rule(format!(
                "principal `{}`: token hash used twice",
                name.escape_default()
            )));
        }
        self.tokens.push((hash, caller));
        Ok(())
    }

    /// Adds a principal authenticated by a TLS client certificate with common name `cn`.
    pub fn add_cert_principal(
        &mut self,
        name: &str,
        role: &str,
        cn: &str,
    ) -> Result<(), PolicyError> {
        if cn.trim().is_empty() {
            return Err(PolicyError::Rule(format!(
                "principal `{}`: cert_cn is empty (it must be the common name of the client certificate)",
                name.escape_default()
            )));
        }
        let caller = self.caller(name, role)?;
        if self.certs.insert(cn.to_string(), caller).is_some() {
            return Err(PolicyError::Rule(format!(
                "certificate name `{}` mapped twice",
                cn.escape_default()
            )));
        }
        Ok(())
    }

    /// Finds the caller a bearer token belongs to. Compares against every stored hash in
    /// constant time, without stopping at a match.
    pub fn authenticate_token(&self, token: &str) -> Option<Caller> {
        let hash = token_hash(token);
        let mut found = None;
        for (stored, caller) in &self.tokens {
            if crypto::ct_eq(stored, &hash) {
                found = Some(caller);
            }
        }
        found.cloned()
    }

    /// Finds the caller a verified client certificate's common name belongs to.
    pub fn authenticate_cert(&self, common_name: &str) -> Option<Caller> {
        self.certs.get(common_name).cloned()
    }

    /// Checks that every `masked` entry names a category or a field of `schema` (a typo would
    /// otherwise leave a field unmasked), one the role may `read`: `masked` narrows `read` and
    /// grants nothing, so an entry outside it would do nothing but mislead (review 30);
    /// `schema_name` names the schema in the message (its file, or "the built-in schema").
    pub fn check_masked(
        &self,
        schema: &crate::schema::Schema,
        schema_name: &str,
    ) -> Result<(), PolicyError> {
        for role in self.roles.values() {
            for name in &role.masked {
                let category = match (Category::parse(name), schema.field(name)) {
                    (Some(category), _) => category,
                    (None, Some(def)) => def.category,
                    (None, None) => {
                        return Err(PolicyError::Rule(format!(
                            "role `{}`: masked names `{}`, which is neither a category nor a field of the schema ({schema_name})",
                            role.name,
                            name.escape_default()
                        )))
                    }
                };
                if !role.may_read(category) {
                    return Err(PolicyError::Rule(format!(
                        "role `{}`: masked names `{name}` (category {category}), which the role may not read: `masked` only narrows `read` (the role gets those fields masked instead of whole) and grants nothing; add `{category}` to its `read`, or remove the entry",
                        role.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// Looks a role up by name.
    pub fn role(&self, name: &str) -> Option<&Arc<Role>> {
        self.roles.get(name)
    }

    /// Looks a purpose up by name.
    pub fn purpose(&self, name: &str) -> Option<&Purpose> {
        self.purposes.get(name)
    }

    /// The purposes, by name.
    pub fn purposes(&self) -> impl Iterator<Item = (&str, &Purpose)> {
        self.purposes.iter().map(|(n, p)| (n.as_str(), p))
    }

    /// The principals that authenticate by a client certificate's common name, as (principal,
    /// common name).
    pub fn cert_principals(&self) -> impl Iterator<Item = (&str, &str)> {
        self.certs
            .iter()
            .map(|(cn, caller)| (caller.principal.as_ref(), cn.as_str()))
    }

    /// How many principals can authenticate.
    pub fn principal_count(&self) -> usize {
        self.tokens.len() + self.certs.len()
    }
}

/// SHA-256 of a bearer token, as the policy stores it.
pub fn token_hash(token: &str) -> [u8; 32] {
    crypto::sha256(&[token.as_bytes()])
}

/// A fresh bearer token: 32 random bytes, URL-safe base64 (43 characters), prefixed `kluis_`.
pub fn generate_token() -> Result<Zeroizing<String>, crypto::CryptoError> {
    use base64::Engine;
    const PREFIX: &str = "kluis_";
    let mut bytes = Zeroizing::new([0u8; 32]);
    crypto::random_fill(bytes.as_mut())?;
    // Encoded straight into the token's own buffer, sized for it: no temporary copy.
    let mut token = Zeroizing::new(String::with_capacity(
        PREFIX.len()
            + base64::encoded_len(bytes.len(), false)
                .expect("the base64 of 32 bytes is 43 characters, far from overflowing"),
    ));
    token.push_str(PREFIX);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(bytes.as_ref(), &mut token);
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purpose_names_follow_the_identifier_rule() {
        for bad in ["", "recruitment ", "pay\u{202E}llor"] {
            let text = format!(
                "{DEFAULT_POLICY_TOML}\n[purposes.\"{bad}\"]\nlegal_basis = \"contract\"\n"
            );
            let err = Policy::from_toml(&text).expect_err("refused").detail();
            assert!(err.contains("a name is 1 to 64 ASCII"), "{err}");
        }
    }

    #[test]
    fn a_toml_error_names_the_place_and_never_the_value() {
        // Review 20: toml's message quoted the offending line, token included.
        let text = format!(
            "{DEFAULT_POLICY_TOML}\n[[principals]]\nname = \"app\"\nrole = \"recruiter\"\ntoken = \"supersecret-token-value\"\n"
        );
        let err = Policy::from_toml(&text).expect_err("refused").detail();
        assert!(!err.contains("supersecret"), "{err}");
        assert!(
            err.contains("TOML error at line ") && err.contains("token"),
            "{err}"
        );
    }

    #[test]
    fn a_purpose_applies_in_the_stages_it_names() {
        let p = Policy::default_policy();
        let recruitment = p.purpose("recruitment").expect("default purpose");
        assert!(recruitment.applies_in("applicant") && recruitment.applies_in("employed"));
        assert!(!recruitment.applies_in("procedure_closed") && !recruitment.applies_in("ended"));
        let dsr = p.purpose("data_subject_request").expect("default purpose");
        assert!(LIFECYCLE_STAGES.iter().all(|s| dsr.applies_in(s)));
        let text = format!(
            "{DEFAULT_POLICY_TOML}\n[purposes.placement]\nlegal_basis = \"contract\"\nstages = [\"hired\"]\n"
        );
        let err = Policy::from_toml(&text).expect_err("refused").to_string();
        assert!(
            err.contains("purpose `placement`") && err.contains("`hired` is not a lifecycle stage"),
            "{err}"
        );
        let empty = format!(
            "{DEFAULT_POLICY_TOML}\n[purposes.placement]\nlegal_basis = \"contract\"\nstages = []\n"
        );
        let err = Policy::from_toml(&empty).expect_err("refused").to_string();
        assert!(
            err.contains("stages = [] allows no lifecycle stage"),
            "{err}"
        );
        let dsr = DEFAULT_POLICY_TOML.replace(
            "[purposes.data_subject_request]\nlegal_basis = \"legal_obligation\"\n",
            "[purposes.data_subject_request]\nlegal_basis = \"legal_obligation\"\nstages = [\"applicant\"]\n",
        );
        assert_ne!(dsr, DEFAULT_POLICY_TOML);
        let err = Policy::from_toml(&dsr).expect_err("refused").to_string();
        assert!(
            err.contains("`data_subject_request`: stages may not be set"),
            "{err}"
        );
    }

    #[test]
    fn a_purpose_on_consent_must_require_it() {
        let text =
            format!("{DEFAULT_POLICY_TOML}\n[purposes.newsletter]\nlegal_basis = \"consent\"\n");
        let err = Policy::from_toml(&text).expect_err("refused").to_string();
        assert!(
            err.contains("purpose `newsletter`") && err.contains("requires_consent = true"),
            "{err}"
        );
        let fixed = format!("{text}requires_consent = true\n");
        Policy::from_toml(&fixed).expect("with the flag it loads");
    }

    #[test]
    fn masked_entries_must_name_a_category_or_a_field() {
        let schema = crate::schema::Schema::default_schema();
        Policy::default_policy()
            .check_masked(&schema, "the built-in schema")
            .expect("the default policy masks real fields");
        let text = DEFAULT_POLICY_TOML.replace(
            "masked = [\"bsn\", \"iban\"]",
            "masked = [\"bsn\", \"ibna\"]",
        );
        assert_ne!(text, DEFAULT_POLICY_TOML);
        let err = Policy::from_toml(&text)
            .expect("parses")
            .check_masked(&schema, "/etc/kluis/schema.toml")
            .expect_err("typo refused");
        assert!(err.to_string().contains("ibna"));
        assert!(err.to_string().contains("(/etc/kluis/schema.toml)"));
        let po = Policy::default_policy();
        let role = po.role("privacy_officer").expect("role");
        assert!(role.masks(Category::Identity, "bsn"));
        assert!(!role.masks(Category::Identity, "id_scan"));
        // An entry the role may not read is refused, naming it and its category.
        let text = DEFAULT_POLICY_TOML.replace(
            "masked = [\"bsn\", \"iban\"]",
            "masked = [\"bsn\", \"iban\"]\n\n[roles.screener]\nread = [\"contact\"]\nwrite = []\npurposes = [\"recruitment\"]\nmasked = [\"bsn\"]",
        );
        let err = Policy::from_toml(&text)
            .expect("parses")
            .check_masked(&schema, "the built-in schema")
            .expect_err("a mask outside read refused")
            .to_string();
        assert!(
            err.contains("role `screener`")
                && err.contains("`bsn` (category identity), which the role may not read")
                && err.contains("grants nothing"),
            "{err}"
        );
        let text = text.replace("masked = [\"bsn\"]", "masked = [\"financial\"]");
        let err = Policy::from_toml(&text)
            .expect("parses")
            .check_masked(&schema, "the built-in schema")
            .expect_err("a masked category outside read refused")
            .to_string();
        assert!(err.contains("`financial` (category financial)"), "{err}");
    }

    #[test]
    fn names_from_the_policy_file_are_escaped_in_its_errors() {
        // Review 30: a newline split the `error:` line, a bidi override was printed raw.
        let role = format!(
            "{DEFAULT_POLICY_TOML}\n[[principals]]\nname = \"p\"\nrole = \"ghost\\nINJECTED\\u202e\"\ntoken_sha256 = \"{}\"\n",
            "ab".repeat(32)
        );
        let purpose = format!(
            "{DEFAULT_POLICY_TOML}\n[roles.x]\nread = []\nwrite = []\npurposes = [\"mark\\neting\\u202e\"]\n"
        );
        let twice = format!(
            "{DEFAULT_POLICY_TOML}\n[[principals]]\nname = \"p\"\nrole = \"auditor\"\ntoken_sha256 = \"{}\"\n[[principals]]\nname = \"p\"\nrole = \"x\\u202eevil\"\ntoken_sha256 = \"{}\"\n",
            "ab".repeat(32),
            "cd".repeat(32)
        );
        let category = format!(
            "{DEFAULT_POLICY_TOML}\n[roles.x]\nread = [\"cv\\n\\u202e\"]\nwrite = []\npurposes = []\n"
        );
        for (text, shown) in [
            (category, "cv\\n\\u{202e}"),
            (role, "ghost\\nINJECTED\\u{202e}"),
            (purpose, "mark\\neting\\u{202e}"),
            (twice, "x\\u{202e}evil"),
        ] {
            let err = Policy::from_toml(&text).expect_err("refused").to_string();
            assert!(
                !err.contains('\n') && !err.contains('\u{202e}') && err.contains(shown),
                "{err}"
            );
        }
        let mut policy = Policy::default_policy();
        policy
            .add_cert_principal("a", "auditor", "c\nn")
            .expect("first");
        let err = policy
            .add_cert_principal("b", "auditor", "c\nn")
            .expect_err("twice")
            .to_string();
        assert!(err.contains("`c\\nn` mapped twice"), "{err}");
    }

    #[test]
    fn default_policy_has_the_fixed_roles() {
        let policy = Policy::default_policy();
        for r in DEFAULT_ROLES {
            assert!(policy.role(r).is_some(), "{r}");
        }
        let recruiter = policy.role("recruiter").expect("recruiter");
        assert!(recruiter.may_read(Category::Cv) && !recruiter.may_read(Category::Identity));
        let officer = policy.role("privacy_officer").expect("po");
        assert!(Category::ALL.iter().all(|c| officer.may_read(*c)));
        assert!(Category::ALL.iter().all(|c| !officer.may_write(*c)));
        let sec = policy.role("security_officer").expect("sec");
        assert!(sec.read.is_empty() && sec.write.is_empty() && sec.purposes.is_empty());
    }

    #[test]
    fn tokens_authenticate_by_hash() {
        let mut policy = Policy::default_policy();
        policy
            .add_token_hash("app", "recruiter", token_hash("secret-1"))
            .expect("add");
        let caller = policy.authenticate_token("secret-1").expect("known token");
        assert_eq!(caller.role.name, "recruiter");
        assert!(policy.authenticate_token("secret-2").is_none());
        assert!(policy.add_token_hash("x", "nope", [0; 32]).is_err());
    }

    #[test]
    fn principal_names_are_identifiers_with_one_role() {
        let with =
            |principals: &str| Policy::from_toml(&format!("{DEFAULT_POLICY_TOML}\n{principals}"));
        let hash = |n: u8| hex::encode([n; 32]);
        let entry = |name: &str, role: &str, n: u8| {
            format!(
                "[[principals]]\nname = \"{name}\"\nrole = \"{role}\"\ntoken_sha256 = \"{}\"\n",
                hash(n)
            )
        };
        with(&entry("payroll-system", "payroll", 1)).expect("a plain name");
        // One name with a token and a certificate, under one role.
        with(&format!(
            "{}[[principals]]\nname = \"app\"\nrole = \"recruiter\"\ncert_cn = \"app\"\n",
            entry("app", "recruiter", 1)
        ))
        .expect("two credentials, one role");
        for (bad, says) in [
            (
                entry("system:retention", "payroll", 1),
                "kept for the vault's own actors",
            ),
            (entry("", "payroll", 1), "1 to 64"),
            (entry("jan de vries", "payroll", 1), "1 to 64"),
            (
                format!(
                    "{}{}",
                    entry("app", "recruiter", 1),
                    entry("app", "payroll", 2)
                ),
                "two roles",
            ),
        ] {
            let err = with(&bad).expect_err("refused");
            assert!(err.to_string().contains(says), "{err}");
        }
    }

    #[test]
    fn role_names_are_identifiers_like_principal_names() {
        for name in ["hr-admin", "hr_admin.2", "ops@example"] {
            Policy::from_toml(&format!("[roles.\"{name}\"]\nread = [\"cv\"]\n")).expect(name);
        }
        for name in ["bad role\\nname", "", "a:b", "rol\u{e9}", &"x".repeat(65)] {
            let err = Policy::from_toml(&format!("[roles.\"{name}\"]\nread = [\"cv\"]\n"))
                .expect_err(name)
                .to_string();
            assert!(err.contains("role `") && err.contains("1 to 64"), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn an_empty_cert_cn_is_refused() {
        for cn in ["", "  "] {
            let err = Policy::from_toml(&format!(
                "{DEFAULT_POLICY_TOML}\n[[principals]]\nname = \"x\"\nrole = \"auditor\"\ncert_cn = \"{cn}\"\n"
            ))
            .expect_err("refused")
            .to_string();
            assert!(err.contains("principal `x`: cert_cn is empty"), "{err}");
        }
        let policy = Policy::from_toml(&format!(
            "{DEFAULT_POLICY_TOML}\n[[principals]]\nname = \"x\"\nrole = \"auditor\"\ncert_cn = \"a.example\"\n"
        ))
        .expect("a common name");
        assert_eq!(
            policy.cert_principals().collect::<Vec<_>>(),
            [("x", "a.example")]
        );
    }

    #[test]
    fn unknown_category_is_refused() {
        let err = Policy::from_toml("[roles.x]\nread = [\"secrets\"]\n").expect_err("bad");
        assert!(err.to_string().contains("secrets"));
    }
}
