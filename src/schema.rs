//! The field catalogue: which fields a record may hold, their category, type and limits, and
//! the typed values (`Bsn`, `Iban`, …) that incoming values are parsed into at the edge.
//!
//! The schema is data (TOML); [`Schema::default_schema`] is `config/schema.toml`, compiled in.
//! Parsing a value yields a [`Parsed`]: the normalised plaintext to seal (zeroizing) and, for
//! searchable fields, the normalised form the blind index is computed over.

use std::collections::BTreeMap;
use std::fmt;
use std::fmt::Write as _;

use chrono::{Months, NaiveDate};
use icu_normalizer::ComposingNormalizerBorrowed;
use icu_properties::props::{DefaultIgnorableCodePoint, GeneralCategory, GeneralCategoryGroup};
use icu_properties::{CodePointMapData, CodePointSetData};
use serde::Deserialize;
use zeroize::{Zeroize, Zeroizing};

use crate::wipe::WipingString;

/// The shipped default schema.
pub const DEFAULT_SCHEMA_TOML: &str = include_str!("../config/schema.toml");

/// A category of fields; each category has its own data key per record, so a role that may
/// not read a category never causes its key to be unwrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// Name, address, e-mail, phone.
    Contact,
    /// Date of birth, gender, nationality, photo, intro video.
    Personal,
    /// CV document, education, experience, tests, references, availability.
    Cv,
    /// BSN, identity document, work permit.
    Identity,
    /// IBAN, wage, payroll tax credit.
    Financial,
    /// Absence periods (dates only).
    Absence,
}

impl Category {
    /// Every category, in a fixed order.
    pub const ALL: [Category; 6] = [
        Category::Contact,
        Category::Personal,
        Category::Cv,
        Category::Identity,
        Category::Financial,
        Category::Absence,
    ];

    /// The category's name as used in TOML, proto and storage.
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Contact => "contact",
            Category::Personal => "personal",
            Category::Cv => "cv",
            Category::Identity => "identity",
            Category::Financial => "financial",
            Category::Absence => "absence",
        }
    }

    /// Parses a category name.
    pub fn parse(name: &str) -> Option<Category> {
        Category::ALL.into_iter().find(|c| c.as_str() == name)
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The type of a field and its limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldType {
    /// Free text of at most `max_len` characters (after NFC), no control characters except
    /// newline/tab/carriage return, no invisible characters (Unicode category Cf or
    /// Default_Ignorable_Code_Point), something visible.
    Text {
        /// Maximum length in characters.
        max_len: usize,
    },
    /// An e-mail address (`local@domain.tld`): NFC, dot-atom local part, domain in IDNA ASCII
    /// form (UTS #46), lower case; the index is over the lower-cased address.
    Email,
    /// A phone number, stored as `+` and 8 to 15 digits (E.164-like); a national number starting
    /// with a single 0 is Dutch (default region NL, `+31`).
    Phone,
    /// A Dutch postcode: four digits (first not 0), optional space, two letters.
    Postcode,
    /// An ISO 8601 calendar date, `YYYY-MM-DD`, with optional per-field bounds.
    Date {
        /// Refuse dates after today (e.g. a date of birth).
        not_after_today: bool,
        /// Refuse dates more than this many years before today (e.g. 120 for a date of birth).
        max_years_ago: Option<u32>,
    },
    /// A Dutch citizen service number: 9 digits passing the 11-test.
    Bsn,
    /// An IBAN (ISO 13616): a country in the SWIFT IBAN registry, that country's length and
    /// account-number format, check digits 02–98 passing mod-97.
    Iban,
    /// A non-negative amount with at most two decimals, e.g. `3125.50`.
    Amount,
    /// `true` or `false`.
    Boolean,
    /// One of a fixed set of values.
    Enum {
        /// The allowed values.
        values: Vec<String>,
    },
    /// Date periods `YYYY-MM-DD/YYYY-MM-DD` (end may be empty: ongoing), comma separated;
    /// stored sorted, no overlaps, at most one ongoing period and only as the latest.
    Periods,
    /// Binary content of at most `max_bytes`, with a content type from `content_types`.
    Blob {
        /// Maximum size in bytes.
        max_bytes: usize,
        /// Allowed content types (exact, lower-case).
        content_types: Vec<String>,
    },
}

impl FieldType {
    /// The masked form of a (normalised) text value of this type, for roles that may see a
    /// field only masked: BSN and IBAN keep their last 4 characters, an e-mail its first letter
    /// and domain, a phone its last 2 digits, a date its year; anything else is hidden whole.
    /// `None` for blobs (never returned masked: withheld instead).
    pub fn mask(&self, value: &str) -> Option<String> {
        // Built from the kept characters only, into a string sized up front: no copy of the
        // whole value (a `Vec<char>` of it, or a string that grows) is left behind.
        let tail = |n: usize, keep: fn(&char) -> bool| {
            let count = value.chars().filter(keep).count();
            let hidden = count - count.min(n);
            let mut out = String::with_capacity(hidden + value.len());
            out.extend(std::iter::repeat_n('*', hidden));
            out.extend(value.chars().filter(keep).skip(hidden));
            out
        };
        Some(match self {
            FieldType::Bsn | FieldType::Iban => tail(4, |c| !c.is_whitespace()),
            FieldType::Phone => tail(2, char::is_ascii_digit),
            FieldType::Email => match value.split_once('@') {
                Some((local, domain)) => {
                    let first = local.chars().next();
                    let mut out = String::with_capacity(8 + domain.len());
                    out.extend(first);
                    out.push_str("***@");
                    out.push_str(domain);
                    out
                }
                None => "***".to_string(),
            },
            FieldType::Date { .. } => {
                let mut out = String::with_capacity(16 + 6);
                out.extend(value.chars().take(4));
                out.push_str("-**-**");
                out
            }
            FieldType::Blob { .. } => return None,
            _ => "***".to_string(),
        })
    }

    /// The mask of a stored value of this type: [`FieldType::mask`] of the value as this type
    /// reads it now (its normalised form; a date's limits, which move with the clock, left
    /// out), or `***` for a value this type does not take — one stored before the schema gave
    /// the field this type (review 22: `TX-777`, masked `***` as text, showed `**-777` once the
    /// type was `bsn`; review 23: values stored by older builds, and aged dates, kept their
    /// partial masks only this way).
    pub fn mask_stored(&self, value: &str) -> String {
        let lenient = match self {
            FieldType::Date { .. } => FieldType::Date {
                not_after_today: false,
                max_years_ago: None,
            },
            other => other.clone(),
        };
        if self.is_blob() {
            return "***".to_string();
        }
        // "Today" as late as it goes: no limit counted from it refuses a stored value (the
        // dates' limits are left out above, and a period may start up to a year after it).
        match parse_text(&lenient, value, NaiveDate::MAX) {
            Ok(read) => self.mask(&read).unwrap_or_else(|| "***".to_string()),
            Err(_) => "***".to_string(),
        }
    }

    /// Whether values of this type are blobs (bytes with a content type) rather than text.
    pub fn is_blob(&self) -> bool {
        matches!(self, FieldType::Blob { .. })
    }

    /// Whether a blind index over this type makes sense: values that identify a person
    /// (e-mail, BSN, IBAN, phone, postcode) or free text. Not booleans, enums, dates, periods,
    /// amounts or blobs: a deterministic tag over a value with few possible values would group
    /// records by that value for anyone who can read the store.
    pub fn may_be_searchable(&self) -> bool {
        matches!(
            self,
            FieldType::Email
                | FieldType::Bsn
                | FieldType::Iban
                | FieldType::Phone
                | FieldType::Postcode
                | FieldType::Text { .. }
        )
    }

    fn name(&self) -> &'static str {
        match self {
            FieldType::Text { .. } => "text",
            FieldType::Email => "email",
            FieldType::Phone => "phone",
            FieldType::Postcode => "postcode",
            FieldType::Date { .. } => "date",
            FieldType::Bsn => "bsn",
            FieldType::Iban => "iban",
            FieldType::Amount => "amount",
            FieldType::Boolean => "boolean",
            FieldType::Enum { .. } => "enum",
            FieldType::Periods => "periods",
            FieldType::Blob { .. } => "blob",
        }
    }
}

/// One field of the schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDef {
    /// The field's name (the key in `fields` maps).
    pub name: String,
    /// Its category.
    pub category: Category,
    /// Its type and limits.
    pub kind: FieldType,
    /// Whether a blind index is kept for exact-match search.
    pub searchable: bool,
}

/// The whole field catalogue.
#[derive(Debug, Clone)]
pub struct Schema {
    fields: BTreeMap<String, FieldDef>,
}

/// A schema file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The TOML did not parse or did not match the schema format.
    #[error("schema is not valid TOML of the expected shape: {0}")]
    Toml(String),
    /// A definition breaks a rule (named in the message).
    #[error("schema field `{field}`: {rule}")]
    Rule {
        /// The field.
        field: String,
        /// The broken rule.
        rule: String,
    },
}

impl SchemaError {
    /// What is wrong, for a message that already names the schema file: `<path>: <detail>`.
    pub fn detail(&self) -> String {
        match self {
            SchemaError::Toml(e) => format!("not valid TOML of the expected shape: {e}"),
            SchemaError::Rule { field, rule } => format!("field `{field}`: {rule}"),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SchemaFile {
    /// Read as plain tables so that every key can be checked against the field's type by hand
    /// (serde's `flatten` would silently ignore a misspelt key such as `searchabel`).
    fields: BTreeMap<String, toml::Table>,
}

/// Keys every field may have.
const COMMON_KEYS: [&str; 3] = ["category", "type", "searchable"];

/// The field types, as written in `type = "…"`.
const TYPE_NAMES: [&str; 12] = [
    "text", "email", "phone", "postcode", "date", "bsn", "iban", "amount", "boolean", "enum",
    "periods", "blob",
];

/// The keys a type allows besides [`COMMON_KEYS`]; `None` for an unknown type.
fn type_keys(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "text" => &["max_len"],
        "date" => &["not_after_today", "max_years_ago"],
        "enum" => &["values"],
        "blob" => &["max_bytes", "content_types"],
        "email" | "phone" | "postcode" | "bsn" | "iban" | "amount" | "boolean" | "periods" => &[],
        _ => return None,
    })
}

/// Longest field name accepted in a schema.
pub const MAX_FIELD_NAME_LEN: usize = 64;
/// Largest `max_len` of a text field, in characters.
pub const MAX_TEXT_CHARS: usize = 1024 * 1024;
/// Largest `max_bytes` of a blob field (256 MiB; a request must also fit `max_request_bytes`).
pub const MAX_BLOB_BYTES: usize = 256 * 1024 * 1024;
/// Largest `max_years_ago` of a date field.
pub const MAX_YEARS_AGO: u32 = 300;
/// Longest enum value or content type accepted in a schema, in bytes.
const MAX_SCHEMA_WORD: usize = 255;

/// Whether `s` is a content type as the allow-list needs it: lower-case `type/subtype` of the
/// RFC 6838 restricted-name characters, no parameters, no spaces.
fn is_plain_content_type(s: &str) -> bool {
    let part = |p: &str| {
        p.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && p.len() <= 127
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$&-^_.+".contains(&b))
    };
    s.split_once('/')
        .is_some_and(|(t, sub)| part(t) && part(sub))
}

impl Schema {
    /// Parses a schema from TOML and checks its rules.
    pub fn from_toml(text: &str) -> Result<Schema, SchemaError> {
        let file: SchemaFile = toml::from_str(text)
            .map_err(|e| SchemaError::Toml(crate::config::toml_error(&e, text)))?;
        let mut fields = BTreeMap::new();
        for (name, table) in file.fields {
            let def = field_from_table(&name, table).map_err(|rule| SchemaError::Rule {
                field: name.clone(),
                rule,
            })?;
            fields.insert(name, def);
        }
        Ok(Schema { fields })
    }

    /// The shipped default schema (`config/schema.toml`).
    pub fn default_schema() -> Schema {
        Schema::from_toml(DEFAULT_SCHEMA_TOML).expect("the compiled-in default schema is valid")
    }

