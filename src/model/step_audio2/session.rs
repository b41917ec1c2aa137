//! A Step-Audio 2 stream with a persistent KV cache.
//!
//! The cache always starts with the system prompt, prefilled once per stream.
//! A final segment appends its human turn (audio patches), the greedy
//! transcript and `<|EOT|>`, so later segments are conditioned on the
//! committed conversation without recomputing it. A partial hypothesis runs
//! the same turn past the committed length and is then rolled back by
//! truncating the cache, which leaves the committed prefix bit-identical.
//! When a final pushes the committed context past `max_context` tokens, the
//! stream restarts from the system prompt: a truncation to its length, since
//! that prefix is still cached.

use super::prompt::SystemPrompt;
use super::{llm, StepAudio2};
use crate::model::ModelError;
use candle_core::{DType, Tensor};
use std::time::{Duration, Instant};

/// Decoding budget of one turn when the caller gives none.
pub(crate) const DEFAULT_MAX_NEW_TOKENS: usize = 512;
/// Committed context (tokens) above which a stream restarts.
pub(crate) const DEFAULT_MAX_CONTEXT: usize = 4096;
/// `<audio_patch>` tokens of a full 25 s piece (2502 mel frames).
const MAX_PATCHES_PER_SEGMENT: usize = 313;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionOptions {
    pub system_prompt: SystemPrompt,
    /// Restart from the system prompt once the committed context passes this.
    pub max_context: usize,
    /// Greedy steps per turn at most (a turn also ends at `<|EOT|>`).
    pub max_new_tokens: usize,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            system_prompt: SystemPrompt::default(),
            max_context: DEFAULT_MAX_CONTEXT,
            max_new_tokens: DEFAULT_MAX_NEW_TOKENS,
        }
    }
}

/// Per-turn decoding switches.
#[derive(Clone, Debug)]
pub struct TurnOptions {
    pub max_new_tokens: usize,
    /// Keep every step's logits (f32, on the model's device) for tests.
    pub record_logits: bool,
    /// Stop at `<|EOT|>` (normal use); off only to time a fixed number of steps.
    pub stop_at_eot: bool,
}

impl TurnOptions {
    pub fn new(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            record_logits: false,
            stop_at_eot: true,
        }
    }
}

/// The result of one decoded turn.
#[derive(Clone, Debug, Default)]
pub struct TurnOutput {
    /// Every greedy id in order, the stopping `<|EOT|>` excluded (audio-output
    /// and other non-text ids included: this is what a commit feeds back).
    pub generated: Vec<u32>,
    /// The forced prefix followed by the text ids of `generated`.
    pub text_tokens: Vec<u32>,
    /// Whether the turn ended with `<|EOT|>` rather than the budget.
    pub finished: bool,
    /// Sum of the greedy tokens' log-probabilities (the stopping EOT included).
    pub sum_logprob: f64,
    /// How many log-probabilities `sum_logprob` adds up.
    pub scored: usize,
    /// Logits `[V]` (f32) each greedy id was taken from, when recorded.
    pub step_logits: Vec<Tensor>,
    /// Tokens of the human turn prompt (audio patches included) + prefix.
    pub prompt_tokens: usize,
    /// Whether the stream restarted from the system prompt during this turn:
    /// before it (the model's position limit, partials included) or after
    /// its commit (the committed context passed `max_context`).
    pub restarted: bool,
    /// Prompt + prefix prefill, until the first id was read back.
    pub prefill_time: Duration,
    /// Single-token steps after the prefill and the time they took (the
    /// closing `<|EOT|>` of a commit not included).
    pub decode_steps: usize,
    pub decode_time: Duration,
}

pub struct Session {
    state: llm::LlmState,
    system_ids: Vec<u32>,
    committed: usize,
    opts: SessionOptions,
    restarts: usize,
    /// The fused decode step over this session's KV cache (CUDA, bf16), made on the
    /// first decode that can use it.
    fused: crate::ops::fast::FusedDecoder,
}

