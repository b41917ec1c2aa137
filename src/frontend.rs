//! Log-mel frontend shared by Whisper and Step-Audio 2 (formula in
//! docs/architecture.md, "Log-mel frontend").
//!
//! Periodic Hann window of 400, n_fft 400, hop 160, centred STFT with reflect
//! padding, power spectrum, Slaney mel filterbank, `log10(max(mel, 1e-10))`,
//! clamp at (max − 8), `(x + 4) / 4`. The last STFT frame is dropped.
//!
//! Every frame is a pure function of its 400 input samples, so the streaming
//! [`MelStream`] computes bit-identical frames to the one-shot [`MelExtractor`];
//! only the final clamp depends on the whole utterance, and it is applied when a
//! mel is read out (see [`LogMel::from_raw_frames`]).

use realfft::{RealFftPlanner, RealToComplex};
use std::sync::Arc;

pub const SAMPLE_RATE: usize = 16_000;
pub const N_FFT: usize = 400;
pub const HOP_LENGTH: usize = 160;
pub const N_FREQ: usize = N_FFT / 2 + 1;
/// Whisper pads or trims every window to 30 s.
pub(crate) const WHISPER_CHUNK_SAMPLES: usize = 30 * SAMPLE_RATE;
pub const WHISPER_CHUNK_FRAMES: usize = WHISPER_CHUNK_SAMPLES / HOP_LENGTH;
/// Step-Audio 2 appends this many zero samples instead of padding to 30 s.
pub const STEP_AUDIO_TAIL_PADDING: usize = 479;
/// Step-Audio 2 cuts longer audio into pieces of this many samples.
pub(crate) const STEP_AUDIO_PIECE_SAMPLES: usize = 25 * SAMPLE_RATE;

pub(crate) const LOG10_FLOOR: f32 = -10.0; // log10(1e-10)
/// Frames per parallel task of the one-shot computation.
const FRAMES_PER_TASK: usize = 128;

/// Slaney-style mel filterbank as librosa builds it by default (`htk=False`,
/// `norm="slaney"`), row-major `[n_mels, N_FREQ]`, computed in f64.
pub fn mel_filterbank(n_mels: usize) -> Vec<f32> {
    fn hz_to_mel(f: f64) -> f64 {
        let f_sp = 200.0 / 3.0;
        let min_log_hz = 1000.0;
        let min_log_mel = min_log_hz / f_sp;
        let logstep = 6.4f64.ln() / 27.0;
        if f >= min_log_hz {
            min_log_mel + (f / min_log_hz).ln() / logstep
        } else {
            f / f_sp
        }
    }
    fn mel_to_hz(m: f64) -> f64 {
        let f_sp = 200.0 / 3.0;
        let min_log_hz = 1000.0;
        let min_log_mel = min_log_hz / f_sp;
        let logstep = 6.4f64.ln() / 27.0;
        if m >= min_log_mel {
            min_log_hz * (logstep * (m - min_log_mel)).exp()
        } else {
            f_sp * m
        }
    }
    let fmax = SAMPLE_RATE as f64 / 2.0;
    let (mel_lo, mel_hi) = (hz_to_mel(0.0), hz_to_mel(fmax));
    let hz_points: Vec<f64> = (0..n_mels + 2)
        .map(|i| mel_to_hz(mel_lo + (mel_hi - mel_lo) * i as f64 / (n_mels + 1) as f64))
        .collect();
    let fft_freqs: Vec<f64> = (0..N_FREQ)
        .map(|k| k as f64 * SAMPLE_RATE as f64 / N_FFT as f64)
        .collect();
    let mut weights = vec![0f32; n_mels * N_FREQ];
    for m in 0..n_mels {
        let (lo, mid, hi) = (hz_points[m], hz_points[m + 1], hz_points[m + 2]);
        let enorm = 2.0 / (hi - lo);
        for (k, &f) in fft_freqs.iter().enumerate() {
            let rising = (f - lo) / (mid - lo);
            let falling = (hi - f) / (hi - mid);
            let w = rising.min(falling).max(0.0);
            weights[m * N_FREQ + k] = (w * enorm) as f32;
        }
    }
    weights
}

