//! Configuration: the `kluis.toml` file, dev mode (`kluis serve --dev`) and production set-up
//! (`kluis init`). Resolves everything into [`Settings`], which the server runs from.
//!
//! Dev mode (fixed; scripts depend on it), run in a directory:
//! - `./keys/master.key` (0600) is created on first start and reused later;
//! - `./keys/dev-tokens.toml` holds a `[tokens]` table with one `role = "token"` line for
//!   each default role, created on first start and reused later; only the tokens' hashes
//!   enter the policy;
//! - `./data` is the data directory; the listener is `127.0.0.1:50051` unless `--listen`
//!   names another loopback address.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use zeroize::Zeroizing;

use crate::keys::{KeyError, MasterKey};
use crate::policy::{self, Policy, PolicyError, DEFAULT_ROLES};
use crate::schema::{Schema, SchemaError};
use crate::store::Durability;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// Default largest request, in bytes (room for several 16 MiB documents).
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 80 * 1024 * 1024;
/// The largest `max_request_bytes` accepted.
pub const MAX_REQUEST_BYTES_LIMIT: usize = 1024 * 1024 * 1024;
/// Default cap on open client connections (TLS handshakes included).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Configuration failures; each says which file or setting and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The configuration file is not valid.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// A setting breaks a rule.
    #[error("{0}")]
    Rule(String),
    /// The master key could not be used.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The schema could not be used.
    #[error("{path}: {}", source.detail())]
    Schema {
        /// The schema file.
        path: String,
        /// Why.
        #[source]
        source: Box<SchemaError>,
    },
    /// The policy could not be used.
    #[error("{path}: {}", source.detail())]
    Policy {
        /// The file: the policy, or the dev tokens whose principals are added to it.
        path: String,
        /// Why.
        #[source]
        source: Box<PolicyError>,
    },
}

fn policy_err(path: &Path) -> impl FnOnce(PolicyError) -> ConfigError + '_ {
    move |source| ConfigError::Policy {
        path: path.display().to_string(),
        source: Box::new(source),
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ConfigError + '_ {
    move |source| ConfigError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Refuses a secret file (`what`, e.g. "TLS private key") that group or others can access at
/// all, as the master key is refused.
fn check_secret_mode(what: &str, path: &Path) -> Result<(), ConfigError> {
    match crate::keys::loose_mode(path, crate::keys::SECRET_FORBIDDEN_BITS).map_err(io_err(path))? {
        Some(mode) => Err(ConfigError::Rule(format!(
            "{what} {} is {}",
            path.display(),
            crate::keys::secret_mode_reason(path, mode)
        ))),
        None => match crate::keys::replaceable_by_others(path).map_err(io_err(path))? {
            Some(why) => Err(ConfigError::Rule(format!(
                "{what} {} is {why}",
                path.display()
            ))),
            None => Ok(()),
        },
    }
}

/// Refuses a file that decides who may do what (`what`, e.g. "policy file") when group or
/// others can write it: whoever can write the policy can give themselves any role.
fn check_trusted_mode(what: &str, path: &Path) -> Result<(), ConfigError> {
    match crate::keys::loose_mode(path, crate::keys::TRUSTED_FORBIDDEN_BITS)
        .map_err(io_err(path))?
    {
        Some(mode) => Err(ConfigError::Rule(format!(
            "{what} {} is writable by group or others (mode {mode:o}), who could then change who may do what; run `chmod go-w {}`",
            path.display(),
            path.display()
        ))),
        None => match crate::keys::replaceable_by_others(path).map_err(io_err(path))? {
            Some(why) => Err(ConfigError::Rule(format!(
                "{what} {} is {why}; they could then change who may do what",
                path.display()
            ))),
            None => Ok(()),
        },
    }
}

/// The `kluis.toml` file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Listen address, e.g. `127.0.0.1:50051`.
    #[serde(default)]
    pub listen: Option<String>,
    /// Data directory (sled), relative to the config file.
    pub data_dir: PathBuf,
    /// Master key file (64 hex digits, mode 0600), relative to the config file. If absent,
    /// the key comes from `KLUIS_MASTER_KEY`.
    #[serde(default)]
    pub master_key_file: Option<PathBuf>,
    /// Policy file, relative to the config file.
    pub policy_file: PathBuf,
    /// Schema file; the built-in default schema when absent.
    #[serde(default)]
    pub schema_file: Option<PathBuf>,
    /// Allow a non-loopback listener without TLS (for a TLS-terminating sidecar only).
    #[serde(default)]
    pub allow_insecure_listen: bool,
    /// Largest accepted request in bytes.
    #[serde(default)]
    pub max_request_bytes: Option<usize>,
    /// Most client connections open at once; further ones wait to be accepted.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// TLS settings.
    #[serde(default)]
    pub tls: Option<TlsFile>,
    /// Audit trail settings.
    #[serde(default)]
    pub audit: AuditFile,
    /// Key rotation schedule.
    #[serde(default)]
    pub keys: KeysFile,
    /// Retention rules (defaults from the privacy statement; see `retention`).
    #[serde(default)]
    pub retention: crate::retention::RetentionRules,
}

/// The `[keys]` section of the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysFile {
    /// Category → days after which its active KEK is rotated and the category rewrapped.
    #[serde(default)]
    pub rotate_after_days: BTreeMap<String, u32>,
    /// Seconds between checks of the schedule (default 3600).
    #[serde(default)]
    pub schedule_check_secs: Option<u64>,
}

/// Default seconds between checks of the key rotation schedule.
pub const DEFAULT_SCHEDULE_CHECK_SECS: u64 = 3600;

/// Most seconds between two runs of a periodic check (the retention sweep, the key-rotation
/// schedule): a day. A larger interval would quietly turn the check off (review 31).
pub const MAX_INTERVAL_SECS_SETTING: u64 = 86_400;
/// Most days a period setting may name (key rotation, applicant retention): ten years.
pub const MAX_DAYS_SETTING: u64 = 3_650;
/// Most days `sweep_max_gap_days` may be: past a year the clock-jump guard means nothing.
pub const MAX_SWEEP_GAP_DAYS: u64 = 366;
/// Most client connections `max_connections` may allow.
pub const MAX_CONNECTIONS_LIMIT: usize = 65_536;

/// Resolved key rotation schedule.
#[derive(Debug, Clone)]
pub struct KeySettings {
    /// Category → age after which its active KEK is rotated (and the category rewrapped).
    pub rotate_after: BTreeMap<crate::schema::Category, std::time::Duration>,
    /// Time between checks of the schedule.
    pub schedule_check: std::time::Duration,
}

impl Default for KeySettings {
    fn default() -> Self {
        KeySettings {
            rotate_after: BTreeMap::new(),
            schedule_check: std::time::Duration::from_secs(DEFAULT_SCHEDULE_CHECK_SECS),
        }
    }
}

impl KeysFile {
    fn resolve(&self) -> Result<KeySettings, ConfigError> {
        let mut rotate_after = BTreeMap::new();
        for (name, days) in &self.rotate_after_days {
            let category = crate::schema::Category::parse(name).ok_or_else(|| {
                ConfigError::Rule(format!(
                    "[keys] rotate_after_days names unknown category `{name}` (categories: contact, personal, identity, financial, cv, absence)"
                ))
            })?;
            if *days == 0 {
                return Err(ConfigError::Rule(format!(
                    "[keys] rotate_after_days.{name} must be at least 1"
                )));
            }
            if u64::from(*days) > MAX_DAYS_SETTING {
                return Err(ConfigError::Rule(format!(
                    "[keys] rotate_after_days.{name} = {days}: must be at most {MAX_DAYS_SETTING} (ten years)"
                )));
            }
            rotate_after.insert(
                category,
                std::time::Duration::from_secs(u64::from(*days) * 86_400),
            );
        }
        Ok(KeySettings {
            rotate_after,
            schedule_check: std::time::Duration::from_secs(bounded(
                "[keys] schedule_check_secs",
                self.schedule_check_secs
                    .unwrap_or(DEFAULT_SCHEDULE_CHECK_SECS),
                MAX_INTERVAL_SECS_SETTING,
            )?),
        })
    }
}

/// The `[audit]` section of the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditFile {
    /// Ed25519 key (PKCS#8, mode 0600) that signs checkpoints, relative to the config file.
    #[serde(default = "default_signing_key_file")]
    pub signing_key_file: PathBuf,
    /// Sign a checkpoint after this many events…
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// …or after this many seconds, whichever comes first (when there are new events).
    #[serde(default = "default_checkpoint_interval_secs")]
    pub checkpoint_interval_secs: u64,
    /// Where the server writes the audit anchor (its newest checkpoint, outside the store),
    /// relative to the config file [default: the signing key's directory]. Must be writable.
    #[serde(default)]
    pub anchor_dir: Option<PathBuf>,
}

