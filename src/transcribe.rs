//! Offline transcription of whole recordings (the `transcribe` and `eval`
//! commands), driving the models through their public API. Whisper: 30 s
//! windows, each conditioned on the text decoded so far, advanced by the
//! last complete timestamp the model produced (Whisper's long-form
//! procedure). Step-Audio 2: 25 s pieces, one committed turn each.

use crate::frontend::{HOP_LENGTH, SAMPLE_RATE, WHISPER_CHUNK_FRAMES, WHISPER_CHUNK_SAMPLES};
use crate::model::whisper::decoding::{DecodedWindow, DecodingOptions};
use crate::model::whisper::tokens::TIMESTAMP_STEP;
use crate::model::whisper::{Task, WhisperModel};
use crate::model::ModelError;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct TranscribeOptions {
    /// Language code (`en`, `zh`, …); `None` detects it on multilingual models.
    pub language: Option<String>,
    pub task: Task,
    /// Decode timestamp tokens (segment boundaries inside a window).
    pub timestamps: bool,
    pub condition_on_previous_text: bool,
    pub initial_prompt: Option<String>,
    /// Skip a window whose no-speech probability exceeds this …
    pub no_speech_threshold: Option<f64>,
    /// … unless its average log-probability is above this.
    pub logprob_threshold: Option<f64>,
}

