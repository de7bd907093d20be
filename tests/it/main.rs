//! Kluis integration tests: one binary. Each test starts the real server on port 0 with a temp
//! data dir (or the real `kluis` binary, for crash and log tests) and talks real gRPC.

mod helpers;

mod audit;
mod audit_cli;
mod crypto_vectors;
mod durability;
mod export_cli;
mod gate;
mod keys;
mod keys_cli;
mod policy_matrix;
mod privacy;
mod records;
mod retention_cli;
mod tamper;
mod tls;