/// One mel filter stored as its non-zero span, since each touches only a few
/// FFT bins and the dense product would dominate the frontend's time.
#[derive(Clone, Debug)]
struct SparseFilter {
    first_bin: usize,
    weights: Vec<f32>,
}

/// Natural log for positive finite f32 without libm, written so the compiler
/// vectorises a loop over it. Error below 1e-7 absolute on the mantissa part.
#[inline(always)]
fn fast_ln(x: f32) -> f32 {
    let bits = x.to_bits();
    // Split x = m * 2^e with m in [sqrt(1/2), sqrt(2)).
    let mut e = ((bits >> 23) & 0xff) as i32 - 127;
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    if m > std::f32::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    // ln(m) = 2 atanh(s), s = (m-1)/(m+1), |s| <= 0.1716: five odd terms reach f32 precision.
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let poly = 1.0 + s2 * (1.0 / 3.0 + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0))));
    2.0 * s * poly + e as f32 * std::f32::consts::LN_2
}

/// Reflect index into `0..len` the way `torch.nn.functional.pad(mode="reflect")`
/// does (edge sample not repeated), bouncing again for very short inputs.
#[inline]
fn reflect_index(i: isize, len: usize) -> usize {
    if len == 1 {
        return 0;
    }
    let period = 2 * (len as isize - 1);
    let mut j = i.rem_euclid(period);
    if j >= len as isize {
        j = period - j;
    }
    j as usize
}

/// Computes log-mel frames; cheap to share between threads and streams.
pub struct MelExtractor {
    n_mels: usize,
    window: Vec<f32>,
    filters: Vec<SparseFilter>,
    fft: Arc<dyn RealToComplex<f32>>,
}

impl std::fmt::Debug for MelExtractor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MelExtractor")
            .field("n_mels", &self.n_mels)
            .finish()
    }
}

/// Per-thread scratch space for the FFT.
struct FrameScratch {
    input: Vec<f32>,
    spectrum: Vec<realfft::num_complex::Complex<f32>>,
    fft_scratch: Vec<realfft::num_complex::Complex<f32>>,
    power: Vec<f32>,
}

impl MelExtractor {
    pub fn new(n_mels: usize) -> Self {
        let dense = mel_filterbank(n_mels);
        let filters = (0..n_mels)
            .map(|m| {
                let row = &dense[m * N_FREQ..(m + 1) * N_FREQ];
                let first = row.iter().position(|&w| w != 0.0).unwrap_or(0);
                let last = row.iter().rposition(|&w| w != 0.0).unwrap_or(0);
                SparseFilter {
                    first_bin: first,
                    weights: row[first..=last.max(first)].to_vec(),
                }
            })
            .collect();
        // Periodic Hann, as torch.hann_window(400) (periodic=True by default).
        let window = (0..N_FFT)
            .map(|n| {
                let phase = 2.0 * std::f64::consts::PI * n as f64 / N_FFT as f64;
                (0.5 - 0.5 * phase.cos()) as f32
            })
            .collect();
        let fft = RealFftPlanner::<f32>::new().plan_fft_forward(N_FFT);
        Self {
            n_mels,
            window,
            filters,
            fft,
        }
    }

    fn scratch(&self) -> FrameScratch {
        FrameScratch {
            input: self.fft.make_input_vec(),
            spectrum: self.fft.make_output_vec(),
            fft_scratch: self.fft.make_scratch_vec(),
            power: vec![0.0; N_FREQ],
        }
    }

    /// Writes the un-normalised `log10` mel of one frame whose 400 samples are
    /// produced by `sample(i)` for `i in 0..N_FFT`.
    #[inline(always)]
    fn frame(&self, scratch: &mut FrameScratch, sample: impl Fn(usize) -> f32, out: &mut [f32]) {
        let mut silent = true;
        for (i, (dst, w)) in scratch.input.iter_mut().zip(&self.window).enumerate() {
            let s = sample(i);
            silent &= s == 0.0;
            *dst = s * w;
        }
        if silent {
            // Zero input has zero power: skip the FFT (Whisper's 30 s padding is mostly this).
            out.fill(LOG10_FLOOR);
            return;
        }
        self.fft
            .process_with_scratch(
                &mut scratch.input,
                &mut scratch.spectrum,
                &mut scratch.fft_scratch,
            )
            .expect("FFT buffers are sized by the plan");
        for (p, c) in scratch.power.iter_mut().zip(&scratch.spectrum) {
            *p = c.re * c.re + c.im * c.im;
        }
        for (o, f) in out.iter_mut().zip(&self.filters) {
            let bins = &scratch.power[f.first_bin..f.first_bin + f.weights.len()];
            let mel: f32 = bins.iter().zip(&f.weights).map(|(p, w)| p * w).sum();
            *o = mel.max(1e-10);
        }
        for o in out.iter_mut() {
            *o = fast_ln(*o) * std::f32::consts::LOG10_E;
        }
    }

