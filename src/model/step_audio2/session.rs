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
//!
//! Several sessions' turns can run together ([`Session::run_turns`]): each
//! prefills alone, then their greedy steps share one batched forward until
//! each stream leaves at `<|EOT|>` or its budget; a turn's prologue (restart,
//! budget), greedy bookkeeping and epilogue (commit or rollback) are the same
//! code as a single stream's.

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
    /// The most streams one of those steps ran with in a batch (1: alone,
    /// 0: no step), so a caller can see that batching took place.
    pub peak_batch: usize,
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
        let plan = self.plan_turn(sa, audio, prefix, opts)?;
        let result = self.greedy_turn(sa, &plan, audio, prefix, commit, opts);
        self.close_turn(&plan, commit, result)
    }

    /// Several streams' turns, each as [`Self::run_turn`] would run it alone, with
    /// the model's work batched: the prefills of all turns as one forward
    /// ([`llm::Qwen2Llm::forward_batch`]), every greedy step of the streams still
    /// generating as one step (a stream leaves at `<|EOT|>` or its budget while
    /// the others go on), and the committed turns' closing `pending + <|EOT|>`
    /// as one more forward. Where the fused decode step applies (CUDA, bf16) the
    /// steps go through the batched fused step shared by the model's sessions;
    /// a lone turn there takes its own batch-1 fused step (the fastest at one
    /// stream). An error in a stream's own prologue or prefill costs only that
    /// stream (a failed batched prefill or close is run again one by one); a
    /// failed batched step fails every stream in it (each rolled back to its
    /// committed context).
    pub fn run_turns(
        sa: &StepAudio2,
        turns: &mut [TurnRequest<'_>],
    ) -> Vec<Result<TurnOutput, ModelError>> {
        let llm = &sa.model.llm;
        let eot = sa.tokenizer.eot;
        let mut results: Vec<Option<Result<TurnOutput, ModelError>>> =
            turns.iter().map(|_| None).collect();
        let weights = llm.decode_weights();
        let mut batch_decoder = sa.batch_decoder.lock().unwrap_or_else(|e| e.into_inner());
        let mut fused = if turns.len() > 1 {
            batch_decoder.prepare(&weights).unwrap_or_else(|e| {
                tracing::warn!("batched fused decode unavailable ({e}); candle ops");
                None
            })
        } else {
            None
        };
        // Per stream: the settled turn and its greedy state once prefilled.
        let mut live: Vec<Option<(TurnPlan, Greedy)>> = turns.iter().map(|_| None).collect();
        // Turns planned for the batch, in order.
        let mut planned = Vec::new();
        for (i, t) in turns.iter_mut().enumerate() {
            let plan = match t.session.plan_turn(sa, t.audio, t.prefix, t.opts) {
                Ok(p) => p,
                Err(e) => {
                    results[i] = Some(Err(e));
                    continue;
                }
            };
            let alone = match fused {
                None => t.session.fused_applies(sa, plan.budget),
                Some(_) => Ok(false),
            };
            match alone {
                Ok(false) => {}
                fused => {
                    // The fused step is batch-1: this stream's turn runs alone.
                    let result = fused.and_then(|_| {
                        t.session
                            .greedy_turn(sa, &plan, t.audio, t.prefix, t.commit, t.opts)
                    });
                    results[i] = Some(t.session.close_turn(&plan, t.commit, result));
                    continue;
                }
            }
            planned.push((i, plan));
        }
        let start = Instant::now();
        Self::prefill_turns(sa, turns, planned, start, &mut live, &mut results);
        let prefilled = Instant::now();
        let (mut steps, mut widest) = (0usize, 0usize);
        // Turns whose greedy decoding ended, closed together after the loop.
        let mut ended: Vec<(usize, (TurnPlan, Greedy))> = Vec::new();
        loop {
            // Streams whose turn ended leave the batch; the others need a step.
            let mut batch = Vec::new();
            for (i, t) in turns.iter_mut().enumerate() {
                let Some((_, g)) = live[i].as_mut() else {
                    continue;
                };
                if g.accept(eot, t.opts) {
                    batch.push(i);
                    continue;
                }
                ended.push((i, live[i].take().expect("live above")));
            }
            if batch.is_empty() {
                break;
            }
            steps += 1;
            widest = widest.max(batch.len());
            let ids: Vec<u32> = batch
                .iter()
                .map(|&i| live[i].as_ref().expect("in the batch").1.next)
                .collect();
            let mut states = states_of(turns, &batch);
            let stepped = match fused.as_mut() {
                Some(f) => {
                    let step = f.step(&ids, &mut states);
                    drop(states);
                    let record = batch.iter().any(|&i| turns[i].opts.record_logits);
                    step.and_then(|outs| {
                        let logits = if record { Some(f.logits()?) } else { None };
                        Ok((outs, logits))
                    })
                    .map_err(ModelError::from)
                    .and_then(|(outs, logits)| {
                        for (row, (&i, (next, lp))) in batch.iter().zip(outs).enumerate() {
                            let (_, g) = live[i].as_mut().expect("in the batch");
                            let row_logits = match (&logits, turns[i].opts.record_logits) {
                                (Some(l), true) => Some(l.get(row)?),
                                _ => None,
                            };
                            g.take_fused(next, lp, row_logits, batch.len());
                        }
                        Ok(())
                    })
                }
                None => {
                    let step = llm
                        .embed(&ids)
                        .and_then(|e| e.unsqueeze(1))
                        .and_then(|e| llm.forward_step_batch(&e, &mut states))
                        .and_then(|h| llm.logits_rows(&h));
                    drop(states);
                    step.map_err(ModelError::from).and_then(|logits| {
                        for (row, &i) in batch.iter().enumerate() {
                            let (_, g) = live[i].as_mut().expect("in the batch");
                            g.choose(&logits.get(row)?, batch.len(), turns[i].opts)?;
                        }
                        Ok(())
                    })
                }
            };
            if let Err(e) = stepped {
                for &i in &batch {
                    let (plan, _) = live[i].take().expect("in the batch");
                    let err = ModelError::Invalid(format!("batched decode step: {e}"));
                    results[i] = Some(turns[i].session.close_turn(
                        &plan,
                        turns[i].commit,
                        Err(err),
                    ));
                }
            }
        }
        Self::close_ended(sa, turns, ended, &mut results);
        // Where a batch's time goes (examples/benchmark_streams on a GPU).
        tracing::debug!(
            turns = turns.len(),
            prefill_ms = (prefilled - start).as_secs_f64() * 1e3,
            decode_ms = prefilled.elapsed().as_secs_f64() * 1e3,
            steps,
            widest,
            fused = fused.is_some(),
            "batch of turns"
        );
        results
            .into_iter()
            .map(|r| r.expect("every turn is closed"))
            .collect()
    }

    /// The prefills of the `planned` turns (stream index and plan, in stream
    /// order) as batches of at most [`PREFILL_ROWS`] rows; a batch that fails
    /// is run again stream by stream, so an error costs only its own stream.
    /// Each prefilled turn goes to `live`, each failed one to `results`.
    fn prefill_turns(
        sa: &StepAudio2,
        turns: &mut [TurnRequest<'_>],
        planned: Vec<(usize, TurnPlan)>,
        start: Instant,
        live: &mut [Option<(TurnPlan, Greedy)>],
        results: &mut [Option<Result<TurnOutput, ModelError>>],
    ) {
        let llm = &sa.model.llm;
        let mut inputs = Vec::with_capacity(planned.len());
        for (i, plan) in planned {
            let t = &mut turns[i];
            match Greedy::prompt_embeds(sa, &plan, t.audio, t.prefix) {
                Ok(e) => inputs.push((i, plan, e)),
                Err(e) => results[i] = Some(t.session.close_turn(&plan, t.commit, Err(e))),
            }
        }
        for chunk in prefill_chunks(&inputs) {
            let embeds: Vec<Tensor> = chunk.iter().map(|&k| inputs[k].2.clone()).collect();
            let streams: Vec<usize> = chunk.iter().map(|&k| inputs[k].0).collect();
            let batched = (chunk.len() > 1)
                .then(|| llm.forward_batch(&embeds, &mut states_of(turns, &streams)))
                .and_then(|r| {
                    r.inspect_err(|e| tracing::warn!("batched prefill failed ({e}); one by one"))
                        .ok()
                });
            if batched.is_none() {
                // roll back whatever part of the batch reached the caches
                for &k in &chunk {
                    let (i, plan, _) = &inputs[k];
                    turns[*i].session.state.truncate(plan.base);
                }
            }
            for (j, &k) in chunk.iter().enumerate() {
                let (i, plan, embeds) = &inputs[k];
                let t = &mut turns[*i];
                let hidden = match &batched {
                    Some(h) => Ok(h[j].clone()),
                    None => llm.forward(embeds, &mut t.session.state),
                };
                let g = hidden
                    .map_err(ModelError::from)
                    .and_then(|h| Greedy::prefilled(sa, plan, &h, t.opts, start));
                match g {
                    Ok(g) => live[*i] = Some((plan.clone(), g)),
                    Err(e) => results[*i] = Some(t.session.close_turn(plan, t.commit, Err(e))),
                }
            }
        }
    }

    /// Closes the turns whose greedy decoding `ended`: the committed ones'
    /// `pending + <|EOT|>` tails as one batched forward (one at a time where
    /// the batch fails), then every turn's output into `results`.
    fn close_ended(
        sa: &StepAudio2,
        turns: &mut [TurnRequest<'_>],
        mut ended: Vec<(usize, (TurnPlan, Greedy))>,
        results: &mut [Option<Result<TurnOutput, ModelError>>],
    ) {
        let llm = &sa.model.llm;
        ended.sort_by_key(|(i, _)| *i);
        let committing: Vec<usize> = ended
            .iter()
            .map(|(i, _)| *i)
            .filter(|&i| turns[i].commit)
            .collect();
        let lengths: Vec<usize> = committing
            .iter()
            .map(|&i| turns[i].session.state.len())
            .collect();
        let tails = ended
            .iter()
            .filter(|(i, _)| turns[*i].commit)
            .map(|(_, (_, g))| llm.embed(&g.tail(sa.tokenizer.eot))?.unsqueeze(0))
            .collect::<candle_core::Result<Vec<_>>>();
        let batched = match tails {
            Ok(tails) if tails.len() > 1 => {
                let ok = llm
                    .forward_batch(&tails, &mut states_of(turns, &committing))
                    .is_ok();
                if !ok {
                    for (&i, &len) in committing.iter().zip(&lengths) {
                        turns[i].session.state.truncate(len);
                    }
                }
                ok
            }
            _ => false,
        };
        for (i, (plan, g)) in ended {
            let t = &mut turns[i];
            let result = if t.commit && !batched {
                g.finish(sa, &mut t.session.state, t.prefix, true)
            } else {
                g.output(sa, t.prefix)
            };
            results[i] = Some(t.session.close_turn(&plan, t.commit, result));
        }
    }

    /// The prologue of a turn: its prompt, a restart when the model's
    /// positions would not hold it, and the greedy budget that fits.
    fn plan_turn(
        &mut self,
        sa: &StepAudio2,
        audio: &[Tensor],
        prefix: &[u32],
        opts: &TurnOptions,
    ) -> Result<TurnPlan, ModelError> {
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
        debug_assert_eq!(self.state.len(), self.committed);
        Ok(TurnPlan {
            prompt,
            turn_len,
            budget: opts.max_new_tokens.min(room),
            base: self.committed,
            restarted,
        })
    }

    /// The epilogue of a turn: a commit moves the committed length (and
    /// restarts past `max_context`); a partial, or any error, truncates the
    /// cache back to where the turn began.
    fn close_turn(
        &mut self,
        plan: &TurnPlan,
        commit: bool,
        result: Result<TurnOutput, ModelError>,
    ) -> Result<TurnOutput, ModelError> {
        let mut restarted = plan.restarted;
        match result {
            Ok(mut out) => {
                if commit {
                    self.committed = self.state.len();
                    if self.committed > self.opts.max_context {
                        self.restart("budget passed");
                        restarted = true;
                    }
                } else {
                    self.state.truncate(plan.base);
                }
                out.prompt_tokens = plan.turn_len;
                out.restarted = restarted;
                Ok(out)
            }
            Err(e) => {
                // Never leave a half-written turn in the committed context.
                self.state.truncate(plan.base);
                Err(e)
            }
        }
    }

    /// Whether this session's turn of `budget` steps would decode through the
    /// fused (batch-1) step.
    fn fused_applies(&mut self, sa: &StepAudio2, budget: usize) -> Result<bool, ModelError> {
        Ok(budget > 1
            && self
                .fused
                .prepare(&sa.model.llm.decode_weights())?
                .is_some())
    }

    /// The single-stream turn: prefill, greedy steps (fused where the device
    /// has the kernel), close.
    fn greedy_turn(
        &mut self,
        sa: &StepAudio2,
        plan: &TurnPlan,
        audio: &[Tensor],
        prefix: &[u32],
        commit: bool,
        opts: &TurnOptions,
    ) -> Result<TurnOutput, ModelError> {
        let llm = &sa.model.llm;
        let eot = sa.tokenizer.eot;
        let mut g = Greedy::prefill(sa, &mut self.state, plan, audio, prefix, opts)?;
        // The fused decode step, where the device has one: it chooses the next id
        // itself (and sums its log-probability on the device).
        let mut fused = if plan.budget > 1 {
            self.fused.prepare(&llm.decode_weights())?
        } else {
            None
        };
        let mut fused_started = false;
        while g.accept(eot, opts) {
            if let Some(f) = fused.as_mut() {
                if !fused_started {
                    f.start(g.next, self.state.len())?;
                    fused_started = true;
                }
                g.next = f.step(&mut self.state)?;
                if opts.record_logits {
                    g.out.step_logits.push(f.logits()?);
                }
                g.out.decode_steps += 1;
                g.out.peak_batch = 1;
            } else {
                // The batched step with one stream: the same computation a
                // stream gets inside a batch.
                let embeds = llm.embed(&[g.next])?.unsqueeze(1)?;
                let h = llm.forward_step_batch(&embeds, &mut [&mut self.state])?;
                g.choose(&llm.logits_rows(&h)?.get(0)?, 1, opts)?;
            }
        }
        if let (Some(f), true) = (fused.as_ref(), fused_started) {
            g.fused_logprob = f.logprob_sum()?;
        }
        g.finish(sa, &mut self.state, prefix, commit)
    }
}

/// Rows of one batched prefill at most: bounds the activations of a batch
/// (the MLP's `[rows, 2·I]` alone is ~310 MB in bf16 at 4096 rows).
const PREFILL_ROWS: usize = 4096;

/// The prefill inputs `[1, n, H]` (third of each entry) grouped in order into
/// batches of at most [`PREFILL_ROWS`] rows (a longer input alone): indices
/// into `inputs`.
fn prefill_chunks<A, B>(inputs: &[(A, B, Tensor)]) -> Vec<Vec<usize>> {
    let mut chunks: Vec<Vec<usize>> = Vec::new();
    let mut rows = 0;
    for (k, (_, _, e)) in inputs.iter().enumerate() {
        let n = e.dim(1).unwrap_or(0);
        match chunks.last_mut() {
            Some(c) if rows + n <= PREFILL_ROWS => c.push(k),
            _ => {
                chunks.push(vec![k]);
                rows = 0;
            }
        }
        rows += n;
    }
    chunks
}

/// The caches of the turns `streams` (indices into `turns`, ascending), in
/// that order.
fn states_of<'a>(
    turns: &'a mut [TurnRequest<'_>],
    streams: &[usize],
) -> Vec<&'a mut llm::LlmState> {
    turns
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| streams.binary_search(i).is_ok())
        .map(|(_, t)| &mut t.session.state)
        .collect()
}

