//! # Kluis — an encrypted candidate-records vault
//!
//! Kluis ("safe") stores a staffing agency's candidate and employee records with every
//! sensitive field encrypted per record, and serves each calling system over gRPC only the
//! fields its role is authorised for. Decryption is role-scoped cryptographically: a request
//! unwraps only the data keys of the categories it may return.
//!
//! Kluis does **not** store plaintext anywhere (store, logs, errors, `Debug`), does not
//! implement its own cryptographic primitives (`ring` does), and does not trust its storage:
//! every record carries a MAC over its header and every field's ciphertext digest.
//!
//! ## Modules, in reading order
//!
//! Pure logic, no IO:
//! - [`crypto`]: AES-256-GCM envelopes, HKDF, HMAC, typed secret keys.
//! - [`schema`]: the field catalogue and typed values parsed at the edge (BSN, IBAN, …).
//! - [`policy`]: roles, purposes, principals; deny by default.
//! - [`record`]: the stored form of a record (MAC-protected header, sealed chunks).
//! - `wipe`: plaintext buffers that grow without leaving copies behind in freed memory.
//!
//! State and IO:
//! - [`store`]: the storage trait (keyspaces, atomic durable batches) and the sled backend.
//! - [`wal`]: the write-ahead log that makes sled writes durable (group commit).
//! - [`keys`]: master key, versioned KEKs, DEK wrapping, blind-index and integrity keys.
//! - [`audit`]: the hash-chained audit trail, signed checkpoints, verification and queries.
//! - [`anchor`]: the audit trail's anchor outside the store (the newest checkpoint, in a file).
//! - [`vault`]: the core operations, the main test boundary below gRPC.
//! - [`retention`]: retention rules and the deadlines of each category of a record.
//! - [`sweeper`]: the retention sweeper and its plan.
//! - [`rotation`]: key lifecycle jobs (rewrap, re-key) and exact per-KEK-version counts.
//! - [`lease`]: which instance runs the key job (fencing token and renewed lease in the store).
//! - [`error`]: the vault's error type.
//!
//! Edges:
//! - [`service`]: tonic handlers, authentication, the one mapping of errors to gRPC status.
//! - [`config`]: configuration file, dev mode and `kluis init`.
//! - [`server`]: assembling and running the gRPC server (TLS, health, reflection, shutdown).
//! - [`cli`]: the `kluis` subcommands beyond `serve`/`init`: `audit`, `keys`, `export`, `retention`.
//! - [`proto`]: the generated `kluis.v1` API.

#![forbid(unsafe_code)]
#![warn(clippy::unwrap_used)]
#![warn(missing_docs)]

pub mod anchor;
pub mod audit;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod error;
pub mod keys;
pub mod lease;
pub mod policy;
pub mod record;
pub mod retention;
pub mod rotation;
pub mod schema;
pub mod server;
pub mod service;
pub mod store;
pub mod sweeper;
pub mod vault;
pub mod wal;
mod wipe;

/// The generated `kluis.v1` gRPC API (messages, clients and servers of `Records`, `Audit` and `Keys`).
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("kluis.v1");

    /// Encoded file descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kluis_descriptor");

    // The messages that carry field values wipe them when dropped: a request's values once
    // the vault took them (what is left), an answer's once tonic encoded it, and either on
    // every path that refuses or drops them. (The transport's own buffers are out of reach.)
    impl Drop for FieldValue {
        fn drop(&mut self) {
            use zeroize::Zeroize;
            match &mut self.kind {
                Some(field_value::Kind::Text(text)) => text.zeroize(),
                Some(field_value::Kind::Blob(bytes)) => bytes.zeroize(),
                None => {}
            }
        }
    }

    impl Drop for ExportRecordResponse {
        fn drop(&mut self) {
            zeroize::Zeroize::zeroize(&mut self.json);
        }
    }

    impl Drop for FindRecordsRequest {
        fn drop(&mut self) {
            zeroize::Zeroize::zeroize(&mut self.value);
        }
    }
}

pub use error::VaultError;
pub use vault::Vault;
