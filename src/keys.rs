//! The key hierarchy: master key → versioned per-category KEKs (stored wrapped) → per-record,
//! per-category DEKs; plus the blind-index root and the record-integrity key, both stored
//! wrapped by the master key.
//!
//! ```text
//! master key (file 0600 or KLUIS_MASTER_KEY; never in the store)
//!  ├─ HKDF "kluis/v1/key-check"  → key check value (detects a wrong master key at start-up)
//!  └─ HKDF "kluis/v1/wrap"       → wraps, in the store's `meta` keyspace:
//!       ├─ kek/<category>/<version>   random 256-bit KEKs; the active (highest) version wraps
//!       │                             new DEKs; older ones are decrypt-only until retired
//!       │                             (deleted; `kek-info/<category>/<version>` keeps the facts)
//!       ├─ index-root/1               random; HKDF(root, "kluis/v1/blind-index/" ‖ field)
//!       │                             → blind-index HMAC key; HKDF(root,
//!       │                             "kluis/v1/record-notes") → seals the privacy officer's
//!       │                             reasons (restriction, legal hold) in headers
//!       └─ integrity/1                random; HMAC-SHA256 over each stored record
//! ```
//!
//! Everything that must be shared by several Kluis instances (KEK versions, which one is
//! active, the key check value) lives in the store, not in process memory alone. Rotation,
//! retirement and master key rotation commit to the store first and change memory after;
//! [`KeyRing::reload`] picks up changes made by another instance or an offline tool.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use zeroize::Zeroizing;

use crate::crypto::{self, CryptoError, SecretKey};
use crate::schema::Category;
use crate::store::{Batch, Expect, Keyspace, Store, StoreError};

const LABEL_KEY_CHECK: &[u8] = b"kluis/v1/key-check";
const LABEL_WRAP: &[u8] = b"kluis/v1/wrap";
const LABEL_INDEX_FIELD: &[u8] = b"kluis/v1/blind-index";
const LABEL_NOTES: &[u8] = b"kluis/v1/record-notes";
const LABEL_STORE_ID: &[u8] = b"kluis/v1/store-id";
const LABEL_PAGE_TOKEN: &[u8] = b"kluis/v1/page-token";
/// Bytes of the tag on a page token.
const PAGE_TAG_LEN: usize = 16;
const CTX_KEK: &[u8] = b"kluis/v1/kek";
const CTX_INDEX_ROOT: &[u8] = b"kluis/v1/index-root";
const CTX_INTEGRITY: &[u8] = b"kluis/v1/integrity";
const CTX_DEK: &[u8] = b"kluis/v1/dek";
const SALT: &[u8] = b"kluis";

const META_KEY_CHECK: &[u8] = b"key-check";
const META_KEK_PREFIX: &str = "kek/";
const META_KEK_INFO_PREFIX: &str = "kek-info/";
/// A KEK being retired: moved here from `kek/` so that no write can wrap under it any more
/// while its records are counted (decrypt-only; destroyed once the count is zero).
const META_KEK_RETIRING_PREFIX: &str = "kek-retiring/";
/// What every KEK-related meta key starts with (`kek/`, `kek-info/`, `kek-retiring/`).
const META_KEK_ANY_PREFIX: &[u8] = b"kek";
/// `active-kek/<category>`: the active KEK version of the category (4 bytes, big-endian),
/// changed by every rotation in the batch that makes the version.
const META_ACTIVE_KEK_PREFIX: &str = "active-kek/";
const META_INDEX_ROOT: &[u8] = b"index-root/1";
const META_INTEGRITY: &[u8] = b"integrity/1";

/// Environment variable that may hold the master key (64 hex digits) instead of a file.
pub const MASTER_KEY_ENV: &str = "KLUIS_MASTER_KEY";

/// Key failures.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The master key file is readable by group or others.
    #[error("master key file {path} is {}", secret_mode_reason(Path::new(path), *mode))]
    Permissions {
        /// The file.
        path: String,
        /// Its mode bits.
        mode: u32,
    },
    /// The master key file or variable could not be read or is not 64 hex digits.
    #[error("master key {0}")]
    BadMasterKey(String),
    /// The master key does not match the one this data directory was created with.
    #[error("the master key does not match this data directory (key check value differs): refusing to start. Use the master key this data directory was last rotated to (`master_key_file` or KLUIS_MASTER_KEY); for a backup taken before a master key rotation, the key current then (`kluis keys rotate-master` kept it as `<master_key_file>.retired-<time>`)")]
    WrongMasterKey,
    /// A stored wrapped key failed authentication.
    #[error("stored key `{0}` failed authentication (tampered or wrong master key)")]
    Corrupt(String),
    /// A data key could not be unwrapped.
    #[error("data key of category {0} failed authentication")]
    Dek(Category),
    /// A record names a KEK version the ring does not have.
    #[error("KEK {0} version {1} is not available")]
    MissingKek(Category, u32),
    /// Randomness or sealing failed.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Fewer distinct byte values than this in a master key mark it as chosen, not drawn
/// ([`MasterKey::distinct_bytes`]): no new store is made under it, nor is it rotated to.
pub const MIN_DISTINCT_BYTES: usize = 16;

/// The master key: the root of the hierarchy, never written to the store.
pub struct MasterKey(SecretKey);

impl MasterKey {
    /// Reads the master key file a server runs with: as [`MasterKey::load_file`], and refuses
    /// a file another user could have put there ([`replaceable_by_others`], as for every other
    /// file a server trusts: review 20, a key `nobody` planted became the root of a new store).
    /// (The CLI's offline `rotate-master`, which root may run on the service user's file,
    /// checks the new key's file itself.)
    pub fn load_server_file(path: &Path) -> Result<MasterKey, KeyError> {
        if let Some(why) = replaceable_by_others(path)
            .map_err(|e| KeyError::BadMasterKey(format!("file {}: {e}", path.display())))?
        {
            return Err(KeyError::BadMasterKey(format!(
                "file {} is {why}: a key someone else could have chosen",
                path.display()
            )));
        }
        Self::load_file(path)
    }

    /// Reads a master key file (64 hex digits); refuses a file readable by group or others.
    pub fn load_file(path: &Path) -> Result<MasterKey, KeyError> {
        let loose = loose_mode(path, SECRET_FORBIDDEN_BITS)
            .map_err(|e| KeyError::BadMasterKey(format!("file {}: {e}", path.display())))?;
        if let Some(mode) = loose {
            return Err(KeyError::Permissions {
                path: path.display().to_string(),
                mode,
            });
        }
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| KeyError::BadMasterKey(format!("file {}: {e}", path.display())))?,
        );
        SecretKey::from_hex(&text).map(MasterKey).ok_or_else(|| {
            KeyError::BadMasterKey(format!("file {} must hold 64 hex digits", path.display()))
        })
    }

    /// Reads the master key from [`MASTER_KEY_ENV`], if set.
    pub fn from_env() -> Result<Option<MasterKey>, KeyError> {
        match std::env::var(MASTER_KEY_ENV) {
            Ok(v) => {
                let v = Zeroizing::new(v);
                SecretKey::from_hex(&v)
                    .map(|k| Some(MasterKey(k)))
                    .ok_or_else(|| {
                        KeyError::BadMasterKey(format!("in {MASTER_KEY_ENV} must be 64 hex digits"))
                    })
            }
            Err(_) => Ok(None),
        }
    }

    /// Creates a new random master key file with mode 0600; refuses to overwrite.
    pub fn create_file(path: &Path) -> Result<MasterKey, KeyError> {
        let key = SecretKey::generate()?;
        let text = Zeroizing::new(format!("{}\n", key.to_hex().as_str()));
        write_secret_file(path, text.as_bytes())
            .map_err(|e| KeyError::BadMasterKey(format!("file {}: {e}", path.display())))?;
        Ok(MasterKey(key))
    }

    /// How many distinct byte values the key has: about 30 for a random 32-byte key (fewer
    /// than [`MIN_DISTINCT_BYTES`] has a probability below 2^-50), 2 for `000…0007`.
    pub fn distinct_bytes(&self) -> usize {
        let mut seen = [false; 256];
        for b in self.0.expose_secret() {
            seen[usize::from(*b)] = true;
        }
        seen.iter().filter(|s| **s).count()
    }

    /// Wraps raw key material (tests and tools).
    pub fn from_secret(key: SecretKey) -> MasterKey {
        MasterKey(key)
    }

    /// A fingerprint of the key, for receipts: 32 hex digits of the SHA-256 of its key check
    /// value (which the store keeps in the clear). Names the key; reveals nothing of it.
    pub fn fingerprint(&self) -> String {
        let digest = crypto::sha256(&[b"kluis master key fingerprint", &self.check_value()]);
        hex::encode(&digest[..16])
    }

    fn check_value(&self) -> [u8; 32] {
        let k = crypto::hkdf_sha256(SALT, &self.0, &[LABEL_KEY_CHECK]);
        crypto::hmac_sha256(&k, &[b"kluis key check value"])
    }

    fn wrapping_key(&self) -> SecretKey {
        crypto::hkdf_sha256(SALT, &self.0, &[LABEL_WRAP])
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(...)")
    }
}

