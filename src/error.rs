//! The vault's error type: one variant per outcome a caller can act on. Messages name fields
//! and rules, never values. `service::status` is the one place that maps these to gRPC.

use crate::store::StoreError;

/// What went wrong with a vault operation.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// A request field breaks a rule: `field` names it (e.g. `fields.bsn`), `rule` says what.
    #[error("{field}: {rule}")]
    InvalidArgument {
        /// The offending request field.
        field: String,
        /// The rule it breaks.
        rule: String,
    },
    /// A value is larger than its limit.
    #[error("{field}: {rule}")]
    TooLarge {
        /// The offending request field.
        field: String,
        /// The limit it exceeds.
        rule: String,
    },
    /// The caller's role may not do this (message says what was refused).
    #[error("{0}")]
    PermissionDenied(String),
    /// No record with this id.
    #[error("record {0} not found")]
    NotFound(String),
    /// The record is at another revision than the caller expected.
    #[error("stale revision: expected_revision is {expected} but record {record_id} is at revision {actual}")]
    StaleRevision {
        /// The record.
        record_id: String,
        /// What the caller sent.
        expected: u64,
        /// What the record is at.
        actual: u64,
    },
    /// The operation is not possible in the current state (message says why and what to do).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Stored data failed authentication: `part` names the field, key or header.
    #[error("record {record_id}: stored {part} failed authentication (tampered or corrupted)")]
    DataLoss {
        /// The record.
        record_id: String,
        /// What failed (`field bsn`, `data key of category identity`, `record header`).
        part: String,
    },
    /// Concurrent writes kept changing the record (or the keys) this operation read, more
    /// often than it retries; nothing was changed and the caller may retry.
    #[error("{0} changed concurrently while this request was applied; nothing was changed: retry")]
    Conflict(String),
    /// The store could not be read or written; nothing was changed.
    #[error("storage unavailable")]
    Unavailable(#[source] StoreError),
    /// The audit event could not be written, so the operation was refused: nothing was
    /// changed and nothing is returned.
    #[error("audit trail unavailable")]
    AuditUnavailable(#[source] StoreError),
    /// An internal failure (randomness, a broken invariant); nothing was changed.
    #[error("internal error")]
    Internal(String),
}

impl VaultError {
    /// An invalid-argument error for `field` breaking `rule`.
    pub fn invalid(field: impl Into<String>, rule: impl Into<String>) -> VaultError {
        VaultError::InvalidArgument {
            field: field.into(),
            rule: rule.into(),
        }
    }
}

impl From<StoreError> for VaultError {
    fn from(e: StoreError) -> Self {
        VaultError::Unavailable(e)
    }
}

impl From<crate::crypto::CryptoError> for VaultError {
    fn from(e: crate::crypto::CryptoError) -> Self {
        VaultError::Internal(e.to_string())
    }
}

/// A request-supplied name (of a field, a purpose, a category) made safe to echo in an error
/// or log. Names are identifiers (`full_name`, `data_subject_request`); something else sent
/// where a name belongs may be a value (a BSN, an e-mail address put in the wrong place), so
/// it is echoed only if it has a name's shape: a lower-case ASCII letter, then lower-case
/// letters, digits, `_`, `-` or `.`, at most 64 characters. Anything else reads
/// `<not a name: not shown>`.
pub fn printable_name(name: &str) -> String {
    let mut chars = name.chars();
    let named = name.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-.".contains(c));
    if named {
        name.to_string()
    } else {
        "<not a name: not shown>".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::printable_name;

    #[test]
    fn only_names_are_echoed() {
        for name in ["shoe_size", "talent_pool", "kek-v2", "a"] {
            assert_eq!(printable_name(name), name);
        }
        for value in [
            "111222333",
            "jan@example.nl",
            "Jansen",
            "NL91ABNA0417164300",
            "",
            "a b",
            "josé",
            &"x".repeat(65),
        ] {
            assert_eq!(printable_name(value), "<not a name: not shown>", "{value}");
        }
    }
}
