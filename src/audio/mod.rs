//! Audio in: file decoding, downmixing and resampling to the 16 kHz mono f32
//! stream every model consumes.

pub mod resample;
pub mod ring;
pub mod source;
pub mod vad;
pub mod wav;

/// The sample rate of every model input.
pub const MODEL_SAMPLE_RATE: u32 = 16_000;

#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    #[error("{path}: cannot open")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a readable WAV file: {reason}")]
    NotWav { path: String, reason: String },
    #[error("{path}: unsupported WAV format: {reason}")]
    Unsupported { path: String, reason: String },
    #[error("{path}: truncated WAV data: {reason}")]
    Truncated { path: String, reason: String },
    #[error("{path}: contains no audio: {reason}")]
    Empty { path: String, reason: String },
    #[error("resampler: {0}")]
    Resample(String),
}