    /// Looks a field up by name.
    pub fn field(&self, name: &str) -> Option<&FieldDef> {
        self.fields.get(name)
    }

    /// Every field, ordered by name.
    pub fn fields(&self) -> impl Iterator<Item = &FieldDef> {
        self.fields.values()
    }

    /// The most bytes the values of one record can hold together: every field at its limit
    /// (for the export's answer limit).
    pub fn largest_record(&self) -> usize {
        self.fields
            .values()
            .map(FieldDef::largest_value)
            .fold(0usize, usize::saturating_add)
    }

    /// The largest value any field accepts, in bytes (for transport limits).
    pub fn largest_value(&self) -> usize {
        self.fields
            .values()
            .map(FieldDef::largest_value)
            .max()
            .unwrap_or(0)
    }
}

/// Checks one field's name and keys and builds its definition; the error is the broken rule.
fn field_from_table(name: &str, table: toml::Table) -> Result<FieldDef, String> {
    if name.is_empty()
        || name.len() > MAX_FIELD_NAME_LEN
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err("names are 1–64 characters of a-z, 0-9 and _".into());
    }
    let Some(kind) = table
        .get("type")
        .and_then(toml::Value::as_str)
        .map(str::to_owned)
    else {
        return Err(format!(
            "key `type` is required, a string, one of: {}",
            TYPE_NAMES.join(", ")
        ));
    };
    let Some(extra) = type_keys(&kind) else {
        return Err(unknown_type());
    };
    let allowed: Vec<&str> = COMMON_KEYS.iter().chain(extra).copied().collect();
    for key in table.keys() {
        if allowed.contains(&key.as_str()) {
            continue;
        }
        let known = TYPE_NAMES
            .iter()
            .filter_map(|t| type_keys(t))
            .any(|keys| keys.contains(&key.as_str()));
        return Err(if known {
            format!(
                "key `{key}` does not apply to type `{kind}` (keys for `{kind}`: {})",
                allowed.join(", ")
            )
        } else {
            format!(
                "unknown key `{key}` (keys for `{kind}`: {})",
                allowed.join(", ")
            )
        });
    }
    // Each key read on its own, so that a value of the wrong type names its key.
    let category: Category = required(&table, &kind, "category")?;
    let searchable: bool = optional(&table, "searchable")?.unwrap_or(false);
    let int = |key: &str, max: u64| -> Result<Option<u64>, String> {
        match optional::<i64>(&table, key)? {
            None => Ok(None),
            Some(n) => match u64::try_from(n) {
                Ok(n) if (1..=max).contains(&n) => Ok(Some(n)),
                _ => Err(format!("{key} must be between 1 and {max}")),
            },
        }
    };
    let field_type = match kind.as_str() {
        "text" => {
            let cap = MAX_TEXT_CHARS as u64;
            let max_len = int("max_len", cap)?.ok_or_else(|| missing(&kind, "max_len"))?;
            FieldType::Text {
                max_len: usize::try_from(max_len).map_err(|_| missing(&kind, "max_len"))?,
            }
        }
        "email" => FieldType::Email,
        "phone" => FieldType::Phone,
        "postcode" => FieldType::Postcode,
        "date" => FieldType::Date {
            not_after_today: optional(&table, "not_after_today")?.unwrap_or(false),
            max_years_ago: int("max_years_ago", u64::from(MAX_YEARS_AGO))?
                .and_then(|n| u32::try_from(n).ok()),
        },
        "bsn" => FieldType::Bsn,
        "iban" => FieldType::Iban,
        "amount" => FieldType::Amount,
        "boolean" => FieldType::Boolean,
        "enum" => {
            let values: Vec<String> = required(&table, &kind, "values")?;
            if values.is_empty() {
                return Err("enum needs at least one value".into());
            }
            for (i, v) in values.iter().enumerate() {
                if v.is_empty()
                    || v.trim() != v
                    || v.len() > MAX_SCHEMA_WORD
                    || v.chars().any(|c| c.is_control() || is_format_char(c))
                {
                    return Err(format!(
                        "enum value {} must be non-empty, at most {MAX_SCHEMA_WORD} bytes, without surrounding spaces, control or format characters (input is trimmed, so it could never match)",
                        i + 1
                    ));
                }
                if values[..i].contains(v) {
                    return Err(format!("enum value {} repeats an earlier value", i + 1));
                }
            }
            FieldType::Enum { values }
        }
        "periods" => FieldType::Periods,
        "blob" => {
            let cap = MAX_BLOB_BYTES as u64;
            let max_bytes = int("max_bytes", cap)?.ok_or_else(|| missing(&kind, "max_bytes"))?;
            let content_types: Vec<String> = required(&table, &kind, "content_types")?;
            if content_types.is_empty() {
                return Err("blobs need at least one content type in content_types".into());
            }
            for (i, t) in content_types.iter().enumerate() {
                if !is_plain_content_type(t) {
                    return Err(format!(
                        "content_types entry {} must be a lower-case `type/subtype` without spaces or parameters, e.g. application/pdf (incoming types are lower-cased and compared exactly)",
                        i + 1
                    ));
                }
                if content_types[..i].contains(t) {
                    return Err(format!(
                        "content_types entry {} repeats an earlier entry",
                        i + 1
                    ));
                }
            }
            FieldType::Blob {
                max_bytes: usize::try_from(max_bytes).map_err(|_| missing(&kind, "max_bytes"))?,
                content_types,
            }
        }
        _ => return Err(unknown_type()),
    };
    if searchable && !field_type.may_be_searchable() {
        return Err(format!(
            "key `searchable`: a `{kind}` field cannot be searchable (only email, bsn, iban, phone, postcode and text: a blind index over a value with few possible values groups records by that value)"
        ));
    }
    Ok(FieldDef {
        name: name.to_string(),
        category,
        kind: field_type,
        searchable,
    })
}

fn unknown_type() -> String {
    format!(
        "key `type`: unknown type (types: {})",
        TYPE_NAMES.join(", ")
    )
}

fn missing(kind: &str, key: &str) -> String {
    format!("type `{kind}` needs key `{key}`")
}

/// The value of `key` in a field's table, if present, as a `T`; the error names the key.
fn optional<T: serde::de::DeserializeOwned>(
    table: &toml::Table,
    key: &str,
) -> Result<Option<T>, String> {
    table
        .get(key)
        .map(|v| {
            v.clone().try_into().map_err(|e: toml::de::Error| {
                format!(
                    "key `{key}`: {}",
                    crate::config::redact_rule(e.message().trim())
                )
            })
        })
        .transpose()
}

/// Like [`optional`], for a key the field's type needs.
fn required<T: serde::de::DeserializeOwned>(
    table: &toml::Table,
    kind: &str,
    key: &str,
) -> Result<T, String> {
    optional(table, key)?.ok_or_else(|| missing(kind, key))
}

/// Why a value was refused; the message names the rule, never the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// The value breaks the field's format rule.
    #[error("{0}")]
    Invalid(String),
    /// The value is larger than the field allows.
    #[error("{0}")]
    TooLarge(String),
}

/// An incoming value before parsing: text or bytes with a content type.
pub enum RawValue<'a> {
    /// Text.
    Text(&'a str),
    /// Bytes (taken, not copied: they become the sealed value), with the declared content
    /// type.
    Blob(Zeroizing<Vec<u8>>, &'a str),
}

/// A parsed, normalised value, ready to seal.
pub struct Parsed {
    /// The normalised plaintext (UTF-8 for text types), in its own buffer, which sealing
    /// turns into the ciphertext.
    pub plaintext: crate::record::PendingValue,
    /// The content type, for blobs.
    pub content_type: Option<String>,
    /// For searchable fields: the normalised form the blind index is computed over.
    pub index_form: Option<Zeroizing<String>>,
}

impl fmt::Debug for Parsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Parsed({} bytes)", self.plaintext.len())
    }
}

impl FieldDef {
    /// The most bytes a value of this field can take.
    pub fn largest_value(&self) -> usize {
        match &self.kind {
            FieldType::Blob { max_bytes, .. } => *max_bytes,
            // A character is at most 4 bytes of UTF-8.
            FieldType::Text { max_len } => max_len.saturating_mul(4),
            _ => 256,
        }
    }

    /// Parses an incoming value for this field. `today` bounds dates (a date of birth not in
    /// the future, an absence starting at most a year ahead); pass the vault's clock.
    pub fn parse(&self, raw: RawValue<'_>, today: NaiveDate) -> Result<Parsed, ValueError> {
        match (&self.kind, raw) {
            (
                FieldType::Blob {
                    max_bytes,
                    content_types,
                },
                RawValue::Blob(bytes, content_type),
            ) => {
                if bytes.is_empty() {
                    return Err(ValueError::Invalid(
                        "must not be empty (use clear to remove a field)".into(),
                    ));
                }
                if bytes.len() > *max_bytes {
                    return Err(ValueError::TooLarge(format!(
                        "is {} bytes, larger than the limit of {max_bytes} bytes",
                        bytes.len()
                    )));
                }
                let content_type = content_type.trim().to_ascii_lowercase();
                if !content_types.contains(&content_type) {
                    return Err(ValueError::Invalid(format!(
                        "content_type must be one of: {}",
                        content_types.join(", ")
                    )));
                }
                Ok(Parsed {
                    plaintext: crate::record::PendingValue::new(bytes),
                    content_type: Some(content_type),
                    index_form: None,
                })
            }
            (FieldType::Blob { .. }, RawValue::Text(_)) => Err(ValueError::Invalid(
                "is a blob field: send bytes in `blob` with a content_type".into(),
            )),
            (_, RawValue::Blob(..)) => {
                let kind = self.kind.name();
                let article = if kind.starts_with(['a', 'e', 'i', 'o', 'u']) {
                    "an"
                } else {
                    "a"
                };
                Err(ValueError::Invalid(format!(
                    "is {article} {kind} field: send the value in `text`, without content_type"
                )))
            }
            (kind, RawValue::Text(text)) => {
                let mut normalised = parse_text(kind, text, today)?;
                let index_form = self.searchable.then(|| index_form(kind, &normalised));
                // The normalised text's own buffer, moved (not copied).
                let bytes = Zeroizing::new(std::mem::take(&mut *normalised).into_bytes());
                Ok(Parsed {
                    plaintext: crate::record::PendingValue::new(bytes),
                    content_type: None,
                    index_form,
                })
            }
        }
    }

    /// Parses a search value for this (searchable) field into its index form: the same
    /// normalisation as [`FieldDef::parse`], so a value finds the records it was stored on.
    /// A blank value is refused as missing, whatever the field's type.
    pub fn parse_search(
        &self,
        text: &str,
        today: NaiveDate,
    ) -> Result<Zeroizing<String>, ValueError> {
        if text.trim().is_empty() {
            return Err(invalid("is required (the value to search for)"));
        }
        let normalised = parse_text(&self.kind, text, today)?;
        Ok(index_form(&self.kind, &normalised))
    }
}

/// The form the blind index is computed over, from a value's stored (normalised) form.
fn index_form(kind: &FieldType, normalised: &str) -> Zeroizing<String> {
    match kind {
        // The stored domain is already lower-case ASCII; the local part keeps its case in the
        // stored value and is case-folded here (NFC again: folding can decompose).
        FieldType::Email => nfc(&fold(normalised)),
        _ => Zeroizing::new(normalised.to_owned()),
    }
}

fn invalid(rule: &str) -> ValueError {
    ValueError::Invalid(rule.to_string())
}

/// Whether `c` is invisible: a Unicode format character (general category Cf: zero-width
/// space, joiners, bidi embeddings, overrides and isolates, soft hyphen, byte-order mark,
/// tags, …) or a default-ignorable code point (Hangul fillers, the combining grapheme joiner,
/// variation selectors, …). Such characters make two values that look the same differ, or
/// make text display as something else.
pub(crate) fn is_format_char(c: char) -> bool {
    GeneralCategoryGroup::Format.contains(CodePointMapData::<GeneralCategory>::new().get(c))
        || CodePointSetData::new::<DefaultIgnorableCodePoint>().contains(c)
}

