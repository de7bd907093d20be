//! The audit trail's anchor outside the store: the newest checkpoint this server signed,
//! kept in a file beside the signing key (`audit-anchor.<store id>`).
//!
//! Signed checkpoints in the store catch a rewrite of the events they cover, but someone with
//! access to the store alone can delete the checkpoints after some point, rewrite the events
//! after it consistently, and let the next server start sign the result. The anchor file is
//! out of that reach (it lives with the keys, mode 0600 in a 0700 directory): the server
//! writes every checkpoint it signs to it (replacing the file atomically and durably), refuses
//! to sign a chain that no longer holds the anchored event with its hash, and verification
//! (`VerifyChain`, `kluis audit verify`) checks the anchor like a checkpoint of the store.
//!
//! The file is named by the store's id ([`crate::keys::KeyRing::store_id`], derived from the
//! store's integrity key: it cannot be changed with access to the store alone), so one keys
//! directory can serve several data directories (dev mode's `--data-dir`) without one
//! store's anchor being taken for another's. The server records the id in the store too,
//! signed by the checkpoint key ([`META_STORE_ID`]), for the offline verifier, which has no
//! master key.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::audit::Checkpoint;
use crate::store::{Batch, Keyspace, Store, StoreError};

/// Where the store keeps a copy of its id (16 bytes), for offline tools. The server derives
/// the id from the keys and mends this copy if it differs.
pub const META_STORE_ID: &[u8] = b"audit/store-id";

/// The anchor file's name prefix; the store id (32 hex digits) follows.
pub const FILE_PREFIX: &str = "audit-anchor.";

const MAGIC: &str = "kluis audit anchor v1";

/// Anchor file failures.
#[derive(Debug, thiserror::Error)]
pub enum AnchorError {
    /// The file could not be read or written.
    #[error("audit anchor {path}: {reason}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        reason: String,
    },
    /// The file is not an anchor of this store signed by this key.
    #[error("audit anchor {path} is unusable: {reason}; restore it, or move it away (the trail is then checked against the store's own checkpoints only)")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// The anchor file of store `store_id` in `dir`.
pub fn path(dir: &Path, store_id: &[u8; 16]) -> PathBuf {
    dir.join(format!("{FILE_PREFIX}{}", hex::encode(store_id)))
}

fn encode(store_id: &[u8; 16], cp: &Checkpoint) -> String {
    format!(
        "{MAGIC}\n# The newest audit checkpoint the Kluis server signed for this store (event {}). Do not edit; see README.md, \"Audit trail\".\nstore {}\ncheckpoint {}\n",
        cp.seq,
        hex::encode(store_id),
        hex::encode(cp.encode())
    )
}

fn decode(text: &str) -> Result<([u8; 16], Checkpoint), String> {
    let mut lines = text.lines().filter(|l| !l.starts_with('#'));
    if lines.next() != Some(MAGIC) {
        return Err(format!("the first line is not `{MAGIC}`"));
    }
    let mut field = |name: &str| {
        lines
            .next()
            .and_then(|l| l.strip_prefix(name))
            .and_then(|v| v.strip_prefix(' '))
            .and_then(|v| hex::decode(v.trim()).ok())
            .ok_or_else(|| format!("no `{name} <hex>` line where expected"))
    };
    let store: [u8; 16] = field("store")?
        .try_into()
        .map_err(|_| "the store id is not 16 bytes".to_string())?;
    let cp = Checkpoint::decode(&field("checkpoint")?)
        .ok_or_else(|| "the checkpoint is not 112 bytes".to_string())?;
    if lines.next().is_some() {
        return Err("unexpected lines after the checkpoint".into());
    }
    Ok((store, cp))
}

/// Reads the anchor at `path` for store `store_id`: `None` if there is no file; an error if
/// it is unreadable, malformed, names another store, or its checkpoint is not signed by
/// `public_key`.
pub fn load(
    path: &Path,
    store_id: &[u8; 16],
    public_key: &[u8; 32],
) -> Result<Option<Checkpoint>, AnchorError> {
    let Some((store, cp)) = load_any(path, public_key)? else {
        return Ok(None);
    };
    if store != *store_id {
        return Err(AnchorError::Invalid {
            path: path.display().to_string(),
            reason: format!(
                "it anchors store {}, not this store ({})",
                hex::encode(store),
                hex::encode(store_id)
            ),
        });
    }
    Ok(Some(cp))
}