impl Default for AuditFile {
    fn default() -> Self {
        AuditFile {
            signing_key_file: default_signing_key_file(),
            checkpoint_every: default_checkpoint_every(),
            checkpoint_interval_secs: default_checkpoint_interval_secs(),
            anchor_dir: None,
        }
    }
}

fn default_signing_key_file() -> PathBuf {
    PathBuf::from("keys").join(crate::audit::SIGNING_KEY_FILE)
}

/// Default events between checkpoints.
pub const DEFAULT_CHECKPOINT_EVERY: u64 = 1000;
/// Default seconds between checkpoints.
pub const DEFAULT_CHECKPOINT_INTERVAL_SECS: u64 = 60;
/// The largest `[audit] checkpoint_every` accepted: more events than this unsigned would
/// leave a long tail of the trail that only the next checkpoint vouches for.
pub const MAX_CHECKPOINT_EVERY: u64 = 1_000_000;
/// The largest `[audit] checkpoint_interval_secs` accepted (one day).
pub const MAX_CHECKPOINT_INTERVAL_SECS: u64 = 86_400;

fn default_checkpoint_every() -> u64 {
    DEFAULT_CHECKPOINT_EVERY
}

fn default_checkpoint_interval_secs() -> u64 {
    DEFAULT_CHECKPOINT_INTERVAL_SECS
}

/// Resolved audit settings.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    /// Whether events are written. Always true in the server; `false` exists only so the load
    /// benchmark can measure what auditing costs. Not settable from the config file.
    pub enabled: bool,
    /// The checkpoint signing key file.
    pub signing_key_file: PathBuf,
    /// Whether to create the signing key if absent (dev mode and tests; `kluis init` creates
    /// it in production).
    pub create_signing_key: bool,
    /// Events between checkpoints.
    pub checkpoint_every: u64,
    /// Time between checkpoints.
    pub checkpoint_interval: std::time::Duration,
    /// Where the audit anchor is written (`None`: the signing key's directory).
    pub anchor_dir: Option<PathBuf>,
}

impl AuditSettings {
    /// The directory the audit anchor is written to.
    pub fn anchor_dir(&self) -> PathBuf {
        self.anchor_dir
            .clone()
            .unwrap_or_else(|| match self.signing_key_file.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            })
    }
}

impl AuditSettings {
    /// Defaults with the signing key in `keys_dir`.
    pub fn in_keys_dir(keys_dir: &Path, create_signing_key: bool) -> AuditSettings {
        AuditSettings {
            enabled: true,
            signing_key_file: keys_dir.join(crate::audit::SIGNING_KEY_FILE),
            create_signing_key,
            checkpoint_every: DEFAULT_CHECKPOINT_EVERY,
            checkpoint_interval: std::time::Duration::from_secs(DEFAULT_CHECKPOINT_INTERVAL_SECS),
            anchor_dir: None,
        }
    }

    /// Most events that may follow the newest checkpoint in a sound chain.
    pub fn max_uncovered(&self) -> u64 {
        crate::audit::max_uncovered(self.checkpoint_every)
    }
}

/// TLS settings of the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// PEM certificate chain of the server.
    pub cert_file: PathBuf,
    /// PEM private key of the server.
    pub key_file: PathBuf,
    /// PEM CA certificates that client certificates must chain to (enables mTLS).
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// Whether a client certificate is required (true) or optional (false, the default;
    /// callers without one must send a bearer token).
    #[serde(default)]
    pub require_client_cert: bool,
}

/// Resolved TLS material.
#[derive(Clone)]
pub struct TlsSettings {
    /// Server certificate chain, PEM.
    pub cert_pem: Vec<u8>,
    /// Server private key, PEM.
    pub key_pem: Zeroizing<Vec<u8>>,
    /// Client CA, PEM (mTLS) if any.
    pub client_ca_pem: Option<Vec<u8>>,
    /// Whether client certificates are required.
    pub require_client_cert: bool,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("mtls", &self.client_ca_pem.is_some())
            .field("require_client_cert", &self.require_client_cert)
            .finish_non_exhaustive()
    }
}

/// Everything the server needs to run.
pub struct Settings {
    /// Listen address (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Data directory.
    pub data_dir: PathBuf,
    /// The master key.
    pub master_key: MasterKey,
    /// Where the master key came from (its file, or the environment variable), for messages.
    pub master_key_source: String,
    /// Field schema.
    pub schema: Schema,
    /// Access policy.
    pub policy: Policy,
    /// TLS, if enabled.
    pub tls: Option<TlsSettings>,
    /// Whether a non-loopback listener without TLS is allowed.
    pub allow_insecure_listen: bool,
    /// Largest accepted request in bytes.
    pub max_request_bytes: usize,
    /// Most client connections open at once (TLS handshakes included); further ones wait in
    /// the listen backlog until one closes.
    pub max_connections: usize,
    /// How long a client connection may stay open before its first request
    /// ([`crate::server::FIRST_REQUEST_TIMEOUT`]; tests shorten it).
    pub first_request_timeout: std::time::Duration,
    /// How long a large answer may go unread before its connection is closed
    /// ([`crate::service::answer::ANSWER_STALL_TIMEOUT`]; tests shorten it).
    pub answer_stall_timeout: std::time::Duration,
    /// How writes are made durable (group commit; per-write only as a benchmark baseline).
    pub durability: Durability,
    /// The audit trail.
    pub audit: AuditSettings,
    /// Key rotation schedule.
    pub keys: KeySettings,
    /// Retention rules.
    pub retention: crate::retention::RetentionRules,
    /// Today's date for retention (the system clock; tests inject another).
    pub clock: crate::vault::Clock,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field("tls", &self.tls)
            .field("principals", &self.policy.principal_count())
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// Checks the listener rule: a non-loopback address needs TLS or an explicit opt-out.
    pub fn check_listener(&self) -> Result<(), ConfigError> {
        if !self.listen.ip().is_loopback() && self.tls.is_none() && !self.allow_insecure_listen {
            return Err(ConfigError::Rule(format!(
                "refusing to listen on non-loopback address {} without TLS: configure [tls] or set allow_insecure_listen = true (only behind a TLS-terminating proxy)",
                self.listen
            )));
        }
        Ok(())
    }
}

/// Parses a listen address: an IP address and a port (host names are not resolved). `source`
/// says where it came from, e.g. "--listen" or "/etc/kluis/kluis.toml: listen".
pub fn parse_listen(text: &str, source: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| {
        ConfigError::Rule(format!(
            "{source}: `{}` must be an IP address and port (host names are not resolved), e.g. 127.0.0.1:50051 or [::1]:50051",
            text.escape_default()
        ))
    })
}

/// Checks that the consent that extends an applicant's period (`[retention]
/// applicant_consent_purpose`) is a purpose of the policy: a typo would erase every consenting
/// applicant after the short period.
pub fn check_consent_purpose(
    rules: &crate::retention::RetentionRules,
    policy: &Policy,
) -> Result<(), ConfigError> {
    let purpose = &rules.applicant_consent_purpose;
    match policy.purpose(purpose) {
        None => Err(ConfigError::Rule(format!(
            "[retention] applicant_consent_purpose = \"{purpose}\" is not a purpose of the policy"
        ))),
        // Only a consent can be granted (SetConsent): another basis would never extend
        // anyone's period.
        Some(p) if p.legal_basis != crate::policy::LegalBasis::Consent => {
            Err(ConfigError::Rule(format!(
                "[retention] applicant_consent_purpose = \"{purpose}\" does not rest on consent (its legal_basis in the policy must be `consent`)"
            )))
        }
        Some(_) => Ok(()),
    }
}

/// What is wrong with a TOML config file, for a message that already names it: a missing key
/// as `<key>: is required` (toml's own message for it points at line 1), anything else by
/// [`toml_error`].
pub(crate) fn toml_message(e: &toml::de::Error, text: &str) -> String {
    let missing = e
        .message()
        .strip_prefix("missing field `")
        .and_then(|rest| rest.strip_suffix('`'));
    match (missing, e.span()) {
        (Some(key), Some(span)) if span.start > 0 => format!(
            "{key}: is required (in the table at line {})",
            text[..span.start.min(text.len())].matches('\n').count() + 1
        ),
        (Some(key), _) => format!("{key}: is required"),
        (None, _) => toml_error(e, text),
    }
}