/// One stream's turn in [`Session::run_turns`].
pub struct TurnRequest<'a> {
    pub session: &'a mut Session,
    /// Kept adapter rows per audio piece, as for [`Session::decode_final`].
    pub audio: &'a [Tensor],
    pub prefix: &'a [u32],
    /// Keep the turn (a final) or roll it back (a partial).
    pub commit: bool,
    pub opts: &'a TurnOptions,
}

/// What a turn's prologue settled: its prompt, the greedy budget that fits
/// the model's positions, and the committed length it rolls back to.
#[derive(Clone)]
struct TurnPlan {
    prompt: super::prompt::PromptIds,
    /// Prompt + forced prefix tokens.
    turn_len: usize,
    budget: usize,
    base: usize,
    restarted: bool,
}

/// One turn's greedy decoding from its prefill to its close: the bookkeeping
/// shared by the single-stream loop and the batched one, which differ only in
/// how a step's logits are computed.
struct Greedy {
    out: TurnOutput,
    budget: usize,
    /// The chosen id not yet accepted into the turn.
    next: u32,
    /// The last accepted id when the budget ended the turn: it was never run
    /// through the model, so a commit runs it before `<|EOT|>`.
    pending: Option<u32>,
    /// Sum of the chosen ids' log-probabilities, kept on the device: the only
    /// per-step read back is the chosen id.
    logprob: Option<Tensor>,
    /// The same sum from the fused step (already on the host).
    fused_logprob: f64,
    start: Instant,
    first_read: Option<Instant>,
}

