//! Whisper as a live [`Recognizer`]: each segment is one window decoded
//! without timestamps, conditioned on the text of the previous finals.
//!
//! The decoder always sees a 30 s window, the segment padded with silence,
//! as in training: shorter windows wreck tiny.en (`examples/
//! context_experiment.rs`, English eval clips of ≤ 8 s: WER 11.4 % at 30 s,
//! 15.2 % at 20 s, 95.6 % at 10 s; the decoder loops). But most of a live
//! segment's window is padding, and the padding's encoder states hardly
//! depend on the audio before it. So by default only the audio's positions
//! plus 0.5 s are encoded; the rest, and their cross-attention keys and
//! values, come from a padding-only window at the same level, computed once
//! per level (`WhisperModel::encode_fresh`). Same clips, 2 s margin:
//! identical WER, the encoder 517 → 139 ms median. `--full-window` turns it
//! off.
//!
//! Segments end at every pause, and Whisper hears a segment's first words
//! without the speech before them (sonnet headings "3. Look in thy glass"
//! became "Three. Looking like last"). With `--carry-audio S` the previous
//! final segment, if it is at most S s long and held text, is put in front
//! of the new one and its final text forced; only what follows is the new
//! segment's hypothesis. Its encoder states are computed once, after its
//! final is out, and reused in front of the new audio
//! (`WhisperModel::encode_after`), all but its last second, which is
//! encoded again with the new audio.
//!
//! A partial of a growing segment reuses the last partial's encoder states
//! the same way: all of the segment's audio but its last second is kept
//! from the partial before, and only what follows is encoded (attending to
//! the kept states), so a partial's encoder work is bounded by the audio
//! since the last partial, not the segment's length. Finals and pause
//! decodes (which may become finals) encode the whole segment;
//! `--full-partials` turns the bounding off.

use super::decoder::CrossAttention;
use super::decoding::{DecodedWindow, DecodingOptions, WindowJob};
use super::encoder::HEAD_CONTEXT;
use super::{EncodedAudio, SilentWindows, Task, WhisperModel};
use crate::frontend::{LogMel, LOG10_FLOOR, N_FFT, WHISPER_CHUNK_FRAMES};
use crate::model::recognizer::{FrontendSpec, Hypothesis, Recognizer, SegmentFeatures};
use crate::model::ModelError;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Encoder positions (0.5 s) computed past the end of the audio when the
/// padding's states are reused. With none, tiny.en's streaming WER on the
/// eval set once rose from 12.26 % to 14.76 % (hallucinated "you" on
/// noise), with 100 it was 12.46 %; since the no-speech rule below catches
/// those, unpaced WER with 0 / 25 / 50 / 100 is 10.47 / 10.37 / 10.77 /
/// 10.77 %, and every position costs encoder time in each decode.
const FRESH_MARGIN: usize = 25;

/// A segment whose no-speech probability is above this is silence whatever
/// the log-probability of its text. Whisper's own rule (no-speech > 0.6 and
/// mean log-prob < -1) is made for 30 s windows of audio; a VAD segment of
/// noise is a short blip in a window of padding, and tiny.en decodes it as
/// a confident "you" (no-speech 0.79–0.93, mean log-prob -0.58 to -0.90 on
/// the eval set) while short real words ("um", "and") stayed at ≤ 0.70.
const NO_SPEECH_ALONE: f64 = 0.75;

/// A segment up to this many level steps (1.0 in log10) louder than the
/// stream's level is normalised with the stream's level. The level only
/// sets the floor of the log-mel (8 below it) and the padding's value, so
/// this changes nothing but the quietest frames; per-segment levels met a
/// new padding window (a full encoder pass, ≈ 0.6 s) in 2–11 segments of
/// every eval recording.
const LEVEL_RISE_STEPS: i32 = 4;
/// A speech segment this many steps (2.0) quieter lowers the stream's level.
const LEVEL_FALL_STEPS: i32 = 8;

/// Whether a decoded segment is silence: Whisper's rule (no-speech above
/// 0.6 and mean log-probability below -1), or no-speech above
/// [`NO_SPEECH_ALONE`].
fn is_silence(no_speech_prob: f64, avg_logprob: f64) -> bool {
    no_speech_prob > 0.6 && (avg_logprob < -1.0 || no_speech_prob > NO_SPEECH_ALONE)
}

