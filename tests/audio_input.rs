//! The `transcribe` command on bad and on unusual (but valid) WAV files.
//! Bad input must end with exit code 2 and a message naming the file; valid
//! files of every sample format, channel count and rate must transcribe.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use stepaudio_live::audio::{resample, wav};
use stepaudio_live::eval::wer::normalize;

fn run_transcribe(files: &[&Path]) -> Output {
    let model = common::model_dir("tiny.en");
    Command::new(env!("CARGO_BIN_EXE_stepaudio-live"))
        .arg("transcribe")
        .arg("--model")
        .arg(&model)
        .args(files)
        .output()
        .expect("cannot run the stepaudio-live binary")
}

fn assert_bad_input(path: &Path, what: &str) {
    let out = run_transcribe(&[path]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{what}: stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    let name = path.file_name().unwrap().to_str().unwrap();
    assert!(
        stderr.contains(name),
        "{what}: message does not name {name}: {stderr}"
    );
    assert!(out.stdout.is_empty(), "{what}: printed a transcript");
}

/// A 16-bit mono WAV of `samples` at `rate`, written by hound.
fn write_pcm16(path: &Path, samples: &[f32], rate: u32) {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for s in samples {
        w.write_sample((s * 32767.0) as i16).unwrap();
    }
    w.finalize().unwrap();
}

#[test]
fn bad_files_exit_with_code_2_and_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let speech = common::read_audio(&common::speech("en_ps_cards_001.wav"));

    let whole = dir.path().join("whole.wav");
    write_pcm16(&whole, &speech, 16_000);
    let bytes = std::fs::read(&whole).unwrap();
    let truncated = dir.path().join("truncated.wav");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert_bad_input(&truncated, "truncated WAV");

    let empty = dir.path().join("empty.wav");
    std::fs::write(&empty, b"").unwrap();
    assert_bad_input(&empty, "empty file");

    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "This is a text file, not audio.\n").unwrap();
    assert_bad_input(&text, "text file");

    let no_samples = dir.path().join("no_samples.wav");
    write_pcm16(&no_samples, &[], 16_000);
    assert_bad_input(&no_samples, "WAV with zero samples");

    assert_bad_input(&dir.path().join("does_not_exist.wav"), "missing path");
}

enum Sample {
    Int(u16),
    Float32,
}

struct Variant {
    name: &'static str,
    format: Sample,
    channels: u16,
    rate: u32,
}

/// Writes `mono` (16 kHz) resampled to `v.rate`, spread over `v.channels`
/// channels with different gains whose mean is the original signal.
fn write_variant(dir: &Path, mono_16k: &[f32], v: &Variant) -> PathBuf {
    let signal = resample::resample(mono_16k, 16_000, v.rate).unwrap();
    let gains: Vec<f32> = match v.channels {
        1 => vec![1.0],
        2 => vec![1.4, 0.6],
        n => (0..n).map(|c| 2.0 * c as f32 / (n - 1) as f32).collect(),
    };
    let (bits, sample_format) = match v.format {
        Sample::Int(bits) => (bits, hound::SampleFormat::Int),
        Sample::Float32 => (32, hound::SampleFormat::Float),
    };
    let spec = hound::WavSpec {
        channels: v.channels,
        sample_rate: v.rate,
        bits_per_sample: bits,
        sample_format,
    };
    let path = dir.join(format!("{}.wav", v.name));
    let mut w = hound::WavWriter::create(&path, spec).unwrap();
    for s in &signal {
        for g in &gains {
            let x = (s * g * 0.7).clamp(-1.0, 1.0);
            match v.format {
                Sample::Float32 => w.write_sample(x).unwrap(),
                Sample::Int(bits) => {
                    let full = ((1i64 << (bits - 1)) - 1) as f32;
                    w.write_sample((x * full).round() as i32).unwrap()
                }
            }
        }
    }
    w.finalize().unwrap();
    path
}

#[test]
fn every_sample_format_channel_count_and_rate_transcribes() {
    let dir = tempfile::tempdir().unwrap();
    let jfk = common::read_audio(&common::speech("en_jfk_ask_not.wav"));
    // The first 8 s hold "… ask not what your country can do for you".
    let clip = &jfk[..8 * 16_000];
    let variants = [
        Variant {
            name: "pcm8_mono_8k",
            format: Sample::Int(8),
            channels: 1,
            rate: 8_000,
        },
        Variant {
            name: "pcm16_stereo_44k1",
            format: Sample::Int(16),
            channels: 2,
            rate: 44_100,
        },
        Variant {
            name: "pcm24_5ch_48k",
            format: Sample::Int(24),
            channels: 5,
            rate: 48_000,
        },
        Variant {
            name: "pcm32_stereo_48k",
            format: Sample::Int(32),
            channels: 2,
            rate: 48_000,
        },
        Variant {
            name: "float32_5ch_44k1",
            format: Sample::Float32,
            channels: 5,
            rate: 44_100,
        },
    ];
    let paths: Vec<PathBuf> = variants
        .iter()
        .map(|v| write_variant(dir.path(), clip, v))
        .collect();
    // The decoder must see what was written, independent of transcription.
    for (v, p) in variants.iter().zip(&paths) {
        let decoded = wav::decode_wav(p).unwrap();
        assert_eq!(
            (decoded.channels, decoded.sample_rate),
            (v.channels, v.rate),
            "{}",
            v.name
        );
        assert_eq!(
            decoded.frames(),
            (clip.len() as u64 * v.rate as u64).div_ceil(16_000) as usize
        );
    }
    // One process for all files: the model loads once.
    let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    let out = run_transcribe(&refs);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), variants.len(), "one line per file: {stdout}");
    for (v, line) in variants.iter().zip(lines) {
        assert!(
            normalize(line).contains("ask not what your country can do for you"),
            "{}: {line}",
            v.name
        );
    }
}