impl Greedy {
    /// Prompt (audio patches replaced by `audio`) and forced prefix in one
    /// prefill; chooses the first id if the budget allows one.
    fn prefill(
        sa: &StepAudio2,
        state: &mut llm::LlmState,
        plan: &TurnPlan,
        audio: &[Tensor],
        prefix: &[u32],
        opts: &TurnOptions,
    ) -> Result<Self, ModelError> {
        let start = Instant::now();
        let embeds = Self::prompt_embeds(sa, plan, audio, prefix)?;
        let hidden = sa.model.llm.forward(&embeds, state)?;
        Self::prefilled(sa, plan, &hidden, opts, start)
    }

    /// The turn's prefill input `[1, n, H]`: prompt (audio patches replaced by
    /// `audio`), then the forced prefix.
    fn prompt_embeds(
        sa: &StepAudio2,
        plan: &TurnPlan,
        audio: &[Tensor],
        prefix: &[u32],
    ) -> Result<Tensor, ModelError> {
        let mut embeds = sa.model.embed_prompt(&plan.prompt, audio)?;
        if !prefix.is_empty() {
            embeds = Tensor::cat(&[embeds, sa.model.llm.embed(prefix)?], 0)?;
        }
        Ok(embeds.unsqueeze(0)?)
    }