/// Positions (1 s) at the end of the carried segment that are encoded again
/// with the new audio rather than reused, so the two meet in both
/// directions. With none, the new segment's first words were dropped
/// after a short carried heading ("Three." then "and tell the face" for
/// "Look in thy glass and tell the face"); unpaced eval WER 10.97 % with
/// none, 10.77 % with 50 or 100, 10.37 % re-encoding all of it.
const HEAD_OVERLAP: usize = 50;

/// Positions (1 s) at the end of a partial's audio that the next partial
/// encodes again with its new audio rather than reusing them (as
/// [`HEAD_OVERLAP`], for the same reason).
const OPEN_OVERLAP: usize = HEAD_OVERLAP;

/// The largest log-mel value of a segment (what sets its padding level).
fn segment_max(raw_frames: &[f32]) -> f32 {
    raw_frames.iter().copied().fold(LOG10_FLOOR, f32::max)
}

/// The mel frames the padding shortcut reads for `fresh` positions: the
/// audio's, then silence (log10 of 1e-10, as the one-shot mel), normalised
/// at padding level `key`.
fn padded_mel(
    n_mels: usize,
    raw_frames: &[f32],
    audio_frames: usize,
    fresh: usize,
    key: i32,
) -> LogMel {
    let frames = (2 * fresh + 4).min(WHISPER_CHUNK_FRAMES);
    let mut raw = raw_frames[..audio_frames.min(frames) * n_mels].to_vec();
    raw.resize(frames * n_mels, LOG10_FLOOR);
    LogMel::from_raw_frames_with_max(n_mels, raw, SilentWindows::level_max(key))
}

/// The last final segment, decoded again in front of the next one.
struct CarriedSegment {
    raw_frames: Vec<f32>,
    tokens: Vec<u32>,
    /// Its states encoded alone (padding shortcut only), made after the final.
    encoded: Option<EncodedAudio>,
}

/// The open segment's encoder states from its last partial, for the next
/// partial to put in front of its new audio.
struct OpenHead {
    /// Raw values of the audio in front of the segment in the window it was
    /// made for (the carried segment's; 0: none).
    front: usize,
    /// The segment's raw frames that the kept states read: a later decode of
    /// the same segment begins with them.
    read: Vec<f32>,
    /// The window's first positions, up to [`OPEN_OVERLAP`] before the end
    /// of that partial's audio.
    states: EncodedAudio,
}

pub(crate) struct WhisperRecognizer {
    model: Arc<WhisperModel>,
    task_tokens: Vec<u32>,
    /// Text tokens of the finals so far (the prompt keeps the most recent).
    context: Vec<u32>,
    condition_on_previous: bool,
    /// Encode only the audio's positions plus this many (see
    /// [`WhisperModel::encode_fresh`]); `None`: the whole 30 s window.
    fresh_margin: Option<usize>,
    /// Longest previous segment (in mel frames) carried into the next decode.
    carry_frames: usize,
    carried: Option<CarriedSegment>,
    /// Padding level (a [`SilentWindows`] key) of the stream's speech so far.
    level: Option<i32>,
    /// Whether partials reuse the last partial's states ([`OpenHead`]; with
    /// the padding shortcut only).
    bound_partials: bool,
    open: Option<OpenHead>,
}

impl WhisperRecognizer {
    pub fn new(
        model: Arc<WhisperModel>,
        language: Option<&str>,
        task: Task,
        reuse_padding: bool,
        carry_seconds: f64,
        bound_partials: bool,
    ) -> Result<Self, ModelError> {
        let task_tokens = model.task_tokens(language.or(Some("en")), task, false)?;
        Ok(Self {
            model,
            task_tokens,
            context: Vec::new(),
            condition_on_previous: true,
            fresh_margin: reuse_padding.then_some(FRESH_MARGIN),
            carry_frames: (carry_seconds.max(0.0) * 100.0) as usize,
            carried: None,
            level: None,
            bound_partials: bound_partials && reuse_padding,
            open: None,
        })
    }

