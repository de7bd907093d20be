//! The one place where vault errors become gRPC statuses. Messages name fields and rules,
//! never values; internal detail goes to the log, not to the caller.

use tonic::Status;

use crate::error::VaultError;

/// Maps a vault error to a gRPC status.
pub fn from_vault(e: VaultError) -> Status {
    match &e {
        VaultError::InvalidArgument { .. } => Status::invalid_argument(e.to_string()),
        VaultError::TooLarge { .. } => Status::resource_exhausted(e.to_string()),
        VaultError::PermissionDenied(_) => Status::permission_denied(e.to_string()),
        VaultError::NotFound(_) => Status::not_found(e.to_string()),
        VaultError::StaleRevision { .. } | VaultError::FailedPrecondition(_) => {
            Status::failed_precondition(e.to_string())
        }
        VaultError::Conflict(_) => Status::aborted(e.to_string()),
        VaultError::DataLoss { .. } => {
            tracing::error!(error = %e, "stored data failed authentication");
            Status::data_loss(e.to_string())
        }
        VaultError::Unavailable(source) => {
            tracing::error!(error = %source, "storage failure");
            Status::unavailable("storage unavailable; nothing was changed")
        }
        VaultError::AuditUnavailable(source) => {
            tracing::error!(error = %source, "audit event could not be written; operation refused");
            // The trail lives in the store: a failing disk shows here too (review 25).
            Status::unavailable(
                "audit trail unavailable (storage failure: see the server log): the operation was refused; nothing was changed or returned",
            )
        }
        VaultError::Internal(detail) => {
            tracing::error!(error = %detail, "internal error");
            Status::internal("internal error; nothing was changed")
        }
    }
}
