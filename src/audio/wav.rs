//! WAV decoding (placeholder: 16-bit PCM only; replaced by the full decoder).

use super::{resample, AudioError, MODEL_SAMPLE_RATE};
use std::path::Path;

/// Decoded interleaved samples scaled to [-1, 1].
pub struct DecodedAudio {
    pub samples: Vec<f32>,
    pub channels: u16,
    pub sample_rate: u32,
}

pub fn decode_wav(path: &Path) -> Result<DecodedAudio, AudioError> {
    let p = path.display().to_string();
    let reader = hound::WavReader::open(path).map_err(|e| AudioError::NotWav {
        path: p.clone(),
        reason: e.to_string(),
    })?;
    let spec = reader.spec();
    let samples: Vec<f32> = reader
        .into_samples::<i16>()
        .map(|s| s.map(|v| v as f32 / 32768.0))
        .collect::<Result<_, _>>()
        .map_err(|e| AudioError::Truncated {
            path: p.clone(),
            reason: e.to_string(),
        })?;
    if samples.is_empty() {
        return Err(AudioError::Empty { path: p });
    }
    Ok(DecodedAudio {
        samples,
        channels: spec.channels,
        sample_rate: spec.sample_rate,
    })
}

/// Reads a WAV file as 16 kHz mono f32, the form every model consumes.
pub fn read_wav_16k_mono(path: &Path) -> Result<Vec<f32>, AudioError> {
    let decoded = decode_wav(path)?;
    let mono = resample::downmix(&decoded.samples, decoded.channels as usize);
    resample::resample(&mono, decoded.sample_rate, MODEL_SAMPLE_RATE)
}