/// Permission bits that group and others must not have on a secret file (a key, tokens): any
/// access at all.
pub const SECRET_FORBIDDEN_BITS: u32 = 0o077;
/// Permission bits that group and others must not have on a file that decides who may do what
/// (the configuration, policy and schema files): write.
pub const TRUSTED_FORBIDDEN_BITS: u32 = 0o022;

/// The permission bits of the file `path` names (symlinks followed) if they grant any of
/// `forbidden`; `None` if they grant none of them.
pub fn loose_mode(path: &Path, forbidden: u32) -> std::io::Result<Option<u32>> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
    Ok((mode & forbidden != 0).then_some(mode))
}

/// Why the file `path` names could have been put there by a user with no say over it, if it
/// could (`None` if not), as ssh's `StrictModes` checks: the file, and every directory on its
/// path (as given, and after symlinks), must be owned by this process's user or root, and no
/// such directory may be writable by group or others without the sticky bit. Mode bits on
/// the file alone do not stop a user who may write its directory from renaming their own
/// file over it, nor one who owns the file or a directory above it (reviews 13 and 14: a key
/// `nobody` left in `/tmp/evil/` became the master key). A directory on a read-only mount is
/// not counted as writable (a Kubernetes ConfigMap's mount is 0777 but read-only).
pub fn replaceable_by_others(path: &Path) -> std::io::Result<Option<String>> {
    use std::os::unix::fs::MetadataExt;
    let me = rustix::process::geteuid().as_raw();
    let trusted = |uid: u32| uid == me || uid == 0;
    let real = std::fs::canonicalize(path)?;
    // A symbolic link's own owner too: whoever made it chose where it points (review 15).
    let link_owner = std::fs::symlink_metadata(path)?.uid();
    let owner = match std::fs::metadata(&real)?.uid() {
        owner if trusted(owner) => link_owner,
        owner => owner,
    };
    if !trusted(owner) {
        return Ok(Some(format!(
            "owned by uid {owner}, neither this process's user (uid {me}) nor root; run `chown` on it"
        )));
    }
    let given = std::path::absolute(path)?;
    for file in [given, real] {
        for dir in file.ancestors().skip(1) {
            let meta = std::fs::metadata(dir)?;
            let mode = meta.mode() & 0o7777;
            if !trusted(meta.uid()) {
                return Ok(Some(format!(
                    "in directory {}, owned by uid {}, neither this process's user (uid {me}) nor root, who could replace the file; run `chown` on it",
                    dir.display(),
                    meta.uid()
                )));
            }
            let read_only = rustix::fs::statvfs(dir)
                .is_ok_and(|v| v.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY));
            if mode & 0o022 != 0 && mode & 0o1000 == 0 && !read_only {
                return Ok(Some(format!(
                    "in directory {}, writable by group or others (mode {mode:o}), who could replace the file; run `chmod go-w {}`",
                    dir.display(),
                    dir.display()
                )));
            }
        }
    }
    Ok(None)
}

/// Why a secret file at `path` with `mode` (see [`SECRET_FORBIDDEN_BITS`]) is refused and
/// what to do, to follow "<what> <path> is ".
pub fn secret_mode_reason(path: &Path, mode: u32) -> String {
    format!(
        "accessible by group or others (mode {mode:o}); run `chmod 600 {}`",
        path.display()
    )
}

/// Creates `dir` and its missing parents, each one's entry synced into its parent, so that a
/// power loss right after cannot lose a directory that files were then synced into.
pub fn create_dir_durable(dir: &Path) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut at = dir;
    while !at.as_os_str().is_empty() && !at.exists() {
        missing.push(at.to_path_buf());
        match at.parent() {
            Some(parent) => at = parent,
            None => break,
        }
    }
    // Never group- or world-writable, whatever the umask (review 13: under umask 000 a
    // created configuration directory let anyone swap its policy file).
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)?;
    }
    for created in missing.iter().rev() {
        let parent = match created.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// Creates `dir` with mode 0700 (no one but the owner may list or enter it) if it is missing,
/// and its missing parents as [`create_dir_durable`] does (0755 at most), each
/// one's entry synced into its parent. An existing directory is left as it is.
pub fn create_private_dir_durable(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    create_dir_durable(parent)?;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => std::fs::File::open(parent)?.sync_all(),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes a new secret file with mode 0600 (creating its directory), fsynced; refuses to
/// overwrite an existing file.
pub fn write_secret_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    // A bare file name has an empty parent: the current directory.
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    create_dir_durable(dir)?;
    // Written whole under a temporary name, then linked to its own (which fails if that name
    // exists: never overwritten): a crash leaves the file complete or absent, never cut short.
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("a secret file needs a file name"))?;
    let mut suffix = [0u8; 8];
    crate::crypto::random_fill(&mut suffix).map_err(|e| std::io::Error::other(e.to_string()))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        hex::encode(suffix)
    ));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::hard_link(&tmp, path)
    })();
    let _ = std::fs::remove_file(&tmp);
    written?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Keeps this process's memory, and the key material in it, out of core dumps and away from
/// debuggers: core files are turned off (`RLIMIT_CORE` 0) and the process is made not
/// dumpable (`PR_SET_DUMPABLE` 0: no core file, no `ptrace` attach or `/proc/<pid>/mem` for
/// other processes of the same user). Secrets Kluis holds zeroize on drop, but `ring`'s AES
/// key schedules (which begin with the key itself) do not, and freed heap may keep them until
/// reused: this is what keeps such remnants from leaving the process. Called by `kluis` at
/// start (every command: the tools hold the master key too).
pub fn keep_out_of_dumps() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{set_dumpable_behavior, setrlimit, DumpableBehavior};
        use rustix::process::{Resource, Rlimit};
        setrlimit(
            Resource::Core,
            Rlimit {
                current: Some(0),
                maximum: Some(0),
            },
        )?;
        set_dumpable_behavior(DumpableBehavior::NotDumpable)?;
    }
    Ok(())
}

/// A data key (DEK) as stored in a record: sealed under a KEK version.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedDek {
    /// The KEK version that wraps it.
    pub kek_version: u32,
    /// The envelope.
    pub sealed: Vec<u8>,
}

/// The state of a KEK version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KekState {
    /// Wraps new DEKs (the newest version of its category).
    Active,
    /// Only unwraps DEKs that still name it; rewrap moves them to the active version.
    DecryptOnly,
    /// Destroyed: removed from the store and zeroized in memory.
    Retired,
}

impl KekState {
    /// The state's name in the API (`active`, `decrypt_only`, `retired`).
    pub fn as_str(self) -> &'static str {
        match self {
            KekState::Active => "active",
            KekState::DecryptOnly => "decrypt_only",
            KekState::Retired => "retired",
        }
    }
}

/// Clear facts about a KEK version, kept in `meta/kek-info/<category>/<version>` (also after
/// the key itself is destroyed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct KekInfo {
    /// When the version was made, Unix milliseconds (0 if unknown).
    pub created_ms: i64,
    /// When it was destroyed, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_ms: Option<i64>,
}

