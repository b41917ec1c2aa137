//! Downmix and resampling (placeholder: identity only; replaced by rubato).

use super::AudioError;

pub fn downmix(interleaved: &[f32], channels: usize) -> Vec<f32> {
    if channels <= 1 {
        return interleaved.to_vec();
    }
    interleaved
        .chunks_exact(channels)
        .map(|f| f.iter().sum::<f32>() / channels as f32)
        .collect()
}

pub fn resample(samples: &[f32], from_rate: u32, to_rate: u32) -> Result<Vec<f32>, AudioError> {
    if from_rate == to_rate {
        return Ok(samples.to_vec());
    }
    Err(AudioError::Resample(format!(
        "{from_rate} Hz -> {to_rate} Hz not implemented yet"
    )))
}