impl Default for TranscribeOptions {
    fn default() -> Self {
        Self {
            language: None,
            task: Task::Transcribe,
            timestamps: true,
            condition_on_previous_text: true,
            initial_prompt: None,
            no_speech_threshold: Some(0.6),
            logprob_threshold: Some(-1.0),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Segment {
    pub start: f64,
    pub end: f64,
    pub text: String,
    pub tokens: Vec<u32>,
    pub avg_logprob: f64,
    pub no_speech_prob: f64,
}

/// Where the time of a transcription went.
#[derive(Clone, Debug, Default)]
pub struct Timings {
    pub mel: Duration,
    pub encoder: Duration,
    pub decoder: Duration,
    pub windows: usize,
    pub tokens: usize,
}

#[derive(Clone, Debug, Default)]
pub struct Transcript {
    pub segments: Vec<Segment>,
    pub language: Option<String>,
    pub timings: Timings,
}

impl Transcript {
    pub fn text(&self) -> String {
        self.segments
            .iter()
            .map(|s| s.text.trim())
            .filter(|t| !t.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Transcribes 16 kHz mono audio of any length with Whisper.
pub fn transcribe_whisper(
    model: &WhisperModel,
    audio: &[f32],
    opts: &TranscribeOptions,
) -> Result<Transcript, ModelError> {
    let tok = &model.tokenizer;
    let total_frames = audio.len() / HOP_LENGTH;
    let mut transcript = Transcript::default();
    let mut previous: Vec<u32> = match &opts.initial_prompt {
        Some(p) => tok.encode_text(&format!(" {}", p.trim()))?,
        None => Vec::new(),
    };
    let mut language = opts.language.clone();
    let mut task_tokens: Option<Vec<u32>> = None;
    let decoding = DecodingOptions {
        timestamps: opts.timestamps,
        ..Default::default()
    };
    let mut seek = 0usize;
    while seek < total_frames {
        let window_start = seek * HOP_LENGTH;
        let window = &audio[window_start..(window_start + WHISPER_CHUNK_SAMPLES).min(audio.len())];
        let segment_frames = WHISPER_CHUNK_FRAMES.min(total_frames - seek);
        let time_offset = window_start as f64 / SAMPLE_RATE as f64;
        let segment_duration = segment_frames as f64 * HOP_LENGTH as f64 / SAMPLE_RATE as f64;

        let t0 = Instant::now();
        let mel = model.mel.whisper(window);
        let t1 = Instant::now();
        let encoded = model.encode(&mel)?;
        let cross = model.cross_attention(&encoded)?;
        let t2 = Instant::now();
        transcript.timings.mel += t1 - t0;
        transcript.timings.encoder += t2 - t1;
        transcript.timings.windows += 1;

        if task_tokens.is_none() {
            if language.is_none() && model.config.is_multilingual() {
                language = model.detect_language(&cross)?;
                tracing::info!(language = ?language, "detected language");
            }
            task_tokens =
                Some(model.task_tokens(language.as_deref(), opts.task, opts.timestamps)?);
        }
        let conditioning: &[u32] = if opts.condition_on_previous_text {
            &previous
        } else {
            &[]
        };
        let (prompt, sot_index) = model.build_prompt(conditioning, task_tokens.as_deref().unwrap());
        let result = model.greedy_decode(&cross, &prompt, sot_index, &decoding)?;
        transcript.timings.decoder += t2.elapsed();
        transcript.timings.tokens += result.tokens.len() + 1;

        if is_silence(&result, opts) {
            tracing::debug!(
                time_offset,
                no_speech = result.no_speech_prob,
                "skipping window without speech"
            );
            seek += segment_frames;
            continue;
        }
        let (segments, advance) = split_window(
            model,
            &result,
            time_offset,
            segment_frames,
            segment_duration,
        );
        seek += advance.max(1);
        for s in segments {
            if !s.text.trim().is_empty() {
                previous.extend_from_slice(&s.tokens);
                transcript.segments.push(s);
            }
        }
    }
    transcript.language = language;
    Ok(transcript)
}

/// Cuts a decoded window into segments at timestamp pairs and says how
/// many mel frames the window consumed.
fn split_window(
    model: &WhisperModel,
    result: &DecodedWindow,
    time_offset: f64,
    segment_frames: usize,
    segment_duration: f64,
) -> (Vec<Segment>, usize) {
    let tok = &model.tokenizer;
    let tokens = &result.tokens;
    let is_ts: Vec<bool> = tokens.iter().map(|&t| tok.is_timestamp(t)).collect();
    let n = tokens.len();
    let single_timestamp_ending = n >= 2 && !is_ts[n - 2] && is_ts[n - 1];
    let mut cuts: Vec<usize> = (1..n).filter(|&i| is_ts[i] && is_ts[i - 1]).collect();
    let make = |slice: &[u32], start: f64, end: f64| Segment {
        start,
        end,
        text: tok.decode_text(slice),
        tokens: slice.to_vec(),
        avg_logprob: result.avg_logprob,
        no_speech_prob: result.no_speech_prob,
    };
    let frames_per_step =
        (TIMESTAMP_STEP * SAMPLE_RATE as f64 / HOP_LENGTH as f64).round() as usize;
    if !cuts.is_empty() {
        if single_timestamp_ending {
            cuts.push(n);
        }
        let mut segments = Vec::new();
        let mut last = 0;
        for &cut in &cuts {
            let slice = &tokens[last..cut];
            let start = tok.timestamp_seconds(slice[0].max(tok.timestamp_begin));
            let end = tok.timestamp_seconds(slice[slice.len() - 1].max(tok.timestamp_begin));
            segments.push(make(slice, time_offset + start, time_offset + end));
            last = cut;
        }
        let advance = if single_timestamp_ending {
            segment_frames
        } else {
            let last_ts = tokens[last - 1];
            (tok.timestamp_seconds(last_ts) / TIMESTAMP_STEP).round() as usize * frames_per_step
        };
        (segments, advance)
    } else {
        let mut duration = segment_duration;
        if let Some(&last_ts) = tokens.iter().rev().find(|&&t| tok.is_timestamp(t)) {
            if last_ts != tok.timestamp_begin {
                duration = tok.timestamp_seconds(last_ts);
            }
        }
        (
            vec![make(tokens, time_offset, time_offset + duration)],
            segment_frames,
        )
    }
}

/// Whisper's silence rule: a likely no-speech window with low confidence.
fn is_silence(result: &DecodedWindow, opts: &TranscribeOptions) -> bool {
    match opts.no_speech_threshold {
        Some(th) if result.no_speech_prob > th => !opts
            .logprob_threshold
            .is_some_and(|lp| result.avg_logprob > lp),
        _ => false,
    }
}

/// Offline long-form with Step-Audio 2: the recording is cut into 25 s
/// pieces as the published code cuts it and encoded as one batch; each piece
/// is then its own turn of one session (decoded and committed, so it is
/// conditioned on the pieces before it), and its text becomes a segment
/// spanning the piece.
pub fn transcribe_step_audio2(
    sa: &crate::model::step_audio2::StepAudio2,
    audio: &[f32],
    session: crate::model::step_audio2::SessionOptions,
) -> Result<Transcript, ModelError> {
    use crate::frontend::STEP_AUDIO_PIECE_SAMPLES;
    use crate::model::step_audio2::TurnOptions;
    let start = Instant::now();
    let rows = sa.audio_rows(audio)?;
    let encoder = start.elapsed();
    let turn = TurnOptions::new(session.max_new_tokens);
    let mut session = sa.session(session)?;
    let mut transcript = Transcript::default();
    for (i, piece) in rows.into_iter().enumerate() {
        let out = session.decode_final(sa, &[piece], &[], &turn)?;
        let begin = i * STEP_AUDIO_PIECE_SAMPLES;
        let end = (begin + STEP_AUDIO_PIECE_SAMPLES).min(audio.len());
        transcript.timings.decoder += out.prefill_time + out.decode_time;
        transcript.timings.tokens += out.decode_steps;
        transcript.timings.windows += 1;
        transcript.segments.push(Segment {
            start: begin as f64 / SAMPLE_RATE as f64,
            end: end as f64 / SAMPLE_RATE as f64,
            text: sa
                .tokenizer
                .decode_text(&out.text_tokens)
                .trim()
                .to_string(),
            avg_logprob: out.sum_logprob / out.scored.max(1) as f64,
            no_speech_prob: 0.0,
            tokens: out.text_tokens,
        });
    }
    transcript.timings.encoder = encoder;
    Ok(transcript)
}

/// Offline transcription with whichever family `model` holds (the
/// `transcribe` and `eval` commands).
pub(crate) fn transcribe_loaded(
    model: &crate::model::LoadedModel,
    audio: &[f32],
    whisper: &TranscribeOptions,
    step_audio: &crate::model::step_audio2::SessionOptions,
) -> Result<Transcript, ModelError> {
    match model {
        crate::model::LoadedModel::Whisper(m) => transcribe_whisper(m, audio, whisper),
        crate::model::LoadedModel::StepAudio2(sa) => {
            transcribe_step_audio2(sa, audio, step_audio.clone())
        }
    }
}