/// Reads the anchor at `path`, of whichever store it names: `None` if there is no file; an
/// error if it is unreadable, malformed, or its checkpoint is not signed by `public_key`.
pub fn load_any(
    path: &Path,
    public_key: &[u8; 32],
) -> Result<Option<([u8; 16], Checkpoint)>, AnchorError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        // Read, but not text: not an anchor (review 30: reported as an IO error).
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            return Err(AnchorError::Invalid {
                path: path.display().to_string(),
                reason: "not an anchor file (not UTF-8 text)".into(),
            })
        }
        Err(e) => {
            return Err(AnchorError::Io {
                path: path.display().to_string(),
                reason: e.to_string(),
            })
        }
    };
    let invalid = |reason: String| AnchorError::Invalid {
        path: path.display().to_string(),
        reason,
    };
    let (store, cp) = decode(&text).map_err(invalid)?;
    if !cp.verify(public_key) {
        return Err(invalid(format!(
            "its checkpoint (event {}) is not signed by the checkpoint key {}",
            cp.seq,
            hex::encode(public_key)
        )));
    }
    Ok(Some((store, cp)))
}

/// The anchor files in `dir` (of any store), for saying which exist when this store's is
/// not found.
pub fn list(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(FILE_PREFIX))
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

/// Replaces the anchor at `path` with `cp`, durably: written whole under a temporary name
/// (mode 0600) and synced, renamed over the old file, and the directory synced. A crash
/// leaves the old anchor or the new one, never a part.
pub fn save(path: &Path, store_id: &[u8; 16], cp: &Checkpoint) -> Result<(), AnchorError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().map_or_else(
        || "audit-anchor".into(),
        |n| n.to_string_lossy().into_owned(),
    );
    // Named by the process: instances sharing a keys directory do not write each other's.
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    // Each step names what it did to which file (review 28: every failure read as one of
    // the anchor file itself).
    let at = |op: &str, file: &Path| {
        let op = op.to_string();
        let file = file.display().to_string();
        move |e: std::io::Error| format!("{op} {file}: {e}")
    };
    let written = (|| {
        // A temporary file left by a crash (of a process with this id) is replaced.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(at("removing the leftover temporary file", &tmp)(e))
            }
            _ => {}
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(at("creating the temporary file", &tmp))?;
        file.write_all(encode(store_id, cp).as_bytes())
            .map_err(at("writing the temporary file", &tmp))?;
        file.sync_all()
            .map_err(at("syncing the temporary file", &tmp))?;
        std::fs::rename(&tmp, path).map_err(at("renaming it over", path))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(at("syncing the directory", dir))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(|reason| AnchorError::Io {
        path: path.display().to_string(),
        reason,
    })
}

/// What the store records as its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordedId {
    /// Nothing: no server with anchors has started on this store.
    Absent,
    /// An id signed by the checkpoint key.
    Signed([u8; 16]),
    /// Something that is not an id signed by the checkpoint key: it was changed.
    Unsigned,
}

/// Label of the signed store id record.
const LABEL_STORE_ID: &[u8] = b"kluis/v1/audit-store-id";

fn store_id_message(store_id: &[u8; 16]) -> Vec<u8> {
    [LABEL_STORE_ID, store_id.as_slice()].concat()
}