    /// How a segment padded to 30 s is encoded, after `head` (states of its
    /// first positions, reused) when given; with `keep` past the head, the
    /// states of the first `keep` positions are kept too (see
    /// [`WhisperModel::encode_after`]).
    fn plan_encode(
        &self,
        n_mels: usize,
        raw_frames: &[f32],
        head: Option<EncodedAudio>,
        keep: usize,
    ) -> WindowEncode {
        let target = WHISPER_CHUNK_FRAMES;
        let audio_frames = (raw_frames.len() / n_mels).min(target);
        let max = segment_max(raw_frames);
        let room = target / 2 - head.as_ref().map_or(0, EncodedAudio::positions);
        let fresh = match (self.fresh_margin, &head) {
            (Some(m), Some(_)) => Some((audio_frames.div_ceil(2) + m).min(room)),
            (Some(m), None) => Some(audio_frames.div_ceil(2) + m).filter(|&f| f < target / 2),
            (None, _) => None,
        };
        match fresh {
            Some(fresh) => {
                let key = head.as_ref().map_or_else(|| self.level_for(max), |h| h.key);
                WindowEncode::After {
                    mel: padded_mel(n_mels, raw_frames, audio_frames, fresh, key),
                    fresh,
                    key,
                    head,
                    keep,
                }
            }
            None => {
                let mut raw = raw_frames[..audio_frames * n_mels].to_vec();
                raw.resize(target * n_mels, LOG10_FLOOR);
                WindowEncode::Full(LogMel::from_raw_frames_with_max(n_mels, raw, max))
            }
        }
    }

    /// The carried segment's audio to encode alone (with the padding
    /// shortcut on), if it still waits for that: its padded log-mel, the
    /// positions to keep, the positions encoded and the padding level.
    fn carried_job(&self) -> Option<(LogMel, usize, usize, i32)> {
        let (Some(margin), Some(level)) = (self.fresh_margin, self.level) else {
            return None;
        };
        let n_mels = self.model.config.n_mels;
        let carried = self.carried.as_ref().filter(|c| c.encoded.is_none())?;
        let audio_frames = carried.raw_frames.len() / n_mels;
        let positions = audio_frames.div_ceil(2);
        let fresh = positions + margin;
        let mel = padded_mel(n_mels, &carried.raw_frames, audio_frames, fresh, level);
        Some((mel, positions, fresh, level))
    }

    /// Encodes the carried segment alone, once, for the decodes that put it
    /// in front of the next segment. Whether it encoded anything.
    fn encode_carried(&mut self) -> Result<bool, ModelError> {
        let Some((mel, positions, fresh, level)) = self.carried_job() else {
            return Ok(false);
        };
        let encoded = self.model.encode_head(&mel, positions, fresh, level)?;
        if let Some(carried) = self.carried.as_mut() {
            carried.encoded = Some(encoded);
        }
        Ok(true)
    }

    /// [`Recognizer::after_final`] of several streams at once: their carried
    /// segments through the encoder together ([`WhisperModel::encode_heads`]:
    /// grouped on a GPU), each as it would be alone on the CPU. Result `i` is
    /// stream `i`'s; a failed batch fails each stream that had work in it
    /// (which the stream's next decode redoes).
    pub(crate) fn after_final_batch(recognizers: &mut [&mut Self]) -> Vec<Result<(), ModelError>> {
        let Some(model) = recognizers.first().map(|r| r.model.clone()) else {
            return Vec::new();
        };
        if recognizers.iter().any(|r| !Arc::ptr_eq(&r.model, &model)) {
            return recognizers.iter_mut().map(|r| r.after_final()).collect();
        }
        let t = Instant::now();
        let work: Vec<Option<(LogMel, usize, usize, i32)>> =
            recognizers.iter().map(|r| r.carried_job()).collect();
        let jobs: Vec<super::HeadJob<'_>> = work
            .iter()
            .flatten()
            .map(|(mel, positions, fresh, key)| super::HeadJob {
                mel,
                positions: *positions,
                fresh: *fresh,
                key: *key,
            })
            .collect();
        if jobs.is_empty() {
            return recognizers.iter().map(|_| Ok(())).collect();
        }
        let encoded = model.encode_heads(&jobs);
        let n = jobs.len();
        drop(jobs);
        let mut encoded = match encoded {
            Ok(e) => e.into_iter(),
            Err(e) => {
                return work
                    .iter()
                    .map(|w| match w {
                        Some(_) => Err(ModelError::Invalid(format!(
                            "encoding {n} carried segments together failed: {e}"
                        ))),
                        None => Ok(()),
                    })
                    .collect()
            }
        };
        for (r, w) in recognizers.iter_mut().zip(&work) {
            if let (Some(_), Some(carried)) = (w, r.carried.as_mut()) {
                carried.encoded = encoded.next();
            }
        }
        if tracing::enabled!(tracing::Level::DEBUG) {
            let _ = model.device.synchronize();
            tracing::debug!(
                segments = n,
                ms = t.elapsed().as_secs_f64() * 1e3,
                "carried segments encoded after their finals"
            );
        }
        recognizers.iter().map(|_| Ok(())).collect()
    }

