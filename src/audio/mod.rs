//! Audio in: file decoding, downmixing and resampling to the 16 kHz mono f32
//! stream every model consumes.

pub mod resample;
pub mod ring;
pub mod source;
pub mod vad;
pub mod wav;

/// The sample rate of every model input.
pub const MODEL_SAMPLE_RATE: u32 = 16_000;

/// Lowest sample rate accepted from any source (WAV header, `--stdin --rate`,
/// the WebSocket `start` message). Below it a header is a lie or a mistake:
/// a 1 Hz header turns every second of samples into hours of model input.
pub const MIN_SAMPLE_RATE: u32 = 1_000;
/// Highest sample rate accepted from any source; it bounds the resampler's
/// filter (24 × the taps of a 16 kHz filter) and its time per sample.
pub const MAX_SAMPLE_RATE: u32 = 384_000;
/// Most interleaved channels accepted from any source.
pub const MAX_CHANNELS: u16 = 32;
/// Largest magnitude of a float sample (full scale is 1.0): 120 dB over
/// full scale. Beyond it a value is not audio, and its square (the STFT
/// power) would overflow f32.
pub const MAX_FLOAT_SAMPLE: f32 = 1.0e6;

/// Whether `rate` (Hz) is one any source may declare; the reason if not.
pub fn check_sample_rate(rate: u64) -> Result<(), String> {
    if (MIN_SAMPLE_RATE as u64..=MAX_SAMPLE_RATE as u64).contains(&rate) {
        Ok(())
    } else {
        Err(format!(
            "sample rate {rate} Hz is outside {MIN_SAMPLE_RATE}..={MAX_SAMPLE_RATE} Hz"
        ))
    }
}

/// Whether `channels` is a channel count any source may declare; the reason if not.
pub fn check_channels(channels: u64) -> Result<(), String> {
    if (1..=MAX_CHANNELS as u64).contains(&channels) {
        Ok(())
    } else {
        Err(format!("{channels} channels is outside 1..={MAX_CHANNELS}"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    #[error("{path}: cannot open")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: read error")]
    Read {
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
    #[error("{path}: invalid samples: {reason}")]
    BadSamples { path: String, reason: String },
    /// Stream parameters given by the user (`--stdin --rate/--channels`).
    #[error("{source_name}: {reason}")]
    Parameters { source_name: String, reason: String },
    #[error("resampler: {0}")]
    Resample(String),
}
