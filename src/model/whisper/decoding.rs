//! Greedy decoding of one 30 s window with Whisper's logit rules: symbol
//! suppression, blank suppression at the start, and the timestamp grammar
//! (timestamps in pairs, non-decreasing, the first within 1 s, and a forced
//! timestamp when timestamps are jointly likelier than any text token).

use super::decoder::{CrossAttention, DecoderState};
use super::WhisperModel;
use candle_core::{DType, Result};

#[derive(Clone, Debug)]
pub struct DecodingOptions {
    pub timestamps: bool,
    pub suppress_blank: bool,
    /// Largest first timestamp, in timestamp steps (50 = 1.0 s).
    pub max_initial_timestamp_index: Option<u32>,
    /// Upper bound on sampled tokens (also capped by the text context).
    pub max_new_tokens: usize,
}

impl Default for DecodingOptions {
    fn default() -> Self {
        Self {
            timestamps: true,
            suppress_blank: true,
            max_initial_timestamp_index: Some(50),
            max_new_tokens: 224,
        }
    }
}

/// One window of a batched greedy decode.
pub struct WindowJob<'a> {
    pub cross: &'a CrossAttention,
    pub prompt: &'a [u32],
    /// Position of `<|startoftranscript|>` in the prompt (for no-speech).
    pub sot_index: usize,
    /// Tokens taken as already sampled (part of the result).
    pub forced: &'a [u32],
    /// Tokens sampled after `forced` at most (also capped by
    /// [`DecodingOptions::max_new_tokens`] and the text context).
    pub max_new_tokens: usize,
}

#[derive(Clone, Debug, Default)]
pub struct DecodedWindow {
    /// Sampled tokens, end-of-text excluded.
    pub tokens: Vec<u32>,
    pub sum_logprob: f64,
    /// `sum_logprob / (tokens + 1)`, as Whisper scores a hypothesis.
    pub avg_logprob: f64,
    /// Probability of the no-speech token at the start-of-transcript position.
    pub no_speech_prob: f64,
    /// Whether decoding ended with end-of-text (not by the length limit).
    pub finished: bool,
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lse = max + sum.ln() as f32;
    logits.iter().map(|&l| l - lse).collect()
}

fn log_sum_exp(xs: &[f32]) -> f32 {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return max;
    }
    max + xs
        .iter()
        .map(|&x| ((x - max) as f64).exp())
        .sum::<f64>()
        .ln() as f32
}

fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

impl WhisperModel {
    /// Applies the suppression and timestamp rules to `logits` in place, given
    /// the tokens sampled so far in this window.
    pub fn apply_logit_rules(&self, logits: &mut [f32], sampled: &[u32], opts: &DecodingOptions) {
        let tok = &self.tokenizer;
        let vocab = logits.len();
        let ninf = f32::NEG_INFINITY;
        for &t in &self.suppress.always {
            if (t as usize) < vocab {
                logits[t as usize] = ninf;
            }
        }
        // Special tokens that must never be sampled inside a transcript.
        for t in [
            Some(tok.sot),
            Some(tok.sot_prev),
            tok.transcribe,
            tok.translate,
            tok.no_speech,
        ]
        .into_iter()
        .flatten()
        {
            if (t as usize) < vocab {
                logits[t as usize] = ninf;
            }
        }
        if sampled.is_empty() && opts.suppress_blank {
            for &t in &self.suppress.at_begin {
                if (t as usize) < vocab {
                    logits[t as usize] = ninf;
                }
            }
        }
        let ts_begin = tok.timestamp_begin as usize;
        logits[tok.no_timestamps as usize] = ninf;
        if !opts.timestamps {
            logits[ts_begin.min(vocab)..].fill(ninf);
            return;
        }
        let is_ts = |t: u32| t as usize >= ts_begin;
        let last_was_ts = sampled.last().is_some_and(|&t| is_ts(t));
        let penultimate_was_ts = sampled.len() < 2 || is_ts(sampled[sampled.len() - 2]);
        if last_was_ts {
            if penultimate_was_ts {
                logits[ts_begin..].fill(ninf);
            } else {
                logits[..tok.eot as usize].fill(ninf);
            }
        }
        if let Some(&last_ts) = sampled.iter().rev().find(|&&t| is_ts(t)) {
            // Non-decreasing timestamps; a segment must not end where it began.
            let limit = if last_was_ts && !penultimate_was_ts {
                last_ts
            } else {
                last_ts + 1
            };
            logits[ts_begin..(limit as usize).min(vocab)].fill(ninf);
        }
        if sampled.is_empty() {
            logits[..ts_begin].fill(ninf);
            if let Some(max_init) = opts.max_initial_timestamp_index {
                let last_allowed = ts_begin + max_init as usize;
                if last_allowed + 1 < vocab {
                    logits[last_allowed + 1..].fill(ninf);
                }
            }
        }
        let logprobs = log_softmax(logits);
        let ts_logprob = log_sum_exp(&logprobs[ts_begin..]);
        let max_text = logprobs[..ts_begin].iter().copied().fold(ninf, f32::max);
        if ts_logprob > max_text {
            logits[..ts_begin].fill(ninf);
        }
    }

