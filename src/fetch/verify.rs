//! Checking a model directory's files against their pins. Hashing a 15 GB
//! checkpoint at every start would be slow, so what was verified is
//! remembered in `.verified.json` beside the files, keyed by each file's size
//! and modification time: a file changed later is hashed again.

use super::catalog::FilePin;
use super::FetchError;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

pub(crate) const STAMP_FILE: &str = ".verified.json";

/// What was seen of one file when it last matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Seen {
    size: u64,
    modified_ns: u128,
    sha256: String,
}

type Stamp = BTreeMap<String, Seen>;

fn size_and_mtime(path: &Path) -> Result<(u64, u128), FetchError> {
    let meta = fs::metadata(path).map_err(|e| FetchError::io(path, e))?;
    let modified_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok((meta.len(), modified_ns))
}

/// SHA-256 of a file as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String, FetchError> {
    let mut file = File::open(path).map_err(|e| FetchError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| FetchError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether to trust what `.verified.json` remembers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recheck {
    /// Hash only files whose size or modification time changed.
    Changed,
    /// Hash every file (`models verify`).
    All,
}

/// The size check alone, before any hashing (and before a download is
/// trusted to be complete).
pub(crate) fn check_size(path: &Path, pin: &FilePin, size: u64) -> Result<(), FetchError> {
    match pin.size {
        Some(want) if want != size => Err(FetchError::Mismatch {
            file: path.to_path_buf(),
            expected: format!("{want} bytes"),
            found: format!("{size} bytes"),
        }),
        _ => Ok(()),
    }
}

/// Compares a file's hash with the pin (or, for a file without one, with
/// what was recorded at its first download).
pub(crate) fn check_hash(
    path: &Path,
    expected: Option<&str>,
    found: &str,
) -> Result<(), FetchError> {
    match expected {
        Some(want) if want != found => Err(FetchError::Mismatch {
            file: path.to_path_buf(),
            expected: format!("SHA-256 {want}"),
            found: format!("SHA-256 {found}"),
        }),
        _ => Ok(()),
    }
}

/// Verifies a cached model directory against `files`. Returns how many
/// files had to be hashed.
pub(crate) fn verify_dir(
    dir: &Path,
    files: &[FilePin],
    recheck: Recheck,
) -> Result<usize, FetchError> {
    let stamp_path = dir.join(STAMP_FILE);
    let old: Stamp = fs::read(&stamp_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mut new = Stamp::new();
    let mut hashed = 0;
    for pin in files {
        let path = dir.join(pin.name);
        if !path.is_file() {
            return Err(FetchError::MissingFile { file: path });
        }
        let (size, modified_ns) = size_and_mtime(&path)?;
        check_size(&path, pin, size)?;
        let recorded = old.get(pin.name);
        let unchanged = recorded.is_some_and(|s| s.size == size && s.modified_ns == modified_ns);
        let expected = pin.sha256.or(recorded.map(|s| s.sha256.as_str()));
        let sha256 = match recorded {
            Some(s) if unchanged && recheck == Recheck::Changed && expected == Some(&s.sha256) => {
                s.sha256.clone()
            }
            _ => {
                hashed += 1;
                let found = sha256_file(&path)?;
                check_hash(&path, expected, &found)?;
                if expected.is_none() {
                    tracing::warn!(file = %path.display(), sha256 = %found, "no pinned hash for this file: recording the one it has now");
                }
                found
            }
        };
        new.insert(
            pin.name.to_string(),
            Seen {
                size,
                modified_ns,
                sha256,
            },
        );
    }
    if new != old {
        // A read-only cache still loads; it is just hashed again next time.
        if let Err(e) = write_stamp(dir, &new) {
            tracing::warn!("cannot remember the verification: {e}");
        }
    }
    Ok(hashed)
}

/// Records hashes that were computed while the files were written.
pub(crate) fn remember(dir: &Path, hashes: &BTreeMap<String, String>) -> Result<(), FetchError> {
    let mut stamp = Stamp::new();
    for (name, sha256) in hashes {
        let (size, modified_ns) = size_and_mtime(&dir.join(name))?;
        stamp.insert(
            name.clone(),
            Seen {
                size,
                modified_ns,
                sha256: sha256.clone(),
            },
        );
    }
    write_stamp(dir, &stamp)
}

fn write_stamp(dir: &Path, stamp: &Stamp) -> Result<(), FetchError> {
    let json = serde_json::to_vec_pretty(stamp).expect("a stamp serialises");
    // Written aside and renamed: a reader never sees half a stamp.
    let tmp = dir.join(format!("{STAMP_FILE}.{}", std::process::id()));
    fs::write(&tmp, json).map_err(|e| FetchError::io(&tmp, e))?;
    fs::rename(&tmp, dir.join(STAMP_FILE)).map_err(|e| FetchError::io(&tmp, e))
}

/// Every regular file in `dir` (not hidden) with its size and SHA-256, for
/// `models info`.
pub fn describe_dir(dir: &Path) -> Result<Vec<(PathBuf, u64, String)>, FetchError> {
    let entries = fs::read_dir(dir).map_err(|e| FetchError::io(dir, e))?;
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    paths.sort();
    let mut out = Vec::with_capacity(paths.len());
    for path in paths {
        let (size, _) = size_and_mtime(&path)?;
        let sha = sha256_file(&path)?;
        out.push((path, size, sha));
    }
    Ok(out)
}
