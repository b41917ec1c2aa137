//! Helpers shared by the integration tests.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(rel: &str) -> PathBuf {
    repo().join("tests/fixtures").join(rel)
}

/// A recording from the repository's `assets/` (see `assets/ATTRIBUTION.md`);
/// `STEPAUDIO_LIVE_SPEECH_DIR` points elsewhere.
pub fn speech(name: &str) -> PathBuf {
    let dir = std::env::var_os("STEPAUDIO_LIVE_SPEECH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("assets"));
    dir.join(name)
}

pub fn load_fixture(rel: &str) -> HashMap<String, Tensor> {
    let p = fixture(rel);
    candle_core::safetensors::load(&p, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", p.display()))
}

pub fn to_vec_f32(t: &Tensor) -> Vec<f32> {
    t.to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// ‖a − b‖ / ‖b‖
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// The real tiny.en weights: `$STEPAUDIO_LIVE_TEST_MODEL` or the cache entry
/// `.ci/run` installs. Missing weights fail the test with instructions.
pub fn model_dir(name: &str) -> PathBuf {
    let var = format!(
        "STEPAUDIO_LIVE_TEST_MODEL_{}",
        name.replace('.', "_").to_uppercase()
    );
    if let Some(p) = std::env::var_os(&var) {
        return PathBuf::from(p);
    }
    let dir = stepaudio_live::fetch::cache_dir().join("models").join(name);
    assert!(
        dir.join("model.bin").is_file() || dir.join("model.safetensors").is_file(),
        "model {name} not found in {} (run `stepaudio-live models fetch {name}` or set {var})",
        dir.display()
    );
    dir
}

pub fn read_audio(path: &Path) -> Vec<f32> {
    stepaudio_live::audio::wav::read_wav_16k_mono(path).unwrap()
}

/// Token ids stored as i64 in a fixture.
pub fn token_ids(t: &Tensor) -> Vec<u32> {
    t.to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

/// The English transcription prompt and no-timestamp options the Whisper
/// fixtures' greedy tokens were made with.
pub fn english_greedy_setup(
    model: &stepaudio_live::model::whisper::WhisperModel,
) -> (
    Vec<u32>,
    stepaudio_live::model::whisper::decoding::DecodingOptions,
) {
    let prompt = model
        .task_tokens(Some("en"), Default::default(), false)
        .unwrap();
    let opts = stepaudio_live::model::whisper::decoding::DecodingOptions {
        timestamps: false,
        ..Default::default()
    };
    (prompt, opts)
}

/// The real tiny.en, int8 decoder weights, loaded once per test binary.
pub fn tiny_en() -> stepaudio_live::model::LoadedModel {
    static MODEL: std::sync::OnceLock<stepaudio_live::model::LoadedModel> =
        std::sync::OnceLock::new();
    MODEL
        .get_or_init(|| {
            let dir = model_dir("tiny.en");
            stepaudio_live::model::LoadedModel::load(
                &dir,
                stepaudio_live::device::DeviceChoice::Cpu,
                None,
                stepaudio_live::model::whisper::DecoderWeights::Int8,
            )
            .expect("tiny.en loads")
        })
        .clone()
}

/// The live pipeline's features of `audio`: raw frames of the audio followed
/// by the recogniser's tail of zeros.
pub fn live_features(
    rec: &dyn stepaudio_live::model::recognizer::Recognizer,
    audio: &[f32],
) -> stepaudio_live::model::recognizer::SegmentFeatures {
    let spec = rec.frontend();
    let mut padded = audio.to_vec();
    padded.resize(audio.len() + spec.tail_zeros, 0.0);
    stepaudio_live::model::recognizer::SegmentFeatures {
        n_mels: spec.n_mels,
        raw_frames: stepaudio_live::frontend::MelExtractor::new(spec.n_mels).raw_frames(&padded),
        samples: audio.len(),
    }
}