/// A TOML file's error without its text: where (line and column) and toml's rule, with any
/// value left out. (toml's own message quotes the offending line, and a misplaced
/// `master_key = "…"` or `token = "…"` would print the secret: review 20.) serde's rules name
/// the value they refuse (`invalid type: string "…", expected usize`, `unknown variant `…``):
/// those keep the kind of value only.
pub(crate) fn toml_error(e: &toml::de::Error, text: &str) -> String {
    let rule = redact_rule(e.message().trim()).replace('\n', "; ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            // In characters, as an editor counts them.
            let column = before[before.rfind('\n').map_or(0, |i| i + 1)..]
                .chars()
                .count()
                + 1;
            format!("TOML error at line {line}, column {column}: {rule}")
        }
        None => format!("TOML error: {rule}"),
    }
}

/// A serde/toml rule with the value it names left out: `invalid type: string "x", expected
/// usize` → `invalid type: string, expected usize`; `unknown variant `x`, expected one of …`
/// → `unknown variant, expected one of …`. Rules that name no value (syntax errors, unknown
/// or missing fields, which name keys) are kept as they are.
pub(crate) fn redact_rule(rule: &str) -> String {
    for prefix in [
        "invalid type: ",
        "invalid value: ",
        "invalid length ",
        "unknown variant",
    ] {
        if let Some(rest) = rule.strip_prefix(prefix) {
            // serde puts the expectation last; a value may hold the words too.
            let (value, expected) = match rest.rfind(", expected") {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            // The kind of value, before its quoted or back-quoted text (`string "…"`,
            // `integer `5``); nothing of a variant's name.
            let kind = if prefix == "unknown variant" {
                ""
            } else {
                value
                    .find([' ', '"', '`', '\''])
                    .map_or(value, |i| &value[..i])
            };
            let head = prefix.trim_end_matches(": ").trim_end();
            return if kind.is_empty() {
                format!("{head}{expected}")
            } else {
                format!("{head}: {kind}{expected}")
            };
        }
    }
    rule.to_string()
}

/// Loads production settings from a config file.
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    check_trusted_mode("configuration file", path)?;
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let file: ConfigFile = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
        path: path.display().to_string(),
        message: toml_message(&e, &text),
    })?;
    // An empty path would name the config file's directory (review 20: `master_key_file = ""`
    // was told to `chmod 600` it).
    let tls = file.tls.as_ref();
    for (key, value, what) in [
        ("data_dir", Some(file.data_dir.as_path()), "a directory"),
        ("master_key_file", file.master_key_file.as_deref(), "a file"),
        ("policy_file", Some(file.policy_file.as_path()), "a file"),
        ("schema_file", file.schema_file.as_deref(), "a file"),
        (
            "[audit] signing_key_file",
            Some(file.audit.signing_key_file.as_path()),
            "a file",
        ),
        (
            "[tls] cert_file",
            tls.map(|t| t.cert_file.as_path()),
            "a file",
        ),
        (
            "[tls] key_file",
            tls.map(|t| t.key_file.as_path()),
            "a file",
        ),
        (
            "[tls] client_ca_file",
            tls.and_then(|t| t.client_ca_file.as_deref()),
            "a file",
        ),
    ] {
        if value.is_some_and(|p| p.as_os_str().is_empty()) {
            return Err(ConfigError::Invalid {
                path: path.display().to_string(),
                message: format!("{key} = \"\": name {what}"),
            });
        }
    }
    let base = path.parent().unwrap_or(Path::new("."));
    let rel = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    };
    let master_key_source = match &file.master_key_file {
        Some(p) => format!("the file {}", rel(p).display()),
        None => format!("the {} environment variable", crate::keys::MASTER_KEY_ENV),
    };
    if file.master_key_file.is_some() && std::env::var_os(crate::keys::MASTER_KEY_ENV).is_some() {
        // Review 31: the variable is not used; an operator who thinks it overrides the file
        // is told, and the secret should not sit in the environment for nothing.
        tracing::warn!(
            variable = crate::keys::MASTER_KEY_ENV,
            "the master key environment variable is set but not used: master_key_file is set in the config file, and the key is read from that file; unset the variable"
        );
    }
    let master_key = match &file.master_key_file {
        Some(p) => MasterKey::load_server_file(&rel(p))?,
        None => MasterKey::from_env()?.ok_or_else(|| {
            ConfigError::Rule(format!(
                "no master key: set master_key_file in {} or the {} environment variable",
                path.display(),
                crate::keys::MASTER_KEY_ENV
            ))
        })?,
    };
    let (schema, schema_name) = match &file.schema_file {
        Some(p) => {
            let p = rel(p);
            check_trusted_mode("schema file", &p)?;
            let schema = Schema::from_toml(&std::fs::read_to_string(&p).map_err(io_err(&p))?)
                .map_err(|source| ConfigError::Schema {
                    path: p.display().to_string(),
                    source: Box::new(source),
                })?;
            (schema, p.display().to_string())
        }
        None => (Schema::default_schema(), "the built-in schema".to_string()),
    };
    let policy_path = rel(&file.policy_file);
    check_trusted_mode("policy file", &policy_path)?;
    let policy =
        Policy::from_toml(&std::fs::read_to_string(&policy_path).map_err(io_err(&policy_path))?)
            .map_err(policy_err(&policy_path))?;
    policy
        .check_masked(&schema, &schema_name)
        .map_err(policy_err(&policy_path))?;
    // A rule broken by a setting of this file is reported as `<path>: <rule>`.
    let in_file = |e: ConfigError| match e {
        ConfigError::Rule(message) => ConfigError::Invalid {
            path: path.display().to_string(),
            message,
        },
        e => e,
    };
    check_consent_purpose(&file.retention, &policy).map_err(in_file)?;
    let mtls = file
        .tls
        .as_ref()
        .is_some_and(|t| t.client_ca_file.is_some());
    if let (false, Some((name, cn))) = (mtls, policy.cert_principals().next()) {
        return Err(ConfigError::Invalid {
            path: policy_path.display().to_string(),
            message: format!(
                "principal `{name}` authenticates by client certificate (cert_cn = \"{}\"), but {} configures no mTLS ([tls] with client_ca_file), so it could never authenticate: configure mTLS or remove the principal",
                cn.escape_default(),
                path.display()
            ),
        });
    }
    let tls = match &file.tls {
        Some(t) => {
            // Requiring client certificates needs the CA that verifies them.
            if t.require_client_cert && t.client_ca_file.is_none() {
                return Err(in_file(ConfigError::Rule(
                    "[tls] require_client_cert = true needs client_ca_file (the CA that signs client certificates)".into(),
                )));
            }
            Some(load_tls(t, &rel)?)
        }
        None => None,
    };
    Ok(Settings {
        listen: parse_listen(
            file.listen.as_deref().unwrap_or(DEFAULT_LISTEN),
            &format!("{}: listen", path.display()),
        )?,
        data_dir: rel(&file.data_dir),
        master_key,
        master_key_source,
        schema,
        policy,
        tls,
        allow_insecure_listen: file.allow_insecure_listen,
        max_request_bytes: match file.max_request_bytes {
            None => DEFAULT_MAX_REQUEST_BYTES,
            Some(n) if (1..=MAX_REQUEST_BYTES_LIMIT).contains(&n) => n,
            Some(n) => {
                return Err(in_file(ConfigError::Rule(format!(
                    "max_request_bytes = {n}: must be between 1 and {MAX_REQUEST_BYTES_LIMIT} (1 GiB; a write and its log frame stay far below the log's 4 GiB frame limit)"
                ))))
            }
        },
        max_connections: match file.max_connections {
            None => DEFAULT_MAX_CONNECTIONS,
            Some(0) => {
                return Err(in_file(ConfigError::Rule(
                    "max_connections = 0: must be at least 1".into(),
                )))
            }
            Some(n) if n > MAX_CONNECTIONS_LIMIT => {
                return Err(in_file(ConfigError::Rule(format!(
                    "max_connections = {n}: must be at most {MAX_CONNECTIONS_LIMIT} (and well below the process's open-file limit)"
                ))))
            }
            Some(n) => n,
        },
        first_request_timeout: crate::server::FIRST_REQUEST_TIMEOUT,
        answer_stall_timeout: crate::service::answer::ANSWER_STALL_TIMEOUT,
        durability: Durability::GroupCommit,
        audit: AuditSettings {
            enabled: true,
            signing_key_file: rel(&file.audit.signing_key_file),
            create_signing_key: false,
            checkpoint_every: bounded(
                "[audit] checkpoint_every",
                file.audit.checkpoint_every,
                MAX_CHECKPOINT_EVERY,
            )
            .map_err(in_file)?,
            checkpoint_interval: std::time::Duration::from_secs(
                bounded(
                    "[audit] checkpoint_interval_secs",
                    file.audit.checkpoint_interval_secs,
                    MAX_CHECKPOINT_INTERVAL_SECS,
                )
                .map_err(in_file)?,
            ),
            anchor_dir: match file.audit.anchor_dir.as_deref() {
                Some(dir) if dir.as_os_str().is_empty() => {
                    return Err(in_file(ConfigError::Rule(
                        "[audit] anchor_dir = \"\": name a directory, or leave the key out for the signing key's directory".into(),
                    )))
                }
                dir => dir.map(rel),
            },
        },
        keys: file.keys.resolve().map_err(in_file)?,
        retention: {
            file.retention
                .validate()
                .map_err(|m| in_file(ConfigError::Rule(m)))?;
            bounded(
                "[retention] sweep_interval_secs",
                file.retention.sweep_interval_secs,
                MAX_INTERVAL_SECS_SETTING,
            )
            .map_err(in_file)?;
            bounded(
                "[retention] sweep_max_gap_days",
                u64::from(file.retention.sweep_max_gap_days),
                MAX_SWEEP_GAP_DAYS,
            )
            .map_err(in_file)?;
            file.retention.clone()
        },
        clock: crate::vault::system_clock(),
    })
}