/// One KEK version as [`KeyRing::versions`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionStatus {
    /// Category.
    pub category: Category,
    /// Version.
    pub version: u32,
    /// State.
    pub state: KekState,
    /// Facts kept about it.
    pub info: KekInfo,
}

/// The KEKs held in memory, their facts and the active version of each category.
#[derive(Default)]
struct KekTable {
    keys: BTreeMap<(Category, u32), std::sync::Arc<SecretKey>>,
    info: BTreeMap<(Category, u32), KekInfo>,
    active: BTreeMap<Category, u32>,
}

/// The unwrapped keys a running vault uses. KEK versions change at run time (rotation,
/// retirement); every change is committed to the store first and applied in memory after.
pub struct KeyRing {
    wrap: SecretKey,
    keks: parking_lot::RwLock<KekTable>,
    index_root: SecretKey,
    index_keys: parking_lot::RwLock<BTreeMap<String, std::sync::Arc<SecretKey>>>,
    /// Seals the free-text reasons a record header keeps (see [`KeyRing::notes_key`]).
    notes: SecretKey,
    integrity: SecretKey,
    /// The key check value of the master key this ring was opened with: every change of the
    /// ring expects it unchanged, so a process still holding a rotated-out master key cannot
    /// add a KEK that no other process can open.
    check: [u8; 32],
    /// Serialises this process's changes of the KEK table (rotate, retire, reload), so that a
    /// reload cannot put back a table read before a local change committed.
    ops: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("active_kek_versions", &self.keks.read().active)
            .finish_non_exhaustive()
    }
}

/// How an audit event names KEK `version` of `category` (`identity/v4`): the second entry
/// of the `field_names` of a `RotateKey` (the version it made) or `RetireKeyVersion` (the
/// version asked for) event, after the category.
pub fn version_name(category: Category, version: u32) -> String {
    format!("{}/v{version}", category.as_str())
}

/// Meta key of KEK `version` of `category` (wrapped by the master key).
pub fn kek_meta_key(category: Category, version: u32) -> Vec<u8> {
    format!("{META_KEK_PREFIX}{}/{version:010}", category.as_str()).into_bytes()
}

fn kek_info_key(category: Category, version: u32) -> Vec<u8> {
    format!("{META_KEK_INFO_PREFIX}{}/{version:010}", category.as_str()).into_bytes()
}

/// Meta key holding the active KEK version of `category` ([`active_kek_value`]). A write
/// that seals with a data key under version `v` expects it to hold `v`: it commits only while
/// `v` is active, in this process or any other, so it can neither give a version being
/// retired a record nor put a data key under an older version behind a rewrap's cursor.
pub fn active_kek_key(category: Category) -> Vec<u8> {
    format!("{META_ACTIVE_KEK_PREFIX}{}", category.as_str()).into_bytes()
}

/// The stored form of an active version in [`active_kek_key`].
pub fn active_kek_value(version: u32) -> Vec<u8> {
    version.to_be_bytes().to_vec()
}

fn kek_retiring_key(category: Category, version: u32) -> Vec<u8> {
    format!(
        "{META_KEK_RETIRING_PREFIX}{}/{version:010}",
        category.as_str()
    )
    .into_bytes()
}

fn kek_context(category: Category, version: u32) -> Vec<u8> {
    crypto::context(&[
        CTX_KEK,
        category.as_str().as_bytes(),
        &version.to_be_bytes(),
    ])
}

/// Parses `<prefix><category>/<version>`.
fn parse_kek_name(name: &str, prefix: &str) -> Option<(Category, u32)> {
    let mut parts = name.strip_prefix(prefix)?.split('/');
    let category = parts.next().and_then(Category::parse)?;
    let version = parts.next().and_then(|v| v.parse::<u32>().ok())?;
    parts.next().is_none().then_some((category, version))
}

fn unwrap_stored(
    wrap: &SecretKey,
    ctx: &[u8],
    sealed: &[u8],
    name: &str,
) -> Result<SecretKey, KeyError> {
    let bytes = crypto::open(wrap, ctx, sealed).map_err(|_| KeyError::Corrupt(name.into()))?;
    let arr: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| KeyError::Corrupt(name.into()))?;
    Ok(SecretKey::from_bytes(arr))
}

/// Why a key operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyOpError {
    /// The version does not exist.
    #[error("category {0} has no KEK version {1}")]
    NoSuchVersion(Category, u32),
    /// The version is the active one.
    #[error("KEK {0} version {1} is the active version: rotate first, then rewrap")]
    Active(Category, u32),
    /// The version was already retired.
    #[error("KEK {0} version {1} is already retired")]
    AlreadyRetired(Category, u32),
    /// Another instance changed the keys at the same moment.
    #[error("the key ring changed concurrently; retry")]
    Concurrent,
    /// Records still have data keys wrapped by the version.
    #[error(
        "KEK {0} version {1} still wraps the data keys of {2} record{s}; run Rewrap (category {0}) first",
        s = if *.2 == 1 { "" } else { "s" }
    )]
    InUse(Category, u32, u64),
    /// Counting the records on the version failed (nothing was changed).
    #[error("counting the records on the version failed: {0}")]
    Count(String),
    /// A key or the store failed.
    #[error(transparent)]
    Key(#[from] KeyError),
}

impl From<StoreError> for KeyOpError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => KeyOpError::Concurrent,
            e => KeyOpError::Key(KeyError::Store(e)),
        }
    }
}

impl KeyRing {
    /// Loads the key ring from the store, creating it on first start. Refuses a master key
    /// that does not match the store's key check value.
    pub async fn open<S: Store>(store: &S, master: &MasterKey) -> Result<KeyRing, KeyError> {
        let check = master.check_value();
        match store.get(Keyspace::Meta, META_KEY_CHECK).await? {
            Some(stored) if crypto::ct_eq(&stored, &check) => {}
            Some(_) => return Err(KeyError::WrongMasterKey),
            None => {
                // A key someone chose rather than drew (review 20: a new store was made under
                // `000…0007`); `kluis keys rotate-master --new-key` refuses the same.
                let distinct = master.distinct_bytes();
                if distinct < MIN_DISTINCT_BYTES {
                    return Err(KeyError::BadMasterKey(format!(
                        "has only {distinct} distinct byte values (a random 32-byte key has about 30): not a randomly made key, so no new store is made under it; make one with `kluis init` or `head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'`"
                    )));
                }
                Self::create(store, master, check).await?
            }
        }
        let ring = Self::load(store, master).await?;
        ring.keep_active_markers(store).await?;
        Ok(ring)
    }

    /// Makes each category's [`active_kek_key`] hold its active version: writes the markers a
    /// store made before they were kept lacks (and mends one that disagrees with the KEKs, the
    /// source of truth), re-reading the ring if another instance changed it meanwhile.
    async fn keep_active_markers<S: Store>(&self, store: &S) -> Result<(), KeyError> {
        let _ops = self.ops.lock().await;
        for _ in 0..3 {
            let mut batch = Batch::default();
            for (category, version) in self.active_versions() {
                let key = active_kek_key(category);
                let want = active_kek_value(version);
                match store.get(Keyspace::Meta, &key).await? {
                    Some(v) if v == want => {}
                    found => {
                        if found.is_some() {
                            tracing::warn!(category = %category, version, "the stored active KEK version disagreed with the KEKs; mended");
                        }
                        batch.expect(
                            Keyspace::Meta,
                            key.clone(),
                            found.map_or(Expect::Absent, Expect::Value),
                        );
                        // The version must still be the newest when the marker lands.
                        batch.expect(
                            Keyspace::Meta,
                            kek_info_key(category, version.saturating_add(1)),
                            Expect::Absent,
                        );
                        batch.put(Keyspace::Meta, key, want);
                    }
                }
            }
            if batch.ops.is_empty() {
                return Ok(());
            }
            match store.commit(batch).await {
                Ok(()) => return Ok(()),
                Err(StoreError::Conflict) => self.reload_locked(store).await?,
                Err(e) => return Err(e.into()),
            }
        }
        Err(KeyError::Corrupt(
            "active-kek/ (changed concurrently three times)".into(),
        ))
    }