    /// The turn after its prefill (`hidden`, begun at `start`): chooses the
    /// first id if the budget allows one.
    fn prefilled(
        sa: &StepAudio2,
        plan: &TurnPlan,
        hidden: &Tensor,
        opts: &TurnOptions,
        start: Instant,
    ) -> Result<Self, ModelError> {
        let mut g = Greedy {
            out: TurnOutput::default(),
            budget: plan.budget,
            next: 0,
            pending: None,
            logprob: None,
            fused_logprob: 0.0,
            start,
            first_read: None,
        };
        if plan.budget > 0 {
            g.pick(&sa.model.llm.logits_last(hidden)?, opts)?;
            g.first_read = Some(Instant::now());
        }
        Ok(g)
    }

    /// Takes the chosen id into the turn; `true` when it must run through the
    /// model to choose the one after, `false` when the turn has ended
    /// (`<|EOT|>` or the budget).
    fn accept(&mut self, eot: u32, opts: &TurnOptions) -> bool {
        if self.out.generated.len() >= self.budget {
            return false;
        }
        self.out.scored += 1;
        if self.next == eot && opts.stop_at_eot {
            self.out.finished = true;
            return false;
        }
        self.out.generated.push(self.next);
        if self.out.generated.len() == self.budget {
            self.pending = Some(self.next);
            return false;
        }
        true
    }