/// Whether `text` shows anything: a character that is not white space, not invisible
/// ([`is_format_char`]) and not the blank braille pattern U+2800 (category So, drawn as
/// nothing). A value, or a required reason, made of such characters only looks empty.
pub(crate) fn has_visible_char(text: &str) -> bool {
    text.chars()
        .any(|c| !c.is_whitespace() && !is_format_char(c) && c != '\u{2800}')
}

/// Unicode full case folding (the default, not Turkic), leaving no copy of the value behind.
/// Folding, unlike lower-casing, has no context: `ΣΑΣ`, `σας` and `σασ` fold alike, and so do
/// `STRASSE`, `straße` and `STRAẞE` (review 31; lower-casing decides a capital sigma's form by
/// the letters around it, and keeps `ß`). On ASCII it is lower-casing. A character folds to at
/// most three times its UTF-8 length (`ΐ`, 2 bytes, to 6), so the buffer never grows.
fn fold(s: &str) -> Zeroizing<String> {
    let mut out = WipingString::with_capacity(s.len().saturating_mul(FOLD_MAX_EXPANSION));
    writeable::Writeable::write_to(&icu_casemap::CaseMapper::new().fold(s), &mut out)
        .expect("writing to a WipingString never fails");
    out.into_inner()
}

/// Case folding makes a string at most three times as long in UTF-8 bytes.
const FOLD_MAX_EXPANSION: usize = 3;

/// Unicode Normalization Form C, into a buffer that leaves no copy behind when it grows.
fn nfc(s: &str) -> Zeroizing<String> {
    let mut out = WipingString::with_capacity(s.len());
    ComposingNormalizerBorrowed::new_nfc()
        .normalize_to(s, &mut out)
        .expect("writing to a WipingString never fails");
    out.into_inner()
}

/// NFC can make a string at most three times as long (in characters): a cheap bound checked
/// before normalising a value that is obviously far too long.
const NFC_MAX_EXPANSION: usize = 3;

/// Parses and normalises a text value of `kind`. The returned string is what gets sealed.
fn parse_text(
    kind: &FieldType,
    text: &str,
    today: NaiveDate,
) -> Result<Zeroizing<String>, ValueError> {
    match kind {
        FieldType::Text { max_len } => parse_free_text(text, *max_len),
        FieldType::Email => Email::parse(text).map(|e| e.0),
        FieldType::Phone => Phone::parse(text).map(|p| p.0),
        FieldType::Postcode => Postcode::parse(text).map(|p| p.0),
        FieldType::Date {
            not_after_today,
            max_years_ago,
        } => {
            let date = Date::parse(text)?;
            let day = date.to_naive();
            if *not_after_today && day > today {
                return Err(invalid("date must not be after today"));
            }
            if let Some(years) = max_years_ago {
                let earliest = today.checked_sub_months(Months::new(years.saturating_mul(12)));
                if earliest.is_some_and(|earliest| day < earliest) {
                    return Err(ValueError::Invalid(format!(
                        "date must be at most {years} years before today"
                    )));
                }
            }
            Ok(date.to_zeroizing())
        }
        FieldType::Bsn => Bsn::parse(text).map(|b| b.0),
        FieldType::Iban => Iban::parse(text).map(|i| i.0),
        FieldType::Amount => parse_amount(text),
        FieldType::Boolean => match text.trim() {
            "true" => Ok(Zeroizing::new("true".into())),
            "false" => Ok(Zeroizing::new("false".into())),
            _ => Err(invalid("must be `true` or `false`")),
        },
        FieldType::Enum { values } => {
            let t = text.trim();
            if values.iter().any(|v| v == t) {
                Ok(Zeroizing::new(t.to_owned()))
            } else {
                Err(ValueError::Invalid(format!(
                    "must be one of: {}",
                    values.join(", ")
                )))
            }
        }
        FieldType::Periods => parse_periods(text, today),
        FieldType::Blob { .. } => Err(invalid("is a blob field: send bytes in `blob`")),
    }
}

/// Free text: not empty, no control characters but tab/newline/carriage return, no format
/// characters (Cf), NFC; the length limit counts characters of the normalised text.
fn parse_free_text(text: &str, max_len: usize) -> Result<Zeroizing<String>, ValueError> {
    let too_long = |chars: usize| {
        ValueError::TooLarge(format!(
            "is {chars} characters, longer than the limit of {max_len}"
        ))
    };
    if !has_visible_char(text) {
        return Err(invalid(
            "must not be empty or blank (use clear to remove a field)",
        ));
    }
    let chars = text.chars().count();
    if chars > max_len.saturating_mul(NFC_MAX_EXPANSION) {
        return Err(too_long(chars));
    }
    if text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t' && c != '\r')
    {
        return Err(invalid("must not contain control characters"));
    }
    if text.chars().any(is_format_char) {
        return Err(invalid(
            "must not contain invisible format characters (Unicode category Cf or Default_Ignorable_Code_Point: zero-width characters, bidi controls such as U+202E, soft hyphens, Hangul fillers, variation selectors)",
        ));
    }
    let normalised = nfc(text);
    let chars = normalised.chars().count();
    if chars > max_len {
        return Err(too_long(chars));
    }
    Ok(normalised)
}

/// A Dutch citizen service number (BSN): 9 digits passing the 11-test.
#[derive(Clone, PartialEq, Eq)]
pub struct Bsn(Zeroizing<String>);

impl Bsn {
    /// Parses a BSN; spaces and dots between digits are ignored.
    pub fn parse(text: &str) -> Result<Bsn, ValueError> {
        let rule = || invalid("BSN must be 9 digits and pass the 11-test");
        // The digits go straight into the value's own buffer, sized for the nine of them.
        let mut digits = Zeroizing::new(String::with_capacity(9));
        for c in text.trim().chars().filter(|c| *c != ' ' && *c != '.') {
            if !c.is_ascii_digit() {
                return Err(rule());
            }
            if digits.len() == 9 {
                return Err(rule());
            }
            digits.push(c);
        }
        if digits.len() != 9 {
            return Err(rule());
        }
        let sum: i64 = digits
            .bytes()
            .zip([9i64, 8, 7, 6, 5, 4, 3, 2, -1])
            .map(|(d, w)| i64::from(d - b'0') * w)
            .sum();
        if sum % 11 != 0 || digits.bytes().all(|d| d == b'0') {
            return Err(rule());
        }
        Ok(Bsn(digits))
    }

    /// The nine digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Bsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Bsn(***)")
    }
}

/// An IBAN, normalised to upper case without spaces.
#[derive(Clone, PartialEq, Eq)]
pub struct Iban(Zeroizing<String>);

impl Iban {
    /// Parses an IBAN (spaces ignored, case-insensitive): the country must be in the SWIFT IBAN
    /// registry (ISO 13616; the `iban_validate` crate's copy of it), the length and account
    /// number (BBAN) must have that country's format, the check digits must be 02–98 and pass
    /// mod-97. A Dutch IBAN is `NL`, 2 check digits, 4 letters (bank) and 10 digits.
    pub fn parse(text: &str) -> Result<Iban, ValueError> {
        // Into a buffer of exactly its size: a string that grows leaves copies behind.
        let mut s = Zeroizing::new(String::with_capacity(
            text.chars()
                .filter(|c| !c.is_whitespace())
                .map(char::len_utf8)
                .sum(),
        ));
        s.extend(
            text.chars()
                .filter(|c| !c.is_whitespace())
                .map(|c| c.to_ascii_uppercase()),
        );
        let b = s.as_bytes();
        if !(5..=34).contains(&b.len())
            || !b[..2].iter().all(u8::is_ascii_uppercase)
            || !b[2..4].iter().all(u8::is_ascii_digit)
            || !b[4..]
                .iter()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
        {
            return Err(invalid(
                "IBAN must be a two-letter country code, two check digits and the account number (letters and digits; spaces ignored)",
            ));
        }
        // 00, 01 and 99 are never issued: 00≡97, 01≡98 and 99≡02 (mod 97) would give one
        // account two accepted spellings.
        let check = (b[2] - b'0') * 10 + (b[3] - b'0');
        if !(2..=98).contains(&check) {
            return Err(invalid("IBAN check digits must be between 02 and 98"));
        }
        let bban_rule = "IBAN must have the length and account-number format registered for its country (Dutch IBANs: NL, 2 check digits, 4 letters and 10 digits, 18 characters)";
        // The rules in order: country, then length and format, then the check digits. The
        // crate checks the check digits first, so it is asked about the same IBAN with the
        // check digits that pass: what it refuses then is the country or the format.
        let passing = with_passing_check_digits(&s);
        match passing.parse::<iban::Iban>() {
            Ok(_) => {}
            Err(iban::ParseIbanError::UnknownCountry(_)) => {
                return Err(invalid(
                    "IBAN country code is not in the IBAN registry (ISO 13616)",
                ))
            }
            Err(
                iban::ParseIbanError::InvalidBban(_) | iban::ParseIbanError::InvalidBaseIban { .. },
            ) => return Err(invalid(bban_rule)),
        }
        // The registry's Dutch format, checked here too so that it does not depend on the
        // crate's copy of the registry.
        if &s[..2] == "NL"
            && !(b.len() == 18
                && b[4..8].iter().all(u8::is_ascii_uppercase)
                && b[8..].iter().all(u8::is_ascii_digit))
        {
            return Err(invalid(bban_rule));
        }
        // Check digits 02–98 that pass are unique: any other pair fails mod-97.
        if *passing != *s {
            return Err(invalid("IBAN check digits fail the mod-97 check"));
        }
        Ok(Iban(s))
    }
}

/// `iban` (upper-case ASCII letters and digits, at least 5 characters) with the check digits
/// that pass mod-97 (ISO 7064: 98 minus the remainder of the account number, the country
/// code and `00`, letters counted as 10–35), which are always 02–98.
fn with_passing_check_digits(iban: &str) -> Zeroizing<String> {
    let (country, bban) = (&iban[..2], &iban[4..]);
    let remainder = bban
        .chars()
        .chain(country.chars())
        .chain("00".chars())
        .filter_map(|c| c.to_digit(36))
        .fold(0u32, |r, d| {
            if d >= 10 {
                (r * 100 + d) % 97
            } else {
                (r * 10 + d) % 97
            }
        });
    let check = 98 - remainder;
    let mut out = Zeroizing::new(String::with_capacity(iban.len()));
    out.push_str(country);
    out.push(char::from(b'0' + (check / 10) as u8));
    out.push(char::from(b'0' + (check % 10) as u8));
    out.push_str(bban);
    out
}

impl fmt::Debug for Iban {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Iban(***)")
    }
}

/// An e-mail address, normalised: NFC, the local part as sent (case kept; the index
/// lower-cases it), the domain in IDNA ASCII form (UTS #46), lower case.
pub struct Email(Zeroizing<String>);

/// RFC 5322 `atext` outside letters and digits.
const ATEXT_SPECIALS: &[u8] = b"!#$%&'*+-/=?^_`{|}~";