    /// Frames `first..first + out.len() / n_mels` of the centred STFT of a
    /// signal of `len` samples read through `sample(i)` (reflect-padded at
    /// both ends), written frame-major into `out`.
    /// Frames `first..first + out.len() / n_mels` of the centred STFT of
    /// `signal` (reflect-padded at both ends), written frame-major into `out`.
    fn frames_into(
        &self,
        signal: &[f32],
        first: usize,
        out: &mut [f32],
        scratch: &mut FrameScratch,
    ) {
        #[cfg(target_arch = "x86_64")]
        if crate::ops::cpu::has_avx2() {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { self.frames_into_avx2(signal, first, out, scratch) };
        }
        self.frames_into_generic(signal, first, out, scratch)
    }

    /// The same loops compiled for AVX2 + FMA (window, power, mel, log).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn frames_into_avx2(
        &self,
        signal: &[f32],
        first: usize,
        out: &mut [f32],
        scratch: &mut FrameScratch,
    ) {
        self.frames_into_generic(signal, first, out, scratch)
    }

    #[inline(always)]
    fn frames_into_generic(
        &self,
        signal: &[f32],
        first: usize,
        out: &mut [f32],
        scratch: &mut FrameScratch,
    ) {
        let len = signal.len();
        for (t, dst) in out.chunks_exact_mut(self.n_mels).enumerate() {
            let start = ((first + t) * HOP_LENGTH) as isize - (N_FFT / 2) as isize;
            if start >= 0 && start as usize + N_FFT <= len {
                let s = &signal[start as usize..start as usize + N_FFT];
                self.frame(scratch, |i| s[i], dst);
            } else {
                self.frame(
                    scratch,
                    |i| signal[reflect_index(start + i as isize, len)],
                    dst,
                );
            }
        }
    }

    /// Un-normalised log10 mel of `signal`, frame-major `[n_frames, n_mels]`,
    /// `n_frames = len / HOP_LENGTH` (the centred STFT's last frame dropped).
    /// Splits the frames across threads when there are enough of them.
    pub fn raw_frames(&self, signal: &[f32]) -> Vec<f32> {
        let n_frames = signal.len() / HOP_LENGTH;
        let mut out = vec![0f32; n_frames * self.n_mels];
        if signal.is_empty() {
            return out;
        }
        if n_frames < 2 * FRAMES_PER_TASK {
            let mut scratch = self.scratch();
            self.frames_into(signal, 0, &mut out, &mut scratch);
            return out;
        }
        // Blocks of frames across rayon's pool (already running for the
        // model), each with its own FFT scratch.
        use rayon::prelude::*;
        out.par_chunks_mut(FRAMES_PER_TASK * self.n_mels)
            .enumerate()
            .for_each(|(i, chunk)| {
                let mut scratch = self.scratch();
                self.frames_into(signal, i * FRAMES_PER_TASK, chunk, &mut scratch);
            });
        out
    }

    /// Whisper's log-mel: audio padded (or trimmed) to 30 s, 3000 frames.
    pub fn whisper(&self, audio: &[f32]) -> LogMel {
        let mut padded = audio[..audio.len().min(WHISPER_CHUNK_SAMPLES)].to_vec();
        padded.resize(WHISPER_CHUNK_SAMPLES, 0.0);
        LogMel::from_raw_frames(self.n_mels, self.raw_frames(&padded))
    }

    /// Whisper's log-mel of `audio` padded to `n_frames` frames with silence
    /// (`n_frames` ≤ 3000); the streaming path uses fewer than 3000 frames.
    pub fn whisper_frames(&self, audio: &[f32], n_frames: usize) -> LogMel {
        let n_samples = n_frames * HOP_LENGTH;
        let mut padded = audio[..audio.len().min(n_samples)].to_vec();
        padded.resize(n_samples, 0.0);
        LogMel::from_raw_frames(self.n_mels, self.raw_frames(&padded))
    }

    /// Step-Audio 2's log-mel of one piece (≤ 25 s): 479 zero samples appended,
    /// no padding to 30 s.
    pub fn step_audio(&self, audio: &[f32]) -> LogMel {
        let mut padded = Vec::with_capacity(audio.len() + STEP_AUDIO_TAIL_PADDING);
        padded.extend_from_slice(audio);
        padded.resize(audio.len() + STEP_AUDIO_TAIL_PADDING, 0.0);
        LogMel::from_raw_frames(self.n_mels, self.raw_frames(&padded))
    }

    /// Step-Audio 2's log-mels of audio of any length: 25 s pieces, each its own mel.
    pub fn step_audio_pieces(&self, audio: &[f32]) -> Vec<LogMel> {
        audio
            .chunks(STEP_AUDIO_PIECE_SAMPLES)
            .map(|piece| self.step_audio(piece))
            .collect()
    }
}