    async fn create<S: Store>(
        store: &S,
        master: &MasterKey,
        check: [u8; 32],
    ) -> Result<(), KeyError> {
        let wrap = master.wrapping_key();
        let now = chrono::Utc::now().timestamp_millis();
        let mut batch = Batch::default();
        batch.expect(Keyspace::Meta, META_KEY_CHECK.to_vec(), Expect::Absent);
        batch.put(Keyspace::Meta, META_KEY_CHECK.to_vec(), check.to_vec());
        for category in Category::ALL {
            let kek = SecretKey::generate()?;
            let sealed = crypto::seal(&wrap, 1, &kek_context(category, 1), kek.expose_secret())?;
            batch.put(Keyspace::Meta, kek_meta_key(category, 1), sealed);
            batch.put(
                Keyspace::Meta,
                active_kek_key(category),
                active_kek_value(1),
            );
            batch.put(
                Keyspace::Meta,
                kek_info_key(category, 1),
                info_bytes(&KekInfo {
                    created_ms: now,
                    retired_ms: None,
                }),
            );
        }
        let root = SecretKey::generate()?;
        let sealed = crypto::seal(
            &wrap,
            1,
            &crypto::context(&[CTX_INDEX_ROOT]),
            root.expose_secret(),
        )?;
        batch.put(Keyspace::Meta, META_INDEX_ROOT.to_vec(), sealed);
        let integrity = SecretKey::generate()?;
        let sealed = crypto::seal(
            &wrap,
            1,
            &crypto::context(&[CTX_INTEGRITY]),
            integrity.expose_secret(),
        )?;
        batch.put(Keyspace::Meta, META_INTEGRITY.to_vec(), sealed);
        match store.commit(batch).await {
            // Another instance initialised the store first: use its keys.
            Ok(()) | Err(StoreError::Conflict) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn load<S: Store>(store: &S, master: &MasterKey) -> Result<KeyRing, KeyError> {
        let wrap = master.wrapping_key();
        let table = Self::load_table(store, &wrap).await?;
        let get = |key: &'static [u8]| async move {
            store
                .get(Keyspace::Meta, key)
                .await?
                .ok_or_else(|| KeyError::Corrupt(String::from_utf8_lossy(key).into()))
        };
        let index_root = unwrap_stored(
            &wrap,
            &crypto::context(&[CTX_INDEX_ROOT]),
            &get(META_INDEX_ROOT).await?,
            "index-root/1",
        )?;
        let integrity = unwrap_stored(
            &wrap,
            &crypto::context(&[CTX_INTEGRITY]),
            &get(META_INTEGRITY).await?,
            "integrity/1",
        )?;
        let notes = crypto::hkdf_sha256(SALT, &index_root, &[LABEL_NOTES]);
        Ok(KeyRing {
            wrap,
            keks: parking_lot::RwLock::new(table),
            index_root,
            index_keys: parking_lot::RwLock::new(BTreeMap::new()),
            notes,
            integrity,
            check: master.check_value(),
            ops: tokio::sync::Mutex::new(()),
        })
    }

    /// Reads the KEKs (`kek/`: usable; `kek-retiring/`: decrypt-only) and their facts
    /// (`kek-info/`) in one scan, so that a key moving between them is seen in one place.
    async fn load_table<S: Store>(store: &S, wrap: &SecretKey) -> Result<KekTable, KeyError> {
        let mut table = KekTable::default();
        let entries = store
            .scan(Keyspace::Meta, META_KEK_ANY_PREFIX, None, usize::MAX)
            .await?;
        for (key, value) in entries {
            let name = String::from_utf8_lossy(&key).to_string();
            let parse = |prefix: &str| {
                parse_kek_name(&name, prefix).ok_or_else(|| KeyError::Corrupt(name.clone()))
            };
            if name.starts_with(META_KEK_INFO_PREFIX) {
                let id = parse(META_KEK_INFO_PREFIX)?;
                let info: KekInfo =
                    serde_json::from_slice(&value).map_err(|_| KeyError::Corrupt(name.clone()))?;
                table.info.insert(id, info);
            } else if name.starts_with(META_KEK_RETIRING_PREFIX) {
                let (category, version) = parse(META_KEK_RETIRING_PREFIX)?;
                let kek = unwrap_stored(wrap, &kek_context(category, version), &value, &name)?;
                table
                    .keys
                    .insert((category, version), std::sync::Arc::new(kek));
            } else if name.starts_with(META_KEK_PREFIX) {
                let (category, version) = parse(META_KEK_PREFIX)?;
                let kek = unwrap_stored(wrap, &kek_context(category, version), &value, &name)?;
                table
                    .keys
                    .insert((category, version), std::sync::Arc::new(kek));
                let a = table.active.entry(category).or_insert(version);
                *a = (*a).max(version);
            }
        }
        for category in Category::ALL {
            let Some(&active) = table.active.get(&category) else {
                return Err(KeyError::MissingKek(category, 1));
            };
            // The newest version never retired must be the active one: if its key were gone
            // (deleted from the store), an older version would silently wrap new data keys.
            if let Some(newest) = table
                .info
                .iter()
                .filter(|((c, _), info)| *c == category && info.retired_ms.is_none())
                .map(|((_, v), _)| *v)
                .max()
            {
                if newest > active {
                    return Err(KeyError::MissingKek(category, newest));
                }
            }
        }
        // Versions made before facts were kept: known to exist, time unknown.
        for id in table.keys.keys() {
            table.info.entry(*id).or_default();
        }
        Ok(table)
    }

    /// Re-reads the KEK versions from the store (after another instance or an offline tool
    /// changed them).
    pub async fn reload<S: Store>(&self, store: &S) -> Result<(), KeyError> {
        let _ops = self.ops.lock().await;
        self.reload_locked(store).await
    }

    async fn reload_locked<S: Store>(&self, store: &S) -> Result<(), KeyError> {
        let table = Self::load_table(store, &self.wrap).await?;
        *self.keks.write() = table;
        Ok(())
    }

    fn dek_context(record_id: &[u8], category: Category, kek_version: u32) -> Vec<u8> {
        crypto::context(&[
            CTX_DEK,
            record_id,
            category.as_str().as_bytes(),
            &kek_version.to_be_bytes(),
        ])
    }

    /// Wraps a DEK for `category` of `record_id` under the category's active KEK.
    pub fn wrap_dek(
        &self,
        record_id: &[u8],
        category: Category,
        dek: &SecretKey,
    ) -> Result<WrappedDek, KeyError> {
        let (version, kek) = {
            let table = self.keks.read();
            let version = *table
                .active
                .get(&category)
                .ok_or(KeyError::MissingKek(category, 0))?;
            let kek = table
                .keys
                .get(&(category, version))
                .cloned()
                .ok_or(KeyError::MissingKek(category, version))?;
            (version, kek)
        };
        let ctx = Self::dek_context(record_id, category, version);
        Ok(WrappedDek {
            kek_version: version,
            sealed: crypto::seal(&kek, version, &ctx, dek.expose_secret())?,
        })
    }

    /// Unwraps the DEK of `category` of `record_id`, sealed under KEK version `kek_version`.
    pub fn unwrap_dek(
        &self,
        record_id: &[u8],
        category: Category,
        kek_version: u32,
        sealed: &[u8],
    ) -> Result<SecretKey, KeyError> {
        let kek = self
            .keks
            .read()
            .keys
            .get(&(category, kek_version))
            .cloned()
            .ok_or(KeyError::MissingKek(category, kek_version))?;
        let ctx = Self::dek_context(record_id, category, kek_version);
        let bytes = crypto::open(&kek, &ctx, sealed).map_err(|_| KeyError::Dek(category))?;
        let arr: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::Dek(category))?;
        Ok(SecretKey::from_bytes(arr))
    }

