//! Downmixing and band-limited resampling to the model rate.
//!
//! Resampling is rubato's windowed-sinc interpolator. Two things are added
//! around it: the filter is sized at the *lower* of the two rates (so the
//! anti-aliasing transition band stays narrow when downsampling from 48 kHz),
//! and the output is aligned in time: output sample `m` is the input signal
//! evaluated at time `m / to_rate`, with no filter delay and no sub-sample
//! shift. [`resample`] is [`StreamResampler`] fed in one piece, so streaming
//! and offline conversion give identical samples.

use super::{check_sample_rate, AudioError};
use rubato::{
    calculate_cutoff, Resampler, SincFixedIn, SincInterpolationParameters, SincInterpolationType,
    WindowFunction,
};

/// Averages the channels of interleaved frames (a trailing partial frame is dropped).
pub fn downmix(interleaved: &[f32], channels: usize) -> Vec<f32> {
    let mut out = Vec::new();
    downmix_into(interleaved, channels, &mut out);
    out
}

/// [`downmix`] into a buffer the caller reuses: `out` is cleared first.
pub fn downmix_into(interleaved: &[f32], channels: usize, out: &mut Vec<f32>) {
    out.clear();
    if channels <= 1 {
        out.extend_from_slice(interleaved);
        return;
    }
    let scale = 1.0 / channels as f32;
    out.extend(
        interleaved
            .chunks_exact(channels)
            .map(|frame| frame.iter().sum::<f32>() * scale),
    );
}

/// Resamples a whole mono signal; the result has `ceil(len · to / from)` samples.
pub fn resample(samples: &[f32], from_rate: u32, to_rate: u32) -> Result<Vec<f32>, AudioError> {
    let mut resampler = StreamResampler::new(from_rate, to_rate)?;
    let mut out = Vec::with_capacity(output_len(samples.len() as u64, from_rate, to_rate) as usize);
    resampler.push_with(samples, |block| out.extend_from_slice(block))?;
    resampler.flush_with(|block| out.extend_from_slice(block))?;
    Ok(out)
}

