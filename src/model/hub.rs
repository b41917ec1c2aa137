//! Models by name: the cache directory and fetching (placeholder: resolves
//! names already in the cache; fetching is added separately).

use super::ModelError;
use std::path::{Path, PathBuf};

/// `$STEPAUDIO_LIVE_CACHE`, else the platform cache dir + `stepaudio-live`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("STEPAUDIO_LIVE_CACHE") {
        return PathBuf::from(dir);
    }
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("stepaudio-live")
}

/// A directory is used as is; a name is looked up in the cache.
pub fn resolve_model(name_or_dir: &str) -> Result<PathBuf, ModelError> {
    let p = Path::new(name_or_dir);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    let cached = cache_dir().join("models").join(name_or_dir);
    if cached.is_dir() {
        return Ok(cached);
    }
    Err(ModelError::UnknownName {
        name: name_or_dir.to_string(),
        known: "tiny.en, base".into(),
    })
}