/// A normalised log-mel, mel-major `[n_mels, n_frames]` as the encoders expect.
#[derive(Clone, Debug, PartialEq)]
pub struct LogMel {
    pub n_mels: usize,
    pub n_frames: usize,
    pub data: Vec<f32>,
}

impl LogMel {
    /// Applies the global clamp and scaling to frame-major raw log10 frames and
    /// transposes them to mel-major.
    pub fn from_raw_frames(n_mels: usize, raw: Vec<f32>) -> Self {
        let max = Self::raw_max(&raw);
        Self::from_raw_frames_with_max(n_mels, raw, max)
    }

    /// The maximum of raw frames, which [`LogMel::from_raw_frames`] clamps and
    /// scales them by.
    pub fn raw_max(raw: &[f32]) -> f32 {
        raw.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    }

    /// As [`LogMel::from_raw_frames`] with the clamp set 8 below `max` rather
    /// than below the frames' own maximum.
    pub fn from_raw_frames_with_max(n_mels: usize, raw: Vec<f32>, max: f32) -> Self {
        let n_frames = raw.len() / n_mels;
        let floor = max - 8.0;
        let mut data = vec![0f32; raw.len()];
        for (t, frame) in raw.chunks_exact(n_mels).enumerate() {
            for (m, &v) in frame.iter().enumerate() {
                data[m * n_frames + t] = (v.max(floor) + 4.0) / 4.0;
            }
        }
        Self {
            n_mels,
            n_frames,
            data,
        }
    }
}

/// Incremental log-mel: append samples as they arrive, get each frame as soon
/// as its 400-sample window is complete. Frames equal the one-shot result bit
/// for bit (tested), because both compute each frame from the same samples.
pub struct MelStream {
    extractor: Arc<MelExtractor>,
    samples: Vec<f32>,
    frames_done: usize,
    scratch: FrameScratch,
    /// Every frame emitted so far, frame-major, for [`MelStream::snapshot`].
    emitted: Vec<f32>,
    finished: bool,
}

impl MelStream {
    pub fn new(extractor: Arc<MelExtractor>) -> Self {
        let scratch = extractor.scratch();
        Self {
            extractor,
            samples: Vec::new(),
            frames_done: 0,
            scratch,
            emitted: Vec::new(),
            finished: false,
        }
    }

    /// Samples received so far.
    pub(crate) fn samples(&self) -> &[f32] {
        &self.samples
    }

    /// Frames emitted so far.
    pub fn frames_emitted(&self) -> usize {
        self.frames_done
    }

    /// Appends samples and returns the raw (un-normalised) frames that became
    /// complete, frame-major. A frame is complete once its right edge is inside
    /// the signal; the left reflection needs only samples 1..=200, present by then.
    pub fn push(&mut self, samples: &[f32]) -> Vec<f32> {
        assert!(!self.finished, "MelStream::push after finish");
        self.samples.extend_from_slice(samples);
        let len = self.samples.len();
        // Frame t's window ends at t*HOP + N_FFT/2 (exclusive); it needs that
        // many samples, plus > N_FFT/2 for the left reflection of early frames.
        let ready = if len > N_FFT / 2 {
            (len - N_FFT / 2) / HOP_LENGTH + 1
        } else {
            0
        };
        // The one-shot mel has len/HOP frames; never emit past what the final
        // signal could have (a frame past the end is dropped there).
        self.emit_until(ready)
    }