impl Session {
    /// Prefills the system prompt into a fresh cache sized for `max_context`
    /// plus one full turn, so a stream normally never reallocates it.
    pub fn new(sa: &StepAudio2, opts: SessionOptions) -> Result<Self, ModelError> {
        let llm = &sa.model.llm;
        let system_ids = sa.tokenizer.system_turn(opts.system_prompt.text())?;
        let turn = MAX_PATCHES_PER_SEGMENT + 32 + opts.max_new_tokens + 1;
        let capacity = (opts.max_context + turn).min(llm.max_positions());
        let mut state = llm.new_state(capacity);
        let embeds = llm.embed(&system_ids)?.unsqueeze(0)?;
        llm.forward(&embeds, &mut state)?;
        let committed = state.len();
        Ok(Self {
            state,
            system_ids,
            committed,
            opts,
            restarts: 0,
            fused: Default::default(),
        })
    }

    /// Tokens in the committed context (system prompt included).
    pub fn committed_len(&self) -> usize {
        self.committed
    }

    pub fn system_len(&self) -> usize {
        self.system_ids.len()
    }

    /// Budget restarts so far.
    pub fn restarts(&self) -> usize {
        self.restarts
    }

    /// The KV cache (for inspection; the session owns its contents).
    pub fn state(&self) -> &llm::LlmState {
        &self.state
    }

    /// Drops the committed conversation, keeping the cached system prompt.
    pub(crate) fn reset(&mut self) {
        self.state.truncate(self.system_ids.len());
        self.committed = self.system_ids.len();
    }

    fn restart(&mut self, reason: &str) {
        tracing::info!(
            committed = self.committed,
            max_context = self.opts.max_context,
            restarts = self.restarts + 1,
            "Step-Audio 2 context {reason}: restarting from the system prompt"
        );
        self.reset();
        self.restarts += 1;
    }

    /// Hypothesis for an open segment; the committed context is unchanged.
    pub fn decode_partial(
        &mut self,
        sa: &StepAudio2,
        audio: &[Tensor],
        prefix: &[u32],
        opts: &TurnOptions,
    ) -> Result<TurnOutput, ModelError> {
        self.run_turn(sa, audio, prefix, false, opts)
    }

    /// Final text of a finished segment; its turn is appended to the context.
    pub fn decode_final(
        &mut self,
        sa: &StepAudio2,
        audio: &[Tensor],
        prefix: &[u32],
        opts: &TurnOptions,
    ) -> Result<TurnOutput, ModelError> {
        self.run_turn(sa, audio, prefix, true, opts)
    }