/// `value`, refused when 0 or above `max` (naming `key` and the bound).
fn bounded(key: &str, value: u64, max: u64) -> Result<u64, ConfigError> {
    let value = positive(key, value)?;
    if value > max {
        return Err(ConfigError::Rule(format!(
            "{key} = {value}: must be at most {max}"
        )));
    }
    Ok(value)
}

/// `value`, refused when 0 (naming `key`).
fn positive(key: &str, value: u64) -> Result<u64, ConfigError> {
    if value == 0 {
        return Err(ConfigError::Rule(format!("{key} = 0: must be at least 1")));
    }
    Ok(value)
}

fn load_tls(t: &TlsFile, rel: &dyn Fn(&Path) -> PathBuf) -> Result<TlsSettings, ConfigError> {
    let read = |p: &Path| {
        let p = rel(p);
        std::fs::read(&p).map_err(io_err(&p))
    };
    check_secret_mode("TLS private key ([tls] key_file)", &rel(&t.key_file))?;
    // The client CA decides which certificates authenticate as the cert_cn principals:
    // whoever can write it can add their own CA, as whoever can write the policy can add a
    // token.
    if let Some(ca) = &t.client_ca_file {
        check_trusted_mode("client CA file ([tls] client_ca_file)", &rel(ca))?;
    }
    let settings = TlsSettings {
        cert_pem: read(&t.cert_file)?,
        key_pem: Zeroizing::new(read(&t.key_file)?),
        client_ca_pem: t.client_ca_file.as_deref().map(read).transpose()?,
        require_client_cert: t.require_client_cert,
    };
    // Each file checked on its own, so that an error names it (review 20: tonic's one error
    // for all three said "peer sent no certificates" of the server's own certificate).
    let bad = |key: &str, path: &Path, rule: &str| {
        ConfigError::Rule(format!("[tls] {key} {}: {rule}", rel(path).display()))
    };
    if !holds_certificates(&settings.cert_pem) {
        return Err(bad(
            "cert_file",
            &t.cert_file,
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
        ));
    }
    {
        use rustls::pki_types::pem::PemObject;
        match rustls::pki_types::PrivateKeyDer::from_pem_slice(&settings.key_pem) {
            Err(_) => {
                return Err(bad(
                    "key_file",
                    &t.key_file,
                    "holds no PEM private key (-----BEGIN PRIVATE KEY-----, or an RSA or EC one)",
                ))
            }
            Ok(key) => {
                if rustls::crypto::ring::sign::any_supported_type(&key).is_err() {
                    return Err(bad(
                        "key_file",
                        &t.key_file,
                        "holds a private key that does not decode, or of a kind TLS here does not take (RSA, ECDSA P-256 or P-384, Ed25519)",
                    ));
                }
            }
        }
    }
    if let (Some(ca), Some(path)) = (&settings.client_ca_pem, &t.client_ca_file) {
        if !holds_certificates(ca) {
            return Err(bad(
                "client_ca_file",
                path,
                "holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            ));
        }
    }
    Ok(settings)
}

/// Whether `pem` holds at least one PEM certificate, and nothing that fails to decode as an
/// X.509 certificate.
fn holds_certificates(pem: &[u8]) -> bool {
    use rustls::pki_types::pem::PemObject;
    let mut any = false;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem) {
        match cert {
            Ok(der) if x509_parser::parse_x509_certificate(&der).is_ok() => any = true,
            _ => return false,
        }
    }
    any
}

/// Settings for tests, benchmarks and tools: loopback port 0, the default schema, no TLS, the
/// audit signing key in `keys/` beside the data directory (created if absent).
pub fn ephemeral(data_dir: &Path, master_key: MasterKey, policy: Policy) -> Settings {
    let keys_dir = data_dir
        .parent()
        .map_or_else(|| PathBuf::from("keys"), |p| p.join("keys"));
    Settings {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: data_dir.to_path_buf(),
        master_key,
        master_key_source: "the key given".into(),
        schema: Schema::default_schema(),
        policy,
        tls: None,
        allow_insecure_listen: false,
        max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
        max_connections: DEFAULT_MAX_CONNECTIONS,
        first_request_timeout: crate::server::FIRST_REQUEST_TIMEOUT,
        answer_stall_timeout: crate::service::answer::ANSWER_STALL_TIMEOUT,
        durability: Durability::GroupCommit,
        audit: AuditSettings::in_keys_dir(&keys_dir, true),
        keys: KeySettings::default(),
        retention: crate::retention::RetentionRules::default(),
        clock: crate::vault::system_clock(),
    }
}

#[derive(Deserialize)]
struct DevTokens {
    tokens: BTreeMap<String, DevToken>,
}

/// A token of `keys/dev-tokens.toml`, zeroized on drop: every token read, and the map they
/// are read into, is wiped when the map is dropped (also when a later line fails to parse).
struct DevToken(Zeroizing<String>);

impl<'de> Deserialize<'de> for DevToken {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|token| DevToken(Zeroizing::new(token)))
    }
}

/// Dev-mode settings for the current directory `root`: creates `keys/master.key`,
/// `keys/dev-tokens.toml` and `data/` on first start, reuses them afterwards.
pub fn dev(
    root: &Path,
    listen: Option<&str>,
    data_dir: Option<&Path>,
) -> Result<Settings, ConfigError> {
    // A production set-up (`kluis init`) uses the same layout: dev mode there would serve its
    // data with dev tokens for every role and the default policy and retention rules.
    let config = root.join("kluis.toml");
    if config.exists() {
        return Err(ConfigError::Rule(format!(
            "{} exists: this directory holds a production set-up; run `kluis serve --config {}` (dev mode belongs in a directory of its own)",
            config.display(),
            config.display()
        )));
    }
    // The address first: a refused start leaves nothing behind.
    let listen = parse_listen(listen.unwrap_or(DEFAULT_LISTEN), "--listen")?;
    if !listen.ip().is_loopback() {
        return Err(ConfigError::Rule(format!(
            "dev mode listens on loopback only; `{listen}` is not a loopback address"
        )));
    }
    let keys = root.join("keys");
    crate::keys::create_private_dir_durable(&keys).map_err(io_err(&keys))?;
    let key_path = keys.join("master.key");
    let master_key = if key_path.exists() {
        MasterKey::load_server_file(&key_path)?
    } else {
        MasterKey::create_file(&key_path)?
    };
    let tokens_path = keys.join("dev-tokens.toml");
    if !tokens_path.exists() {
        write_dev_tokens(&tokens_path)?;
    }
    check_secret_mode("dev tokens file", &tokens_path)?;
    let text = Zeroizing::new(std::fs::read_to_string(&tokens_path).map_err(io_err(&tokens_path))?);
    // toml's own message quotes the offending line, which holds a token: say where only.
    let tokens: DevTokens = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
        path: tokens_path.display().to_string(),
        message: match e.span() {
            Some(span) => format!(
                "not a `[tokens]` table of `role = \"token\"` lines (line {})",
                text[..span.start.min(text.len())].matches('\n').count() + 1
            ),
            None => "not a `[tokens]` table of `role = \"token\"` lines".into(),
        },
    })?;
    let mut policy = Policy::default_policy();
    for (role, token) in &tokens.tokens {
        policy
            .add_token_hash(&format!("dev-{role}"), role, policy::token_hash(&token.0))
            .map_err(policy_err(&tokens_path))?;
    }
    let data_dir = data_dir.map_or_else(|| root.join("data"), Path::to_path_buf);
    crate::audit::Signer::load_or_create(&keys.join(crate::audit::SIGNING_KEY_FILE), true)
        .map_err(|e| ConfigError::Rule(e.to_string()))?;
    Ok(Settings {
        listen,
        audit: AuditSettings::in_keys_dir(&keys, true),
        master_key_source: format!("the file {}", key_path.display()),
        ..ephemeral(&data_dir, master_key, policy)
    })
}