impl Email {
    /// Parses `local@domain.tld`: no spaces, control or format (Cf) characters; the local
    /// part a dot-atom of RFC 5322 `atext` (letters, digits, ``!#$%&'*+-/=?^_`{|}~``) where
    /// non-ASCII letters are allowed too (internationalised addresses, RFC 6531) but not
    /// compatibility forms such as full-width letters; the domain a host name that converts
    /// under UTS #46 (full-width forms and upper case fold), with at least one dot; at most 64
    /// bytes before the `@` and 254 in all, counted on the stored form.
    pub fn parse(text: &str) -> Result<Email, ValueError> {
        let shape = "e-mail must look like local@domain.tld (no spaces, at most 64 bytes before the @ and 254 in all)";
        let s = text.trim();
        if s.chars().any(|c| c.is_control() || is_format_char(c)) {
            return Err(invalid(
                "e-mail must not contain control or invisible format characters (Unicode category Cf or Default_Ignorable_Code_Point: zero-width characters, bidi controls, fillers)",
            ));
        }
        if s.chars().any(char::is_whitespace) {
            return Err(invalid(shape));
        }
        if s.get(..7)
            .is_some_and(|p| p.eq_ignore_ascii_case("mailto:"))
        {
            return Err(invalid(
                "e-mail must be the bare address, without `mailto:`",
            ));
        }
        if s.contains(',') || s.contains(';') {
            return Err(invalid(
                "e-mail must be a single address (no commas or semicolons)",
            ));
        }
        let s = nfc(s);
        let Some((local, domain)) = s.rsplit_once('@') else {
            return Err(invalid(shape));
        };
        check_local_part(local)?;
        let domain = email_domain(domain)?;
        let mut address = Zeroizing::new(String::with_capacity(local.len() + 1 + domain.len()));
        address.push_str(local);
        address.push('@');
        address.push_str(&domain);
        if local.len() > 64 || address.len() > 254 {
            return Err(invalid(shape));
        }
        Ok(Email(address))
    }
}

/// The local part: a dot-atom (atoms separated by single dots, none at either end) of ASCII
/// `atext` or non-ASCII letters and marks that NFKC leaves unchanged (no full-width forms).
fn check_local_part(local: &str) -> Result<(), ValueError> {
    let rule = "e-mail local part (before the @) must be letters, digits and !#$%&'*+-/=?^_`{|}~, with single dots between them (no quotes, commas, colons or @)";
    if local.is_empty() || local.split('.').any(str::is_empty) {
        return Err(invalid(rule));
    }
    let gc = CodePointMapData::<GeneralCategory>::new();
    for atom in local.split('.') {
        for (i, c) in atom.chars().enumerate() {
            let ok = if c.is_ascii() {
                c.is_ascii_alphanumeric() || ATEXT_SPECIALS.contains(&(c as u8))
            } else {
                let cat = gc.get(c);
                GeneralCategoryGroup::Letter.contains(cat)
                    || (i > 0 && GeneralCategoryGroup::Mark.contains(cat))
            };
            if !ok {
                return Err(invalid(rule));
            }
        }
    }
    if !local.is_ascii() && !ComposingNormalizerBorrowed::new_nfkc().is_normalized(local) {
        return Err(invalid(
            "e-mail local part must not contain full-width or other compatibility forms of letters (type them as ordinary letters)",
        ));
    }
    Ok(())
}

/// The domain in IDNA ASCII form: UTS #46 processing (mapping: case and full-width forms
/// fold, `。` becomes `.`), STD3 rules (letters, digits, hyphens), no hyphen at either end of a
/// label, DNS lengths, at least two labels, the last not all digits (no IP addresses).
fn email_domain(domain: &str) -> Result<Zeroizing<String>, ValueError> {
    use idna::uts46::{AsciiDenyList, ErrorPolicy, Hyphens, ProcessingSuccess, Uts46};
    let rule = "e-mail domain (after the @) must be a host name such as example.nl or bücher.de: labels of letters, digits and inner hyphens, at least one dot";
    // `Uts46::to_ascii` with `DnsLength::Verify`, written into a buffer that leaves no copy
    // behind when it grows (`to_ascii` writes into a plain `String`).
    let mut sink = WipingString::with_capacity(domain.len());
    let wrote = Uts46::new()
        .process(
            domain.as_bytes(),
            AsciiDenyList::STD3,
            Hyphens::CheckFirstLast,
            ErrorPolicy::FailFast,
            |_, _, _| false,
            &mut sink,
            None,
        )
        .map_err(|_| invalid(rule))?;
    let mut ascii = match wrote {
        // The domain as it is (it is ASCII and needs no mapping).
        ProcessingSuccess::Passthrough => Zeroizing::new(domain.to_owned()),
        ProcessingSuccess::WroteToSink => sink.into_inner(),
    };
    if !idna::uts46::verify_dns_length(&ascii, false) {
        return Err(invalid(rule));
    }
    ascii.make_ascii_lowercase();
    match ascii.rsplit_once('.') {
        Some((rest, tld)) if !rest.is_empty() && !tld.bytes().all(|b| b.is_ascii_digit()) => {}
        _ => return Err(invalid(rule)),
    }
    Ok(ascii)
}

/// A phone number, normalised to `+` and digits (E.164-like).
pub struct Phone(Zeroizing<String>);

/// The country code a national number (one leading 0) belongs to: the default region is NL.
pub const PHONE_DEFAULT_COUNTRY_CODE: &str = "31";

impl Phone {
    /// Parses a phone number and stores it as `+` and 8–15 digits. International input starts
    /// with `+` or `00` (which becomes `+`); a `(0)` right after the country code (`+31 (0)6…`)
    /// is the national trunk prefix and is dropped. National input starts with a single `0`,
    /// which is dropped for the default region's code (`06 1234 5678` → `+31612345678`).
    /// Separators ` -().` are allowed between digits.
    pub fn parse(text: &str) -> Result<Phone, ValueError> {
        let rule = "phone must start with +, 00 or a single 0 (a Dutch number) and have 8 to 15 digits with its country code (spaces, dashes, dots and parentheses allowed)";
        let s = text.trim();
        // A national number may open with a parenthesis: `(020) 123 4567`.
        let opened = s.trim_start_matches(['(', ' ']);
        let (international, rest) = if let Some(rest) = s.strip_prefix('+') {
            (true, rest)
        } else if let Some(rest) = opened.strip_prefix("00") {
            (true, rest)
        } else if let Some(rest) = opened.strip_prefix('0') {
            (false, rest)
        } else {
            return Err(invalid(rule));
        };
        // The number without a `(0)` after the country code: the code and the rest.
        let (mut code, mut body) = ("", rest);
        if international {
            // `+cc (0)…`: a country code is 1–3 digits; its digits are ASCII, one byte each.
            let cc_len = rest.bytes().take_while(u8::is_ascii_digit).count();
            let after = rest[cc_len..].trim_start_matches(' ');
            if let (1..=3, Some(national)) = (cc_len, after.strip_prefix("(0)")) {
                (code, body) = (&rest[..cc_len], national);
            }
        }
        // `+` and the digits, in a buffer sized for them all: no copy is left behind.
        let mut number = Zeroizing::new(String::with_capacity(
            1 + PHONE_DEFAULT_COUNTRY_CODE.len() + code.len() + body.len(),
        ));
        number.push('+');
        if !international {
            number.push_str(PHONE_DEFAULT_COUNTRY_CODE);
        }
        // Where the national part starts in the digits (after the `+`).
        let national_start = number.len() - 1;
        number.push_str(code);
        for c in body.chars() {
            match c {
                '0'..='9' => number.push(c),
                ' ' | '-' | '(' | ')' | '.' => {}
                _ => return Err(invalid(rule)),
            }
        }
        let digits = &number[1..];
        // No country code starts with 0, and a Dutch number after its trunk 0 does not either.
        if digits[national_start..].starts_with('0') {
            return Err(invalid(rule));
        }
        // Nor after +31 (no country code is 3 alone): `+31 06…` keeps the trunk 0 that the
        // international form drops, and would store the number a second way.
        if international && digits.starts_with("310") {
            return Err(invalid(
                "phone must not keep the trunk 0 after +31 (write +31 6… or 06…)",
            ));
        }
        if !(8..=15).contains(&digits.len()) {
            return Err(invalid(rule));
        }
        Ok(Phone(number))
    }
}

/// A Dutch postcode, normalised to `1234 AB`.
pub struct Postcode(Zeroizing<String>);

impl Postcode {
    /// Parses four digits (first not 0), an optional space and two letters.
    pub fn parse(text: &str) -> Result<Postcode, ValueError> {
        let rule = "postcode must be four digits (not starting with 0), an optional space and two letters, e.g. 3311 KG";
        // At most 7 characters, on the stack (wiped): anything longer is refused.
        let mut t = Zeroizing::new(['\0'; 7]);
        let mut len = 0;
        for c in text.trim().chars() {
            if len == t.len() {
                return Err(invalid(rule));
            }
            t[len] = c;
            len += 1;
        }
        // The one space allowed sits between the digits and the letters.
        let (digits, letters) = match len {
            7 if t[4] == ' ' => (&t[..4], &t[5..7]),
            6 => (&t[..4], &t[4..6]),
            _ => return Err(invalid(rule)),
        };
        let ok = digits.iter().all(char::is_ascii_digit)
            && digits[0] != '0'
            && letters.iter().all(char::is_ascii_alphabetic);
        if !ok {
            return Err(invalid(rule));
        }
        let mut out = Zeroizing::new(String::with_capacity(7));
        out.extend(digits);
        out.push(' ');
        out.extend(letters.iter().map(char::to_ascii_uppercase));
        Ok(Postcode(out))
    }
}

/// The refusal of a date outside the supported years.
const DATE_YEARS_RULE: &str = "date must be in the years 1900–2199 (YYYY-MM-DD)";

/// A calendar date.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Date {
    year: u16,
    month: u8,
    day: u8,
}

impl Date {
    /// Parses `YYYY-MM-DD` (years 1900–2199), checking the day exists.
    pub fn parse(text: &str) -> Result<Date, ValueError> {
        let rule = "date must be an existing calendar date written YYYY-MM-DD";
        let b = text.trim().as_bytes();
        if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
            return Err(invalid(rule));
        }
        let num = |r: std::ops::Range<usize>| -> Result<u16, ValueError> {
            let s = &b[r];
            if !s.iter().all(u8::is_ascii_digit) {
                return Err(invalid(rule));
            }
            Ok(s.iter().fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0')))
        };
        let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        let days = match month {
            1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
            4 | 6 | 9 | 11 => 30,
            2 if leap => 29,
            2 => 28,
            _ => return Err(invalid(rule)),
        };
        if day == 0 || day > days {
            return Err(invalid(rule));
        }
        if !(1900..=2199).contains(&year) {
            return Err(invalid(DATE_YEARS_RULE));
        }
        Ok(Date {
            year,
            month: month as u8,
            day: day as u8,
        })
    }

    /// The same day as a chrono date.
    pub fn to_naive(self) -> NaiveDate {
        NaiveDate::from_ymd_opt(
            i32::from(self.year),
            u32::from(self.month),
            u32::from(self.day),
        )
        .expect("Date::parse builds only days that exist, in the years 1900–2199")
    }

    /// `YYYY-MM-DD`, in a buffer of exactly that size (a date of birth is personal data).
    fn to_zeroizing(self) -> Zeroizing<String> {
        let mut out = Zeroizing::new(String::with_capacity(10));
        write!(out, "{self}").expect("writing to a String never fails");
        out
    }
}

impl Zeroize for Date {
    fn zeroize(&mut self) {
        self.year.zeroize();
        self.month.zeroize();
        self.day.zeroize();
    }
}

impl fmt::Display for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

fn parse_amount(text: &str) -> Result<Zeroizing<String>, ValueError> {
    let rule = "amount must be a non-negative number with at most 12 digits before the point and two after, e.g. 3125.50";
    let s = text.trim();
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (s, None),
    };
    let int_ok = !int.is_empty() && int.len() <= 12 && int.bytes().all(|b| b.is_ascii_digit());
    let frac_ok =
        frac.is_none_or(|f| (1..=2).contains(&f.len()) && f.bytes().all(|b| b.is_ascii_digit()));
    if !int_ok || !frac_ok {
        return Err(invalid(rule));
    }
    let int = int.trim_start_matches('0');
    let int = if int.is_empty() { "0" } else { int };
    let frac = frac.unwrap_or("");
    let mut out = Zeroizing::new(String::with_capacity(int.len() + 3));
    out.push_str(int);
    out.push('.');
    out.push_str(frac);
    out.extend(std::iter::repeat_n('0', 2 - frac.len()));
    Ok(out)
}

/// At most this many periods in one value.
const MAX_PERIODS: usize = 1000;
/// How far ahead of today a period may start (a planned leave, in months).
const PERIOD_START_AHEAD_MONTHS: u32 = 12;

