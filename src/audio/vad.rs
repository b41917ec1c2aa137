//! Voice activity detection with WebRTC's VAD (`webrtc-vad`) on 10, 20 or
//! 30 ms frames of 16 kHz audio, plus each frame's energy (the segmenter
//! cuts over-long segments at the quietest recent frame).

use super::MODEL_SAMPLE_RATE;
use webrtc_vad::{SampleRate, Vad, VadMode};

#[derive(Debug, thiserror::Error)]
pub enum VadError {
    #[error("VAD frames must be 10, 20 or 30 ms, not {0} ms")]
    FrameLength(u32),
    #[error("VAD mode must be 0 (least aggressive) to 3 (most), not {0}")]
    Mode(u8),
}

/// Classification of one frame.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VadFrame {
    pub voiced: bool,
    /// Mean square of the samples.
    pub energy: f32,
}

pub struct VoiceDetector {
    vad: Vad,
    frame_len: usize,
    pcm: Vec<i16>,
}

// SAFETY: `Vad` holds a pointer to a heap-allocated libfvad state that this
// value owns exclusively; libfvad keeps no thread-local or global state, so
// moving the owner to another thread is sound (it is never shared: no Sync).
unsafe impl Send for VoiceDetector {}

impl VoiceDetector {
    pub fn new(mode: u8, frame_ms: u32) -> Result<Self, VadError> {
        if !matches!(frame_ms, 10 | 20 | 30) {
            return Err(VadError::FrameLength(frame_ms));
        }
        let mode = match mode {
            0 => VadMode::Quality,
            1 => VadMode::LowBitrate,
            2 => VadMode::Aggressive,
            3 => VadMode::VeryAggressive,
            m => return Err(VadError::Mode(m)),
        };
        let frame_len = (MODEL_SAMPLE_RATE / 1000 * frame_ms) as usize;
        Ok(Self {
            vad: Vad::new_with_rate_and_mode(SampleRate::Rate16kHz, mode),
            frame_len,
            pcm: Vec::with_capacity(frame_len),
        })
    }

    /// Samples per frame at 16 kHz.
    pub fn frame_len(&self) -> usize {
        self.frame_len
    }

    /// Classifies one frame of exactly `frame_len()` samples.
    pub fn classify(&mut self, frame: &[f32]) -> VadFrame {
        debug_assert_eq!(frame.len(), self.frame_len);
        self.pcm.clear();
        self.pcm.extend(
            frame
                .iter()
                .map(|&s| (s * 32768.0).round().clamp(-32768.0, 32767.0) as i16),
        );
        // The only error is a wrong frame length, which the constructor rules out.
        let voiced = self.vad.is_voice_segment(&self.pcm).unwrap_or(false);
        let energy = frame.iter().map(|s| s * s).sum::<f32>() / frame.len().max(1) as f32;
        VadFrame { voiced, energy }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_is_not_voice_and_bad_settings_are_errors() {
        let mut vad = VoiceDetector::new(3, 30).unwrap();
        assert_eq!(vad.frame_len(), 480);
        let f = vad.classify(&vec![0.0; 480]);
        assert!(!f.voiced);
        assert_eq!(f.energy, 0.0);
        assert!(matches!(
            VoiceDetector::new(2, 25),
            Err(VadError::FrameLength(25))
        ));
        assert!(matches!(VoiceDetector::new(4, 20), Err(VadError::Mode(4))));
    }
}