    /// A page token for `position` in the listing `list` (`records`, `events`): the position
    /// and a tag (HMAC under HKDF(index root, "kluis/v1/page-token"), over the listing's name
    /// and the position, 16 bytes), base64url. Every instance over the same store makes and
    /// accepts the same tokens.
    pub fn page_token(&self, list: &str, position: &[u8]) -> String {
        use base64::Engine;
        let mut token = position.to_vec();
        token.extend_from_slice(&self.page_tag(list, position));
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token)
    }

    /// The position in a token [`KeyRing::page_token`] made for `list`; `None` for anything
    /// else (a forged or altered token, another vault's, another listing's).
    pub fn page_position(&self, list: &str, token: &str) -> Option<Vec<u8>> {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .ok()?;
        let split = bytes.len().checked_sub(PAGE_TAG_LEN)?;
        let (position, tag) = bytes.split_at(split);
        crypto::ct_eq(&self.page_tag(list, position), tag).then(|| position.to_vec())
    }

    fn page_tag(&self, list: &str, position: &[u8]) -> [u8; PAGE_TAG_LEN] {
        let key = crypto::hkdf_sha256(SALT, &self.index_root, &[LABEL_PAGE_TOKEN]);
        let mac = crypto::hmac_sha256(&key, &[list.as_bytes(), b"/", position]);
        let mut tag = [0u8; PAGE_TAG_LEN];
        tag.copy_from_slice(&mac[..PAGE_TAG_LEN]);
        tag
    }

    /// The blind-index HMAC key of `field`: HKDF(index root, field name).
    pub fn index_key(&self, field: &str) -> std::sync::Arc<SecretKey> {
        if let Some(k) = self.index_keys.read().get(field) {
            return std::sync::Arc::clone(k);
        }
        let key = std::sync::Arc::new(crypto::hkdf_sha256(
            SALT,
            &self.index_root,
            &[LABEL_INDEX_FIELD, b"/", field.as_bytes()],
        ));
        self.index_keys
            .write()
            .insert(field.to_string(), std::sync::Arc::clone(&key));
        key
    }

    /// The key that seals the privacy officer's free-text reasons kept in record headers
    /// (why a record is restricted or held): HKDF(index root, "kluis/v1/record-notes"). It
    /// is not per record, so unlike field values a reason is not crypto-shredded by retiring
    /// a KEK; it is gone from the live store when the header is.
    pub fn notes_key(&self) -> &SecretKey {
        &self.notes
    }

    /// The record-integrity key and its version.
    pub fn integrity_key(&self) -> (u32, &SecretKey) {
        (1, &self.integrity)
    }

    /// This store's identity: HMAC(integrity key, "kluis/v1/store-id"), 16 bytes. The
    /// integrity key is random per store and kept wrapped by the master key, so the id
    /// cannot be changed, or taken from another store, with access to the store alone; it
    /// survives master key rotation. The audit anchor file is named by it.
    pub fn store_id(&self) -> [u8; 16] {
        let mac = crypto::hmac_sha256(&self.integrity, &[LABEL_STORE_ID]);
        let mut id = [0u8; 16];
        id.copy_from_slice(&mac[..16]);
        id
    }

    /// The active KEK version of each category.
    pub fn active_versions(&self) -> BTreeMap<Category, u32> {
        self.keks.read().active.clone()
    }

    /// Whether the ring holds KEK `version` of `category` (not retired, not unknown).
    pub fn holds(&self, category: Category, version: u32) -> bool {
        self.keks.read().keys.contains_key(&(category, version))
    }

    /// The active KEK version of `category`.
    pub fn active_version(&self, category: Category) -> Option<u32> {
        self.keks.read().active.get(&category).copied()
    }

    /// Every KEK version the store knows, retired ones included, by category and version.
    pub fn versions(&self) -> Vec<VersionStatus> {
        let table = self.keks.read();
        table
            .info
            .iter()
            .map(|(&(category, version), info)| VersionStatus {
                category,
                version,
                info: *info,
                state: if !table.keys.contains_key(&(category, version)) {
                    KekState::Retired
                } else if table.active.get(&category) == Some(&version) {
                    KekState::Active
                } else {
                    KekState::DecryptOnly
                },
            })
            .collect()
    }

    /// Makes a new KEK version active for each of `categories`, in one atomic batch together
    /// with `events` (audit event bodies). Older versions become decrypt-only. Returns the new
    /// versions.
    pub async fn rotate<S: Store>(
        &self,
        store: &S,
        categories: &[Category],
        events: Vec<Vec<u8>>,
    ) -> Result<Vec<(Category, u32)>, KeyOpError> {
        self.rotate_audited(store, categories, |_| events).await
    }

    /// [`KeyRing::rotate`] whose audit event bodies `events` makes from the versions the
    /// batch makes (category, version, in the order of `categories`), so that the events
    /// committed with the rotation name exactly the versions it created (a version is chosen
    /// only once the ring's lock is held, and a retry after a conflict makes another).
    pub async fn rotate_audited<S, F>(
        &self,
        store: &S,
        categories: &[Category],
        events: F,
    ) -> Result<Vec<(Category, u32)>, KeyOpError>
    where
        S: Store,
        F: FnOnce(&[(Category, u32)]) -> Vec<Vec<u8>> + Send,
    {
        let _ops = self.ops.lock().await;
        let now = chrono::Utc::now().timestamp_millis();
        let mut batch = Batch::default();
        let mut made = Vec::new();
        {
            let table = self.keks.read();
            for &category in categories {
                // Retired versions count too: a version number is never reused.
                let newest = table
                    .info
                    .keys()
                    .filter(|(c, _)| *c == category)
                    .map(|(_, v)| *v)
                    .chain(table.active.get(&category).copied())
                    .max()
                    .unwrap_or(0);
                let version = newest + 1;
                let kek = SecretKey::generate().map_err(KeyError::from)?;
                let sealed = crypto::seal(
                    &self.wrap,
                    1,
                    &kek_context(category, version),
                    kek.expose_secret(),
                )
                .map_err(KeyError::from)?;
                batch.expect(
                    Keyspace::Meta,
                    kek_meta_key(category, version),
                    Expect::Absent,
                );
                batch.expect(
                    Keyspace::Meta,
                    kek_info_key(category, version),
                    Expect::Absent,
                );
                batch.put(Keyspace::Meta, kek_meta_key(category, version), sealed);
                // Writes sealing under the version active until now conflict from here on.
                if let Some(&current) = table.active.get(&category) {
                    batch.expect(
                        Keyspace::Meta,
                        active_kek_key(category),
                        Expect::Value(active_kek_value(current)),
                    );
                }
                batch.put(
                    Keyspace::Meta,
                    active_kek_key(category),
                    active_kek_value(version),
                );
                let info = KekInfo {
                    created_ms: now,
                    retired_ms: None,
                };
                batch.put(
                    Keyspace::Meta,
                    kek_info_key(category, version),
                    info_bytes(&info),
                );
                made.push((category, version, kek, info));
            }
        }
        self.expect_master(&mut batch);
        let versions: Vec<(Category, u32)> = made.iter().map(|(c, v, _, _)| (*c, *v)).collect();
        for event in events(&versions) {
            batch.append_event(event);
        }
        match store.commit(batch).await {
            Ok(()) => {}
            Err(StoreError::Conflict) => {
                // Another instance made the version first: take up the store's ring, so that
                // a retry makes the next version.
                self.reload_locked(store).await?;
                return Err(KeyOpError::Concurrent);
            }
            Err(e) => return Err(e.into()),
        }
        let mut table = self.keks.write();
        let mut out = Vec::with_capacity(made.len());
        for (category, version, kek, info) in made {
            table
                .keys
                .insert((category, version), std::sync::Arc::new(kek));
            table.info.insert((category, version), info);
            let a = table.active.entry(category).or_insert(version);
            *a = (*a).max(version);
            out.push((category, version));
        }
        Ok(out)
    }

    /// Whether KEK `version` of `category` may be retired as far as its state goes (it exists,
    /// is not retired yet and is not the active version); returns its facts.
    pub fn retirable(&self, category: Category, version: u32) -> Result<KekInfo, KeyOpError> {
        let table = self.keks.read();
        let Some(info) = table.info.get(&(category, version)).copied() else {
            return Err(KeyOpError::NoSuchVersion(category, version));
        };
        if !table.keys.contains_key(&(category, version)) {
            return Err(KeyOpError::AlreadyRetired(category, version));
        }
        if table.active.get(&category) == Some(&version) {
            return Err(KeyOpError::Active(category, version));
        }
        Ok(info)
    }

    /// Destroys KEK `version` of `category` if no record needs it any more, in three steps:
    ///
    /// 1. **Fence**: the key moves from `kek/` to `kek-retiring/` in one batch. A record
    ///    write expects the version it seals under to be the active one
    ///    ([`active_kek_key`], see `vault::expect_keks`), which this version is not, and a
    ///    key job's batch expects the `kek/` entry of every version it wraps under; so from
    ///    here on no write, in this process or another sharing the store, can give the
    ///    version a record. Reads still open it.
    /// 2. **Count**: `count` returns how many records still have a data key under it.
    /// 3. **Destroy** (count zero): the key is deleted in one batch with `events` and zeroized
    ///    in memory. Otherwise the fence is undone and [`KeyOpError::InUse`] returned.
    ///
    /// A crash between the steps leaves the key in `kek-retiring/`: decrypt-only, and retired
    /// by the next call. Refuses the active version.
    pub async fn retire<S, F, Fut>(
        &self,
        store: &S,
        category: Category,
        version: u32,
        count: F,
        events: Vec<Vec<u8>>,
    ) -> Result<(), KeyOpError>
    where
        S: Store,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<u64, String>>,
    {
        let _ops = self.ops.lock().await;
        let info = self.retirable(category, version)?;
        let usable = kek_meta_key(category, version);
        let retiring = kek_retiring_key(category, version);
        match store.get(Keyspace::Meta, &usable).await? {
            Some(sealed) => {
                let mut fence = Batch::default();
                fence.expect(
                    Keyspace::Meta,
                    usable.clone(),
                    Expect::Value(sealed.clone()),
                );
                fence.expect(Keyspace::Meta, retiring.clone(), Expect::Absent);
                fence.delete(Keyspace::Meta, usable.clone());
                fence.put(Keyspace::Meta, retiring.clone(), sealed);
                self.expect_master(&mut fence);
                store.commit(fence).await?;
            }
            // Fenced by an earlier call that was cut short: go on from there.
            None if store.get(Keyspace::Meta, &retiring).await?.is_some() => {}
            // Retired meanwhile (by another instance).
            None => {
                self.reload_locked(store).await?;
                return Err(KeyOpError::AlreadyRetired(category, version));
            }
        }
        let left = match count().await {
            Ok(left) => left,
            Err(e) => {
                self.unfence(store, category, version).await;
                return Err(KeyOpError::Count(e));
            }
        };
        if left > 0 {
            self.unfence(store, category, version).await;
            return Err(KeyOpError::InUse(category, version, left));
        }
        let retired = KekInfo {
            retired_ms: Some(chrono::Utc::now().timestamp_millis()),
            ..info
        };
        let mut batch = Batch::default();
        batch.expect(Keyspace::Meta, retiring.clone(), Expect::Present);
        self.expect_master(&mut batch);
        batch.delete(Keyspace::Meta, retiring);
        batch.put(
            Keyspace::Meta,
            kek_info_key(category, version),
            info_bytes(&retired),
        );
        for event in events {
            batch.append_event(event);
        }
        store.commit(batch).await?;
        let mut table = self.keks.write();
        // Dropping the last reference zeroizes the key (`SecretKey` zeroizes on drop).
        table.keys.remove(&(category, version));
        table.info.insert((category, version), retired);
        Ok(())
    }

    /// Makes `batch` expect the store's key check value to be this ring's master key's.
    fn expect_master(&self, batch: &mut Batch) {
        batch.expect(
            Keyspace::Meta,
            META_KEY_CHECK.to_vec(),
            Expect::Value(self.check.to_vec()),
        );
    }

    /// Undoes a fence (the version is still needed): the key goes back to `kek/`. If that
    /// fails, the key stays decrypt-only in `kek-retiring/`, which no write needs (writes
    /// wrap under the active version), and the next retire goes on from there.
    async fn unfence<S: Store>(&self, store: &S, category: Category, version: u32) {
        let usable = kek_meta_key(category, version);
        let retiring = kek_retiring_key(category, version);
        let result = async {
            let Some(sealed) = store.get(Keyspace::Meta, &retiring).await? else {
                return Ok(());
            };
            let mut batch = Batch::default();
            batch.expect(
                Keyspace::Meta,
                retiring.clone(),
                Expect::Value(sealed.clone()),
            );
            batch.expect(Keyspace::Meta, usable.clone(), Expect::Absent);
            batch.delete(Keyspace::Meta, retiring);
            batch.put(Keyspace::Meta, usable, sealed);
            store.commit(batch).await
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(
                category = category.as_str(),
                version,
                error = %e,
                "a KEK left fenced (decrypt-only) after a refused retire; the next retire goes on from there"
            );
        }
    }
}