    fn has_words(&self, tokens: &[u32]) -> bool {
        self.model
            .tokenizer
            .decode_text(tokens)
            .chars()
            .any(char::is_alphanumeric)
    }

    /// The padding level for a segment whose log-mel maximum is `max`: the
    /// stream's, unless the segment is much louder. Quieter segments (noise
    /// blips) keep the stream's level, so their noise is not stretched over
    /// the full range the model expects of speech.
    fn level_for(&self, max: f32) -> i32 {
        let own = SilentWindows::level_key(max);
        match self.level {
            Some(level) if own <= level + LEVEL_RISE_STEPS => level,
            _ => own,
        }
    }

    /// Follows the level of committed speech (segments that decoded to text).
    fn track_level(&mut self, features: &SegmentFeatures) {
        let own = SilentWindows::level_key(segment_max(&features.raw_frames));
        self.level = match self.level {
            Some(level) if own <= level + LEVEL_RISE_STEPS && own > level - LEVEL_FALL_STEPS => {
                Some(level)
            }
            _ => Some(own),
        };
    }

    /// Plans the segment's window: its encoding, after the carried segment
    /// if given, and its prompt. A `partial` puts the open segment's states
    /// from its last partial in front of the new audio where they fit, and
    /// keeps the states of this one's for the next ([`PreparedWindow::open`]).
    fn plan_window(
        &self,
        features: &SegmentFeatures,
        carried: Option<&CarriedSegment>,
        prefix: &[u32],
        partial: bool,
    ) -> Result<WindowPlan, ModelError> {
        let n_mels = features.n_mels;
        let front: &[f32] = carried.map_or(&[], |c| &c.raw_frames);
        // The segment's own frames unless the carried ones go in front.
        let joined: std::borrow::Cow<[f32]> = if front.is_empty() {
            (&features.raw_frames[..]).into()
        } else {
            [front, features.raw_frames.as_slice()].concat().into()
        };
        // The carried states serve if they were made at the new audio's level.
        let carried_head = carried
            .and_then(|c| c.encoded.as_ref())
            .filter(|h| h.key == self.level_for(segment_max(&features.raw_frames)));
        let key = carried_head.map_or_else(|| self.level_for(segment_max(&joined)), |h| h.key);
        let positions = (joined.len() / n_mels).div_ceil(2);
        let bounded = partial && self.bound_partials;
        let open = self.open.as_ref().filter(|o| {
            bounded
                && o.front == front.len()
                && o.states.key == key
                && o.states.positions() < positions
                && features.raw_frames.starts_with(&o.read)
        });
        let head = match (open, carried_head) {
            (Some(o), _) => Some(o.states.narrow(o.states.positions())?),
            // The carried segment's last positions are encoded again with
            // the new audio, so the two meet in both directions.
            (None, Some(h)) => Some(h.narrow(h.positions() - HEAD_OVERLAP.min(h.positions()))?),
            (None, None) => None,
        };
        let kept = head.as_ref().map_or(0, EncodedAudio::positions);
        let keep = if bounded && self.fresh_margin.is_some() {
            positions.saturating_sub(OPEN_OVERLAP)
        } else {
            0
        };
        let context = kept.min(HEAD_CONTEXT);
        let from = (2 * (kept - context) * n_mels).min(joined.len());
        let encode = self.plan_encode(n_mels, &joined[from..], head, keep);
        // Position p reads frames up to 2p + 2.
        let read = (2 * keep + 2).saturating_sub(front.len() / n_mels) * n_mels;
        let carried_tokens: &[u32] = carried.map_or(&[], |c| &c.tokens);
        // Carried text is forced, so the prompt stops before it.
        let conditioning: &[u32] = if self.condition_on_previous {
            &self.context[..self.context.len().saturating_sub(carried_tokens.len())]
        } else {
            &[]
        };
        let (prompt, sot_index) = self.model.build_prompt(conditioning, &self.task_tokens);
        Ok(WindowPlan {
            encode,
            front: front.len(),
            read: features.raw_frames[..read.min(features.raw_frames.len())].to_vec(),
            prompt,
            sot_index,
            forced: [carried_tokens, prefix].concat(),
            carried_tokens: carried_tokens.len(),
            max_new_tokens: max_new_tokens(features.samples),
        })
    }