    /// The next id from the logits `[V]` of a decode step that ran `width`
    /// streams.
    fn choose(
        &mut self,
        logits: &Tensor,
        width: usize,
        opts: &TurnOptions,
    ) -> Result<(), ModelError> {
        self.pick(logits, opts)?;
        self.out.decode_steps += 1;
        self.out.peak_batch = self.out.peak_batch.max(width);
        Ok(())
    }

    /// The next id as the fused step chose it (with its log-probability, and
    /// the step's logits when they are recorded), from a step of `width` streams.
    fn take_fused(&mut self, next: u32, logprob: f32, logits: Option<Tensor>, width: usize) {
        self.next = next;
        self.fused_logprob += logprob as f64;
        self.out.step_logits.extend(logits);
        self.out.decode_steps += 1;
        self.out.peak_batch = self.out.peak_batch.max(width);
    }

    fn pick(&mut self, logits: &Tensor, opts: &TurnOptions) -> Result<(), ModelError> {
        if opts.record_logits {
            self.out.step_logits.push(logits.to_dtype(DType::F32)?);
        }
        self.next = llm::argmax(logits)?;
        let lp = llm::max_logprob(logits)?;
        self.logprob = Some(match self.logprob.take() {
            Some(sum) => (sum + lp)?,
            None => lp,
        });
        Ok(())
    }

