//! Downloading pinned files from a Hugging Face repository at a fixed commit
//! (`{endpoint}/{repo}/resolve/{revision}/{file}`). Each file is written to
//! `FILE.part`, hashed as it arrives and renamed only when its size and
//! SHA-256 match; a `.part` left by an interrupted fetch is resumed with a
//! range request.

use super::catalog::FilePin;
use super::verify::{check_hash, check_size, hex, sha256_file};
use indicatif::ProgressBar;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

/// Seconds without an answer or a byte from the hub before an attempt is
/// given up (`$STEPAUDIO_LIVE_HUB_TIMEOUT`, default 15).
fn hub_timeout() -> Duration {
    std::env::var("STEPAUDIO_LIVE_HUB_TIMEOUT")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(15))
}

/// Attempts per file; each resumes where the last one stopped.
const ATTEMPTS: usize = 3;

/// `$HF_ENDPOINT` (as the hub's own clients honour it), else huggingface.co.
pub fn hub_endpoint() -> String {
    std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "https://huggingface.co".into())
        .trim_end_matches('/')
        .to_string()
}

fn hf_token() -> Option<String> {
    std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty())
}

/// Downloads every file of `files` into `model_dir`; returns their hashes.
pub(crate) fn fetch_from_hub(
    repo: &str,
    revision: &str,
    files: &[FilePin],
    model_dir: &Path,
    bar: &ProgressBar,
) -> Result<BTreeMap<String, String>, String> {
    let endpoint = hub_endpoint();
    let timeout = hub_timeout();
    let agent = ureq::AgentBuilder::new()
        .try_proxy_from_env(true)
        .timeout_connect(timeout)
        .timeout_read(timeout)
        .build();
    let mut hashes = BTreeMap::new();
    for pin in files {
        let url = format!("{endpoint}/{repo}/resolve/{revision}/{}", pin.name);
        let target = model_dir.join(pin.name);
        // Left complete by an earlier attempt (of this or another source).
        if target.is_file() {
            if let Ok(sha) = sha256_file(&target) {
                if pin.sha256.is_none_or(|want| want == sha) {
                    bar.inc(pin.size.unwrap_or(0));
                    hashes.insert(pin.name.to_string(), sha);
                    continue;
                }
            }
            let _ = fs::remove_file(&target);
        }
        let mut last_error = String::new();
        let mut done = None;
        for attempt in 1..=ATTEMPTS {
            let counted = bar.position();
            match download_one(&agent, &url, pin, model_dir, bar, timeout) {
                Ok(sha) => {
                    done = Some(sha);
                    break;
                }
                Err(Failure::Final(e)) => return Err(e),
                Err(Failure::Retry(e)) => {
                    bar.set_position(counted);
                    tracing::warn!(%url, attempt, error = %e, "download interrupted");
                    last_error = e;
                }
            }
        }
        let sha = done.ok_or(last_error)?;
        hashes.insert(pin.name.to_string(), sha);
    }
    Ok(hashes)
}

enum Failure {
    /// Worth another attempt (the connection broke or stalled).
    Retry(String),
    /// Will not get better (HTTP error, wrong content, local I/O).
    Final(String),
}

fn download_one(
    agent: &ureq::Agent,
    url: &str,
    pin: &FilePin,
    model_dir: &Path,
    bar: &ProgressBar,
    timeout: Duration,
) -> Result<String, Failure> {
    let target = model_dir.join(pin.name);
    let part = model_dir.join(format!("{}.part", pin.name));
    let local = |e: std::io::Error| Failure::Final(format!("{}: {e}", part.display()));
    let mut have = fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    if pin.size.is_some_and(|size| have > size) {
        have = 0;
    }
    let mut request = agent.get(url);
    if let Some(token) = hf_token() {
        request = request.set("Authorization", &format!("Bearer {token}"));
    }
    if have > 0 {
        request = request.set("Range", &format!("bytes={have}-"));
    }
    let response = match request.call() {
        Ok(r) => r,
        // The range starts at the end: the part is complete (or wrong).
        Err(ureq::Error::Status(416, _)) if have > 0 => {
            fs::remove_file(&part).map_err(local)?;
            return Err(Failure::Retry(
                "the partial file did not fit the remote one; starting again".into(),
            ));
        }
        Err(ureq::Error::Status(code, _)) => {
            return Err(Failure::Final(format!("{url} answered HTTP {code}")))
        }
        // Unreachable, refused or silent: another attempt would not help.
        Err(ureq::Error::Transport(t)) => {
            let detail = match t.message() {
                Some(m) => format!("{}: {m}", t.kind()),
                None => t.kind().to_string(),
            };
            return Err(Failure::Final(format!(
                "cannot reach {url} (time limit {:.1} s): {detail}",
                timeout.as_secs_f64()
            )));
        }
    };
    let resumed = have > 0 && response.status() == 206;
    let mut hasher = Sha256::new();
    let mut file = if resumed {
        // Hash what is already there, then append.
        let mut old = File::open(&part).map_err(local)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut read = 0u64;
        while read < have {
            let n = old.read(&mut buf).map_err(local)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            read += n as u64;
        }
        bar.inc(have);
        tracing::info!(%url, from = have, "resuming download");
        OpenOptions::new().append(true).open(&part).map_err(local)?
    } else {
        File::create(&part).map_err(local)?
    };
    let mut written = if resumed { have } else { 0 };
    let mut body = response.into_reader();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                file.flush().map_err(local)?;
                return Err(Failure::Retry(format!("{url}: {e} after {written} bytes")));
            }
        };
        file.write_all(&buf[..n]).map_err(local)?;
        hasher.update(&buf[..n]);
        written += n as u64;
        bar.inc(n as u64);
        if pin.size.is_some_and(|size| written > size) {
            drop(file);
            let _ = fs::remove_file(&part);
            return Err(Failure::Final(format!(
                "{url}: more than the pinned {} bytes",
                pin.size.unwrap_or(0)
            )));
        }
    }
    file.sync_all().map_err(local)?;
    drop(file);
    if pin.size.is_some_and(|size| written < size) {
        return Err(Failure::Retry(format!(
            "{url}: the connection closed after {written} of {} bytes",
            pin.size.unwrap_or(0)
        )));
    }
    let sha = hex(&hasher.finalize());
    let checked =
        check_size(&part, pin, written).and_then(|()| check_hash(&target, pin.sha256, &sha));
    if let Err(e) = checked {
        let _ = fs::remove_file(&part);
        return Err(Failure::Final(e.to_string()));
    }
    fs::rename(&part, &target).map_err(local)?;
    Ok(sha)
}