    /// The segment's own result from its decoded window: the carried text
    /// removed, and the no-speech rule applied to a segment decoded alone
    /// (with carried speech in the window the no-speech probability says
    /// nothing about the new audio).
    fn finish_window(
        prepared: &PreparedWindow,
        mut window: DecodedWindow,
        prefix: &[u32],
    ) -> DecodedWindow {
        window.tokens.drain(..prepared.carried_tokens);
        let silent =
            prepared.carried_tokens == 0 && is_silence(window.no_speech_prob, window.avg_logprob);
        // A segment the model itself calls silence keeps only what was already committed.
        if silent && prefix.is_empty() {
            window.tokens.clear();
        }
        window
    }

    /// The carried segment, when it and the new one fit one window.
    fn carried_for(&self, features: &SegmentFeatures) -> Option<&CarriedSegment> {
        self.carried.as_ref().filter(|c| {
            (c.raw_frames.len() + features.raw_frames.len()) / features.n_mels.max(1)
                <= WHISPER_CHUNK_FRAMES - 2 * FRESH_MARGIN
        })
    }

    /// After carried text tiny.en sometimes ends the transcript at once
    /// (nothing, or a full stop) though the new segment holds speech ("And
    /// I think" lost): such a segment is then decoded alone.
    fn needs_decoding_alone(
        &self,
        with_carried: bool,
        window: &DecodedWindow,
        prefix: &[u32],
    ) -> bool {
        with_carried && !self.has_words(&window.tokens[prefix.len()..])
    }

    /// [`Recognizer::decode`], or for a `partial` [`Recognizer::decode_partial`].
    fn decode_segment(
        &mut self,
        features: &SegmentFeatures,
        prefix: &[u32],
        partial: bool,
    ) -> Result<Hypothesis, ModelError> {
        let t0 = Instant::now();
        self.encode_carried()?;
        let mut encode_time = t0.elapsed();
        let opts = live_decoding();
        let decode_window = |carried, encode_time: &mut Duration| -> Result<_, ModelError> {
            let t = Instant::now();
            let plan = self.plan_window(features, carried, prefix, partial)?;
            let encoded = encode_windows(&self.model, &[&plan.encode]).remove(0)?;
            let mut prepared = plan.prepared(encoded);
            *encode_time += t.elapsed();
            let window = self
                .model
                .greedy_decode_batch(&[prepared.job()], &opts)?
                .remove(0);
            Ok((
                Self::finish_window(&prepared, window, prefix),
                prepared.open.take(),
            ))
        };
        let carried = self.carried_for(features);
        let (mut window, mut open) = decode_window(carried, &mut encode_time)?;
        if self.needs_decoding_alone(carried.is_some(), &window, prefix) {
            (window, open) = decode_window(None, &mut encode_time)?;
        }
        if open.is_some() {
            self.open = open;
        }
        Ok(self.hypothesis(window, t0, encode_time))
    }

    fn hypothesis(&self, window: DecodedWindow, t0: Instant, encode_time: Duration) -> Hypothesis {
        let tokens = window.tokens;
        Hypothesis {
            text: self.model.tokenizer.decode_text(&tokens),
            tokens,
            no_speech_prob: Some(window.no_speech_prob),
            avg_logprob: window.avg_logprob,
            encode_time,
            decode_time: t0.elapsed().saturating_sub(encode_time),
        }
    }
}

/// How a window is encoded ([`WhisperRecognizer::plan_encode`]).
enum WindowEncode {
    /// The padding shortcut, after the states of a head when given (a job of
    /// [`WhisperModel::encode_after_batch`]).
    After {
        mel: LogMel,
        fresh: usize,
        key: i32,
        head: Option<EncodedAudio>,
        keep: usize,
    },
    /// The whole 30 s window.
    Full(LogMel),
}