/// A date's refusal when it names the supported years, otherwise `rule`.
fn outside_years_or(e: ValueError, rule: &str) -> ValueError {
    match e {
        ValueError::Invalid(text) if text == DATE_YEARS_RULE => ValueError::Invalid(text),
        _ => invalid(rule),
    }
}

/// Absence periods, stored sorted by start: `start/end` (both days included) or `start/` for
/// an ongoing absence. Refused: a repeated period, overlapping periods, more than one ongoing
/// period or one that is not the latest, a start more than a year after `today`.
fn parse_periods(text: &str, today: NaiveDate) -> Result<Zeroizing<String>, ValueError> {
    let rule = "periods must be comma-separated YYYY-MM-DD/YYYY-MM-DD ranges (end empty = ongoing, end not before start); no other text may be stored";
    // Counted before anything is parsed or allocated: a huge value is refused at once.
    if text.split(',').nth(MAX_PERIODS).is_some() {
        return Err(ValueError::TooLarge(format!(
            "at most {MAX_PERIODS} periods"
        )));
    }
    // Sized up front (a vector that grows leaves copies behind) and wiped when dropped.
    let mut parsed = Periods(Vec::with_capacity(text.split(',').count()));
    let periods = &mut parsed.0;
    for part in text.split(',') {
        let Some((start, end)) = part.trim().split_once('/') else {
            return Err(invalid(rule));
        };
        let start = Date::parse(start).map_err(|e| outside_years_or(e, rule))?;
        if end.trim().is_empty() {
            periods.push((start, None));
            continue;
        }
        let end = Date::parse(end).map_err(|e| outside_years_or(e, rule))?;
        if end < start {
            return Err(invalid(rule));
        }
        periods.push((start, Some(end)));
    }
    let latest_start = today
        .checked_add_months(Months::new(PERIOD_START_AHEAD_MONTHS))
        .unwrap_or(NaiveDate::MAX);
    if periods.iter().any(|(s, _)| s.to_naive() > latest_start) {
        return Err(invalid("periods must start at most one year after today"));
    }
    if periods.iter().filter(|(_, e)| e.is_none()).count() > 1 {
        return Err(invalid(
            "periods may hold at most one ongoing period (empty end)",
        ));
    }
    // By start; of two with the same start the shorter first, an ongoing one last.
    periods.sort_by_key(|&(s, e)| (s, e.is_none(), e));
    if periods.windows(2).any(|pair| pair[0] == pair[1]) {
        return Err(invalid("periods must not repeat a period"));
    }
    for pair in periods.windows(2) {
        let ((_, end), (next_start, _)) = (pair[0], pair[1]);
        match end {
            None => {
                return Err(invalid(
                    "an ongoing period (empty end) must be the latest period",
                ))
            }
            Some(end) if end >= next_start => {
                return Err(invalid(
                    "periods must not overlap (both days of a period are included)",
                ))
            }
            Some(_) => {}
        }
    }
    // `YYYY-MM-DD/YYYY-MM-DD` or `YYYY-MM-DD/`, comma separated, into a buffer of exactly
    // that size.
    let len = periods
        .iter()
        .map(|(_, e)| if e.is_some() { 21 } else { 11 })
        .sum::<usize>()
        + periods.len().saturating_sub(1);
    let mut out = Zeroizing::new(String::with_capacity(len));
    for (i, (s, e)) in periods.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        match e {
            Some(e) => write!(out, "{sep}{s}/{e}"),
            None => write!(out, "{sep}{s}/"),
        }
        .expect("writing to a String never fails");
    }
    debug_assert_eq!(out.len(), len, "the periods' buffer is sized exactly");
    Ok(out)
}

/// Parsed periods, wiped when dropped.
struct Periods(Vec<(Date, Option<Date>)>);