    /// Greedy decoding of one encoded window after `prompt`; `sot_index` is the
    /// position of `<|startoftranscript|>` in the prompt (for no-speech).
    pub fn greedy_decode(
        &self,
        cross: &CrossAttention,
        prompt: &[u32],
        sot_index: usize,
        opts: &DecodingOptions,
    ) -> Result<DecodedWindow> {
        self.greedy_decode_forced(cross, prompt, sot_index, &[], opts)
    }

    /// As [`Self::greedy_decode`], with `forced` tokens taken as already
    /// sampled (the committed start of a streaming segment); they are part
    /// of the returned tokens.
    pub fn greedy_decode_forced(
        &self,
        cross: &CrossAttention,
        prompt: &[u32],
        sot_index: usize,
        forced: &[u32],
        opts: &DecodingOptions,
    ) -> Result<DecodedWindow> {
        let job = WindowJob {
            cross,
            prompt,
            sot_index,
            forced,
            max_new_tokens: opts.max_new_tokens,
        };
        Ok(self.greedy_decode_batch(&[job], opts)?.remove(0))
    }

    /// Greedy decoding of several windows at once: each is prefilled on its
    /// own (prompts differ in length), then every window still generating
    /// takes its next step in one [`WhisperDecoder::step_batch`]; a window
    /// leaves the batch at end-of-text or its budget. Window `i`'s result
    /// is what it gets decoded alone.
    ///
    /// [`WhisperDecoder::step_batch`]: super::decoder::WhisperDecoder::step_batch
    pub fn greedy_decode_batch(
        &self,
        jobs: &[WindowJob<'_>],
        opts: &DecodingOptions,
    ) -> Result<Vec<DecodedWindow>> {
        let mut states = Vec::with_capacity(jobs.len());
        let mut outs = Vec::with_capacity(jobs.len());
        let mut rows = Vec::with_capacity(jobs.len());
        let mut budgets = Vec::with_capacity(jobs.len());
        for job in jobs {
            let mut state = self.decoder.new_state();
            let full: Vec<u32> = job.prompt.iter().chain(job.forced).copied().collect();
            let hidden = self.decoder.forward_hidden(&full, &mut state, job.cross)?;
            let logits = self
                .decoder
                .logits(&hidden, &[job.sot_index, full.len() - 1])?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?;
            let no_speech_prob = match self.tokenizer.no_speech {
                Some(ns) => (log_softmax(&logits[0])[ns as usize] as f64).exp(),
                None => 0.0,
            };
            budgets.push(
                (job.forced.len() + job.max_new_tokens.min(opts.max_new_tokens))
                    .min(self.decoder.n_text_ctx().saturating_sub(job.prompt.len())),
            );
            outs.push(DecodedWindow {
                no_speech_prob,
                tokens: job.forced.to_vec(),
                ..Default::default()
            });
            rows.push(logits.into_iter().nth(1).unwrap());
            states.push(state);
        }
        // Windows still generating, in batch order.
        let mut active: Vec<usize> = (0..jobs.len())
            .filter(|&i| outs[i].tokens.len() < budgets[i])
            .collect();
        while !active.is_empty() {
            let mut stepping = Vec::with_capacity(active.len());
            for &i in &active {
                let out = &mut outs[i];
                let row = &mut rows[i];
                self.apply_logit_rules(row, &out.tokens, opts);
                let next = argmax(row);
                out.sum_logprob += log_softmax(row)[next as usize] as f64;
                if next == self.tokenizer.eot {
                    out.finished = true;
                    continue;
                }
                out.tokens.push(next);
                if out.tokens.len() < budgets[i] {
                    stepping.push(i);
                }
            }
            if stepping.is_empty() {
                break;
            }
            let tokens: Vec<u32> = stepping
                .iter()
                .map(|&i| *outs[i].tokens.last().expect("a token was just pushed"))
                .collect();
            let crosses: Vec<&CrossAttention> = stepping.iter().map(|&i| jobs[i].cross).collect();
            let mut batch_states: Vec<&mut DecoderState> = states
                .iter_mut()
                .enumerate()
                // `stepping` is in batch order.
                .filter(|(i, _)| stepping.binary_search(i).is_ok())
                .map(|(_, s)| s)
                .collect();
            let hidden = self
                .decoder
                .step_batch(&tokens, &mut batch_states, &crosses)?;
            let logits = self
                .decoder
                .step_logits(&hidden)?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?;
            for (&i, row) in stepping.iter().zip(logits) {
                rows[i] = row;
            }
            active = stepping;
        }
        for out in &mut outs {
            out.avg_logprob = out.sum_logprob / (out.tokens.len() + 1) as f64;
        }
        Ok(outs)
    }
}