/// Checks that the anchor can be written in `dir` (created, mode 0700, if absent): a probe
/// file is created there, synced and removed.
pub fn check_writable(dir: &Path) -> Result<(), AnchorError> {
    use std::os::unix::fs::OpenOptionsExt;
    if !dir.exists() {
        crate::keys::create_private_dir_durable(dir).map_err(|e| AnchorError::Io {
            path: dir.display().to_string(),
            reason: format!("creating the audit anchor directory: {e}"),
        })?;
    }
    let probe = dir.join(format!(".audit-anchor-probe.{}", std::process::id()));
    let made = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&probe)
        .and_then(|f| f.sync_all());
    let _ = std::fs::remove_file(&probe);
    made.map_err(|e| AnchorError::Io {
        path: dir.display().to_string(),
        reason: format!(
            "the audit anchor cannot be written in this directory ({e}): make it writable for the server, or set [audit] anchor_dir to a writable directory outside the data directory"
        ),
    })
}

/// The store's record of its id (id ‖ Ed25519 signature by the checkpoint key), checked
/// against `public_key`. Signed, so that with access to the store alone it can be removed
/// (which the verifier notices when anchors exist) but not changed to an unsigned value; a
/// copy of another store's record (same keys directory) leads to that store's anchor, which
/// this chain does not hold.
pub async fn recorded_store_id(
    store: &impl Store,
    public_key: &[u8; 32],
) -> Result<RecordedId, StoreError> {
    let Some(value) = store.get(Keyspace::Meta, META_STORE_ID).await? else {
        return Ok(RecordedId::Absent);
    };
    let signed = (value.len() == 16 + 64)
        .then(|| {
            let id: [u8; 16] = value[..16].try_into().ok()?;
            ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key)
                .verify(&store_id_message(&id), &value[16..])
                .is_ok()
                .then_some(id)
        })
        .flatten();
    Ok(signed.map_or(RecordedId::Unsigned, RecordedId::Signed))
}