    /// Ends the turn: on commit the assistant turn is closed the way the
    /// published multi-turn layout does (the pending id, then `<|EOT|>`).
    fn finish(
        self,
        sa: &StepAudio2,
        state: &mut llm::LlmState,
        prefix: &[u32],
        commit: bool,
    ) -> Result<TurnOutput, ModelError> {
        let llm = &sa.model.llm;
        if commit {
            let tail = self.tail(sa.tokenizer.eot);
            llm.forward(&llm.embed(&tail)?.unsqueeze(0)?, state)?;
        }
        self.output(sa, prefix)
    }

    /// The ids that close a committed turn: the pending id, then `<|EOT|>`.
    fn tail(&self, eot: u32) -> Vec<u32> {
        self.pending.into_iter().chain([eot]).collect()
    }

    /// The turn's output; a commit's [`Self::tail`] has run through the model.
    fn output(mut self, sa: &StepAudio2, prefix: &[u32]) -> Result<TurnOutput, ModelError> {
        let decoded = Instant::now();
        let first_read = self.first_read.unwrap_or(decoded);
        self.out.prefill_time = first_read - self.start;
        self.out.decode_time = decoded - first_read;
        self.out.sum_logprob = self.fused_logprob
            + match &self.logprob {
                Some(t) => t.to_dtype(DType::F32)?.to_vec1::<f32>()?[0] as f64,
                None => 0.0,
            };
        self.out.text_tokens = prefix.to_vec();
        self.out
            .text_tokens
            .extend(sa.tokenizer.text_ids(&self.out.generated));
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::{prefill_chunks, PREFILL_ROWS};
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn prefills_are_grouped_in_order_up_to_the_row_bound() {
        let input = |n: usize| {
            (
                (),
                (),
                Tensor::zeros((1, n, 1), DType::F32, &Device::Cpu).unwrap(),
            )
        };
        let half = PREFILL_ROWS / 2;
        // Two halves fill a batch; the third starts the next; an input longer
        // than the bound goes alone; a short one after it starts another.
        let inputs = [
            input(half),
            input(half),
            input(half),
            input(PREFILL_ROWS + 1),
            input(3),
            input(5),
        ];
        assert_eq!(
            prefill_chunks(&inputs),
            vec![vec![0, 1], vec![2], vec![3], vec![4, 5]]
        );
        assert!(prefill_chunks::<(), ()>(&[]).is_empty());
    }
}