/// Number of output samples at times `m / to` that fall inside `n / from` seconds.
pub fn output_len(input_len: u64, from_rate: u32, to_rate: u32) -> u64 {
    (input_len * to_rate as u64).div_ceil(from_rate as u64)
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Filter length in taps at the lower of the two rates. 512 keeps the
/// passband flat to ~0.95 of the output Nyquist frequency with a stopband
/// below −100 dB (squared Blackman–Harris window).
const FILTER_TAPS_AT_LOWER_RATE: usize = 512;
const WINDOW: WindowFunction = WindowFunction::BlackmanHarris2;
/// Above this many filter phases per input sample, the exact polyphase table
/// gets large; cubic interpolation between 256 phases is used instead.
const MAX_EXACT_PHASES: u64 = 1024;
const INTERPOLATED_PHASES: usize = 256;
/// Most entries (taps × phases) of the filter table, 16 MiB of f32: exact
/// phases that would need more (a long downsampling filter with many
/// phases) fall back to interpolated ones. rubato builds the table in one
/// allocation, with a window and a copy of the same size beside it.
pub const MAX_FILTER_TABLE: usize = 1 << 22;
/// Input frames per rubato call: 10 ms, so a live source is not held back
/// longer than that before its output appears (plus half the filter).
const CHUNK_SECONDS_RECIPROCAL: u32 = 100;
const MIN_CHUNK: usize = 64;

/// Converts a mono stream from one sample rate to another. Push chunks of
/// any size; output comes out as soon as the filter has seen enough input;
/// `flush` pads the end and emits the rest. The output never depends on how
/// the input was split, because rubato always runs on fixed-size chunks.
pub struct StreamResampler {
    from_rate: u32,
    to_rate: u32,
    engine: Option<Engine>,
    /// Real (not lead-in) input samples pushed since the start or last flush.
    input_seen: u64,
    /// Output samples handed to the caller since the start or last flush.
    output_emitted: u64,
}

struct Engine {
    sinc: SincFixedIn<f32>,
    chunk: usize,
    /// Input waiting for a full chunk.
    pending: Vec<f32>,
    /// rubato's output for one chunk, allocated once.
    scratch: Vec<Vec<f32>>,
    /// Zeros put in front of the signal and the outputs they shift in; see [`alignment`].
    lead_in_zeros: usize,
    drop_outputs: usize,
    /// Leading outputs still to drop in the current stream.
    to_drop: usize,
}

/// rubato's output `n` is the input evaluated at time `(n + 1)·t − 1 + 1/F`
/// (in input samples; `t = from/to`, `F` the number of filter phases), a
/// consequence of where its first output lands and how its phase table is
/// indexed. Putting `P` zeros in front and dropping the first `k` outputs
/// moves output `k` to time 0 when `t − 1 + 1/F + k·t = P`. For rational
/// ratios with `F` = the reduced denominator a `k < F` makes this exact; for
/// interpolated phases the best `k` leaves a residue far below one sample.
fn alignment(step: f64, phases: usize) -> (usize, usize, f64) {
    let offset = step - 1.0 + 1.0 / phases as f64;
    let mut best = (0usize, offset.ceil().max(0.0) as usize, f64::INFINITY);
    for k in 0..phases.max(1) {
        let shift = offset + k as f64 * step;
        let zeros = shift.round();
        let residue = (shift - zeros).abs();
        if zeros >= 0.0 && residue < best.2 - 1e-9 {
            best = (k, zeros as usize, residue);
            if residue < 1e-9 {
                break;
            }
        }
    }
    best
}

impl StreamResampler {
    /// Both rates must pass [`check_sample_rate`]: the filter's size and
    /// the work per sample grow with their ratio.
    pub fn new(from_rate: u32, to_rate: u32) -> Result<Self, AudioError> {
        for rate in [from_rate, to_rate] {
            check_sample_rate(rate as u64).map_err(|reason| {
                AudioError::Resample(format!("{from_rate} Hz -> {to_rate} Hz: {reason}"))
            })?;
        }
        let engine = if from_rate == to_rate {
            None
        } else {
            Some(Engine::new(from_rate, to_rate)?)
        };
        Ok(Self {
            from_rate,
            to_rate,
            engine,
            input_seen: 0,
            output_emitted: 0,
        })
    }

    pub fn from_rate(&self) -> u32 {
        self.from_rate
    }

    pub fn to_rate(&self) -> u32 {
        self.to_rate
    }

    /// Feeds input; `sink` receives every block of output that is ready.
    /// Does not allocate after construction.
    pub fn push_with(
        &mut self,
        input: &[f32],
        mut sink: impl FnMut(&[f32]),
    ) -> Result<(), AudioError> {
        self.input_seen += input.len() as u64;
        let emitted = &mut self.output_emitted;
        let mut counted = |block: &[f32]| {
            *emitted += block.len() as u64;
            sink(block);
        };
        match &mut self.engine {
            None => {
                if !input.is_empty() {
                    counted(input);
                }
                Ok(())
            }
            Some(engine) => engine.push(input, &mut counted),
        }
    }

    /// Feeds input and returns the output that became ready.
    pub fn push(&mut self, input: &[f32]) -> Result<Vec<f32>, AudioError> {
        let mut out = Vec::new();
        self.push_with(input, |block| out.extend_from_slice(block))?;
        Ok(out)
    }

    /// Ends the stream: emits the remaining output so that the total is
    /// `ceil(inputs · to / from)` samples, then starts a fresh stream.
    pub fn flush_with(&mut self, mut sink: impl FnMut(&[f32])) -> Result<(), AudioError> {
        let total = output_len(self.input_seen, self.from_rate, self.to_rate);
        if let Some(engine) = &mut self.engine {
            let mut remaining = total.saturating_sub(self.output_emitted);
            // Each zero chunk yields about chunk·to/from outputs; the tail
            // needs only half a filter length, so a few rounds always suffice.
            let mut rounds = 0;
            while remaining > 0 {
                rounds += 1;
                if rounds > 64 {
                    return Err(AudioError::Resample(format!(
                        "flush produced no output ({remaining} samples missing)"
                    )));
                }
                let zeros = engine.chunk - engine.pending.len();
                engine.pad_zeros(zeros, &mut |block: &[f32]| {
                    let take = (remaining as usize).min(block.len());
                    if take > 0 {
                        sink(&block[..take]);
                        remaining -= take as u64;
                    }
                })?;
            }
            engine.restart()?;
        }
        self.input_seen = 0;
        self.output_emitted = 0;
        Ok(())
    }

    /// [`flush_with`](Self::flush_with) collecting the output.
    pub fn flush(&mut self) -> Result<Vec<f32>, AudioError> {
        let mut out = Vec::new();
        self.flush_with(|block| out.extend_from_slice(block))?;
        Ok(out)
    }
}

impl Engine {
    fn new(from_rate: u32, to_rate: u32) -> Result<Self, AudioError> {
        let (from, to) = (from_rate as u64, to_rate as u64);
        let ratio = to_rate as f64 / from_rate as f64;
        let reduced_denominator = to / gcd(from, to);
        // rubato measures the filter at the input rate and scales the cutoff
        // by the ratio when downsampling; lengthen it by the same factor.
        let taps = if ratio < 1.0 {
            (FILTER_TAPS_AT_LOWER_RATE as f64 / ratio).ceil() as usize
        } else {
            FILTER_TAPS_AT_LOWER_RATE
        };
        let (phases, interpolation) = if reduced_denominator <= MAX_EXACT_PHASES
            && taps as u64 * reduced_denominator <= MAX_FILTER_TABLE as u64
        {
            (reduced_denominator as usize, SincInterpolationType::Nearest)
        } else {
            (INTERPOLATED_PHASES, SincInterpolationType::Cubic)
        };
        // Holds for every rate pair that passes `check_sample_rate`.
        if taps * phases > MAX_FILTER_TABLE {
            return Err(AudioError::Resample(format!(
                "{from_rate} Hz -> {to_rate} Hz needs a filter of {taps} taps × {phases} phases"
            )));
        }
        let params = SincInterpolationParameters {
            sinc_len: taps,
            f_cutoff: calculate_cutoff(FILTER_TAPS_AT_LOWER_RATE, WINDOW),
            oversampling_factor: phases,
            interpolation,
            window: WINDOW,
        };
        let chunk = MIN_CHUNK.max((from_rate / CHUNK_SECONDS_RECIPROCAL) as usize);
        let sinc = SincFixedIn::<f32>::new(ratio, 1.0, params, chunk, 1)
            .map_err(|e| AudioError::Resample(format!("{from_rate} Hz -> {to_rate} Hz: {e}")))?;
        let scratch = sinc.output_buffer_allocate(true);
        let (drop_outputs, lead_in_zeros, residue) =
            alignment(from_rate as f64 / to_rate as f64, phases);
        tracing::debug!(
            from_rate,
            to_rate,
            taps,
            phases,
            chunk,
            drop_outputs,
            lead_in_zeros,
            residue,
            "resampler"
        );
        let mut engine = Self {
            sinc,
            chunk,
            pending: Vec::with_capacity(chunk),
            scratch,
            lead_in_zeros,
            drop_outputs,
            to_drop: 0,
        };
        engine.restart()?;
        Ok(engine)
    }

    fn restart(&mut self) -> Result<(), AudioError> {
        self.sinc.reset();
        self.pending.clear();
        self.to_drop = self.drop_outputs;
        self.pad_zeros(self.lead_in_zeros, &mut |_| {
            debug_assert!(false, "lead-in zeros produce only dropped outputs")
        })
    }

    fn push(&mut self, mut input: &[f32], sink: &mut dyn FnMut(&[f32])) -> Result<(), AudioError> {
        while !input.is_empty() {
            let take = (self.chunk - self.pending.len()).min(input.len());
            self.pending.extend_from_slice(&input[..take]);
            input = &input[take..];
            if self.pending.len() == self.chunk {
                self.run_chunk(sink)?;
            }
        }
        Ok(())
    }

    fn pad_zeros(
        &mut self,
        mut count: usize,
        sink: &mut dyn FnMut(&[f32]),
    ) -> Result<(), AudioError> {
        while count > 0 {
            let take = (self.chunk - self.pending.len()).min(count);
            self.pending.resize(self.pending.len() + take, 0.0);
            count -= take;
            if self.pending.len() == self.chunk {
                self.run_chunk(sink)?;
            }
        }
        Ok(())
    }

    fn run_chunk(&mut self, sink: &mut dyn FnMut(&[f32])) -> Result<(), AudioError> {
        let (_, produced) = self
            .sinc
            .process_into_buffer(&[&self.pending[..]], &mut self.scratch, None)
            .map_err(|e| AudioError::Resample(e.to_string()))?;
        self.pending.clear();
        let skip = self.to_drop.min(produced);
        self.to_drop -= skip;
        if produced > skip {
            sink(&self.scratch[0][skip..produced]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn sine(freq: f64, rate: u32, seconds: f64, amplitude: f64) -> Vec<f32> {
        let n = (seconds * rate as f64) as usize;
        (0..n)
            .map(|i| {
                (amplitude * (2.0 * std::f64::consts::PI * freq * i as f64 / rate as f64).sin())
                    as f32
            })
            .collect()
    }

    fn rms(x: &[f32]) -> f64 {
        (x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / x.len() as f64).sqrt()
    }

    /// Frequency (Hz) of the strongest DFT bin of one second of signal.
    fn peak_frequency(one_second: &[f32]) -> usize {
        let mut planner = realfft::RealFftPlanner::<f32>::new();
        let fft = planner.plan_fft_forward(one_second.len());
        let mut input = one_second.to_vec();
        let mut spectrum = fft.make_output_vec();
        fft.process(&mut input, &mut spectrum).unwrap();
        spectrum
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.norm().total_cmp(&b.1.norm()))
            .unwrap()
            .0
    }

    /// The middle of the output, away from the edges where the filter sees
    /// the step from silence.
    fn steady(x: &[f32]) -> &[f32] {
        &x[2000..x.len() - 2000]
    }

    #[test]
    fn tone_keeps_frequency_amplitude_and_phase() {
        for from in [44_100, 48_000, 8_000, 22_050, 11_025, 96_000, 44_101] {
            let input = sine(1000.0, from, 2.0, 0.5);
            let out = resample(&input, from, 16_000).unwrap();
            assert_eq!(out.len(), 32_000, "{from} Hz");
            assert_eq!(peak_frequency(&out[8000..24_000]), 1000, "{from} Hz");
            let gain_db = 20.0 * (rms(steady(&out)) / rms(&input)).log10();
            assert!(gain_db.abs() < 1.0, "{from} Hz: gain {gain_db} dB");
            // Sample m is the tone at time m / 16 kHz: no delay, no sub-sample shift.
            let ideal = sine(1000.0, 16_000, 2.0, 0.5);
            let worst = steady(&out)
                .iter()
                .zip(steady(&ideal))
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(worst < 1e-3, "{from} Hz: off the ideal tone by {worst}");
        }
    }

    #[test]
    fn passband_edge_kept_and_aliases_rejected() {
        let out_db = |freq: f64| {
            let input = sine(freq, 48_000, 1.0, 0.5);
            let out = resample(&input, 48_000, 16_000).unwrap();
            20.0 * (rms(steady(&out)) / rms(&input)).log10()
        };
        let kept = out_db(7_500.0);
        assert!(kept.abs() < 1.0, "7.5 kHz changed by {kept} dB");
        // 10 kHz is above the 8 kHz output Nyquist and would alias to 6 kHz.
        let rejected = out_db(10_000.0);
        assert!(rejected < -40.0, "10 kHz only attenuated by {rejected} dB");
    }

    #[test]
    fn upsampling_does_not_create_images() {
        // 3 kHz at 8 kHz → 16 kHz: the image at 5 kHz must not appear.
        let out = resample(&sine(3000.0, 8_000, 2.0, 0.5), 8_000, 16_000).unwrap();
        assert_eq!(peak_frequency(&out[8000..24_000]), 3000);
        let ideal = sine(3000.0, 16_000, 2.0, 0.5);
        let residual: Vec<f32> = steady(&out)
            .iter()
            .zip(steady(&ideal))
            .map(|(a, b)| a - b)
            .collect();
        assert!(rms(&residual) < 1e-3 * rms(steady(&ideal)));
    }

    #[test]
    fn streaming_in_random_chunks_equals_one_shot() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for from in [44_100u32, 48_000, 8_000, 22_050, 44_101] {
            let input: Vec<f32> = (0..from as usize * 2 + 333)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let one_shot = resample(&input, from, 16_000).unwrap();
            let mut stream = StreamResampler::new(from, 16_000).unwrap();
            let mut streamed = Vec::new();
            let mut rest = &input[..];
            while !rest.is_empty() {
                let n = rng.random_range(0..3000).min(rest.len());
                let ready = stream.push(&rest[..n]).unwrap();
                streamed.extend(ready);
                rest = &rest[n..];
                // Output may lag the input only by the filter and one chunk.
                let lag = (input.len() - rest.len()) as f64 * 16_000.0 / from as f64
                    - streamed.len() as f64;
                assert!(lag < 700.0, "{from} Hz: output lags by {lag} samples");
            }
            streamed.extend(stream.flush().unwrap());
            assert_eq!(streamed.len(), one_shot.len(), "{from} Hz");
            let worst = streamed
                .iter()
                .zip(&one_shot)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(worst <= 1e-5, "{from} Hz: streamed differs by {worst}");
            // After flush the resampler starts over and gives the same again.
            let again: Vec<f32> = [stream.push(&input).unwrap(), stream.flush().unwrap()].concat();
            assert_eq!(again, one_shot);
        }
    }

    #[test]
    fn output_length_is_input_length_times_ratio() {
        for (n, from, to, want) in [
            (44_100usize, 44_100u32, 16_000u32, 16_000usize),
            (1, 48_000, 16_000, 1),
            (4, 48_000, 16_000, 2),
            (3, 8_000, 16_000, 6),
            (0, 44_100, 16_000, 0),
            (12_345, 22_050, 16_000, 8958),
            (1000, 16_000, 16_000, 1000),
        ] {
            let out = resample(&vec![0.1; n], from, to).unwrap();
            assert_eq!(out.len(), want, "{n} samples {from} -> {to}");
        }
    }

    #[test]
    fn rates_outside_the_limits_are_errors() {
        for (from, to) in [
            (0, 16_000),
            (1, 16_000),
            (999, 16_000),
            (384_001, 16_000),
            (2_147_483_647, 16_000),
            (16_000, 0),
            (16_000, u32::MAX),
        ] {
            assert!(
                matches!(StreamResampler::new(from, to), Err(AudioError::Resample(_))),
                "{from} -> {to}"
            );
        }
    }

    #[test]
    fn filter_tables_stay_bounded_at_the_extreme_rates() {
        // The slowest and the longest filters allowed; rates prime to 16 kHz
        // get interpolated phases, the others exact ones under the bound.
        for from in [1_000, 1_001, 383_999, 384_000, 383_984, 352_800, 11_025] {
            let mut r = StreamResampler::new(from, 16_000).unwrap();
            let one_second = vec![0.25; from as usize];
            let out: Vec<f32> = [r.push(&one_second).unwrap(), r.flush().unwrap()].concat();
            assert_eq!(out.len(), 16_000, "{from} Hz");
            assert!(
                (out[8_000] - 0.25).abs() < 1e-3,
                "{from} Hz: {}",
                out[8_000]
            );
        }
    }

    #[test]
    fn downmix_is_the_mean_of_channels() {
        assert_eq!(downmix(&[1.0, 0.0, -1.0, 0.5, 0.5, 0.5], 3), vec![0.0, 0.5]);
        assert_eq!(downmix(&[0.25, -0.5], 1), vec![0.25, -0.5]);
    }
}
