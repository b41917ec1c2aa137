//! Greedy decoding of one 30 s window with Whisper's logit rules: symbol
//! suppression, blank suppression at the start, and the timestamp grammar
//! (timestamps in pairs, non-decreasing, the first within 1 s, and a forced
//! timestamp when timestamps are jointly likelier than any text token).

use super::decoder::{CrossAttention, DecoderState};
use super::WhisperModel;
use candle_core::{DType, Result, Tensor};

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

/// Index of the largest value (the first of equals).
pub fn argmax(xs: &[f32]) -> u32 {
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
    /// is what it gets decoded alone. Off the CPU the windows go through
    /// the stacked path instead ([`super::stacked`]: one padded prefill, one
    /// attention launch per layer for all rows).
    ///
    /// [`WhisperDecoder::step_batch`]: super::decoder::WhisperDecoder::step_batch
    pub fn greedy_decode_batch(
        &self,
        jobs: &[WindowJob<'_>],
        opts: &DecodingOptions,
    ) -> Result<Vec<DecodedWindow>> {
        let stacked = !self.device.is_cpu()
            && jobs.first().is_some_and(|j| {
                jobs.iter()
                    .all(|k| k.cross.positions() == j.cross.positions())
            });
        if stacked {
            return self.greedy_decode_stacked(jobs, opts);
        }
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
            let (out, row) = self.start_window(job, logits);
            budgets.push(self.budget(job, opts));
            outs.push(out);
            rows.push(row);
            states.push(state);
        }
        // Windows still generating, in batch order.
        let mut active: Vec<usize> = (0..jobs.len())
            .filter(|&i| outs[i].tokens.len() < budgets[i])
            .collect();
        while !active.is_empty() {
            let stepping = self.pick_next(&active, &mut rows, &mut outs, &budgets, opts);
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
        Ok(Self::finish_windows(outs))
    }

    /// [`Self::greedy_decode_batch`] through the stacked decoder state. Rows
    /// that finished keep stepping (their results unused) until at most
    /// half the rows still step; then the state is gathered down to those.
    /// Without timestamps (live decoding) the logit rules are the same
    /// masks at every step, so they, the argmax and the log-probability
    /// run on the device and only two numbers per row come back (at batch
    /// 256 the whole logits took 56 ms to the host, the step 10 ms);
    /// with timestamps the rows go to the host for the rules. Public so it
    /// can be checked on the CPU against the per-row path.
    pub fn greedy_decode_stacked(
        &self,
        jobs: &[WindowJob<'_>],
        opts: &DecodingOptions,
    ) -> Result<Vec<DecodedWindow>> {
        let prompts: Vec<Vec<u32>> = jobs
            .iter()
            .map(|j| j.prompt.iter().chain(j.forced).copied().collect())
            .collect();
        let budgets: Vec<usize> = jobs.iter().map(|j| self.budget(j, opts)).collect();
        let steps = jobs
            .iter()
            .zip(&budgets)
            .map(|(j, &b)| b.saturating_sub(j.forced.len()))
            .max()
            .unwrap_or(0);
        let prompt_refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let crosses: Vec<&CrossAttention> = jobs.iter().map(|j| j.cross).collect();
        let started = std::time::Instant::now();
        let (mut prefill_time, mut decode_steps, mut widest) = (None, 0usize, 0usize);
        let (mut state, hidden) = self
            .decoder
            .stacked_prefill(&prompt_refs, &crosses, steps)?;
        let column = |r: usize, i: usize| (r, state.column(r, i));
        let sot_picks: Vec<_> = jobs
            .iter()
            .enumerate()
            .map(|(r, j)| column(r, j.sot_index))
            .collect();
        let last_picks: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(r, p)| column(r, p.len() - 1))
            .collect();
        let sot_logits = self.decoder.stacked_logits(&hidden, &sot_picks)?;
        let last_logits = self.decoder.stacked_logits(&hidden, &last_picks)?;
        let rules = if opts.timestamps {
            None
        } else {
            Some(DeviceRules::new(
                self,
                opts,
                last_logits.dim(1)?,
                last_logits.device(),
            )?)
        };
        let mut outs = Vec::with_capacity(jobs.len());
        // Per window: its next logits row (host rules) or its next pick.
        let mut rows: Vec<Vec<f32>> = Vec::new();
        let mut picks: Vec<(u32, f32)> = Vec::new();
        match &rules {
            None => {
                let sot = sot_logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                let last = last_logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                for ((job, s), l) in jobs.iter().zip(sot).zip(last) {
                    let (out, row) = self.start_window(job, vec![s, l]);
                    outs.push(out);
                    rows.push(row);
                }
            }
            Some(rules) => {
                let no_speech = self.no_speech_probs(&sot_logits)?;
                let begin: Vec<bool> = jobs.iter().map(|j| j.forced.is_empty()).collect();
                picks = rules.picks(&last_logits, &begin)?;
                for (job, p) in jobs.iter().zip(no_speech) {
                    outs.push(DecodedWindow {
                        no_speech_prob: p,
                        tokens: job.forced.to_vec(),
                        ..Default::default()
                    });
                }
            }
        }
        // What the fused step reads (without timestamps), once for every step.
        let step_weights = rules.as_ref().and_then(|_| self.decoder.step_weights());
        // The window of each row of the stacked state.
        let mut stacked_rows: Vec<usize> = (0..jobs.len()).collect();
        let mut active: Vec<usize> = (0..jobs.len())
            .filter(|&i| outs[i].tokens.len() < budgets[i])
            .collect();
        while !active.is_empty() {
            // The first picks were read back: the prefill is over.
            prefill_time.get_or_insert_with(|| started.elapsed());
            let stepping = match &rules {
                None => self.pick_next(&active, &mut rows, &mut outs, &budgets, opts),
                Some(_) => active
                    .iter()
                    .copied()
                    .filter(|&i| {
                        let (next, logprob) = picks[i];
                        self.record(&mut outs[i], next, logprob, budgets[i])
                    })
                    .collect(),
            };
            if stepping.is_empty() {
                break;
            }
            if 2 * stepping.len() <= stacked_rows.len() {
                let keep: Vec<usize> = stacked_rows
                    .iter()
                    .enumerate()
                    .filter(|(_, w)| stepping.binary_search(w).is_ok())
                    .map(|(r, _)| r)
                    .collect();
                state.retain(&keep)?;
                stacked_rows = stepping.clone();
            }
            // A finished row steps on end-of-text; its results are dropped.
            let tokens: Vec<u32> = stacked_rows
                .iter()
                .map(|w| match stepping.binary_search(w) {
                    Ok(_) => *outs[*w].tokens.last().expect("a token was just pushed"),
                    Err(_) => self.tokenizer.eot,
                })
                .collect();
            decode_steps += 1;
            widest = widest.max(tokens.len());
            // Without timestamps, the fused step (one graph launch) gives the picks.
            // If it fails, candle ops take this step and every later one (the
            // step's column is written again by them).
            let fused = match (&rules, &step_weights) {
                (Some(rules), Some(weights)) => {
                    let mut fused = self.fused_step.lock().unwrap_or_else(|e| e.into_inner());
                    self.decoder
                        .fused_stacked_step(&mut fused, weights, &mut state, &tokens, &rules.always)
                        .unwrap_or_else(|e| {
                            tracing::warn!(
                                "fused Whisper decode step failed ({e}); candle ops from now on"
                            );
                            fused.disable();
                            None
                        })
                }
                _ => None,
            };
            if let Some(all) = fused {
                for (r, w) in stacked_rows.iter().enumerate() {
                    if stepping.binary_search(w).is_ok() {
                        picks[*w] = all[r];
                    }
                }
                active = stepping;
                continue;
            }
            let hidden = self.decoder.stacked_step(&mut state, &tokens)?;
            let logits = self.decoder.step_logits(&hidden)?;
            // Only the stepping rows' logits are used.
            let logits = if stepping.len() < stacked_rows.len() {
                let keep: Vec<u32> = stacked_rows
                    .iter()
                    .enumerate()
                    .filter(|(_, w)| stepping.binary_search(w).is_ok())
                    .map(|(r, _)| r as u32)
                    .collect();
                logits.index_select(
                    &candle_core::Tensor::new(keep.as_slice(), logits.device())?,
                    0,
                )?
            } else {
                logits
            };
            match &rules {
                None => {
                    let logits = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                    for (&i, row) in stepping.iter().zip(logits) {
                        rows[i] = row;
                    }
                }
                Some(rules) => {
                    let new = rules.picks(&logits, &vec![false; stepping.len()])?;
                    for (&i, p) in stepping.iter().zip(new) {
                        picks[i] = p;
                    }
                }
            }
            active = stepping;
        }
        let prefill_time = prefill_time.unwrap_or_else(|| started.elapsed());
        tracing::debug!(
            turns = jobs.len(),
            prefill_ms = prefill_time.as_secs_f64() * 1e3,
            decode_ms = (started.elapsed() - prefill_time).as_secs_f64() * 1e3,
            steps = decode_steps,
            widest,
            "stacked batch of turns"
        );
        Ok(Self::finish_windows(outs))
    }

    /// No-speech probabilities of the start-of-transcript logits `[R, vocab]`
    /// (no rules applied), computed on their device.
    fn no_speech_probs(&self, sot_logits: &Tensor) -> Result<Vec<f64>> {
        let rows = sot_logits.dim(0)?;
        let Some(ns) = self
            .tokenizer
            .no_speech
            .filter(|&ns| (ns as usize) < sot_logits.dim(1).unwrap_or(0))
        else {
            return Ok(vec![0.0; rows]);
        };
        let l = sot_logits.to_dtype(DType::F32)?;
        let max = l.max_keepdim(1)?;
        let lse = (l.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?.log()? + max)?;
        let p = (l.narrow(1, ns as usize, 1)? - lse)?.exp()?;
        Ok(p.flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect())
    }

    /// Records window `out`'s sampled `next` and its log-probability;
    /// whether the window takes another step.
    fn record(&self, out: &mut DecodedWindow, next: u32, logprob: f32, budget: usize) -> bool {
        out.sum_logprob += logprob as f64;
        if next == self.tokenizer.eot {
            out.finished = true;
            return false;
        }
        out.tokens.push(next);
        out.tokens.len() < budget
    }

    /// Tokens window `job` may hold when done (forced ones included).
    fn budget(&self, job: &WindowJob<'_>, opts: &DecodingOptions) -> usize {
        (job.forced.len() + job.max_new_tokens.min(opts.max_new_tokens))
            .min(self.decoder.n_text_ctx().saturating_sub(job.prompt.len()))
    }

    /// A window's result so far and its next logits row, from the prefill's
    /// logits at the start-of-transcript position and at the last token.
    fn start_window(
        &self,
        job: &WindowJob<'_>,
        logits: Vec<Vec<f32>>,
    ) -> (DecodedWindow, Vec<f32>) {
        let mut logits = logits.into_iter();
        let sot_row = logits.next().unwrap_or_default();
        let no_speech_prob = match self.tokenizer.no_speech {
            Some(ns) if (ns as usize) < sot_row.len() => {
                ((sot_row[ns as usize] - log_sum_exp(&sot_row)) as f64).exp()
            }
            _ => 0.0,
        };
        let out = DecodedWindow {
            no_speech_prob,
            tokens: job.forced.to_vec(),
            ..Default::default()
        };
        (out, logits.next().unwrap_or_default())
    }

    /// Samples the next token of every window in `active` (sorted) from its
    /// logits row, applying the logit rules; returns the windows that take
    /// another step, in order. Rows are independent, so a large batch's
    /// rules run in parallel.
    fn pick_next(
        &self,
        active: &[usize],
        rows: &mut [Vec<f32>],
        outs: &mut [DecodedWindow],
        budgets: &[usize],
        opts: &DecodingOptions,
    ) -> Vec<usize> {
        use rayon::prelude::*;
        let pick = |i: usize, out: &mut DecodedWindow, row: &mut Vec<f32>| -> Option<usize> {
            if active.binary_search(&i).is_err() {
                return None;
            }
            self.apply_logit_rules(row, &out.tokens, opts);
            let next = argmax(row);
            let logprob = row[next as usize] - log_sum_exp(row);
            self.record(out, next, logprob, budgets[i]).then_some(i)
        };
        // Below this many rows a thread pool costs more than the rules.
        const PARALLEL_ROWS: usize = 8;
        if active.len() >= PARALLEL_ROWS {
            outs.par_iter_mut()
                .zip(rows.par_iter_mut())
                .enumerate()
                .filter_map(|(i, (out, row))| pick(i, out, row))
                .collect()
        } else {
            outs.iter_mut()
                .zip(rows.iter_mut())
                .enumerate()
                .filter_map(|(i, (out, row))| pick(i, out, row))
                .collect()
        }
    }

    fn finish_windows(mut outs: Vec<DecodedWindow>) -> Vec<DecodedWindow> {
        for out in &mut outs {
            out.avg_logprob = out.sum_logprob / (out.tokens.len() + 1) as f64;
        }
        outs
    }
}

/// Added to a suppressed logit on the device (finite, so a 0/1 flag times it
/// stays finite; exp of it underflows to 0 as exp(−inf) does).
const SUPPRESSED: f32 = -1.0e30;

/// The logit rules of decoding without timestamps as additive masks on the
/// device, taken from [`WhisperModel::apply_logit_rules`] itself so both
/// suppress the same tokens: what every step suppresses, and what the first
/// sampled position suppresses besides.
struct DeviceRules {
    /// `[1, vocab]` f32: [`SUPPRESSED`] or 0.
    always: Tensor,
    /// `[1, vocab]` f32: [`SUPPRESSED`] on the tokens only the first position suppresses.
    begin: Tensor,
    /// `[1, vocab]` f32: vocab − i, to find the first index of a row's maximum.
    first_index: Tensor,
    vocab: usize,
}

impl DeviceRules {
    fn new(
        model: &WhisperModel,
        opts: &DecodingOptions,
        vocab: usize,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let masked = |sampled: &[u32]| {
            let mut row = vec![0f32; vocab];
            model.apply_logit_rules(&mut row, sampled, opts);
            row
        };
        // Without timestamps the rules look only at whether anything was sampled.
        let (first, later) = (masked(&[]), masked(&[0]));
        let bias = |x: f32| {
            if x == f32::NEG_INFINITY {
                SUPPRESSED
            } else {
                0.0
            }
        };
        let always: Vec<f32> = later.iter().map(|&x| bias(x)).collect();
        let begin: Vec<f32> = first
            .iter()
            .zip(&always)
            .map(|(&x, &a)| if a == 0.0 { bias(x) } else { 0.0 })
            .collect();
        let first_index: Vec<f32> = (0..vocab).map(|i| (vocab - i) as f32).collect();
        let row = |v: Vec<f32>| Tensor::from_vec(v, (1, vocab), device);
        Ok(Self {
            always: row(always)?,
            begin: row(begin)?,
            first_index: row(first_index)?,
            vocab,
        })
    }

    /// Each row's greedy token under the rules (the first maximum, as the
    /// host's argmax) and its log-probability, from logits `[n, vocab]`;
    /// `begin[r]`: row r samples its first position.
    fn picks(&self, logits: &Tensor, begin: &[bool]) -> Result<Vec<(u32, f32)>> {
        let n = logits.dim(0)?;
        let l = logits.to_dtype(DType::F32)?.broadcast_add(&self.always)?;
        let l = if begin.iter().any(|&b| b) {
            let flags: Vec<f32> = begin.iter().map(|&b| if b { 1.0 } else { 0.0 }).collect();
            let flags = Tensor::from_vec(flags, (n, 1), l.device())?;
            l.broadcast_add(&flags.broadcast_mul(&self.begin)?)?
        } else {
            l
        };
        let max = l.max_keepdim(1)?;
        // log Σ exp(l − max): the chosen token's log-probability is its negative.
        let spread = l.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?.log()?;
        let first = l
            .broadcast_eq(&max)?
            .to_dtype(DType::F32)?
            .broadcast_mul(&self.first_index)?
            .max_keepdim(1)?;
        let both = Tensor::cat(&[&first, &spread], 1)?.to_vec2::<f32>()?;
        Ok(both
            .into_iter()
            .map(|r| ((self.vocab as f32 - r[0]) as u32, -r[1]))
            .collect())
    }
}
