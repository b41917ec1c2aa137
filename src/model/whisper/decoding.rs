//! Greedy decoding of one 30 s window with Whisper's logit rules: symbol
//! suppression, blank suppression at the start, and the timestamp grammar
//! (timestamps in pairs, non-decreasing, the first within 1 s, and a forced
//! timestamp when timestamps are jointly likelier than any text token).

use super::decoder::CrossAttention;
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
        let mut state = self.decoder.new_state();
        let full: Vec<u32> = prompt.iter().chain(forced).copied().collect();
        let hidden = self.decoder.forward_hidden(&full, &mut state, cross)?;
        let rows = [sot_index, full.len() - 1];
        let logits = self
            .decoder
            .logits(&hidden, &rows)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let no_speech_prob = match self.tokenizer.no_speech {
            Some(ns) => {
                let lp = log_softmax(&logits[0]);
                (lp[ns as usize] as f64).exp()
            }
            None => 0.0,
        };
        let budget = (forced.len() + opts.max_new_tokens)
            .min(self.decoder.n_text_ctx().saturating_sub(prompt.len()));
        let mut out = DecodedWindow {
            no_speech_prob,
            tokens: forced.to_vec(),
            ..Default::default()
        };
        let mut row = logits.into_iter().nth(1).unwrap();
        while out.tokens.len() < budget {
            self.apply_logit_rules(&mut row, &out.tokens, opts);
            let next = argmax(&row);
            let lp = log_softmax(&row)[next as usize];
            out.sum_logprob += lp as f64;
            if next == self.tokenizer.eot {
                out.finished = true;
                break;
            }
            out.tokens.push(next);
            if out.tokens.len() == budget {
                break;
            }
            let hidden = self.decoder.forward_hidden(&[next], &mut state, cross)?;
            row = self
                .decoder
                .logits(&hidden, &[0])?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
        }
        out.avg_logprob = out.sum_logprob / (out.tokens.len() + 1) as f64;
        Ok(out)
    }
}