fn info_bytes(info: &KekInfo) -> Vec<u8> {
    serde_json::to_vec(info).expect("KekInfo serializes (plain integers)")
}

/// Re-wraps every key the master key protects (the key check value, every KEK, the
/// blind-index root and the integrity key) under `new`, in one atomic, durable batch with
/// `events`. Each stored key is expected unchanged, so a concurrent change makes it fail
/// whole. A crash leaves the store wholly under `old` or wholly under `new`. Returns the
/// number of keys re-wrapped.
pub async fn rotate_master<S: Store>(
    store: &S,
    old: &MasterKey,
    new: &MasterKey,
    events: Vec<Vec<u8>>,
) -> Result<usize, KeyError> {
    match store.get(Keyspace::Meta, META_KEY_CHECK).await? {
        Some(stored) if crypto::ct_eq(&stored, &old.check_value()) => {}
        _ => return Err(KeyError::WrongMasterKey),
    }
    let old_wrap = old.wrapping_key();
    let new_wrap = new.wrapping_key();
    let mut batch = Batch::default();
    let mut count = 0;
    let mut rewrap = |batch: &mut Batch, key: Vec<u8>, sealed: Vec<u8>, ctx: Vec<u8>| {
        let name = String::from_utf8_lossy(&key).to_string();
        let secret = unwrap_stored(&old_wrap, &ctx, &sealed, &name)?;
        let resealed = crypto::seal(&new_wrap, 1, &ctx, secret.expose_secret())?;
        batch.expect(Keyspace::Meta, key.clone(), Expect::Value(sealed));
        batch.put(Keyspace::Meta, key, resealed);
        count += 1;
        Ok::<(), KeyError>(())
    };
    for prefix in [META_KEK_PREFIX, META_KEK_RETIRING_PREFIX] {
        for (key, sealed) in store
            .scan(Keyspace::Meta, prefix.as_bytes(), None, usize::MAX)
            .await?
        {
            let name = String::from_utf8_lossy(&key).to_string();
            let (category, version) =
                parse_kek_name(&name, prefix).ok_or_else(|| KeyError::Corrupt(name.clone()))?;
            rewrap(&mut batch, key, sealed, kek_context(category, version))?;
        }
    }
    for (key, ctx) in [
        (META_INDEX_ROOT, crypto::context(&[CTX_INDEX_ROOT])),
        (META_INTEGRITY, crypto::context(&[CTX_INTEGRITY])),
    ] {
        let sealed = store
            .get(Keyspace::Meta, key)
            .await?
            .ok_or_else(|| KeyError::Corrupt(String::from_utf8_lossy(key).into()))?;
        rewrap(&mut batch, key.to_vec(), sealed, ctx)?;
    }
    batch.expect(
        Keyspace::Meta,
        META_KEY_CHECK.to_vec(),
        Expect::Value(old.check_value().to_vec()),
    );
    batch.put(
        Keyspace::Meta,
        META_KEY_CHECK.to_vec(),
        new.check_value().to_vec(),
    );
    for event in events {
        batch.append_event(event);
    }
    store.commit(batch).await?;
    Ok(count)
}