    /// One human turn of audio pieces (`audio[i]`: the kept adapter rows of
    /// piece i, `[n_i, H]`), then `prefix` forced, then greedy decoding.
    /// With `commit` the turn stays in the cache, closed by `<|EOT|>`;
    /// otherwise the cache is truncated back to the committed length.
    pub(crate) fn run_turn(
        &mut self,
        sa: &StepAudio2,
        audio: &[Tensor],
        prefix: &[u32],
        commit: bool,
        opts: &TurnOptions,
    ) -> Result<TurnOutput, ModelError> {
        let llm = &sa.model.llm;
        let counts = audio
            .iter()
            .map(|r| r.dim(0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let prompt = sa.tokenizer.human_audio_turn(&counts);
        let turn_len = prompt.len() + prefix.len();
        let max_pos = llm.max_positions();
        let mut restarted = false;
        // The model's position table is a hard limit, for partials too.
        if self.committed + turn_len + 1 > max_pos && self.committed > self.system_len() {
            self.restart("would pass the model's positions");
            restarted = true;
        }
        let room = max_pos.saturating_sub(self.committed + turn_len + 1);
        if room == 0 {
            return Err(ModelError::Invalid(format!(
                "a turn of {turn_len} tokens does not fit the model's {max_pos} positions"
            )));
        }
        let budget = opts.max_new_tokens.min(room);
        let base = self.committed;
        debug_assert_eq!(self.state.len(), base);

        let result = self.greedy_turn(sa, &prompt, audio, prefix, budget, commit, opts);
        match result {
            Ok(mut out) => {
                if commit {
                    self.committed = self.state.len();
                    if self.committed > self.opts.max_context {
                        self.restart("budget passed");
                        restarted = true;
                    }
                } else {
                    self.state.truncate(base);
                }
                out.prompt_tokens = turn_len;
                out.restarted = restarted;
                Ok(out)
            }
            Err(e) => {
                // Never leave a half-written turn in the committed context.
                self.state.truncate(base);
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn greedy_turn(
        &mut self,
        sa: &StepAudio2,
        prompt: &super::prompt::PromptIds,
        audio: &[Tensor],
        prefix: &[u32],
        budget: usize,
        commit: bool,
        opts: &TurnOptions,
    ) -> Result<TurnOutput, ModelError> {
        let llm = &sa.model.llm;
        let eot = sa.tokenizer.eot;
        let start = Instant::now();
        let mut first_read: Option<Instant> = None;
        let mut embeds = sa.model.embed_prompt(prompt, audio)?;
        if !prefix.is_empty() {
            embeds = Tensor::cat(&[embeds, llm.embed(prefix)?], 0)?;
        }
        // Prompt and forced prefix go through in one prefill.
        let hidden = llm.forward(&embeds.unsqueeze(0)?, &mut self.state)?;
        let mut logits = llm.logits_last(&hidden)?;
        let mut out = TurnOutput::default();
        // Log-probabilities are summed on the device; the only per-step read
        // back is the chosen id.
        let mut logprob: Option<Tensor> = None;
        // A greedy id chosen but not yet run through the model.
        let mut pending: Option<u32> = None;
        // The fused decode step, where the device has one: it chooses the next id
        // itself (and sums its log-probability on the device).
        let mut fused = if budget > 1 {
            self.fused.prepare(&llm.decode_weights())?
        } else {
            None
        };
        let mut fused_started = false;
        let mut next = 0;
        if budget > 0 {
            if opts.record_logits {
                out.step_logits.push(logits.to_dtype(DType::F32)?);
            }
            next = llm::argmax(&logits)?;
            first_read = Some(Instant::now());
            logprob = Some(llm::max_logprob(&logits)?);
        }
        while out.generated.len() < budget {
            out.scored += 1;
            if next == eot && opts.stop_at_eot {
                out.finished = true;
                break;
            }
            out.generated.push(next);
            if out.generated.len() == budget {
                pending = Some(next);
                break;
            }
            if let Some(f) = fused.as_mut() {
                if !fused_started {
                    f.start(next, self.state.len())?;
                    fused_started = true;
                }
                next = f.step(&mut self.state)?;
                if opts.record_logits {
                    out.step_logits.push(f.logits()?);
                }
            } else {
                let h = llm.forward(&llm.embed(&[next])?.unsqueeze(0)?, &mut self.state)?;
                logits = llm.logits_last(&h)?;
                if opts.record_logits {
                    out.step_logits.push(logits.to_dtype(DType::F32)?);
                }
                next = llm::argmax(&logits)?;
                let lp = llm::max_logprob(&logits)?;
                logprob = Some(match logprob {
                    Some(sum) => (sum + lp)?,
                    None => lp,
                });
            }
            out.decode_steps += 1;
        }
        let fused_logprob = match (fused.as_ref(), fused_started) {
            (Some(f), true) => f.logprob_sum()?,
            _ => 0.0,
        };
        let decoded = Instant::now();
        let first_read = first_read.unwrap_or(decoded);
        out.prefill_time = first_read - start;
        out.decode_time = decoded - first_read;
        if commit {
            // Close the assistant turn the way the published multi-turn
            // layout does: the generated ids as they are, then <|EOT|>.
            let mut tail: Vec<u32> = pending.into_iter().collect();
            tail.push(eot);
            llm.forward(&llm.embed(&tail)?.unsqueeze(0)?, &mut self.state)?;
        }
        out.sum_logprob = fused_logprob
            + match logprob {
                Some(t) => t.to_dtype(DType::F32)?.to_vec1::<f32>()?[0] as f64,
                None => 0.0,
            };
        out.text_tokens = prefix.to_vec();
        out.text_tokens
            .extend(sa.tokenizer.text_ids(&out.generated));
        Ok(out)
    }
}