/// Records `store_id`, signed by `signer`, in the store if its record is absent or differs;
/// returns the record that differed, if one did (someone changed it: the caller says so).
pub async fn record_store_id(
    store: &impl Store,
    store_id: &[u8; 16],
    signer: &crate::audit::Signer,
) -> Result<Option<Vec<u8>>, StoreError> {
    let stored = store.get(Keyspace::Meta, META_STORE_ID).await?;
    if recorded_store_id(store, &signer.public_key()).await? == RecordedId::Signed(*store_id) {
        return Ok(None);
    }
    let mut value = store_id.to_vec();
    value.extend_from_slice(&signer.sign_labelled(&store_id_message(store_id)));
    let mut batch = Batch::default();
    batch.put(Keyspace::Meta, META_STORE_ID.to_vec(), value);
    store.commit(batch).await?;
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Head, Signer};

    fn signer(dir: &Path) -> Signer {
        Signer::load_or_create(&dir.join("audit-signing.key"), true).expect("signing key")
    }

    fn checkpoint(signer: &Signer, seq: u64) -> Checkpoint {
        signer.sign(
            &Head {
                seq,
                time_ms: 1_700_000_000_000,
                hash: [seq as u8; 32],
            },
            1_700_000_000_500,
        )
    }

    /// A failed write names the step and the file it failed on, and leaves the anchor.
    #[test]
    fn a_failed_save_names_the_step_and_keeps_the_old_anchor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = signer(dir.path());
        let id = [7u8; 16];
        let p = path(dir.path(), &id);
        save(&p, &id, &checkpoint(&s, 10)).expect("save");
        let name = p.file_name().expect("name").to_string_lossy().into_owned();
        let tmp = dir
            .path()
            .join(format!(".{name}.{}.tmp", std::process::id()));
        std::fs::create_dir(&tmp).expect("a directory in the way");
        std::fs::write(tmp.join("x"), b"x").expect("not empty");
        let err = save(&p, &id, &checkpoint(&s, 20)).expect_err("refused");
        let text = err.to_string();
        assert!(
            text.contains("removing the leftover temporary file")
                && text.contains(&tmp.display().to_string()),
            "{text}"
        );
        let got = load(&p, &id, &s.public_key()).expect("load").expect("kept");
        assert_eq!(got.seq, 10);
    }

    #[test]
    fn an_anchor_round_trips_and_is_replaced_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = signer(dir.path());
        let id = [7u8; 16];
        let p = path(dir.path(), &id);
        assert!(load(&p, &id, &s.public_key()).expect("absent").is_none());
        save(&p, &id, &checkpoint(&s, 10)).expect("save");
        save(&p, &id, &checkpoint(&s, 20)).expect("replace");
        let got = load(&p, &id, &s.public_key())
            .expect("load")
            .expect("present");
        assert_eq!(got, checkpoint(&s, 20));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // No temporary file left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert!(
            names.iter().all(|n| !n.to_string_lossy().ends_with(".tmp")),
            "{names:?}"
        );
    }

    #[test]
    fn an_anchor_of_another_store_key_or_shape_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = signer(dir.path());
        let id = [7u8; 16];
        let p = path(dir.path(), &id);
        save(&p, &id, &checkpoint(&s, 10)).expect("save");
        // Another store's id.
        let e = load(&p, &[8u8; 16], &s.public_key()).expect_err("other store");
        assert!(e.to_string().contains("anchors store"), "{e}");
        // Not text: not an anchor, rather than a file that could not be read (review 30).
        let binary = dir.path().join("binary");
        std::fs::write(&binary, [0xff, 0xfe, 0x00]).expect("write");
        let e = load(&binary, &id, &s.public_key()).expect_err("binary");
        assert!(
            matches!(&e, AnchorError::Invalid { reason, .. } if reason.contains("not UTF-8")),
            "{e}"
        );
        // Another key.
        let other = tempfile::tempdir().expect("tempdir");
        let e = load(&p, &id, &signer(other.path()).public_key()).expect_err("other key");
        assert!(e.to_string().contains("not signed"), "{e}");
        // A changed hash breaks the signature.
        let mut cp = checkpoint(&s, 10);
        cp.hash[0] ^= 1;
        std::fs::write(&p, encode(&id, &cp)).expect("write");
        assert!(load(&p, &id, &s.public_key()).is_err());
        // Malformed files.
        for text in [
            "",
            "kluis audit anchor v2\n",
            "kluis audit anchor v1\nstore 00\ncheckpoint 00\n",
            &format!("{}extra\n", encode(&id, &checkpoint(&s, 10))),
        ] {
            std::fs::write(&p, text).expect("write");
            let e = load(&p, &id, &s.public_key()).expect_err(text);
            assert!(matches!(e, AnchorError::Invalid { .. }), "{e}");
        }
    }

    #[tokio::test]
    async fn the_store_keeps_a_signed_mended_record_of_its_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = signer(dir.path());
        let pk = s.public_key();
        let store = crate::store::SledStore::open(&dir.path().join("data")).expect("store");
        let recorded = || recorded_store_id(&store, &pk);
        assert_eq!(recorded().await.expect("get"), RecordedId::Absent);
        assert_eq!(
            record_store_id(&store, &[1; 16], &s).await.expect("put"),
            None
        );
        assert_eq!(recorded().await.expect("get"), RecordedId::Signed([1; 16]));
        assert_eq!(
            record_store_id(&store, &[1; 16], &s).await.expect("same"),
            None
        );
        let first = store
            .get(Keyspace::Meta, META_STORE_ID)
            .await
            .expect("get")
            .expect("recorded");
        assert_eq!(
            record_store_id(&store, &[2; 16], &s).await.expect("mend"),
            Some(first.clone())
        );
        assert_eq!(recorded().await.expect("get"), RecordedId::Signed([2; 16]));
        // Changed with the store alone: an unsigned id, another id under the old signature,
        // or a bare id.
        let mut changed = first.clone();
        changed[0] ^= 1;
        for value in [changed, first[..16].to_vec(), vec![]] {
            let mut b = Batch::default();
            b.put(Keyspace::Meta, META_STORE_ID.to_vec(), value);
            store.commit(b).await.expect("put");
            assert_eq!(recorded().await.expect("get"), RecordedId::Unsigned);
        }
        // Another key's signature does not count.
        let other = tempfile::tempdir().expect("tempdir");
        record_store_id(&store, &[3; 16], &signer(other.path()))
            .await
            .expect("put");
        assert_eq!(recorded().await.expect("get"), RecordedId::Unsigned);
    }
}