/// Which of two master keys opens the store: `Some(true)` for `a`, `Some(false)` for `b`,
/// `None` for neither.
pub async fn which_master_key<S: Store>(
    store: &S,
    a: &MasterKey,
    b: &MasterKey,
) -> Result<Option<bool>, KeyError> {
    let Some(stored) = store.get(Keyspace::Meta, META_KEY_CHECK).await? else {
        return Ok(None);
    };
    Ok(if crypto::ct_eq(&stored, &a.check_value()) {
        Some(true)
    } else if crypto::ct_eq(&stored, &b.check_value()) {
        Some(false)
    } else {
        None
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_others_could_replace_is_named() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("etc");
        std::fs::create_dir(&dir).expect("mkdir");
        let file = dir.join("policy.toml");
        std::fs::write(&file, b"x").expect("write");
        assert_eq!(replaceable_by_others(&file).expect("check"), None);
        for (mode, replaceable) in [
            (0o777, true),
            (0o775, true),
            (0o1777, false),
            (0o755, false),
        ] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let why = replaceable_by_others(&file).expect("check");
            assert_eq!(why.is_some(), replaceable, "{mode:o}: {why:?}");
            if let Some(why) = why {
                assert!(
                    why.contains(&dir.display().to_string()) && why.contains("chmod go-w"),
                    "{why}"
                );
            }
        }
        // A link into such a directory is judged where it leads, too.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let safe = root.path().join("safe");
        std::fs::create_dir(&safe).expect("mkdir");
        let link = safe.join("policy.toml");
        std::os::unix::fs::symlink(&file, &link).expect("symlink");
        assert!(replaceable_by_others(&link).expect("check").is_some());
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        // Another user's file (only root can make one here): refused.
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(&file, Some(65534), None).expect("chown");
            let why = replaceable_by_others(&file)
                .expect("check")
                .expect("another user's");
            assert!(why.contains("uid 65534"), "{why}");
            // Nor when that user owns the directory too (review 14: `/tmp/evil/key`).
            std::os::unix::fs::chown(&dir, Some(65534), None).expect("chown");
            assert!(replaceable_by_others(&file).expect("check").is_some());
            // Root's file in another user's directory: that user could replace it.
            std::os::unix::fs::chown(&file, Some(0), None).expect("chown");
            let why = replaceable_by_others(&file)
                .expect("check")
                .expect("their directory");
            assert!(
                why.contains("in directory") && why.contains("uid 65534"),
                "{why}"
            );
            // Another user's link to root's file, in root's directory (review 15).
            let own = root.path().join("own");
            std::fs::create_dir(&own).expect("mkdir");
            let target = own.join("real.toml");
            std::fs::write(&target, b"x").expect("write");
            let link = own.join("policy.toml");
            std::os::unix::fs::symlink(&target, &link).expect("symlink");
            assert_eq!(replaceable_by_others(&link).expect("check"), None);
            std::os::unix::fs::lchown(&link, Some(65534), None).expect("lchown");
            let why = replaceable_by_others(&link)
                .expect("check")
                .expect("their link");
            assert!(why.contains("uid 65534"), "{why}");
        }
    }

    #[test]
    fn a_chosen_master_key_shows_few_distinct_bytes() {
        let chosen =
            MasterKey::from_secret(SecretKey::from_hex(&format!("{:064}", 7)).expect("hex"));
        assert_eq!(chosen.distinct_bytes(), 2);
        let drawn = MasterKey::from_secret(SecretKey::generate().expect("rng"));
        assert!(drawn.distinct_bytes() >= 16);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_process_is_kept_out_of_core_dumps() {
        keep_out_of_dumps().expect("prctl and setrlimit");
        let core = rustix::process::getrlimit(rustix::process::Resource::Core);
        assert_eq!((core.current, core.maximum), (Some(0), Some(0)));
        assert_eq!(
            rustix::process::dumpable_behavior().expect("prctl"),
            rustix::process::DumpableBehavior::NotDumpable
        );
        // Idempotent.
        keep_out_of_dumps().expect("again");
    }

    #[test]
    fn a_secret_file_is_written_whole_once_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub").join("secret.key");
        write_secret_file(&path, b"first").expect("written");
        assert_eq!(std::fs::read(&path).expect("read"), b"first");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = write_secret_file(&path, b"second").expect_err("exists");
        assert_eq!(again.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(
            std::fs::read(&path).expect("read"),
            b"first",
            "left as it was"
        );
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(path.parent().expect("dir"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("secret.key")]);
    }
    use crate::store::SledStore;

    /// Review 20: the master key file gets the checks every trusted file gets, and no new
    /// store is made under a chosen key (an existing one still opens, to be rotated away).
    #[tokio::test]
    async fn a_planted_or_chosen_master_key_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("keys");
        std::fs::create_dir(&dir).expect("mkdir");
        let path = dir.join("master.key");
        MasterKey::create_file(&path).expect("create");
        assert!(MasterKey::load_server_file(&path).is_ok());
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let Err(err) = MasterKey::load_server_file(&path) else {
            panic!("accepted")
        };
        assert!(
            err.to_string().contains("writable by group or others")
                && err.to_string().contains("someone else could have chosen"),
            "{err}"
        );
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(&path, Some(65534), None).expect("chown");
            let Err(err) = MasterKey::load_server_file(&path) else {
                panic!("accepted")
            };
            assert!(err.to_string().contains("uid 65534"), "{err}");
        }

        let chosen =
            MasterKey::from_secret(SecretKey::from_hex(&format!("{:064}", 7)).expect("hex"));
        let data = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(data.path()).expect("open");
        let Err(err) = KeyRing::open(&store, &chosen).await else {
            panic!("accepted")
        };
        assert!(
            err.to_string().contains("only 2 distinct byte values"),
            "{err}"
        );
        assert!(
            store
                .get(Keyspace::Meta, META_KEY_CHECK)
                .await
                .expect("get")
                .is_none(),
            "no store made"
        );
        // A store made under such a key before this check still opens (to be rotated away).
        let check = chosen.check_value();
        KeyRing::create(&store, &chosen, check).await.expect("made");
        assert!(KeyRing::open(&store, &chosen).await.is_ok());
    }

    #[tokio::test]
    async fn wrong_master_key_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let m1 = MasterKey::from_secret(SecretKey::generate().expect("rng"));
        let m2 = MasterKey::from_secret(SecretKey::generate().expect("rng"));
        let ring = KeyRing::open(&store, &m1)
            .await
            .expect("first open creates");
        let dek = SecretKey::generate().expect("rng");
        let wrapped = ring
            .wrap_dek(b"rec", Category::Identity, &dek)
            .expect("wrap");
        let again = KeyRing::open(&store, &m1).await.expect("same key reopens");
        let back = again
            .unwrap_dek(
                b"rec",
                Category::Identity,
                wrapped.kek_version,
                &wrapped.sealed,
            )
            .expect("unwrap");
        assert_eq!(back.expose_secret(), dek.expose_secret());
        assert!(again
            .unwrap_dek(
                b"other",
                Category::Identity,
                wrapped.kek_version,
                &wrapped.sealed
            )
            .is_err());
        assert!(again
            .unwrap_dek(
                b"rec",
                Category::Financial,
                wrapped.kek_version,
                &wrapped.sealed
            )
            .is_err());
        assert!(matches!(
            KeyRing::open(&store, &m2).await,
            Err(KeyError::WrongMasterKey)
        ));
    }

    #[tokio::test]
    async fn the_store_names_each_categorys_active_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let master = MasterKey::from_secret(SecretKey::generate().expect("rng"));
        let marker = |c: Category| {
            let store = store.clone();
            async move {
                store
                    .get(Keyspace::Meta, &active_kek_key(c))
                    .await
                    .expect("get")
            }
        };
        let ring = KeyRing::open(&store, &master).await.expect("create");
        assert_eq!(marker(Category::Identity).await, Some(active_kek_value(1)));
        ring.rotate(&store, &[Category::Identity], vec![])
            .await
            .expect("rotate");
        assert_eq!(marker(Category::Identity).await, Some(active_kek_value(2)));
        assert_eq!(marker(Category::Contact).await, Some(active_kek_value(1)));
        // A store from before the markers (or with one that disagrees) gets them on opening.
        let mut batch = Batch::default();
        batch.delete(Keyspace::Meta, active_kek_key(Category::Identity));
        batch.put(
            Keyspace::Meta,
            active_kek_key(Category::Contact),
            active_kek_value(7),
        );
        store.commit(batch).await.expect("strip");
        KeyRing::open(&store, &master).await.expect("reopen");
        assert_eq!(marker(Category::Identity).await, Some(active_kek_value(2)));
        assert_eq!(marker(Category::Contact).await, Some(active_kek_value(1)));
    }

    #[tokio::test]
    async fn rotate_retire_and_rotate_the_master_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let m1 = MasterKey::from_secret(SecretKey::generate().expect("rng"));
        let m2 = MasterKey::from_secret(SecretKey::generate().expect("rng"));
        let ring = KeyRing::open(&store, &m1).await.expect("create");
        let none = || async { Ok::<u64, String>(0) };
        let dek = SecretKey::generate().expect("rng");
        let old = ring.wrap_dek(b"r", Category::Identity, &dek).expect("wrap");
        assert_eq!(old.kek_version, 1);

        let made = ring
            .rotate(&store, &[Category::Identity], vec![])
            .await
            .expect("rotate");
        assert_eq!(made, vec![(Category::Identity, 2)]);
        let new = ring.wrap_dek(b"r", Category::Identity, &dek).expect("wrap");
        assert_eq!(new.kek_version, 2);
        assert_eq!(ring.active_version(Category::Contact), Some(1));
        let state = |ring: &KeyRing, v: u32| {
            ring.versions()
                .into_iter()
                .find(|s| s.category == Category::Identity && s.version == v)
                .map(|s| s.state)
        };
        assert_eq!(state(&ring, 1), Some(KekState::DecryptOnly));
        assert_eq!(state(&ring, 2), Some(KekState::Active));
        // Decrypt-only still opens.
        ring.unwrap_dek(b"r", Category::Identity, 1, &old.sealed)
            .expect("v1 opens");

        assert!(matches!(
            ring.retire(&store, Category::Identity, 2, none, vec![])
                .await,
            Err(KeyOpError::Active(Category::Identity, 2))
        ));
        assert!(matches!(
            ring.retire(&store, Category::Identity, 9, none, vec![])
                .await,
            Err(KeyOpError::NoSuchVersion(Category::Identity, 9))
        ));
        // Still in use: refused, and the fence is undone (writes under v1 work again).
        assert!(matches!(
            ring.retire(&store, Category::Identity, 1, || async { Ok(3) }, vec![])
                .await,
            Err(KeyOpError::InUse(Category::Identity, 1, 3))
        ));
        assert!(store
            .get(Keyspace::Meta, &kek_meta_key(Category::Identity, 1))
            .await
            .expect("get")
            .is_some());
        // While the records are counted, the version is fenced: a write that expects it (as
        // every write wrapping under it does) conflicts, and reads still open it.
        let fenced = || async {
            let mut write = Batch::default();
            write.expect(
                Keyspace::Meta,
                kek_meta_key(Category::Identity, 1),
                Expect::Present,
            );
            write.put(Keyspace::Records, b"r".to_vec(), b"header".to_vec());
            assert!(matches!(
                store.commit(write).await,
                Err(StoreError::Conflict)
            ));
            ring.unwrap_dek(b"r", Category::Identity, 1, &old.sealed)
                .map_err(|e| e.to_string())?;
            Ok(0)
        };
        ring.retire(&store, Category::Identity, 1, fenced, vec![])
            .await
            .expect("retire");
        assert!(matches!(
            ring.unwrap_dek(b"r", Category::Identity, 1, &old.sealed),
            Err(KeyError::MissingKek(Category::Identity, 1))
        ));
        assert!(matches!(
            ring.retire(&store, Category::Identity, 1, none, vec![])
                .await,
            Err(KeyOpError::AlreadyRetired(Category::Identity, 1))
        ));
        assert_eq!(
            store
                .get(Keyspace::Meta, &kek_meta_key(Category::Identity, 1))
                .await
                .expect("get"),
            None,
            "destroyed in the store"
        );

        // A reopened ring agrees; version numbers are never reused.
        let again = KeyRing::open(&store, &m1).await.expect("reopen");
        assert_eq!(state(&again, 1), Some(KekState::Retired));
        assert!(again
            .versions()
            .iter()
            .any(|v| v.version == 1 && v.info.retired_ms.is_some()));
        let made = again
            .rotate(&store, &[Category::Identity], vec![])
            .await
            .expect("rotate");
        assert_eq!(made, vec![(Category::Identity, 3)]);
        // A ring that has not seen the other's rotation conflicts instead of reusing v3, and
        // takes up the store's ring, so that a retry makes v4.
        assert!(matches!(
            ring.rotate(&store, &[Category::Identity], vec![]).await,
            Err(KeyOpError::Concurrent)
        ));
        assert_eq!(ring.active_version(Category::Identity), Some(3));

        // A retire cut short after its fence leaves the key decrypt-only in `kek-retiring/`:
        // a reopened ring still opens it, never makes it active, and the next retire finishes.
        let v2 = store
            .get(Keyspace::Meta, &kek_meta_key(Category::Identity, 2))
            .await
            .expect("get")
            .expect("v2 stored");
        let mut cut = Batch::default();
        cut.delete(Keyspace::Meta, kek_meta_key(Category::Identity, 2));
        cut.put(Keyspace::Meta, kek_retiring_key(Category::Identity, 2), v2);
        store.commit(cut).await.expect("fence v2");
        let reopened = KeyRing::open(&store, &m1).await.expect("reopen fenced");
        assert_eq!(reopened.active_version(Category::Identity), Some(3));
        assert_eq!(state(&reopened, 2), Some(KekState::DecryptOnly));
        reopened
            .unwrap_dek(b"r", Category::Identity, 2, &new.sealed)
            .expect("a fenced version still opens");
        ring.reload(&store).await.expect("reload");
        assert_eq!(ring.active_version(Category::Identity), Some(3));

        // Master key rotation covers fenced keys too (checked after it, below).

        // Master key rotation: one atomic batch; afterwards only the new key opens.
        assert!(matches!(
            rotate_master(&store, &m2, &m1, vec![]).await,
            Err(KeyError::WrongMasterKey)
        ));
        let n = rotate_master(&store, &m1, &m2, vec![])
            .await
            .expect("rotate master");
        // 6 categories: identity v2 (fenced), v3 + 5 × v1; plus index root and integrity key.
        assert_eq!(n, 2 + 5 + 2);
        assert_eq!(
            which_master_key(&store, &m1, &m2).await.expect("which"),
            Some(false)
        );
        assert!(matches!(
            KeyRing::open(&store, &m1).await,
            Err(KeyError::WrongMasterKey)
        ));
        // A process still holding the old master key cannot add a KEK nobody else can open.
        assert!(ring
            .rotate(&store, &[Category::Identity], vec![])
            .await
            .is_err());
        assert_eq!(
            store
                .get(Keyspace::Meta, &kek_meta_key(Category::Identity, 4))
                .await
                .expect("get"),
            None
        );
        let under_m2 = KeyRing::open(&store, &m2).await.expect("new key opens");
        let back = under_m2
            .unwrap_dek(b"r", Category::Identity, 2, &new.sealed)
            .expect("KEK v2 survives the master rotation");
        assert_eq!(back.expose_secret(), dek.expose_secret());
        assert_eq!(
            under_m2.integrity_key().1.expose_secret(),
            again.integrity_key().1.expose_secret()
        );
    }

    #[tokio::test]
    async fn a_missing_newest_kek_refuses_to_open_instead_of_falling_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let m = MasterKey::from_secret(SecretKey::generate().expect("rng"));
        let ring = KeyRing::open(&store, &m).await.expect("create");
        ring.rotate(&store, &[Category::Financial], vec![])
            .await
            .expect("rotate");
        let mut gone = Batch::default();
        gone.delete(Keyspace::Meta, kek_meta_key(Category::Financial, 2));
        store.commit(gone).await.expect("delete v2");
        assert!(matches!(
            KeyRing::open(&store, &m).await,
            Err(KeyError::MissingKek(Category::Financial, 2))
        ));
    }

    #[test]
    fn master_key_file_permissions_are_enforced() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("master.key");
        MasterKey::create_file(&path).expect("create");
        assert_eq!(
            std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        MasterKey::load_file(&path).expect("0600 loads");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        assert!(matches!(
            MasterKey::load_file(&path),
            Err(KeyError::Permissions { .. })
        ));
        assert!(MasterKey::create_file(&path).is_err(), "never overwrites");
    }
}