/// Each window's cross-attention (and kept head, see [`WhisperModel::encode_after`]):
/// the padding-shortcut ones encoded as one batch (a failure of that batch fails
/// each of them), whole windows one by one.
fn encode_windows(
    model: &WhisperModel,
    windows: &[&WindowEncode],
) -> Vec<Result<(CrossAttention, Option<EncodedAudio>), ModelError>> {
    let jobs: Vec<super::AfterJob<'_>> = windows
        .iter()
        .filter_map(|w| match w {
            WindowEncode::After {
                mel,
                fresh,
                key,
                head,
                keep,
            } => Some(super::AfterJob {
                mel,
                fresh: *fresh,
                key: *key,
                head: head.as_ref(),
                keep: *keep,
            }),
            WindowEncode::Full(_) => None,
        })
        .collect();
    let mut batched = match model.encode_after_batch(&jobs) {
        Ok(done) => done.into_iter().map(Ok).collect::<Vec<_>>(),
        Err(e) => jobs
            .iter()
            .map(|_| {
                Err(ModelError::Invalid(format!(
                    "batched encoder of {} windows failed: {e}",
                    jobs.len()
                )))
            })
            .collect(),
    }
    .into_iter();
    windows
        .iter()
        .map(|w| match w {
            WindowEncode::After { .. } => batched.next().expect("one result per job"),
            WindowEncode::Full(mel) => {
                let encoded = model.encode(mel)?;
                Ok((model.cross_attention(&encoded)?, None))
            }
        })
        .collect()
}

/// A segment's window before it is encoded ([`WhisperRecognizer::plan_window`]).
struct WindowPlan {
    encode: WindowEncode,
    /// Raw values of the carried audio in front, and the segment's raw
    /// frames that a kept head reads ([`OpenHead`]).
    front: usize,
    read: Vec<f32>,
    prompt: Vec<u32>,
    sot_index: usize,
    forced: Vec<u32>,
    carried_tokens: usize,
    max_new_tokens: usize,
}

impl WindowPlan {
    /// The window once encoded (`encoded`: its cross-attention and kept head).
    fn prepared(self, (cross, kept): (CrossAttention, Option<EncodedAudio>)) -> PreparedWindow {
        let (front, read) = (self.front, self.read);
        PreparedWindow {
            cross,
            prompt: self.prompt,
            sot_index: self.sot_index,
            forced: self.forced,
            carried_tokens: self.carried_tokens,
            max_new_tokens: self.max_new_tokens,
            open: kept.map(|states| OpenHead {
                front,
                read,
                states,
            }),
        }
    }
}

/// A segment's window, encoded and ready for greedy decoding.
struct PreparedWindow {
    cross: CrossAttention,
    prompt: Vec<u32>,
    sot_index: usize,
    /// The carried segment's text, then the forced prefix.
    forced: Vec<u32>,
    carried_tokens: usize,
    max_new_tokens: usize,
    /// A partial's encoder states for the next partial of its segment.
    open: Option<OpenHead>,
}

impl PreparedWindow {
    fn job(&self) -> WindowJob<'_> {
        WindowJob {
            cross: &self.cross,
            prompt: &self.prompt,
            sot_index: self.sot_index,
            forced: &self.forced,
            max_new_tokens: self.max_new_tokens,
        }
    }
}

/// Tokens a segment of `samples` (16 kHz) may add: 16 plus 8 per second,
/// far above speech (English runs at about 3 tokens a second), so only a
/// decode stuck in a loop is cut — tiny.en repeats "word word …" until the
/// 224-token limit on `en_mfa_words`, and every partial of that segment
/// cost ≈ 2 s of model time, stalling the other streams.
fn max_new_tokens(samples: usize) -> usize {
    16 + (8 * samples).div_ceil(16_000)
}

/// Live decodes never sample timestamps.
fn live_decoding() -> DecodingOptions {
    DecodingOptions {
        timestamps: false,
        ..Default::default()
    }
}

/// A stream's progress through a batched decode.
struct BatchSlot {
    t0: Instant,
    encode_time: Duration,
    /// The window to encode next.
    plan: Option<WindowPlan>,
    /// The window being decoded (and whether it has the carried segment).
    prepared: Option<PreparedWindow>,
    window: Option<DecodedWindow>,
    error: Option<ModelError>,
}