fn write_secret_file(path: &Path, text: &str) -> Result<(), ConfigError> {
    crate::keys::write_secret_file(path, text.as_bytes()).map_err(io_err(path))
}

fn write_dev_tokens(path: &Path) -> Result<(), ConfigError> {
    const HEADER: &str = "# Kluis dev-mode bearer tokens, one per default role. Dev only: never use in production.\n[tokens]\n";
    let tokens = DEFAULT_ROLES
        .iter()
        .map(|role| Ok((*role, policy::generate_token()?)))
        .collect::<Result<Vec<_>, crate::crypto::CryptoError>>()
        .map_err(|e| ConfigError::Rule(e.to_string()))?;
    // `role = "token"` lines, written into a buffer of exactly their size (a string that grows
    // leaves copies of the tokens behind).
    let len = HEADER.len()
        + tokens
            .iter()
            .map(|(role, token)| role.len() + token.len() + 6)
            .sum::<usize>();
    let mut text = Zeroizing::new(String::with_capacity(len));
    text.push_str(HEADER);
    for (role, token) in &tokens {
        for part in [*role, " = \"", token.as_str(), "\"\n"] {
            text.push_str(part);
        }
    }
    debug_assert_eq!(text.len(), len, "the tokens file is sized exactly");
    write_secret_file(path, &text)
}

/// What `kluis init` created.
pub struct InitOutput {
    /// The config file written.
    pub config_path: PathBuf,
    /// Principal name, role and token, to print once.
    pub tokens: Vec<(String, String, Zeroizing<String>)>,
}

/// What one `kluis init` run created, removed again when a later step fails: a failed run
/// leaves no key behind that a re-run would then refuse to overwrite.
#[derive(Default)]
struct Created {
    /// Directories, outermost first.
    dirs: Vec<PathBuf>,
    /// Files, in the order they were written.
    files: Vec<PathBuf>,
}

impl Created {
    /// The directories among `dir` and its ancestors that do not exist yet, outermost first
    /// (to note before creating `dir`).
    fn missing_dirs(&mut self, dir: &Path) {
        let mut missing = Vec::new();
        let mut at = Some(dir);
        while let Some(p) = at.filter(|p| !p.as_os_str().is_empty()) {
            if std::fs::symlink_metadata(p).is_ok() {
                break;
            }
            missing.push(p.to_path_buf());
            at = p.parent();
        }
        self.dirs.extend(missing.into_iter().rev());
    }