impl Drop for Periods {
    fn drop(&mut self) {
        for (start, end) in &mut self.0 {
            start.zeroize();
            end.zeroize();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The zeroizing fold is icu's, and on ASCII it is lower-casing (index forms stored
        /// before folding are unchanged for ASCII addresses).
        #[test]
        fn fold_is_icu_fold(s in "[a-zA-Z0-9 .'_\u{00AD}\u{0345}\u{0307}ΣσςαβΑΒİȺȾÉéẞßſΐﬃ]{0,24}") {
            let want = icu_casemap::CaseMapper::new().fold_string(&s).into_owned();
            let folded = fold(&s);
            proptest::prop_assert_eq!(folded.as_str(), want.as_str());
        }

        #[test]
        fn fold_of_ascii_is_lowercase(s in "[ -~]{0,40}") {
            let folded = fold(&s);
            proptest::prop_assert_eq!(folded.as_str(), s.to_ascii_lowercase());
        }
    }

    /// Every character folds within [`FOLD_MAX_EXPANSION`], so [`fold`]'s buffer never grows
    /// (a grown buffer would leave a copy of the value's beginning in freed memory).
    #[test]
    fn fold_never_outgrows_its_buffer() {
        let mapper = icu_casemap::CaseMapper::new();
        for c in (0..0x11_0000u32).filter_map(char::from_u32) {
            let mut buf = [0u8; 4];
            let s: &str = c.encode_utf8(&mut buf);
            let folded = mapper.fold_string(s);
            assert!(
                folded.len() <= s.len() * FOLD_MAX_EXPANSION,
                "U+{:04X} folds to {} bytes",
                u32::from(c),
                folded.len()
            );
        }
        for s in ["ΐΐΐ", "ﬃ", "ẞ", "İSTANBUL", "ΣΑΣ.ΜΑΣ", "plain"] {
            let folded = fold(s);
            assert!(folded.capacity() == s.len() * FOLD_MAX_EXPANSION, "{s}");
        }
    }

    /// Review 31: an address finds its own spellings in other case even where lower-casing
    /// alone would not (a capital sigma before a dot, a sharp s written as SS or ẞ).
    #[test]
    fn email_search_ignores_case_by_folding() {
        let email = Schema::default_schema()
            .field("email")
            .expect("email")
            .clone();
        let form = |s: &str| {
            let stored = email
                .parse(RawValue::Text(s), today())
                .expect("plausible address");
            stored.index_form.expect("email is searchable")
        };
        for (stored, spellings) in [
            (
                "σας.μας@example.gr",
                &["ΣΑΣ.ΜΑΣ@example.gr", "σασ.μασ@EXAMPLE.gr"][..],
            ),
            ("ΣΑΣ.ΜΑΣ@example.gr", &["σας.μας@example.gr"][..]),
            (
                "straße@example.de",
                &[
                    "STRASSE@example.de",
                    "STRAẞE@example.de",
                    "strasse@example.de",
                ][..],
            ),
            (
                "Jan.Jansen@Example.NL",
                &["jan.jansen@example.nl", "JAN.JANSEN@example.nl"][..],
            ),
        ] {
            let form = form(stored);
            for spelling in spellings {
                let search = email.parse_search(spelling, today()).expect("searchable");
                assert_eq!(form.as_str(), search.as_str(), "{stored} by {spelling}");
            }
        }
        // ASCII addresses keep the index form stored before folding (lower-cased).
        assert_eq!(
            form("Jan.Jansen@Example.NL").as_str(),
            "jan.jansen@example.nl"
        );
        // Distinct addresses stay distinct.
        assert_ne!(
            form("strase@example.de").as_str(),
            form("straße@example.de").as_str()
        );
    }

    /// Reviews 22 and 23: a stored value of the field's type keeps its partial mask (also an
    /// aged date, or one stored by an older build in another spelling); a value of another
    /// type is masked whole.
    #[test]
    fn stored_values_are_masked_as_their_type_reads_them() {
        let date = FieldType::Date {
            not_after_today: true,
            max_years_ago: Some(1),
        };
        assert_eq!(date.mask_stored("1906-11-27"), "1906-**-**");
        let phone = FieldType::Phone.mask_stored("0612345678");
        assert!(phone.starts_with('*') && phone.ends_with("78"), "{phone}");
        assert_eq!(
            FieldType::Email.mask_stored("Jan@Example.NL"),
            "J***@example.nl"
        );
        assert_eq!(FieldType::Bsn.mask_stored("111 222 333"), "*****2333");
        assert_eq!(FieldType::Bsn.mask_stored("TX-777"), "***");
        assert_eq!(FieldType::Iban.mask_stored("not an iban"), "***");
        assert_eq!(date.mask_stored("TX-777"), "***");
    }

    /// The tests' today.
    fn today() -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, 11, 26).expect("a real day")
    }

    fn field(name: &str) -> FieldDef {
        Schema::default_schema()
            .field(name)
            .expect("field in the default schema")
            .clone()
    }

    fn parse(def: &FieldDef, text: &str) -> Result<String, ValueError> {
        def.parse(RawValue::Text(text), today()).map(|p| {
            String::from_utf8(p.plaintext.plaintext().expect("laid out").to_vec()).expect("utf-8")
        })
    }

    /// The refusal's message, checked to name no part of the value.
    fn refusal(def: &FieldDef, text: &str) -> String {
        let err = parse(def, text).expect_err(text).to_string();
        // Every run of 4+ letters or digits of the value is kept out of the message (shorter
        // ones such as `nl` or `06` occur in rule texts by chance).
        let mut word = String::new();
        for c in text.chars().chain([' ']) {
            if c.is_alphanumeric() {
                word.push(c);
                continue;
            }
            // `mailto` is named by the rule that refuses it.
            if word.chars().count() >= 4 && !word.eq_ignore_ascii_case("mailto") {
                assert!(
                    !err.contains(&word),
                    "{err:?} contains {word:?} of {text:?}"
                );
            }
            word.clear();
        }
        err
    }

    fn schema_error(toml: &str) -> String {
        let err = Schema::from_toml(toml).expect_err(toml);
        assert!(matches!(
            err,
            SchemaError::Rule { .. } | SchemaError::Toml(_)
        ));
        err.to_string()
    }

    #[test]
    fn at_most_1000_periods_counted_before_parsing() {
        // 1000 distinct one-day periods, two days apart (periods may not repeat or overlap).
        let first = NaiveDate::from_ymd_opt(2020, 1, 1).expect("day");
        let many = |n: u64| {
            (0..n)
                .map(|i| {
                    let d = first + chrono::Days::new(2 * i);
                    format!("{d}/{d}")
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        assert_eq!(
            parse_periods(&many(1000), today()).expect("1000").len(),
            1000 * 22 - 1
        );
        assert!(matches!(
            parse_periods(&many(1001), today()),
            Err(ValueError::TooLarge(_))
        ));
        // Refused as too many even when the parts are not periods at all.
        assert!(matches!(
            parse_periods(&",".repeat(5000), today()),
            Err(ValueError::TooLarge(_))
        ));
    }

    #[test]
    fn masks_keep_only_what_the_rule_allows() {
        let blob = FieldType::Blob {
            max_bytes: 1,
            content_types: vec![],
        };
        let date = FieldType::Date {
            not_after_today: false,
            max_years_ago: None,
        };
        assert_eq!(
            FieldType::Bsn.mask("111222333").as_deref(),
            Some("*****2333")
        );
        assert_eq!(
            FieldType::Iban.mask("NL91ABNA0417164300").as_deref(),
            Some("**************4300")
        );
        assert_eq!(
            FieldType::Email.mask("jan.jansen@example.nl").as_deref(),
            Some("j***@example.nl")
        );
        assert_eq!(
            FieldType::Phone.mask("+31 6 1234 5678").as_deref(),
            Some("*********78")
        );
        assert_eq!(date.mask("1990-04-01").as_deref(), Some("1990-**-**"));
        assert_eq!(FieldType::Amount.mask("3125.50").as_deref(), Some("***"));
        assert_eq!(blob.mask("x"), None);
    }

    #[test]
    fn default_schema_loads_with_every_category() {
        let schema = Schema::default_schema();
        for c in Category::ALL {
            assert!(schema.fields().any(|f| f.category == c), "{c}");
        }
        assert!(schema.field("bsn").expect("bsn").searchable);
        assert!(schema.field("email").expect("email").searchable);
        assert_eq!(
            schema.field("date_of_birth").expect("dob").kind,
            FieldType::Date {
                not_after_today: true,
                max_years_ago: Some(120)
            }
        );
        assert_eq!(
            schema.field("id_document_expiry").expect("expiry").kind,
            FieldType::Date {
                not_after_today: false,
                max_years_ago: None
            }
        );
        assert_eq!(schema.largest_value(), 16 * 1024 * 1024);
    }

    #[test]
    fn bsn_eleven_test() {
        for (input, ok) in [
            ("111222333", true),
            ("123456782", true),
            ("111222334", false),
            ("12345678", false),
            ("1234567820", false),
            ("000000000", false),
            ("12345678a", false),
            ("123.456.782", true),
        ] {
            assert_eq!(Bsn::parse(input).is_ok(), ok, "{input}");
        }
    }

    #[test]
    fn iban_mod97() {
        for (input, ok) in [
            ("NL91ABNA0417164300", true),
            ("nl91 abna 0417 1643 00", true),
            ("NL91ABNA0417164301", false),
            ("NL91ABNA041716430", false),
            ("DE89370400440532013000", true),
            ("GB82WEST12345698765432", true),
            ("XX", false),
        ] {
            assert_eq!(Iban::parse(input).is_ok(), ok, "{input}");
        }
    }

    /// `CCkk` + `bban` with the check digits that pass mod-97.
    fn with_check_digits(country: &str, bban: &str) -> (u32, String) {
        let numeric: String = format!("{bban}{country}00")
            .chars()
            .map(|c| c.to_digit(36).expect("alphanumeric").to_string())
            .collect();
        let rem = numeric
            .bytes()
            .fold(0u32, |r, b| (r * 10 + u32::from(b - b'0')) % 97);
        let check = 98 - rem;
        (check, format!("{country}{check:02}{bban}"))
    }

    #[test]
    fn iban_registry_lengths_countries_check_digits_and_dutch_bban() {
        let iban = field("iban");
        // Accepted: registered countries at their length and format.
        for ok in [
            "NL91ABNA0417164300",
            "BE71 0961 2345 6769",
            "DE89370400440532013000",
            "FR1420041010050500013M02606",
            "GB82WEST12345698765432",
        ] {
            assert!(parse(&iban, ok).is_ok(), "{ok}");
        }
        // Refused, each with its rule (from the review: wrong lengths, unknown country,
        // unissued check digits, a Dutch account number that is not 4 letters + 10 digits).
        for (input, rule) in [
            ("DE640037040044053201", "format registered"),
            ("BE820037040044053201", "format registered"),
            ("XX210037040044053201", "IBAN registry"),
            ("NL01ABNA0000000057", "02 and 98"),
            ("NL00ABNA0000000057", "02 and 98"),
            ("NL9012341234567890", "format registered"),
            ("NL91ABNA0417164301", "mod-97"),
            ("N191ABNA0417164300", "two-letter country code"),
        ] {
            let err = refusal(&iban, input);
            assert!(err.contains(rule), "{input}: {err}");
        }
        // The one accepted spelling of the account the review found with 01 and 98.
        assert!(parse(&iban, "NL98ABNA0000000057").is_ok());
        // 02 and 99 pass mod-97 alike: only 02 is accepted.
        let two = (0u64..)
            .map(|n| with_check_digits("NL", &format!("ABNA{n:010}")))
            .find(|(check, _)| *check == 2)
            .expect("some account has check digits 02");
        assert!(parse(&iban, &two.1).is_ok(), "{}", two.1);
        let ninety_nine = two.1.replacen("NL02", "NL99", 1);
        assert!(refusal(&iban, &ninety_nine).contains("02 and 98"));
        // A Dutch BBAN needs its 4 letters even when the check digits fit.
        let digits_only = with_check_digits("NL", "1234123456789").1;
        assert!(refusal(&iban, &digits_only).contains("format registered"));
        // 19 characters with valid check digits: the Dutch length.
        let too_long = with_check_digits("NL", "ABNA04171643001").1;
        assert!(refusal(&iban, &too_long).contains("format registered"));
    }

    #[test]
    fn iban_refusals_name_the_country_then_the_format_then_the_check_digits() {
        let iban = field("iban");
        // The check digits fail too, but the country or the length is what is wrong (review
        // 4: both said `mod-97`). The same IBANs with passing check digits say the same.
        for (input, rule) in [
            ("XX91ABNA0417164300", "IBAN registry"),
            ("NL91ABNA041716430", "format registered"),
            ("NL91ABNA04171643000", "format registered"),
            ("DE89370400440532013", "format registered"),
            ("NL911234041716430099", "format registered"),
        ] {
            let err = refusal(&iban, input);
            assert!(err.contains(rule), "{input}: {err}");
            assert!(!err.contains("mod-97"), "{input}: {err}");
            let passing = with_passing_check_digits(input);
            let err = refusal(&iban, &passing);
            assert!(err.contains(rule), "{}: {err}", passing.as_str());
        }
        // Country, length and format right: the check digits are what fails.
        for wrong in ["NL92ABNA0417164300", "DE88370400440532013000"] {
            assert!(refusal(&iban, wrong).contains("mod-97"), "{wrong}");
        }
        // The check digits computed here are the ones that pass, for every IBAN accepted.
        for ok in [
            "NL91ABNA0417164300",
            "DE89370400440532013000",
            "GB82WEST12345698765432",
            "FR1420041010050500013M02606",
        ] {
            assert_eq!(with_passing_check_digits(ok).as_str(), ok);
        }
        assert_eq!(
            with_passing_check_digits("NL00ABNA0000000057").as_str(),
            "NL98ABNA0000000057"
        );
    }

    #[test]
    fn dates_outside_the_supported_years_name_the_range() {
        let expiry = field("id_document_expiry");
        for outside in ["2200-01-01", "1899-12-31", "0000-01-01", "9999-12-31"] {
            let err = refusal(&expiry, outside);
            assert!(err.contains("1900–2199"), "{outside}: {err}");
        }
        for (ok, stored) in [("1900-01-01", "1900-01-01"), (" 2199-12-31", "2199-12-31")] {
            assert_eq!(parse(&expiry, ok).as_deref(), Ok(stored));
        }
        // A day that does not exist, or another spelling, keeps the calendar rule.
        for bad in [
            "2200-02-30",
            "2023-02-29",
            "2026-13-01",
            "26-01-01",
            "2026/01/01",
        ] {
            let err = refusal(&expiry, bad);
            assert!(err.contains("existing calendar date"), "{bad}: {err}");
        }
        // In absence periods too.
        let err = parse_periods("2026-01-05/2200-01-01", today())
            .expect_err("2200")
            .to_string();
        assert!(err.contains("1900–2199"), "{err}");
    }

    #[test]
    fn a_blank_search_value_is_refused_as_missing_whatever_the_type() {
        for name in [
            "bsn",
            "email",
            "iban",
            "full_name",
            "phone",
            "date_of_birth",
        ] {
            let def = field(name);
            for blank in ["", "  ", "\t"] {
                let err = def
                    .parse_search(blank, today())
                    .err()
                    .unwrap_or_else(|| panic!("{name}: {blank:?} accepted"))
                    .to_string();
                assert!(err.contains("is required"), "{name}: {err}");
            }
        }
    }

    #[test]
    fn typed_values_normalise() {
        assert_eq!(Postcode::parse("3311kg").expect("pc").0.as_str(), "3311 KG");
        assert!(Postcode::parse("0311 KG").is_err());
        assert!(Postcode::parse("331 KG").is_err());
        assert_eq!(
            Postcode::parse(" 3311 kg ").expect("pc").0.as_str(),
            "3311 KG"
        );
        for misplaced in ["33 11KG", "3311K G", "3311  KG", "3 311KG"] {
            assert!(Postcode::parse(misplaced).is_err(), "{misplaced}");
        }
        // The trunk (0) after the country code is dropped (it was kept before: +310612345678).
        assert_eq!(
            Phone::parse("+31 (0)6-1234 5678")
                .expect("phone")
                .0
                .as_str(),
            "+31612345678"
        );
        assert!(Date::parse("2023-02-29").is_err());
        assert!(Date::parse("2024-02-29").is_ok());
        assert_eq!(parse_amount("03125.5").expect("amount").as_str(), "3125.50");
        assert!(parse_amount("-1").is_err());
        assert!(parse_amount("1.234").is_err());
        assert_eq!(
            parse_periods("2026-01-05/2026-01-09, 2026-02-01/", today())
                .expect("periods")
                .as_str(),
            "2026-01-05/2026-01-09,2026-02-01/"
        );
        assert!(parse_periods("2026-01-05/2026-01-01", today()).is_err());
        assert!(parse_periods("griep 2026-01-05/2026-01-09", today()).is_err());
        assert!(Email::parse("a@b.nl").is_ok());
        assert!(Email::parse("a b@b.nl").is_err());
        assert!(Email::parse("ab.nl").is_err());
    }

    #[test]
    fn phone_stores_one_e164_form_per_number() {
        let phone = field("phone");
        for input in [
            "+31 (0)6-1234 5678",
            "+31(0)612345678",
            "+31 6 1234 5678",
            "+31612345678",
            "06 1234 5678",
            "06-12345678",
            "(06) 1234 5678",
            "(0)6 1234 5678",
            "0031612345678",
            "0031 (0)6 1234 5678",
            " 06.1234.5678 ",
        ] {
            assert_eq!(
                parse(&phone, input).as_deref(),
                Ok("+31612345678"),
                "{input}"
            );
        }
        for (input, stored) in [
            ("+44 (0)20 7946 0000", "+442079460000"),
            ("010-123 4567", "+31101234567"),
            ("(020) 123 4567", "+31201234567"),
            ("0800 1234", "+318001234"),
            ("+39 06 1234 5678", "+390612345678"),
            ("+1 (212) 555-0100", "+12125550100"),
        ] {
            assert_eq!(parse(&phone, input).as_deref(), Ok(stored), "{input}");
            // A stored value parses to itself.
            assert_eq!(parse(&phone, stored).as_deref(), Ok(stored), "{stored}");
        }
        for refused in [
            "31612345678",      // international without + or 00: ambiguous
            "612345678",        // national without its 0
            "+0612345678",      // no country code starts with 0
            "0 0612345678",     // a Dutch number after its trunk 0 does not start with 0
            "+31 06 1234 5678", // nor after +31 (review 10: stored as +310612345678)
            "0031 06 1234 5678",
            "+31 6 1234",            // too short
            "+31 6 1234 5678 90123", // more than 15 digits
            "06 1234 5678 ext 2",
            "tel:+31612345678",
            "call me",
        ] {
            assert!(refusal(&phone, refused).contains("phone must"), "{refused}");
        }
    }

    #[test]
    fn email_pairs_that_must_and_must_not_find_each_other() {
        let email = field("email");
        let tag = |text: &str| {
            email
                .parse_search(text, today())
                .unwrap_or_else(|e| panic!("{text}: {e}"))
                .to_string()
        };
        // Same address: the same index form.
        for (a, b) in [
            ("jan@bücher.de", "jan@xn--bcher-kva.de"),
            ("JAN@BÜCHER.DE", "jan@xn--bcher-kva.de"),
            ("josé@example.nl", "jose\u{301}@example.nl"),
            ("jan@example.ｎｌ", "jan@example.nl"),
            ("jan@ｅｘａｍｐｌｅ.nl", "jan@example.nl"),
            ("jan@example\u{3002}nl", "jan@example.nl"),
            ("Jan.Jansen@Example.NL", "jan.jansen@example.nl"),
            (" jan@example.nl ", "jan@example.nl"),
            ("\u{212A}laas@x.nl", "klaas@x.nl"),
        ] {
            assert_eq!(tag(a), tag(b), "{a} vs {b}");
        }
        // Different addresses: different index forms.
        for (a, b) in [
            ("jan@example.nl", "jan@example.com"),
            ("jan.jansen@x.nl", "janjansen@x.nl"),
            ("jan+cv@x.nl", "jan@x.nl"),
            ("josé@x.nl", "jose@x.nl"),
            ("jan@bücher.de", "jan@bucher.de"),
            ("jan@sub.example.nl", "jan@example.nl"),
        ] {
            assert_ne!(tag(a), tag(b), "{a} vs {b}");
        }
    }

    #[test]
    fn email_stored_form_is_nfc_with_an_ascii_lower_case_domain() {
        let email = field("email");
        for (input, stored) in [
            ("Jan.Jansen@Example.nl", "Jan.Jansen@example.nl"),
            ("jan@bücher.de", "jan@xn--bcher-kva.de"),
            ("jan@XN--BCHER-KVA.de", "jan@xn--bcher-kva.de"),
            ("jose\u{301}@example.nl", "josé@example.nl"),
            ("jan@example.ｎｌ", "jan@example.nl"),
            ("o'brien+cv@example.co.uk", "o'brien+cv@example.co.uk"),
            ("Zoë.Ünal@example.nl", "Zoë.Ünal@example.nl"),
            ("\u{212A}laas@x.nl", "Klaas@x.nl"),
        ] {
            assert_eq!(parse(&email, input).as_deref(), Ok(stored), "{input}");
            assert_eq!(parse(&email, stored).as_deref(), Ok(stored), "{stored}");
        }
        let local = "a".repeat(64);
        assert!(parse(&email, &format!("{local}@example.nl")).is_ok());
        assert!(parse(&email, &format!("{local}a@example.nl")).is_err());
        // 64 bytes, not characters: 32 × é is 64 bytes, 33 × é is 66.
        assert!(parse(&email, &format!("{}@example.nl", "é".repeat(32))).is_ok());
        assert!(parse(&email, &format!("{}@example.nl", "é".repeat(33))).is_err());
        // A domain over 253 bytes is refused by the DNS length rule; a whole address over
        // 254 bytes by the address rule.
        let long_domain = format!("{}.nl", vec!["d".repeat(60); 5].join("."));
        assert!(parse(&email, &format!("jan@{long_domain}")).is_err());
        let domain =
            |n: usize| format!("{}.{}.nl", vec!["d".repeat(60); 3].join("."), "d".repeat(n));
        assert_eq!(local.len() + 1 + domain(3).len(), 254);
        assert!(parse(&email, &format!("{local}@{}", domain(3))).is_ok());
        assert!(parse(&email, &format!("{local}@{}", domain(4))).is_err());
    }

    #[test]
    fn email_refusals_name_the_rule_never_the_value() {
        let email = field("email");
        for (input, rule) in [
            ("jan\u{200B}@example.nl", "format characters"),
            ("a\u{202E}b@x.nl", "format characters"),
            ("jan@exa\u{2066}mple.nl", "format characters"),
            ("\u{FEFF}jan@example.nl", "format characters"),
            ("jan\u{7}@example.nl", "control"),
            ("mailto:jan@example.nl", "mailto"),
            ("MAILTO:jan@example.nl", "mailto"),
            ("a,b@x.nl", "single address"),
            ("jan@example.nl;piet@example.nl", "single address"),
            ("jan:piet@example.nl", "local part"),
            ("\"jan\"@example.nl", "local part"),
            ("jan<x>@example.nl", "local part"),
            (".jan@x.nl", "local part"),
            ("jan.@x.nl", "local part"),
            ("ja..n@x.nl", "local part"),
            ("@example.nl", "local part"),
            ("jan@piet@example.nl", "local part"),
            ("ｊａｎ@example.nl", "compatibility forms"),
            ("jan①@example.nl", "local part"),
            ("jan@x", "domain"),
            ("jan@-x.nl", "domain"),
            ("jan@x-.nl", "domain"),
            ("jan@ab_cd.nl", "domain"),
            ("jan@x..nl", "domain"),
            ("jan@x.nl.", "domain"),
            ("jan@1.2.3.4", "domain"),
            ("jan@[10.0.0.1]", "domain"),
            ("jan@", "domain"),
            ("jan @example.nl", "look like"),
            ("janexample.nl", "look like"),
        ] {
            let err = refusal(&email, input);
            assert!(err.contains(rule), "{input:?}: {err}");
        }
    }

    #[test]
    fn text_refuses_format_characters_and_is_stored_nfc() {
        let name = field("full_name");
        for input in [
            "Jan\u{202E}\u{200B}",
            "Jan\u{202A}Jansen",
            "Jan\u{2067}Jansen\u{2069}",
            "Jan\u{200B}Jansen",
            "Jan\u{200D}Jansen",
            "Jan\u{00AD}sen",
            "\u{FEFF}Jansen",
            // Default-ignorable, outside Cf (review 10): fillers, CGJ, variation selectors.
            "Jan\u{3164}sen",
            "Jan\u{034F}sen",
            "Jan\u{FE0F}",
            "\u{115F}Jan",
            "Jan\u{FFA0}",
        ] {
            let err = refusal(&name, input);
            assert!(err.contains("format characters"), "{input:?}: {err}");
        }
        // Nothing visible: blank, whatever the characters.
        for input in [
            "\u{3164}",
            "\u{2800}\u{2800}",
            " \u{2800} ",
            "\u{00A0}",
            "\u{200B}",
        ] {
            let err = refusal(&name, input);
            assert!(
                err.contains("must not be empty or blank"),
                "{input:?}: {err}"
            );
        }
        // Visible text in other scripts passes.
        for input in ["김민준", "Ærø", "Zoë ⠁"] {
            assert!(parse(&name, input).is_ok(), "{input:?}");
        }
        assert!(refusal(&name, "Jan\u{7}sen").contains("control characters"));
        assert_eq!(
            parse(&name, "Jose\u{301} Jansen").as_deref(),
            Ok("José Jansen")
        );
        assert_eq!(
            parse(&field("work_experience"), "2020–2024\tbakker\r\nAmsterdam").as_deref(),
            Ok("2020–2024\tbakker\r\nAmsterdam")
        );
        // The limit counts characters of the normalised text.
        let def = FieldDef {
            name: "t".into(),
            category: Category::Contact,
            kind: FieldType::Text { max_len: 4 },
            searchable: false,
        };
        assert_eq!(parse(&def, &"e\u{301}".repeat(4)), Ok("é".repeat(4)));
        assert!(matches!(
            parse(&def, &"e\u{301}".repeat(5)),
            Err(ValueError::TooLarge(_))
        ));
        assert!(matches!(
            parse(&def, &"x".repeat(100)),
            Err(ValueError::TooLarge(_))
        ));
    }

    #[test]
    fn date_of_birth_not_in_the_future_nor_over_120_years_ago() {
        let dob = field("date_of_birth");
        for ok in ["2026-11-26", "1990-04-01", "1906-11-26"] {
            assert_eq!(parse(&dob, ok).as_deref(), Ok(ok));
        }
        assert!(refusal(&dob, "2026-11-27").contains("not be after today"));
        assert!(refusal(&dob, "2150-01-01").contains("not be after today"));
        assert!(refusal(&dob, "1906-11-25").contains("at most 120 years"));
        assert!(refusal(&dob, "1900-01-01").contains("at most 120 years"));
        // Other dates keep only the calendar rule: a document expires in the future.
        let expiry = field("id_document_expiry");
        assert_eq!(parse(&expiry, "2150-01-01").as_deref(), Ok("2150-01-01"));
        assert_eq!(parse(&expiry, "1901-01-01").as_deref(), Ok("1901-01-01"));
    }

    #[test]
    fn absence_periods_sorted_without_overlaps_or_repeats() {
        let periods = field("absence_periods");
        for (input, stored) in [
            (
                "2026-03-01/2026-03-05,2026-01-05/2026-01-09",
                "2026-01-05/2026-01-09,2026-03-01/2026-03-05",
            ),
            (
                "2026-02-01/, 2026-01-05/2026-01-09",
                "2026-01-05/2026-01-09,2026-02-01/",
            ),
            // Adjacent days do not overlap.
            (
                "2026-01-10/2026-01-20,2026-01-01/2026-01-09",
                "2026-01-01/2026-01-09,2026-01-10/2026-01-20",
            ),
            // A start exactly one year ahead.
            ("2027-11-26/2027-11-30", "2027-11-26/2027-11-30"),
        ] {
            assert_eq!(parse(&periods, input).as_deref(), Ok(stored), "{input}");
            assert_eq!(parse(&periods, stored).as_deref(), Ok(stored), "{stored}");
        }
        for (input, rule) in [
            (
                "2026-01-01/2026-01-31,2026-01-10/2026-01-20,2026-01-10/2026-01-20",
                "repeat",
            ),
            ("2026-01-01/2026-01-31,2026-01-10/2026-01-20", "overlap"),
            ("2026-01-01/2026-01-10,2026-01-10/2026-01-20", "overlap"),
            ("2026-01-01/2026-01-10,2026-01-01/2026-01-20", "overlap"),
            ("2026-01-01/2026-01-10,2026-01-01/2026-01-10", "repeat"),
            ("2026-01-01/,2026-02-01/", "at most one ongoing"),
            ("2026-01-01/,2026-01-01/", "at most one ongoing"),
            ("2026-01-01/,2026-02-01/2026-02-05", "must be the latest"),
            ("2026-01-01/,2026-01-01/2026-01-05", "overlap"),
            ("2027-11-27/2027-11-30", "one year after today"),
            ("1950-01-01/2150-12-31,2200-01-01/", "1900–2199"),
            ("2150-01-01/", "one year after today"),
        ] {
            let err = refusal(&periods, input);
            assert!(err.contains(rule), "{input}: {err}");
        }
    }

    #[test]
    fn schema_refuses_unknown_and_misplaced_keys_naming_field_and_key() {
        let base = "[fields.email]\ncategory = \"contact\"\ntype = \"email\"\n";
        assert!(Schema::from_toml(base).is_ok());
        let err = schema_error(&format!("{base}searchabel = true\n"));
        assert!(
            err.contains("`email`") && err.contains("unknown key `searchabel`"),
            "{err}"
        );
        let err = schema_error(&format!("{base}max_len = 5\n"));
        assert!(
            err.contains("`email`") && err.contains("`max_len` does not apply to type `email`"),
            "{err}"
        );
        let err = schema_error(
            "[fields.dob]\ncategory = \"personal\"\ntype = \"date\"\nnot_after_tody = true\n",
        );
        assert!(
            err.contains("`dob`") && err.contains("not_after_tody"),
            "{err}"
        );
        let err = schema_error("[fields.x]\ncategory = \"contact\"\ntype = \"txt\"\nmax_len = 5\n");
        assert!(err.contains("`x`") && err.contains("unknown type"), "{err}");
        let err = schema_error("[fields.x]\ncategory = \"contact\"\nmax_len = 5\n");
        assert!(err.contains("`x`") && err.contains("key `type`"), "{err}");
        let err = schema_error("[fields.x]\ncategory = \"contact\"\ntype = \"text\"\n");
        assert!(
            err.contains("`x`") && err.contains("needs key `max_len`"),
            "{err}"
        );
        let err = schema_error("[fields.x]\ncategory = \"contakt\"\ntype = \"email\"\n");
        // The key and the rule, never the value (review 22).
        assert!(
            err.contains("`x`")
                && err.contains("key `category`: unknown variant, expected one of `contact`")
                && !err.contains("contakt"),
            "{err}"
        );
        let err = schema_error("[fields.x]\ncategory = \"contact\"\ntype = \"email\"\n[other]\n");
        assert!(err.contains("other"), "{err}");
    }

    #[test]
    fn schema_allows_searchable_only_where_a_blind_index_makes_sense() {
        let with = |kind: &str, extra: &str| {
            format!("[fields.f]\ncategory = \"financial\"\ntype = \"{kind}\"\nsearchable = true\n{extra}")
        };
        for (kind, extra) in [
            ("email", ""),
            ("bsn", ""),
            ("iban", ""),
            ("phone", ""),
            ("postcode", ""),
            ("text", "max_len = 10\n"),
        ] {
            let schema = Schema::from_toml(&with(kind, extra)).expect(kind);
            assert!(schema.field("f").expect("f").searchable);
        }
        for (kind, extra) in [
            ("boolean", ""),
            ("enum", "values = [\"a\"]\n"),
            ("date", ""),
            ("periods", ""),
            ("amount", ""),
            ("blob", "max_bytes = 10\ncontent_types = [\"image/png\"]\n"),
        ] {
            let err = schema_error(&with(kind, extra));
            assert!(
                err.contains("`f`") && err.contains("`searchable`") && err.contains(kind),
                "{err}"
            );
        }
    }

    #[test]
    fn schema_checks_content_types_enum_values_and_limits() {
        let blob = |types: &str| {
            format!("[fields.b]\ncategory = \"cv\"\ntype = \"blob\"\nmax_bytes = 10\ncontent_types = {types}\n")
        };
        assert!(Schema::from_toml(&blob(
            "[\"image/jpeg\", \"application/vnd.oasis.opendocument.text\", \"image/svg+xml\"]"
        ))
        .is_ok());
        for bad in [
            "[\"Image/JPEG\"]",
            "[\"image/ jpeg\"]",
            "[\" image/jpeg\"]",
            "[\"image\"]",
            "[\"image/jpeg; q=1\"]",
            "[\"image/jpeg/x\"]",
            "[\"/jpeg\"]",
            "[\"\"]",
        ] {
            let err = schema_error(&blob(bad));
            assert!(
                err.contains("`b`") && err.contains("content_types entry 1"),
                "{bad}: {err}"
            );
        }
        assert!(schema_error(&blob("[]")).contains("at least one content type"));
        assert!(schema_error(&blob("[\"image/png\", \"image/png\"]")).contains("entry 2 repeats"));

        let en = |values: &str| {
            format!("[fields.e]\ncategory = \"identity\"\ntype = \"enum\"\nvalues = {values}\n")
        };
        assert!(Schema::from_toml(&en("[\"passport\", \"id card\"]")).is_ok());
        for (bad, which) in [
            ("[\" a\"]", "value 1"),
            ("[\"a \"]", "value 1"),
            ("[\"a\", \"\"]", "value 2"),
            ("[\"a\", \"b\\u200B\"]", "value 2"),
            ("[\"a\", \"a\"]", "value 2 repeats"),
        ] {
            let err = schema_error(&en(bad));
            assert!(err.contains("`e`") && err.contains(which), "{bad}: {err}");
        }
        assert!(schema_error(&en("[]")).contains("at least one value"));

        let text =
            |n: &str| format!("[fields.t]\ncategory = \"cv\"\ntype = \"text\"\nmax_len = {n}\n");
        // Once a panic in largest_value (max_len * 4 overflowed); now refused up front.
        for bad in [
            "9223372036854775807",
            "0",
            &(MAX_TEXT_CHARS + 1).to_string(),
        ] {
            let err = schema_error(&text(bad));
            assert!(
                err.contains("`t`") && err.contains("max_len must be between"),
                "{err}"
            );
        }
        assert!(schema_error(&text("-1")).contains("max_len"));
        let max = Schema::from_toml(&text(&MAX_TEXT_CHARS.to_string())).expect("cap");
        assert_eq!(max.largest_value(), MAX_TEXT_CHARS * 4);
        let big_blob = format!("[fields.b]\ncategory = \"cv\"\ntype = \"blob\"\nmax_bytes = {}\ncontent_types = [\"image/png\"]\n", i64::MAX);
        assert!(schema_error(&big_blob).contains("max_bytes must be between"));
        let years = |n: &str| {
            format!("[fields.d]\ncategory = \"personal\"\ntype = \"date\"\nmax_years_ago = {n}\n")
        };
        assert!(schema_error(&years("0")).contains("max_years_ago must be between"));
        assert!(schema_error(&years("100000")).contains("max_years_ago must be between"));
        assert!(Schema::from_toml(&years("120")).is_ok());
    }

    #[test]
    fn blob_rules() {
        let schema = Schema::default_schema();
        let cv = schema.field("cv_document").expect("cv");
        assert!(cv
            .parse(
                RawValue::Blob(Zeroizing::new(b"%PDF-1.7".to_vec()), "application/pdf"),
                today()
            )
            .is_ok());
        assert!(matches!(
            cv.parse(
                RawValue::Blob(Zeroizing::new(b"x".to_vec()), "image/gif"),
                today()
            ),
            Err(ValueError::Invalid(_))
        ));
        let big = vec![0u8; 16 * 1024 * 1024 + 1];
        assert!(matches!(
            cv.parse(
                RawValue::Blob(Zeroizing::new(big), "application/pdf"),
                today()
            ),
            Err(ValueError::TooLarge(_))
        ));
        assert!(cv.parse(RawValue::Text("cv"), today()).is_err());
        // A blob sent for a typed field names the type, with its article (review 30).
        for (name, kind) in [
            ("wage", "an amount"),
            ("email", "an email"),
            ("bsn", "a bsn"),
        ] {
            let err = schema
                .field(name)
                .expect("a default field")
                .parse(
                    RawValue::Blob(Zeroizing::new(b"x".to_vec()), "application/pdf"),
                    today(),
                )
                .expect_err("a blob for a text field")
                .to_string();
            assert!(err.starts_with(&format!("is {kind} field:")), "{err}");
        }
    }

    #[test]
    fn messages_never_contain_the_value() {
        let schema = Schema::default_schema();
        let bsn = schema.field("bsn").expect("bsn");
        let err = bsn
            .parse(RawValue::Text("111222334"), today())
            .expect_err("fails 11-test");
        assert!(!err.to_string().contains("111222334"));
    }

    mod properties {
        use super::super::*;
        use super::today;
        use proptest::prelude::*;

        fn eleven_test(d: &[u32]) -> bool {
            let w = [9i64, 8, 7, 6, 5, 4, 3, 2, -1];
            d.iter().zip(w).map(|(d, w)| i64::from(*d) * w).sum::<i64>() % 11 == 0
        }

        /// A plausible address: dot-separated atoms, some letters accented (precomposed).
        fn address() -> impl Strategy<Value = (String, String)> {
            // ß, ς and σ: the local part is case-folded (review 31).
            let atom = "[a-zA-Z0-9éüøçÉßςσΣ+_-]{1,8}";
            // No ß: upper-casing turns it into SS, another domain.
            let label = "[a-zA-Z0-9üé]{1,10}";
            (
                proptest::collection::vec(atom, 1..3),
                proptest::collection::vec(label, 1..3),
                prop::sample::select(vec!["nl", "de", "com", "NL"]),
            )
                .prop_map(|(atoms, labels, tld)| {
                    (atoms.join("."), format!("{}.{tld}", labels.join(".")))
                })
        }

        fn nfd(s: &str) -> String {
            icu_normalizer::DecomposingNormalizerBorrowed::new_nfd()
                .normalize(s)
                .into_owned()
        }

        fn full_width(s: &str) -> String {
            s.chars()
                .map(|c| match c {
                    '!'..='~' => char::from_u32(c as u32 - 0x21 + 0xFF01).expect("full-width form"),
                    c => c,
                })
                .collect()
        }

        proptest! {
            #[test]
            fn bsn_accepts_exactly_the_eleven_proof_numbers(digits in proptest::collection::vec(0u32..10, 9)) {
                let text: String = digits.iter().map(|d| char::from_digit(*d, 10).expect("digit")).collect();
                let expected = eleven_test(&digits) && digits.iter().any(|d| *d != 0);
                prop_assert_eq!(Bsn::parse(&text).is_ok(), expected);
            }

            #[test]
            fn iban_check_digits_round_trip(bank in "[A-Z]{4}", account in "[0-9]{10}") {
                // Compute the check digits for NLkk BANK ACCOUNT, then any single-digit change fails.
                let bban = format!("{bank}{account}");
                let numeric: String = format!("{bban}NL00").chars().map(|c| {
                    if c.is_ascii_digit() { c.to_string() } else { (c as u32 - 'A' as u32 + 10).to_string() }
                }).collect();
                let rem = numeric.bytes().fold(0u32, |r, b| (r * 10 + u32::from(b - b'0')) % 97);
                let iban = format!("NL{:02}{bban}", 98 - rem);
                prop_assert!(Iban::parse(&iban).is_ok(), "{}", iban);
                let mut changed = iban.clone().into_bytes();
                let last = changed.len() - 1;
                changed[last] = if changed[last] == b'9' { b'0' } else { changed[last] + 1 };
                prop_assert!(Iban::parse(&String::from_utf8(changed).expect("ascii")).is_err());
            }

            #[test]
            fn normalised_values_parse_to_themselves(text in "\\PC{0,40}") {
                // Parsing never panics, and a normalised value is a fixed point.
                let schema = Schema::default_schema();
                for field in schema.fields().filter(|f| !f.kind.is_blob()) {
                    if let Ok(parsed) = field.parse(RawValue::Text(&text), today()) {
                        let once = String::from_utf8(parsed.plaintext.plaintext().expect("laid out").to_vec()).expect("utf-8");
                        let twice = field.parse(RawValue::Text(&once), today()).expect("normalised parses");
                        prop_assert_eq!(once.as_bytes().to_vec(), twice.plaintext.plaintext().expect("laid out").to_vec(), "{}", field.name);
                    }
                }
            }

            #[test]
            fn search_form_is_the_index_form_of_the_stored_value(text in "\\PC{0,40}") {
                // What a search computes equals what a write indexed, for every searchable
                // field and any input: both accept or both refuse, with the same form.
                let schema = Schema::default_schema();
                for field in schema.fields().filter(|f| f.searchable) {
                    let stored = field.parse(RawValue::Text(&text), today());
                    let search = field.parse_search(&text, today());
                    match (stored, search) {
                        (Ok(stored), Ok(search)) => {
                            let index = stored.index_form.expect("searchable fields get an index form");
                            prop_assert_eq!(index.as_str(), search.as_str(), "{}", field.name);
                        }
                        // A blank search is refused as missing; a write refuses it by its rule.
                        (Err(_), Err(b)) if text.trim().is_empty() => {
                            prop_assert_eq!(b.to_string(), "is required (the value to search for)")
                        }
                        (Err(a), Err(b)) => prop_assert_eq!(a, b),
                        (a, b) => prop_assert!(false, "{}: parse {:?}, search {:?}", field.name, a.is_ok(), b.is_ok()),
                    }
                }
            }

            #[test]
            fn email_spellings_of_one_address_share_the_index_form((local, domain) in address()) {
                let email = Schema::default_schema().field("email").expect("email").clone();
                let base = format!("{local}@{domain}");
                let stored = email.parse(RawValue::Text(&base), today()).expect("plausible address");
                let form = stored.index_form.expect("email is searchable");
                let ascii_domain = idna::domain_to_ascii(&domain).expect("domain converts");
                for variant in [
                    base.to_uppercase(),
                    base.to_lowercase(),
                    nfd(&base),
                    format!("  {base}\t"),
                    format!("{local}@{}", domain.to_uppercase()),
                    format!("{local}@{}", full_width(&domain)),
                    format!("{local}@{ascii_domain}"),
                    format!("{}@{ascii_domain}", nfd(&local)),
                ] {
                    let search = email.parse_search(&variant, today());
                    prop_assert!(search.is_ok(), "{:?}", variant);
                    let search = search.expect("checked");
                    prop_assert_eq!(form.as_str(), search.as_str(), "{:?}", variant);
                }
            }

            #[test]
            fn postcodes_normalise(digits in 1000u32..10000, letters in "[a-zA-Z]{2}", space in proptest::bool::ANY) {
                let text = if space { format!("{digits} {letters}") } else { format!("{digits}{letters}") };
                let p = Postcode::parse(&text).expect("valid postcode");
                prop_assert_eq!(p.0.as_str(), format!("{digits} {}", letters.to_ascii_uppercase()));
            }
        }
    }
}