impl WhisperRecognizer {
    /// Several streams' segments in one batch (see [`crate::model::batch`]):
    /// every stream's window is planned on its own (its padding level,
    /// carried audio and kept states are its own), the windows are encoded
    /// as one batch ([`encode_windows`]), then every window is decoded greedily in
    /// one [`WhisperModel::greedy_decode_batch`]; windows that must be
    /// decoded again without the carried segment go through a second batch.
    /// Streams of another model are decoded one by one.
    pub(crate) fn decode_batch(
        requests: &mut [crate::model::batch::FamilyRequest<'_, Self>],
    ) -> Vec<Result<Hypothesis, ModelError>> {
        let model = requests[0].recognizer.model.clone();
        if requests
            .iter()
            .any(|r| !Arc::ptr_eq(&r.recognizer.model, &model))
        {
            return requests
                .iter_mut()
                .map(|r| {
                    let mut req = crate::model::batch::BatchRequest {
                        recognizer: &mut *r.recognizer,
                        features: r.features,
                        prefix: r.prefix,
                        commit: r.commit,
                        partial: r.partial,
                    };
                    crate::model::batch::decode_one(&mut req)
                })
                .collect();
        }
        let mut carried_encodes = 0usize;
        let mut slots: Vec<BatchSlot> = requests
            .iter_mut()
            .map(|r| {
                let t0 = Instant::now();
                let mut slot = BatchSlot {
                    t0,
                    encode_time: Duration::ZERO,
                    plan: None,
                    prepared: None,
                    window: None,
                    error: None,
                };
                let rec = &mut *r.recognizer;
                let plan = rec.encode_carried().and_then(|encoded| {
                    carried_encodes += usize::from(encoded);
                    let carried = rec.carried_for(r.features);
                    rec.plan_window(r.features, carried, r.prefix, r.partial)
                });
                slot.encode_time = t0.elapsed();
                match plan {
                    Ok(p) => slot.plan = Some(p),
                    Err(e) => slot.error = Some(e),
                }
                slot
            })
            .collect();
        let debug = tracing::enabled!(tracing::Level::DEBUG);
        // Stage times: wait for the kernels of each stage before reading the clock.
        let planned = if debug {
            let _ = model.device.synchronize();
            slots[0].t0.elapsed()
        } else {
            Duration::ZERO
        };
        encode_planned(&model, &mut slots);
        if debug {
            let _ = model.device.synchronize();
            tracing::debug!(
                windows = slots.len(),
                carried = carried_encodes,
                plan_ms = planned.as_secs_f64() * 1e3,
                encode_ms = slots[0].t0.elapsed().as_secs_f64() * 1e3,
                "encoded a batch"
            );
        }
        decode_prepared(&model, &mut slots, requests);
        // Second round: windows with carried text that came out without words.
        for (slot, r) in slots.iter_mut().zip(requests.iter()) {
            let (Some(p), Some(w)) = (&slot.prepared, &slot.window) else {
                continue;
            };
            if r.recognizer
                .needs_decoding_alone(p.carried_tokens > 0, w, r.prefix)
            {
                slot.window = None;
                slot.prepared = None;
                match r
                    .recognizer
                    .plan_window(r.features, None, r.prefix, r.partial)
                {
                    Ok(p) => slot.plan = Some(p),
                    Err(e) => slot.error = Some(e),
                }
            }
        }
        encode_planned(&model, &mut slots);
        decode_prepared(&model, &mut slots, requests);
        slots
            .into_iter()
            .zip(requests.iter_mut())
            .map(|(slot, r)| {
                if let Some(e) = slot.error {
                    return Err(e);
                }
                if let Some(open) = slot.prepared.and_then(|p| p.open) {
                    r.recognizer.open = Some(open);
                }
                let window = slot
                    .window
                    .expect("every slot without an error was decoded");
                let hypothesis = r.recognizer.hypothesis(window, slot.t0, slot.encode_time);
                if r.commit {
                    r.recognizer.commit(r.features, &hypothesis)?;
                }
                Ok(hypothesis)
            })
            .collect()
    }
}

/// Encodes the planned windows of the slots as one batch ([`encode_windows`]);
/// each slot is charged the batch's encoder time.
fn encode_planned(model: &WhisperModel, slots: &mut [BatchSlot]) {
    let t = Instant::now();
    let planned: Vec<usize> = (0..slots.len())
        .filter(|&i| slots[i].plan.is_some())
        .collect();
    if planned.is_empty() {
        return;
    }
    let plans: Vec<WindowPlan> = planned
        .iter()
        .map(|&i| slots[i].plan.take().expect("planned"))
        .collect();
    let windows: Vec<&WindowEncode> = plans.iter().map(|p| &p.encode).collect();
    let encoded = encode_windows(model, &windows);
    drop(windows);
    let took = t.elapsed();
    for ((&i, plan), encoded) in planned.iter().zip(plans).zip(encoded) {
        let slot = &mut slots[i];
        slot.encode_time += took;
        match encoded {
            Ok(e) => slot.prepared = Some(plan.prepared(e)),
            Err(e) => slot.error = Some(e),
        }
    }
}

/// Decodes, as one batch, every slot that has a prepared window and no
/// decoded one yet; a failed batch fails each of them.
fn decode_prepared(
    model: &WhisperModel,
    slots: &mut [BatchSlot],
    requests: &[crate::model::batch::FamilyRequest<'_, WhisperRecognizer>],
) {
    let waiting: Vec<usize> = (0..slots.len())
        .filter(|&i| slots[i].window.is_none() && slots[i].error.is_none())
        .collect();
    if waiting.is_empty() {
        return;
    }
    let jobs: Vec<WindowJob<'_>> = waiting
        .iter()
        .map(|&i| slots[i].prepared.as_ref().expect("prepared").job())
        .collect();
    match model.greedy_decode_batch(&jobs, &live_decoding()) {
        Ok(windows) => {
            drop(jobs);
            for (&i, window) in waiting.iter().zip(windows) {
                let prepared = slots[i].prepared.as_ref().expect("prepared");
                let window = WhisperRecognizer::finish_window(prepared, window, requests[i].prefix);
                slots[i].window = Some(window);
            }
        }
        Err(e) => {
            drop(jobs);
            for &i in &waiting {
                slots[i].error = Some(ModelError::Invalid(format!(
                    "batched decode of {} windows failed: {e}",
                    waiting.len()
                )));
            }
        }
    }
}

impl Recognizer for WhisperRecognizer {
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn name(&self) -> String {
        format!(
            "whisper-{}L-{}d",
            self.model.config.decoder_layers, self.model.config.d_model
        )
    }

    fn frontend(&self) -> FrontendSpec {
        // N_FFT zeros reach every frame that overlaps the audio; later frames are silence.
        FrontendSpec {
            n_mels: self.model.config.n_mels,
            tail_zeros: N_FFT,
        }
    }

    fn max_segment_seconds(&self) -> f64 {
        30.0
    }

    fn decode(
        &mut self,
        features: &SegmentFeatures,
        prefix: &[u32],
    ) -> Result<Hypothesis, ModelError> {
        self.decode_segment(features, prefix, false)
    }

    fn decode_partial(
        &mut self,
        features: &SegmentFeatures,
        prefix: &[u32],
    ) -> Result<Hypothesis, ModelError> {
        self.decode_segment(features, prefix, true)
    }

    fn commit(
        &mut self,
        features: &SegmentFeatures,
        hypothesis: &Hypothesis,
    ) -> Result<(), ModelError> {
        self.context.extend_from_slice(&hypothesis.tokens);
        if !hypothesis.tokens.is_empty() {
            self.track_level(features);
        }
        self.open = None;
        // Only text-bearing segments short enough are carried; noise is not.
        self.carried = (!hypothesis.tokens.is_empty() && features.n_frames() <= self.carry_frames)
            .then(|| CarriedSegment {
                raw_frames: features.raw_frames.clone(),
                tokens: hypothesis.tokens.clone(),
                encoded: None,
            });
        // The prompt only ever uses the most recent half-context of tokens.
        let keep = self.model.decoder.n_text_ctx() / 2;
        if self.context.len() > 2 * keep {
            self.context.drain(..self.context.len() - keep);
        }
        Ok(())
    }

    fn after_final(&mut self) -> Result<(), ModelError> {
        Self::after_final_batch(&mut [self]).remove(0)
    }

    fn detokenize(&self, tokens: &[u32]) -> String {
        self.model.tokenizer.decode_text(tokens)
    }

    fn starts_word(&self, token: u32) -> bool {
        self.model.tokenizer.decode_text(&[token]).starts_with(' ')
    }

    fn reset_context(&mut self) {
        self.context.clear();
        self.carried = None;
        self.level = None;
        self.open = None;
    }
}

#[cfg(test)]
mod tests {
    use super::is_silence;

    #[test]
    fn silence_rule_separates_the_eval_sets_noise_from_short_words() {
        // (no-speech, mean log-prob) of finals on the eval set, tiny.en.
        for (ns, lp) in [
            (0.885, -1.224),
            (0.914, -0.900),
            (0.930, -0.601),
            (0.791, -0.872),
        ] {
            assert!(is_silence(ns, lp), "noise decoded as 'you': {ns} {lp}");
        }
        for (ns, lp) in [
            (0.700, -0.873),
            (0.638, -0.474),
            (0.388, -0.437),
            (0.01, -2.0),
        ] {
            assert!(!is_silence(ns, lp), "short speech: {ns} {lp}");
        }
        assert!(is_silence(0.65, -1.2), "Whisper's own rule still holds");
    }
}
