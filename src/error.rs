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

/// A request-supplied name made safe to echo in an error or log: printable ASCII only, at most
/// 64 characters (longer names end in `…`).
pub fn printable_name(name: &str) -> String {
    let clean: String = name
        .chars()
        .take(64)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect();
    if name.chars().count() > 64 {
        format!("{clean}…")
    } else {
        clean
    }
}