    /// Declares the end of the signal and returns the remaining frames (those
    /// that needed the right reflection). Total frames = len / HOP_LENGTH.
    pub fn finish(&mut self) -> Vec<f32> {
        let total = self.samples.len() / HOP_LENGTH;
        let out = self.emit_until(total);
        self.finished = true;
        out
    }

    /// Raw frames of the signal `samples[..len]` followed by `tail_zeros`
    /// zero samples, as the one-shot computation would give for that signal,
    /// without changing the stream: frames whose window lies inside
    /// `samples[..len]` are reused, the few that reach into the zero tail are
    /// computed. Frame count = (len + tail_zeros) / HOP_LENGTH.
    pub fn snapshot(&mut self, len: usize, tail_zeros: usize) -> Vec<f32> {
        let len = len.min(self.samples.len());
        let n_mels = self.extractor.n_mels;
        let total = (len + tail_zeros) / HOP_LENGTH;
        // Frames complete within samples[..len] (right edge inside; see push()).
        let reusable = if len > N_FFT / 2 {
            ((len - N_FFT / 2) / HOP_LENGTH + 1)
                .min(self.frames_done)
                .min(total)
        } else {
            0
        };
        let mut out = Vec::with_capacity(total * n_mels);
        out.extend_from_slice(&self.emitted[..reusable * n_mels]);
        if total > reusable {
            // Only the signal from two hops before the first missing frame is
            // needed (frames read 200 samples to the left of their hop); with
            // that offset no frame reaches the reflection at the left edge,
            // unless the segment is shorter than that, when we start at 0.
            let lead = reusable.min(2);
            let from = (reusable - lead) * HOP_LENGTH;
            let mut signal = Vec::with_capacity(len - from + tail_zeros);
            signal.extend_from_slice(&self.samples[from..len]);
            signal.resize(len - from + tail_zeros, 0.0);
            let mut rest = vec![0f32; (total - reusable) * n_mels];
            let first = if from == 0 { reusable } else { lead };
            self.extractor
                .frames_into(&signal, first, &mut rest, &mut self.scratch);
            out.extend_from_slice(&rest);
        }
        out
    }

    fn emit_until(&mut self, end: usize) -> Vec<f32> {
        if end <= self.frames_done {
            return Vec::new();
        }
        let n_mels = self.extractor.n_mels;
        let mut out = vec![0f32; (end - self.frames_done) * n_mels];
        self.extractor
            .frames_into(&self.samples, self.frames_done, &mut out, &mut self.scratch);
        self.frames_done = end;
        self.emitted.extend_from_slice(&out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_mel_uses_the_same_stft() {
        use crate::ops::fast::{DEVICE_MEL_BINS, DEVICE_MEL_HOP, DEVICE_MEL_N_FFT};
        assert_eq!(
            (DEVICE_MEL_N_FFT, DEVICE_MEL_HOP, DEVICE_MEL_BINS),
            (N_FFT, HOP_LENGTH, N_FREQ)
        );
    }

    #[test]
    fn fast_ln_matches_std() {
        let mut x = 1e-10f32;
        while x < 1e6 {
            let (a, b) = (fast_ln(x), x.ln());
            assert!((a - b).abs() < 2e-6, "x={x} fast={a} std={b}");
            x *= 1.137;
        }
    }

    #[test]
    fn reflect_matches_torch_convention() {
        // torch reflect of [0,1,2,3] padded by 2: [2,1,0,1,2,3,2,1]
        let got: Vec<usize> = (-2..6).map(|i| reflect_index(i, 4)).collect();
        assert_eq!(got, vec![2, 1, 0, 1, 2, 3, 2, 1]);
    }

    #[test]
    fn filterbank_rows_are_triangles_with_slaney_area() {
        let fb = mel_filterbank(80);
        for m in 0..80 {
            let row = &fb[m * N_FREQ..(m + 1) * N_FREQ];
            assert!(row.iter().all(|&w| w >= 0.0));
            assert!(row.iter().any(|&w| w > 0.0), "filter {m} is empty");
        }
    }
}