    /// Removes every file this run wrote and every directory it created (left alone if not
    /// empty), newest first. Best effort: the error being reported matters more.
    fn undo(self) {
        for f in self.files.iter().rev() {
            let _ = std::fs::remove_file(f);
        }
        for d in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Production set-up in `dir`: a master key (0600) and the audit signing key in `keys/`
/// (0700), `policy.toml` with one principal per default role (token hashes only),
/// `kluis.toml`. Refuses to overwrite anything, checking every file it would write before it
/// writes any; if a step fails, removes what it wrote.
pub fn init(dir: &Path, listen: &str) -> Result<InitOutput, ConfigError> {
    let config_path = dir.join("kluis.toml");
    let policy_path = dir.join("policy.toml");
    let keys_dir = dir.join("keys");
    let key_path = keys_dir.join("master.key");
    let signing_path = keys_dir.join(crate::audit::SIGNING_KEY_FILE);
    let public_path = keys_dir.join(crate::audit::PUBLIC_KEY_FILE);
    parse_listen(listen, "--listen")?;
    for p in [
        &config_path,
        &policy_path,
        &key_path,
        &signing_path,
        &public_path,
    ] {
        // symlink_metadata, not exists(): a dangling symbolic link is in the way too.
        match std::fs::symlink_metadata(p) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(p)(e)),
            Ok(_) => {
                // Serving is the way out only where a set-up is there to serve.
                let serve = if config_path.is_file() {
                    format!(
                        "To serve a finished set-up, run `kluis serve --config {}`; otherwise run",
                        config_path.display()
                    )
                } else {
                    "Run".to_string()
                };
                return Err(ConfigError::Rule(format!(
                    "{} already exists: kluis init never overwrites. {serve} init with an empty --dir (remove an earlier set-up's files only if no data was ever stored under its keys)",
                    p.display(),
                )));
            }
        }
    }
    let mut policy_text = String::from(policy::DEFAULT_POLICY_TOML);
    let mut tokens = Vec::new();
    for role in DEFAULT_ROLES {
        let token = policy::generate_token().map_err(|e| ConfigError::Rule(e.to_string()))?;
        let name = format!("{}-1", role.replace('_', "-"));
        policy_text.push_str(&format!(
            "\n[[principals]]\nname = \"{name}\"\nrole = \"{role}\"\ntoken_sha256 = \"{}\"\n",
            hex::encode(policy::token_hash(&token))
        ));
        tokens.push((name, role.to_string(), token));
    }
    Policy::from_toml(&policy_text).map_err(policy_err(&policy_path))?;
    let config = format!(
        "# Kluis configuration (see README.md, \"Configuration reference\").\nlisten = \"{listen}\"\ndata_dir = \"data\"\nmaster_key_file = \"keys/master.key\"\npolicy_file = \"policy.toml\"\n# schema_file = \"schema.toml\"   # default: the built-in schema\n# allow_insecure_listen = false\n# max_request_bytes = {DEFAULT_MAX_REQUEST_BYTES}\n# max_connections = {DEFAULT_MAX_CONNECTIONS}   # open client connections at once\n\n# [tls]\n# cert_file = \"tls/server.crt\"\n# key_file = \"tls/server.key\"\n# client_ca_file = \"tls/clients-ca.crt\"   # enables mTLS\n# require_client_cert = false\n\n# [audit]\n# signing_key_file = \"keys/audit-signing.key\"   # Ed25519, signs chain checkpoints\n# checkpoint_every = {DEFAULT_CHECKPOINT_EVERY}                          # events between checkpoints\n# checkpoint_interval_secs = {DEFAULT_CHECKPOINT_INTERVAL_SECS}                    # or seconds, whichever first\n# anchor_dir = \"keys\"   # where the newest checkpoint is kept outside the store (writable)\n\n# [keys]\n# schedule_check_secs = {DEFAULT_SCHEDULE_CHECK_SECS}\n# [keys.rotate_after_days]   # rotate the KEK and rewrap the category when this old\n# identity = 90\n# financial = 90\n"
    );
    let mut created = Created::default();
    created.missing_dirs(&keys_dir);
    let written = (|| {
        // Each file is noted once written: one that failed because it appeared meanwhile
        // is someone else's.
        crate::keys::create_private_dir_durable(&keys_dir).map_err(io_err(&keys_dir))?;
        // One that was there already is made private too (review 13).
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&keys_dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err(&keys_dir))?;
        }
        MasterKey::create_file(&key_path)?;
        created.files.push(key_path.clone());
        crate::audit::Signer::load_or_create(&signing_path, true)
            .map_err(|e| ConfigError::Rule(e.to_string()))?;
        created.files.push(signing_path.clone());
        created.files.push(public_path.clone());
        write_secret_file(&policy_path, &policy_text)?;
        created.files.push(policy_path.clone());
        write_secret_file(&config_path, &config)
    })();
    if let Err(e) = written {
        created.undo();
        return Err(e);
    }
    Ok(InitOutput {
        config_path,
        tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_mode_creates_then_reuses() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A refused address leaves nothing behind.
        let err = dev(dir.path(), Some("0.0.0.0:50051"), None).expect_err("not loopback");
        assert!(err.to_string().contains("loopback"), "{err}");
        assert!(!dir.path().join("keys").exists());
        let s1 = dev(dir.path(), None, None).expect("first start");
        assert_eq!(s1.policy.principal_count(), 6);
        let t1 = std::fs::read_to_string(dir.path().join("keys/dev-tokens.toml")).expect("tokens");
        dev(dir.path(), None, None).expect("second start");
        let t2 = std::fs::read_to_string(dir.path().join("keys/dev-tokens.toml")).expect("tokens");
        assert_eq!(t1, t2);
        assert!(dev(dir.path(), Some("0.0.0.0:50051"), None).is_err());
    }

    #[test]
    fn init_writes_hashes_only_and_never_overwrites() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = init(dir.path(), DEFAULT_LISTEN).expect("init");
        let policy = std::fs::read_to_string(dir.path().join("policy.toml")).expect("policy");
        for (_, _, token) in &out.tokens {
            assert!(!policy.contains(token.as_str()));
        }
        let settings = load(&out.config_path).expect("config loads");
        assert!(settings
            .policy
            .authenticate_token(&out.tokens[0].2)
            .is_some());
        assert!(init(dir.path(), DEFAULT_LISTEN).is_err());
    }

    #[test]
    fn max_request_bytes_is_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = init(dir.path(), DEFAULT_LISTEN).expect("init");
        let config = std::fs::read_to_string(&out.config_path).expect("config");
        for (value, ok) in [("0", false), ("1048576", true), ("1073741825", false)] {
            let edited = config.replace(
                &format!("# max_request_bytes = {DEFAULT_MAX_REQUEST_BYTES}"),
                &format!("max_request_bytes = {value}"),
            );
            assert_ne!(edited, config);
            std::fs::write(&out.config_path, edited).expect("write");
            match load(&out.config_path) {
                Ok(s) => assert!(ok && s.max_request_bytes.to_string() == value, "{value}"),
                Err(e) => assert!(!ok && e.to_string().contains("max_request_bytes"), "{e}"),
            }
        }
        std::fs::write(&out.config_path, &config).expect("write");
        assert_eq!(
            load(&out.config_path).expect("loads").max_connections,
            DEFAULT_MAX_CONNECTIONS
        );
        let edited = config.replace(
            &format!("# max_connections = {DEFAULT_MAX_CONNECTIONS}"),
            "max_connections = 8",
        );
        assert_ne!(edited, config);
        std::fs::write(&out.config_path, edited).expect("write");
        assert_eq!(load(&out.config_path).expect("loads").max_connections, 8);
    }

    /// A self-signed certificate and its key, PEM.
    fn test_pem() -> (String, String) {
        let made =
            rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
        (made.cert.pem(), made.signing_key.serialize_pem())
    }

    #[test]
    fn an_empty_path_is_refused_by_its_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = init(dir.path(), DEFAULT_LISTEN).expect("init");
        let config = std::fs::read_to_string(&out.config_path).expect("config");
        for key in ["master_key_file", "policy_file", "data_dir"] {
            let edited: String = config
                .lines()
                .map(|l| {
                    if l.starts_with(&format!("{key} =")) {
                        format!("{key} = \"\"\n")
                    } else {
                        format!("{l}\n")
                    }
                })
                .collect();
            assert_ne!(edited, config, "{key}");
            std::fs::write(&out.config_path, edited).expect("write");
            let err = load(&out.config_path).expect_err("refused").to_string();
            assert!(err.contains(&format!("{key} = \"\": name a")), "{err}");
        }
    }

    #[test]
    fn settings_that_would_silently_weaken_or_break_things_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = init(dir.path(), DEFAULT_LISTEN).expect("init");
        let config = std::fs::read_to_string(&out.config_path).expect("config");
        for (extra, needle) in [
            ("max_connections = 0\n", "max_connections = 0"),
            ("[audit]\ncheckpoint_every = 0\n", "checkpoint_every = 0"),
            (
                "[audit]\ncheckpoint_interval_secs = 0\n",
                "checkpoint_interval_secs = 0",
            ),
            (
                "[keys]\nschedule_check_secs = 0\n",
                "schedule_check_secs = 0",
            ),
            (
                "[retention]\nsweep_interval_secs = 0\n",
                "sweep_interval_secs = 0",
            ),
            (
                "[retention]\nsweep_max_gap_days = 0\n",
                "sweep_max_gap_days = 0",
            ),
            // Review 31: a huge value quietly turned a safeguard off.
            (
                "max_connections = 9223372036854775807\n",
                "max_connections = 9223372036854775807: must be at most 65536",
            ),
            (
                "[keys]\nschedule_check_secs = 9223372036854775807\n",
                "schedule_check_secs = 9223372036854775807: must be at most 86400",
            ),
            (
                "[keys.rotate_after_days]\nidentity = 4294967295\n",
                "rotate_after_days.identity = 4294967295: must be at most 3650",
            ),
            (
                "[retention]\nsweep_interval_secs = 86401\n",
                "sweep_interval_secs = 86401: must be at most 86400",
            ),
            (
                "[retention]\nsweep_max_gap_days = 4294967295\n",
                "sweep_max_gap_days = 4294967295: must be at most 366",
            ),
            (
                "[retention]\napplicant_max_days = 4294967295\napplicant_consent_max_days = 4294967295\n",
                "applicant_max_days = 4294967295: must be at most 3650",
            ),
            (
                "[retention]\napplicant_consent_purpose = \"talentpool\"\n",
                "applicant_consent_purpose",
            ),
            (
                "[retention]\napplicant_consent_purpose = \"recruitment\"\n",
                "does not rest on consent",
            ),
            (
                "[retention]\napplicant_max_days = 0\n",
                "applicant_max_days = 0",
            ),
            (
                "[tls]\ncert_file = \"a.crt\"\nkey_file = \"a.key\"\nrequire_client_cert = true\n",
                "client_ca_file",
            ),
            (
                "[audit]\ncheckpoint_every = 1000001\n",
                "[audit] checkpoint_every = 1000001: must be at most 1000000",
            ),
            (
                "[audit]\ncheckpoint_interval_secs = 86401\n",
                "[audit] checkpoint_interval_secs = 86401: must be at most 86400",
            ),
            (
                "[audit]\ncheckpoint_every = 9223372036854775807\ncheckpoint_interval_secs = 9223372036854775807\n",
                "must be at most",
            ),
            (
                "[retention]\napplicant_basis = \"\"\n",
                "[retention] applicant_basis is empty",
            ),
            (
                "[keys.rotate_after_days]\nsecrets = 90\n",
                "[keys] rotate_after_days names unknown category `secrets`",
            ),
        ] {
            std::fs::write(&out.config_path, format!("{config}\n{extra}")).expect("write");
            let err = load(&out.config_path).expect_err("refused").to_string();
            assert!(err.contains(needle), "{extra}: {err}");
            // Each names the file it is in.
            assert!(
                err.starts_with(&format!("{}: ", out.config_path.display())),
                "{extra}: {err}"
            );
        }
        for (extra, ok) in [
            ("[audit]\ncheckpoint_every = 1000000\n", true),
            ("[audit]\ncheckpoint_interval_secs = 86400\n", true),
        ] {
            std::fs::write(&out.config_path, format!("{config}\n{extra}")).expect("write");
            assert_eq!(load(&out.config_path).is_ok(), ok, "{extra}");
        }
        // Dev mode refuses a production set-up.
        std::fs::write(&out.config_path, &config).expect("write");
        let err = dev(dir.path(), None, None)
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("kluis.toml") && err.contains("--config"),
            "{err}"
        );
    }

    #[test]
    fn a_broken_dev_tokens_file_is_named_without_quoting_a_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        dev(dir.path(), None, None).expect("first start");
        let path = dir.path().join("keys/dev-tokens.toml");
        let text = std::fs::read_to_string(&path).expect("tokens");
        // A duplicate role line: toml's own message would quote it, token and all.
        let line = text
            .lines()
            .find(|l| l.starts_with("recruiter"))
            .expect("a recruiter line")
            .to_string();
        std::fs::write(&path, format!("{text}{line}\n")).expect("write");
        let err = dev(dir.path(), None, None)
            .expect_err("refused")
            .to_string();
        let token = line.split('"').nth(1).expect("quoted token");
        assert!(!err.contains(token), "{err}");
        assert!(
            err.contains("dev-tokens.toml") && err.contains("line"),
            "{err}"
        );
    }

    fn chmod(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn files_that_decide_who_may_do_what_may_not_be_writable_by_group_or_others() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = init(dir.path(), DEFAULT_LISTEN).expect("init");
        let config = std::fs::read_to_string(&out.config_path).expect("config");
        let schema = dir.path().join("schema.toml");
        std::fs::write(&schema, crate::schema::DEFAULT_SCHEMA_TOML).expect("write");
        std::fs::write(
            &out.config_path,
            config.replace("# schema_file", "schema_file"),
        )
        .expect("write");
        let policy = dir.path().join("policy.toml");
        for (path, what) in [
            (&out.config_path, "configuration file"),
            (&policy, "policy file"),
            (&schema, "schema file"),
        ] {
            // Readable by all is fine (nothing in them is secret).
            chmod(path, 0o644);
            load(&out.config_path).expect("0644 loads");
            for mode in [0o664, 0o646, 0o666] {
                chmod(path, mode);
                let err = load(&out.config_path).expect_err("refused").to_string();
                assert!(
                    err.contains(&format!("{what} {}", path.display()))
                        && err.contains(&format!("mode {mode:o}"))
                        && err.contains(&format!("chmod go-w {}", path.display())),
                    "{err}"
                );
            }
            chmod(path, 0o600);
        }
        load(&out.config_path).expect("loads again");
    }

    #[test]
    fn a_client_ca_file_that_group_or_others_can_write_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = init(dir.path(), DEFAULT_LISTEN).expect("init");
        let config = std::fs::read_to_string(&out.config_path).expect("config");
        std::fs::write(
            &out.config_path,
            format!("{config}\n[tls]\ncert_file = \"server.crt\"\nkey_file = \"server.key\"\nclient_ca_file = \"clients-ca.crt\"\n"),
        )
        .expect("write");
        std::fs::write(dir.path().join("server.crt"), "cert").expect("write");
        let key = dir.path().join("server.key");
        std::fs::write(&key, "key").expect("write");
        chmod(&key, 0o600);
        let ca = dir.path().join("clients-ca.crt");
        std::fs::write(&ca, "ca").expect("write");
        chmod(&ca, 0o666);
        // The CA decides which certificates authenticate as the cert_cn principals: whoever
        // may write it may add their own CA. It should be refused like the policy file.
        assert!(
            load(&out.config_path).is_err(),
            "a world-writable client_ca_file was accepted"
        );
    }

    #[test]
    fn a_tls_private_key_that_group_or_others_can_read_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = init(dir.path(), DEFAULT_LISTEN).expect("init");
        let config = std::fs::read_to_string(&out.config_path).expect("config");
        std::fs::write(
            &out.config_path,
            format!("{config}\n[tls]\ncert_file = \"server.crt\"\nkey_file = \"server.key\"\n"),
        )
        .expect("write");
        let (cert_pem, key_pem) = test_pem();
        std::fs::write(dir.path().join("server.crt"), cert_pem).expect("write");
        let key = dir.path().join("server.key");
        std::fs::write(&key, key_pem).expect("write");
        for mode in [0o644, 0o640, 0o604, 0o620] {
            chmod(&key, mode);
            let err = load(&out.config_path).expect_err("refused").to_string();
            assert!(
                err.contains(&format!(
                    "TLS private key ([tls] key_file) {}",
                    key.display()
                )) && err.contains("accessible by group or others")
                    && err.contains(&format!("mode {mode:o}"))
                    && err.contains(&format!("chmod 600 {}", key.display())),
                "{err}"
            );
        }
        for mode in [0o600, 0o400] {
            chmod(&key, mode);
            load(&out.config_path).expect("a private key loads");
        }
    }

    #[test]
    fn init_and_dev_mode_create_files_that_pass_the_checks() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        let dir = tempfile::tempdir().expect("tempdir");
        // A --dir that does not exist yet: made with its keys/.
        let root = dir.path().join("etc/kluis");
        init(&root, DEFAULT_LISTEN).expect("init");
        for name in [
            "kluis.toml",
            "policy.toml",
            "keys/master.key",
            "keys/audit-signing.key",
        ] {
            assert_eq!(mode(&root.join(name)), 0o600, "{name}");
        }
        // No one else may list the keys (their names and times show when keys were rotated).
        assert_eq!(mode(&root.join("keys")), 0o700);
        let dev_dir = tempfile::tempdir().expect("tempdir");
        dev(dev_dir.path(), None, None).expect("dev");
        assert_eq!(mode(&dev_dir.path().join("keys")), 0o700);
        let tokens = dev_dir.path().join("keys/dev-tokens.toml");
        assert_eq!(mode(&tokens), 0o600);
        chmod(&tokens, 0o644);
        let err = dev(dev_dir.path(), None, None)
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains(&format!("dev tokens file {}", tokens.display()))
                && err.contains("mode 644")
                && err.contains("chmod 600"),
            "{err}"
        );
    }

    #[test]
    fn a_listen_address_must_be_an_ip_address_and_port_and_says_where_it_came_from() {
        for bad in [
            "localhost:50051",
            "127.0.0.1",
            "kluis.internal:443",
            ":50051",
        ] {
            let err = parse_listen(bad, "--listen")
                .expect_err("refused")
                .to_string();
            assert!(
                err.starts_with("--listen: ")
                    && err.contains(&format!("`{bad}` must be an IP address and port"))
                    && err.contains("host names are not resolved")
                    && err.contains("[::1]:50051"),
                "{err}"
            );
        }
        assert!(parse_listen("[::1]:0", "--listen").is_ok());
        let dir = tempfile::tempdir().expect("tempdir");
        let out = init(dir.path(), DEFAULT_LISTEN).expect("init");
        let config = std::fs::read_to_string(&out.config_path).expect("config");
        std::fs::write(
            &out.config_path,
            config.replace(
                "listen = \"127.0.0.1:50051\"",
                "listen = \"localhost:50051\"",
            ),
        )
        .expect("write");
        let err = load(&out.config_path).expect_err("refused").to_string();
        assert!(
            err.starts_with(&format!("{}: listen: ", out.config_path.display()))
                && err.contains("host names are not resolved"),
            "{err}"
        );
        // Refused by init before anything is written.
        let fresh = dir.path().join("fresh");
        let err = init(&fresh, "localhost:50051")
            .err()
            .expect("refused")
            .to_string();
        assert!(err.starts_with("--listen: "), "{err}");
        assert!(!fresh.exists());
    }

    #[test]
    fn a_missing_key_is_named_as_required() {
        let message = |text: &str| {
            let e = toml::from_str::<ConfigFile>(text).expect_err("refused");
            toml_message(&e, text)
        };
        assert_eq!(
            message("policy_file = \"p.toml\"\n"),
            "data_dir: is required"
        );
        assert_eq!(
            message("data_dir = \"d\"\npolicy_file = \"p\"\n[tls]\ncert_file = \"c\"\n"),
            "key_file: is required (in the table at line 3)"
        );
        // Anything else: where, and toml's rule, with no value and no line of the file.
        assert!(message("data_dir = 1\n").contains("line 1"));
        let secret = "fcae8af3bf9ce0680000111122223333444455556666777788889999aaaabbbb";
        for text in [
            format!("master_key = \"{secret}\"\ndata_dir = \"d\"\npolicy_file = \"p\"\n"),
            format!("data_dir = \"d\"\npolicy_file = \"p\"\nmax_connections = \"{secret}\"\n"),
            format!("data_dir = \"d\"\npolicy_file = \"p\"\n[tls\ncert_file = \"{secret}\"\n"),
        ] {
            let m = message(&text);
            assert!(!m.contains("fcae8af3"), "{m}");
            assert!(m.starts_with("TOML error at line "), "{m}");
        }
        assert_eq!(
            message("data_dir = \"d\"\npolicy_file = \"p\"\nmax_connections = \"x\"\n"),
            "TOML error at line 3, column 19: invalid type: string, expected usize"
        );
        // Review 21: an embedded quote, a single-quoted string, a variant, a float.
        for (line, rule) in [
            ("max_connections = 'pass\"wordSECRET'", "invalid type: string, expected usize"),
            ("max_connections = \"pass\\\"wordSECRET\"", "invalid type: string, expected usize"),
            ("max_connections = 77777.5", "invalid type: floating, expected usize"),
            (
                "[retention.former_employee.identity]\nkeep_years = 5\nmax_years = 7\nbasis = \"b\"\ncounts_from = \"SECRETval\"",
                "unknown variant, expected",
            ),
        ] {
            let m = message(&format!("data_dir = \"d\"\npolicy_file = \"p\"\n{line}\n"));
            assert!(!m.contains("SECRET") && !m.contains("77777"), "{m}");
            assert!(m.contains(rule), "{m}");
        }
        // Review 22: a value holding the words serde ends its rule with.
        let m = message(
            "data_dir = \"d\"\npolicy_file = \"p\"\nmax_connections = \"x, expected SECRET\"\n",
        );
        assert!(
            !m.contains("SECRET") && m.ends_with("expected usize"),
            "{m}"
        );
        // A syntax error keeps toml's hint whole.
        let m = message("master_key = fcae8af3\n");
        assert!(m.contains("expected") && !m.contains("fcae8af3"), "{m}");
    }

    #[test]
    fn init_checks_every_file_first_and_says_what_to_do_when_one_exists() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A dangling symbolic link where policy.toml goes: exists() would not see it.
        std::os::unix::fs::symlink("/nonexistent/policy", dir.path().join("policy.toml"))
            .expect("symlink");
        let err = init(dir.path(), DEFAULT_LISTEN)
            .err()
            .expect("refused")
            .to_string();
        // No kluis.toml there: serving is no way out, so it is not suggested (review 9).
        assert!(
            err.contains("policy.toml already exists")
                && !err.contains("kluis serve --config")
                && err.contains("empty --dir"),
            "{err}"
        );
        assert!(!dir.path().join("keys").exists(), "nothing was written");
        // A finished set-up's kluis.toml in the way: serve it, or init elsewhere.
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("kluis.toml"), "").expect("write");
        let err = init(dir.path(), DEFAULT_LISTEN)
            .err()
            .expect("refused")
            .to_string();
        assert!(
            err.contains("kluis.toml already exists")
                && err.contains("kluis serve --config")
                && err.contains("empty --dir"),
            "{err}"
        );
        // The same for a signing key left alone in keys/.
        let dir = tempfile::tempdir().expect("tempdir");
        let signing = dir.path().join("keys").join(crate::audit::SIGNING_KEY_FILE);
        crate::audit::Signer::load_or_create(&signing, true).expect("signing key");
        let err = init(dir.path(), DEFAULT_LISTEN)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("audit-signing.key already exists"), "{err}");
        assert!(!dir.path().join("keys/master.key").exists());
    }

    #[test]
    fn a_failed_init_removes_what_it_created_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let before = dir.path().join("before.txt");
        std::fs::write(&before, "not ours").expect("write");
        let keys = dir.path().join("a/b/keys");
        let mut created = Created::default();
        created.missing_dirs(&keys);
        assert_eq!(
            created.dirs,
            [dir.path().join("a"), dir.path().join("a/b"), keys.clone()]
        );
        crate::keys::create_private_dir_durable(&keys).expect("mkdir");
        let key = keys.join("master.key");
        MasterKey::create_file(&key).expect("key");
        created.files.push(key);
        created.undo();
        assert!(!dir.path().join("a").exists());
        assert!(before.exists());
        // A directory that holds something this run did not write stays.
        let mut created = Created::default();
        created.missing_dirs(&keys);
        crate::keys::create_private_dir_durable(&keys).expect("mkdir");
        std::fs::write(keys.join("other"), "x").expect("write");
        created.undo();
        assert!(keys.join("other").exists());
    }

    #[test]
    fn policy_and_schema_errors_name_their_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = init(dir.path(), DEFAULT_LISTEN).expect("init");
        let config = std::fs::read_to_string(&out.config_path).expect("config");
        let policy_path = dir.path().join("policy.toml");
        let policy = std::fs::read_to_string(&policy_path).expect("policy");
        let schema_path = dir.path().join("schema.toml");
        let schema = crate::schema::DEFAULT_SCHEMA_TOML;
        let refused = |policy_text: &str, schema_text: Option<&str>| {
            std::fs::write(&policy_path, policy_text).expect("write");
            let config = match schema_text {
                Some(text) => {
                    std::fs::write(&schema_path, text).expect("write");
                    config.replace("# schema_file", "schema_file")
                }
                None => config.clone(),
            };
            std::fs::write(&out.config_path, config).expect("write");
            load(&out.config_path).expect_err("refused").to_string()
        };
        let in_policy = |rest: &str| format!("{}: {rest}", policy_path.display());
        let in_schema = |rest: &str| format!("{}: {rest}", schema_path.display());
        let read = "read = [\"contact\", \"personal\", \"cv\"]";
        assert!(policy.contains(read));
        let err = refused(&policy.replacen(read, "reed = [\"contact\"]", 1), None);
        assert!(
            err.starts_with(&in_policy("not valid TOML of the expected shape")),
            "{err}"
        );
        assert!(err.contains("reed"), "{err}");
        let err = refused(&policy.replacen(read, "read = [\"secrets\"]", 1), None);
        assert!(
            err.starts_with(&in_policy(
                "role `recruiter`: read names unknown category `secrets`"
            )),
            "{err}"
        );
        let hash = policy
            .lines()
            .find(|l| l.starts_with("token_sha256"))
            .expect("a token hash");
        let twice =
            format!("{policy}\n[[principals]]\nname = \"again\"\nrole = \"auditor\"\n{hash}\n");
        let err = refused(&twice, None);
        assert!(
            err.starts_with(&in_policy("principal `again`: token hash used twice")),
            "{err}"
        );
        // Schema errors name the schema file.
        let typo = schema.replacen("max_len = 200", "max_len = 200\nsearchabel = true", 1);
        assert_ne!(typo, schema);
        let err = refused(&policy, Some(&typo));
        assert!(
            err.starts_with(&in_schema("field `full_name`: ")) && err.contains("searchabel"),
            "{err}"
        );
        let err = refused(&policy, Some(&schema.replacen("[fields.", "[fieldz.", 1)));
        assert!(
            err.starts_with(&in_schema("not valid TOML of the expected shape")),
            "{err}"
        );
        // A `masked` entry the schema does not know: the policy's error, naming the schema.
        let err = refused(
            &policy.replace(
                "masked = [\"bsn\", \"iban\"]",
                "masked = [\"bsn\", \"ibna\"]",
            ),
            Some(schema),
        );
        assert!(
            err.starts_with(&in_policy("role `privacy_officer`: masked names `ibna`"))
                && err.contains(&format!("({})", schema_path.display())),
            "{err}"
        );
        let err = refused(
            &policy.replace(
                "masked = [\"bsn\", \"iban\"]",
                "masked = [\"bsn\", \"ibna\"]",
            ),
            None,
        );
        assert!(err.contains("(the built-in schema)"), "{err}");
        // Dev mode names the tokens file whose principals it adds.
        let dev_dir = tempfile::tempdir().expect("tempdir");
        dev(dev_dir.path(), None, None).expect("dev");
        let tokens = dev_dir.path().join("keys/dev-tokens.toml");
        let text = std::fs::read_to_string(&tokens).expect("tokens");
        std::fs::remove_file(&tokens).expect("rm");
        crate::keys::write_secret_file(
            &tokens,
            text.replacen("recruiter =", "recruitre =", 1).as_bytes(),
        )
        .expect("write");
        let err = dev(dev_dir.path(), None, None)
            .expect_err("refused")
            .to_string();
        assert!(
            err.starts_with(&format!(
                "{}: principal `dev-recruitre` names undefined role `recruitre`",
                tokens.display()
            )),
            "{err}"
        );
    }

    #[test]
    fn certificate_principals_need_mtls() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = init(dir.path(), DEFAULT_LISTEN).expect("init");
        let config = std::fs::read_to_string(&out.config_path).expect("config");
        let policy_path = dir.path().join("policy.toml");
        let policy = std::fs::read_to_string(&policy_path).expect("policy");
        std::fs::write(
            &policy_path,
            format!("{policy}\n[[principals]]\nname = \"payroll-mtls\"\nrole = \"payroll\"\ncert_cn = \"payroll.example.internal\"\n"),
        )
        .expect("write");
        let (cert_pem, key_pem) = test_pem();
        for name in ["server.crt", "clients-ca.crt"] {
            std::fs::write(dir.path().join(name), &cert_pem).expect("write");
        }
        crate::keys::write_secret_file(&dir.path().join("server.key"), key_pem.as_bytes())
            .expect("key");
        let tls = "[tls]\ncert_file = \"server.crt\"\nkey_file = \"server.key\"\n";
        for extra in ["", tls] {
            std::fs::write(&out.config_path, format!("{config}\n{extra}")).expect("write");
            let err = load(&out.config_path).expect_err("refused").to_string();
            assert!(
                err.starts_with(&format!(
                    "{}: principal `payroll-mtls` authenticates by client certificate (cert_cn = \"payroll.example.internal\")",
                    policy_path.display()
                )) && err.contains("no mTLS ([tls] with client_ca_file)"),
                "{extra}: {err}"
            );
        }
        std::fs::write(
            &out.config_path,
            format!("{config}\n{tls}client_ca_file = \"clients-ca.crt\"\n"),
        )
        .expect("write");
        load(&out.config_path).expect("with mTLS");
    }

    #[test]
    fn non_loopback_without_tls_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = dev(dir.path(), None, None).expect("dev");
        s.listen = "0.0.0.0:50051".parse().expect("addr");
        assert!(s.check_listener().is_err());
        s.allow_insecure_listen = true;
        assert!(s.check_listener().is_ok());
    }
}
