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
//! Several sessions' turns can run together in a [`TurnLoop`]: turns join it
//! between its greedy steps (prefilled together), share each step's batched
//! forward and leave at `<|EOT|>` or their budget while the others go on; a
//! turn's prologue (restart, budget), greedy bookkeeping and epilogue (commit
//! or rollback) are the same code as a single stream's. Prefills go through the
//! batched fused kernels where the device has them, alone or together. A turn
//! may carry a draft (ids it is expected to choose): prefilled after the
//! prompt, the agreeing ids are taken without decode steps and the cache
//! drops the rest, so the turn's ids are those it would choose without.
//!
//! A partial may leave the start of its prompt in the cache for the next
//! partial of the same segment ([`TurnOptions::keep`]): the human turn's
//! header and the audio rows that the next one reuses as they are
//! ([`TurnOptions::reuse`]), so it prefills only what follows. Finals never
//! reuse anything: the committed context stays what a decode of the whole
//! segment gives.

use super::prompt::SystemPrompt;
use super::{llm, StepAudio2};
use crate::model::ModelError;
use crate::ops::fast::{fast_paths, DecodeWeights};
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
    /// Ids expected after the prefix (the last hypothesis of the same audio,
    /// its prefix taken off): prefilled with the prompt and kept as far as the
    /// greedy choices agree with them, so each agreeing id costs no decode
    /// step. The turn's ids are the same as without.
    pub draft: Vec<u32>,
    /// Prompt tokens at the start of this turn that are cached from the last
    /// partial ([`Self::keep`]) and reused without a prefill, as far as the
    /// cache still holds them. The caller vouches that this turn's prompt
    /// begins with the same tokens and audio rows.
    pub reuse: usize,
    /// A partial: prompt tokens left in the cache after it, for the next
    /// partial to [`Self::reuse`] (0: the cache goes back to the committed
    /// context). A commit keeps nothing.
    pub keep: usize,
    /// A turn that does not commit but is closed and left in the cache as a
    /// commit would leave it, until the next turn begins (which drops it) or
    /// [`Session::commit_held`] commits it as it is: a pause decode, whose
    /// hypothesis usually becomes the segment's final, which then costs no
    /// model work at all instead of a prefill of the whole turn.
    pub hold: bool,
}

impl TurnOptions {
    pub fn new(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            record_logits: false,
            stop_at_eot: true,
            draft: Vec::new(),
            reuse: 0,
            keep: 0,
            hold: false,
        }
    }

    /// Whether a turn asked to `commit` (or not) is closed with `<|EOT|>` as
    /// a commit is: committed or held.
    fn closes(&self, commit: bool) -> bool {
        commit || self.hold
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
    /// Draft ids ([`TurnOptions::draft`]) offered in the prefill, and how many
    /// of them the greedy choices agreed with (taken without a decode step).
    pub draft_offered: usize,
    pub draft_taken: usize,
    /// Prompt tokens taken from the cache as the last partial left them
    /// ([`TurnOptions::reuse`]) instead of being prefilled.
    pub reused: usize,
}

pub struct Session {
    state: llm::LlmState,
    system_ids: Vec<u32>,
    committed: usize,
    /// Prompt tokens of the open segment's last partial cached after the
    /// committed context ([`TurnOptions::keep`]).
    open: usize,
    /// Cache length at the end of a held turn ([`TurnOptions::hold`]) still
    /// cached after the committed context.
    held: Option<usize>,
    opts: SessionOptions,
    restarts: usize,
    /// The fused decode step over this session's KV cache (CUDA, bf16), made on the
    /// first decode that can use it.
    fused: crate::ops::fast::FusedDecoder,
}

impl Session {
    /// Prefills the system prompt (or copies the cache of an earlier session
    /// with the same prompt) into a fresh cache sized for `max_context` plus
    /// one full turn, so a stream normally never reallocates it.
    pub fn new(sa: &StepAudio2, opts: SessionOptions) -> Result<Self, ModelError> {
        let llm = &sa.model.llm;
        let system_ids = sa.tokenizer.system_turn(opts.system_prompt.text())?;
        let capacity = Self::positions_for(&opts, llm.max_positions());
        let mut state = match sa.take_kv_slot(capacity) {
            Some(slot) => llm.state_in_slot(slot)?,
            None => llm.new_state(capacity),
        };
        sa.prefill_system_prompt(&system_ids, &mut state)?;
        let committed = state.len();
        Ok(Self {
            state,
            system_ids,
            committed,
            open: 0,
            held: None,
            opts,
            restarts: 0,
            fused: Default::default(),
        })
    }

    /// Positions a session with `opts` holds at most: a committed context of
    /// `max_context` plus a turn (a 25 s segment's audio, its header, the
    /// budget and the closing `<|EOT|>`), within the model's `max_positions`.
    pub fn positions_for(opts: &SessionOptions, max_positions: usize) -> usize {
        let turn = MAX_PATCHES_PER_SEGMENT + 32 + opts.max_new_tokens + 1;
        (opts.max_context + turn).min(max_positions)
    }

    /// Tokens in the committed context (system prompt included).
    pub fn committed_len(&self) -> usize {
        self.committed
    }

    pub fn system_len(&self) -> usize {
        self.system_ids.len()
    }

    pub fn options(&self) -> &SessionOptions {
        &self.opts
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
        self.open = 0;
        self.held = None;
    }

    /// Commits the held turn ([`TurnOptions::hold`]) as it is cached: the
    /// committed context becomes what committing its decode would have made
    /// it. False (nothing changed) when no turn is held, e.g. a later turn
    /// dropped it.
    pub fn commit_held(&mut self) -> bool {
        match self.held.take() {
            Some(len) if self.state.len() == len => {
                self.committed = len;
                if self.committed > self.opts.max_context {
                    self.restart("budget passed");
                }
                true
            }
            _ => false,
        }
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
        let closes = opts.closes(commit);
        let result = self.greedy_turn(sa, &plan, audio, prefix, closes, opts);
        self.close_turn(&plan, closes, result)
    }

    /// Several streams' turns, each as [`Self::run_turn`] would run it alone, with
    /// the model's work batched: all of them join one [`TurnLoop`] (one batched
    /// prefill, every greedy step of the streams still generating as one step,
    /// the committed turns' closing `pending + <|EOT|>` as one forward) and are
    /// taken back as they end. A lone turn runs as [`Self::run_turn`] (on CUDA
    /// its own batch-1 fused step, the fastest at one stream).
    pub fn run_turns(
        sa: &StepAudio2,
        turns: &mut [TurnRequest<'_>],
    ) -> Vec<Result<TurnOutput, ModelError>> {
        if let [t] = turns {
            return vec![t.session.run_turn(sa, t.audio, t.prefix, t.commit, t.opts)];
        }
        let mut batch = TurnLoop::new(sa);
        let keys: Vec<u64> = (0..turns.len() as u64).collect();
        let mut results: Vec<Option<Result<TurnOutput, ModelError>>> = batch
            .admit(sa, &keys, turns)
            .into_iter()
            .map(|r| r.err().map(Err))
            .collect();
        while !batch.is_idle() {
            for key in batch.step(sa) {
                let i = key as usize;
                results[i] = batch.finish(key, turns[i].session);
            }
        }
        batch.log("batch of turns");
        results
            .into_iter()
            .map(|r| r.expect("every turn is closed"))
            .collect()
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
        // The model's position table, and a pool slot's positions, are hard
        // limits, for partials too. A turn whose budget they would cut
        // restarts first, so that a final is never cut short by them.
        let max_pos = self
            .state
            .fixed_positions()
            .map_or(llm.max_positions(), |p| p.min(llm.max_positions()));
        let mut restarted = false;
        let needed = self.committed + turn_len + 1 + opts.max_new_tokens;
        if needed > max_pos && self.committed > self.system_len() {
            self.restart("would pass the positions it may hold");
            restarted = true;
        }
        let room = max_pos.saturating_sub(self.committed + turn_len + 1);
        if room == 0 {
            return Err(ModelError::Invalid(format!(
                "a turn of {turn_len} tokens does not fit the {max_pos} positions a stream may hold"
            )));
        }
        // The last partial's cached prompt start, as far as this turn reuses it.
        let reused = if restarted {
            0
        } else {
            opts.reuse.min(self.open).min(prompt.len())
        };
        self.state.truncate(self.committed + reused);
        self.open = 0;
        self.held = None;
        debug_assert_eq!(self.state.len(), self.committed + reused);
        let budget = opts.max_new_tokens.min(room);
        Ok(TurnPlan {
            reused,
            keep: opts.keep.min(prompt.len()),
            prompt,
            turn_len,
            budget,
            // within the budget, so the drafted positions fit the model's
            draft: opts.draft.len().min(budget.saturating_sub(1)),
            base: self.committed,
            restarted,
            hold: opts.hold,
        })
    }

    /// The epilogue of a turn: a commit moves the committed length (and
    /// restarts past `max_context`), a held turn (closed as a commit) stays
    /// cached past it; a partial truncates the cache back to where the turn
    /// began plus the prompt tokens it keeps, an error to where it began.
    fn close_turn(
        &mut self,
        plan: &TurnPlan,
        commit: bool,
        result: Result<TurnOutput, ModelError>,
    ) -> Result<TurnOutput, ModelError> {
        let mut restarted = plan.restarted;
        match result {
            Ok(mut out) => {
                if commit && plan.hold {
                    self.held = Some(self.state.len());
                } else if commit {
                    self.committed = self.state.len();
                    if self.committed > self.opts.max_context {
                        self.restart("budget passed");
                        restarted = true;
                    }
                } else {
                    self.state.truncate(plan.base + plan.keep);
                    self.open = plan.keep;
                }
                out.prompt_tokens = plan.turn_len;
                out.reused = plan.reused;
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
        let weights = llm.decode_weights();
        let mut g = Greedy::prefill(sa, &weights, &mut self.state, plan, audio, prefix, opts)?;
        // The fused decode step, where the device has one: it chooses the next id
        // itself (and sums its log-probability on the device).
        let mut fused = if plan.budget > 1 {
            self.fused.prepare(&weights)?
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
        g.finish(sa, &weights, &mut self.state, prefix, commit)
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

/// New positions of one or several streams in one forward (as
/// [`llm::Qwen2Llm::forward_batch`]): through the batched fused kernels where
/// the device has them, which run a stream's rows the same way alone or beside
/// others; else candle ops.
fn forward_rows(
    sa: &StepAudio2,
    weights: &DecodeWeights,
    embeds: &[Tensor],
    states: &mut [&mut llm::LlmState],
) -> candle_core::Result<Vec<Tensor>> {
    let mut decoder = sa.batch_decoder.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(mut f) = decoder.prepare(weights)? {
        if let Some(hidden) = f.prefill(embeds, states)? {
            return Ok(hidden);
        }
    }
    drop(decoder);
    sa.model.llm.forward_batch(embeds, states)
}

/// Greedy choices of prefill rows: ids, log-probabilities `[R]`, logits `[R, V]`.
type Choices = (Vec<u32>, Tensor, Tensor);

/// The greedy choices at the last `1 + d_i` rows of each prefilled turn
/// (`heads[i] = (hidden_i [1, n_i, H], d_i)`: its prefill's final-norm states
/// and its draft length): after the prompt, then after each draft id. One
/// `lm_head` GEMM and one read-back for all: the ids in turn order, with their
/// log-probabilities `[R]` and logits `[R, V]` (model dtype) on the device.
fn predictions(sa: &StepAudio2, heads: &[(&Tensor, usize)]) -> candle_core::Result<Choices> {
    let last = heads
        .iter()
        .map(|(h, d)| h.narrow(1, h.dim(1)? - 1 - d, 1 + d))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let logits = sa.model.llm.logits_rows(&Tensor::cat(&last, 1)?)?;
    let ids = logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
    Ok((ids, llm::max_logprob(&logits)?, logits))
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

/// Turns of several sessions that join and leave one running greedy loop
/// between its steps (continuous batching): turns admitted together are
/// prefilled as one batched forward (which, switch `fold`, also takes the
/// running turns' next step) and take part in the next step; a turn
/// that ends (`<|EOT|>`, its budget) is closed — a commit's `pending +
/// <|EOT|>` with the others ending at the same step, as one forward — and
/// can be taken back while the others go on. Each turn gives exactly what
/// [`Session::run_turn`] gives it alone. Where the fused decode step applies
/// (CUDA, bf16) the steps go through the batched fused step shared by the
/// model's sessions. While its turn is in the loop a session's KV cache is
/// the loop's: [`TurnLoop::finish`] (or [`TurnLoop::abandon`]) hands it back.
/// A loop serves the sessions of the model it was made for.
pub struct TurnLoop {
    /// The model's decoder weights, gathered once rather than every step.
    weights: DecodeWeights,
    live: Vec<LoopTurn>,
    /// Closed turns not taken back yet.
    ended: Vec<EndedTurn>,
    /// Keys of `ended` that [`Self::step`] has not reported yet.
    fresh: Vec<u64>,
    /// The live turns took this round's step inside the last admission's
    /// prefill (switch `fold`): the next [`Self::step`] only reports.
    stepped: bool,
    /// Steps taken inside admissions since the loop began.
    folded: usize,
    stats: LoopStats,
}

/// A turn decoding in a [`TurnLoop`].
struct LoopTurn {
    key: u64,
    state: llm::LlmState,
    plan: TurnPlan,
    greedy: Greedy,
    prefix: Vec<u32>,
    commit: bool,
    opts: TurnOptions,
}

/// A closed turn of a [`TurnLoop`], waiting for its session.
struct EndedTurn {
    key: u64,
    state: llm::LlmState,
    plan: TurnPlan,
    commit: bool,
    result: Result<TurnOutput, ModelError>,
}

/// Where a [`TurnLoop`]'s time went since its last log line.
struct LoopStats {
    since: Instant,
    admitted: usize,
    prefill: Duration,
    steps: usize,
    /// Of `steps`, those taken inside an admission's prefill.
    folded: usize,
    stepping: Duration,
    widest: usize,
    /// Draft ids offered in prefills, and those taken.
    drafted: usize,
    draft_taken: usize,
    /// Prompt tokens of the admitted turns, and those reused from the cache
    /// as the last partial left them.
    prompt: usize,
    reused: usize,
}

impl Default for LoopStats {
    fn default() -> Self {
        Self {
            since: Instant::now(),
            admitted: 0,
            prefill: Duration::ZERO,
            steps: 0,
            folded: 0,
            stepping: Duration::ZERO,
            widest: 0,
            drafted: 0,
            draft_taken: 0,
            prompt: 0,
            reused: 0,
        }
    }
}

/// The caches of `items` at the ascending indices `which`, in that order.
fn states_at<'a, T>(
    items: &'a mut [T],
    which: &[usize],
    state: fn(&mut T) -> &mut llm::LlmState,
) -> Vec<&'a mut llm::LlmState> {
    items
        .iter_mut()
        .enumerate()
        .filter(|(k, _)| which.binary_search(k).is_ok())
        .map(|(_, t)| state(t))
        .collect()
}

impl TurnLoop {
    /// An empty loop for the sessions of `sa`.
    pub fn new(sa: &StepAudio2) -> Self {
        Self {
            weights: sa.model.llm.decode_weights(),
            live: Vec::new(),
            ended: Vec::new(),
            fresh: Vec::new(),
            stepped: false,
            folded: 0,
            stats: LoopStats::default(),
        }
    }

    /// Turns decoding (not ended).
    pub fn running(&self) -> usize {
        self.live.len()
    }

    /// Nothing decoding and nothing left to take back.
    pub fn is_idle(&self) -> bool {
        self.live.is_empty() && self.ended.is_empty()
    }

    /// Steps of the running turns taken inside an admission's prefill so far.
    pub fn steps_in_admissions(&self) -> usize {
        self.folded
    }

    /// Starts the `turns` (`keys[i]` names `turns[i]`): their prologues, one
    /// batched prefill (at most [`PREFILL_ROWS`] rows a forward; a failed
    /// forward is run again stream by stream) and their first ids. An error
    /// costs only its own turn, whose session is left as it was (a session
    /// whose turn is still in a loop is refused). With switch `fold` the
    /// running turns take their next step inside the first prefill forward,
    /// one row each, so the [`Self::step`] after it runs nothing: both read
    /// all the weights, and a step's rows add little to a prefill's (H200,
    /// 128–160 streams: 2–7 % more turns a second). Where that forward
    /// fails they step as usual.
    pub fn admit(
        &mut self,
        sa: &StepAudio2,
        keys: &[u64],
        turns: &mut [TurnRequest<'_>],
    ) -> Vec<Result<(), ModelError>> {
        let start = Instant::now();
        let llm = &sa.model.llm;
        let running = self.live.len();
        let mut results: Vec<Result<(), ModelError>> = turns.iter().map(|_| Ok(())).collect();
        let mut inputs = Vec::with_capacity(turns.len());
        for (i, t) in turns.iter_mut().enumerate() {
            if t.session.state.num_layers() == 0 {
                results[i] = Err(ModelError::Invalid(
                    "the session already has a turn in a decode loop".into(),
                ));
                continue;
            }
            let plan = match t.session.plan_turn(sa, t.audio, t.prefix, t.opts) {
                Ok(p) => p,
                Err(e) => {
                    results[i] = Err(e);
                    continue;
                }
            };
            match Greedy::prompt_embeds(sa, &plan, t.audio, t.prefix, t.opts) {
                Ok(e) => inputs.push((i, plan, e)),
                Err(e) => results[i] = t.session.close_turn(&plan, t.commit, Err(e)).map(drop),
            }
        }
        let mut states: Vec<llm::LlmState> = inputs
            .iter()
            .map(|(i, _, _)| std::mem::take(&mut turns[*i].session.state))
            .collect();
        let mut hidden: Vec<Option<Result<Tensor, ModelError>>> =
            inputs.iter().map(|_| None).collect();
        // The running turns' next ids, one row each, ride along the first forward.
        let riders = (fast_paths().fold && !inputs.is_empty() && !self.live.is_empty())
            .then(|| self.step_rows(sa))
            .and_then(|r| {
                r.inspect_err(|e| tracing::warn!("no step inside the admission ({e})"))
                    .ok()
            });
        let rider_lens: Vec<usize> = self.live.iter().map(|t| t.state.len()).collect();
        let mut rider_hidden: Option<Vec<Tensor>> = None;
        for (c, chunk) in prefill_chunks(&inputs).into_iter().enumerate() {
            let mut embeds: Vec<Tensor> = chunk.iter().map(|&k| inputs[k].2.clone()).collect();
            let mut chunk_states = states_at(&mut states, &chunk, |s| s);
            let ride = c == 0 && riders.is_some();
            if ride {
                embeds.extend(riders.iter().flatten().cloned());
                chunk_states.extend(self.live.iter_mut().map(|t| &mut t.state));
            }
            let batched = forward_rows(sa, &self.weights, &embeds, &mut chunk_states)
                .inspect_err(|e| tracing::warn!("batched prefill failed ({e}); one by one"))
                .ok();
            drop(chunk_states);
            match &batched {
                Some(h) if ride => rider_hidden = Some(h[chunk.len()..].to_vec()),
                Some(_) => {}
                None => {
                    // roll back whatever part of the batch reached the caches
                    for &k in &chunk {
                        states[k].truncate(inputs[k].1.base + inputs[k].1.reused);
                    }
                    if ride {
                        self.unstep(&rider_lens);
                    }
                }
            }
            for (j, &k) in chunk.iter().enumerate() {
                hidden[k] = Some(match &batched {
                    Some(h) => Ok(h[j].clone()),
                    None => llm
                        .forward(&inputs[k].2, &mut states[k])
                        .map_err(Into::into),
                });
            }
        }
        // The greedy choices of all prefilled turns with a budget: one lm_head
        // GEMM and one read-back (a turn alone where that fails).
        let heads: Vec<(usize, &Tensor)> = hidden
            .iter()
            .enumerate()
            .filter(|(k, _)| inputs[*k].1.budget > 0)
            .filter_map(|(k, h)| Some((k, h.as_ref()?.as_ref().ok()?)))
            .collect();
        let mut rows: Vec<(&Tensor, usize)> =
            heads.iter().map(|&(k, h)| (h, inputs[k].1.draft)).collect();
        rows.extend(rider_hidden.iter().flatten().map(|h| (h, 0)));
        let chosen = (!rows.is_empty())
            .then(|| predictions(sa, &rows))
            .and_then(|r| {
                r.inspect_err(|e| tracing::warn!("batched greedy choices failed ({e}); one by one"))
                    .ok()
            });
        // Where each turn's rows start among the choices.
        let mut offsets = vec![None; inputs.len()];
        let mut offset = 0;
        for &(k, _) in &heads {
            offsets[k] = Some(offset);
            offset += 1 + inputs[k].1.draft;
        }
        drop(heads);
        // The riders' choices follow the new turns'.
        let stepped = match (&rider_hidden, &chosen) {
            (Some(_), Some(choices)) => self
                .take_step_choices(choices, offset)
                .inspect_err(|e| tracing::warn!("the step inside the admission failed ({e})"))
                .is_ok(),
            _ => false,
        };
        if rider_hidden.is_some() && !stepped {
            self.unstep(&rider_lens);
        }
        let mut greedy: Vec<Result<Greedy, ModelError>> = Vec::with_capacity(inputs.len());
        for (k, h) in hidden.into_iter().enumerate() {
            let (i, plan, _) = &inputs[k];
            let opts = turns[*i].opts;
            let state = &mut states[k];
            greedy.push(
                match (h.expect("every input is prefilled"), &chosen, offsets[k]) {
                    (Err(e), ..) => Err(e),
                    (Ok(_), Some(choices), Some(at)) => {
                        Greedy::started(sa, plan, state, choices, at, opts, start)
                    }
                    (Ok(h), ..) => Greedy::prefilled(sa, plan, &h, state, opts, start),
                },
            );
        }
        for (((i, plan, _), state), g) in inputs.into_iter().zip(states).zip(greedy) {
            let t = &mut turns[i];
            match g {
                Ok(greedy) => {
                    self.stats.drafted += greedy.out.draft_offered;
                    self.stats.draft_taken += greedy.out.draft_taken;
                    self.stats.prompt += plan.turn_len;
                    self.stats.reused += plan.reused;
                    self.live.push(LoopTurn {
                        key: keys[i],
                        state,
                        plan,
                        greedy,
                        prefix: t.prefix.to_vec(),
                        commit: t.opts.closes(t.commit),
                        opts: t.opts.clone(),
                    })
                }
                Err(e) => {
                    t.session.state = state;
                    results[i] = t.session.close_turn(&plan, t.commit, Err(e)).map(drop);
                }
            }
        }
        self.stats.admitted += turns.len();
        self.stats.prefill += start.elapsed();
        if stepped {
            self.stepped = true;
            self.folded += 1;
            self.stats.steps += 1;
            self.stats.folded += 1;
            self.stats.widest = self.stats.widest.max(running);
        }
        // The new turns take their first ids (the running ones took theirs
        // at their last step, or in this prefill).
        self.sweep(sa, if stepped { 0 } else { running });
        results
    }

    /// The inputs `[1, 1, H]` of the live turns' next step, in turn order.
    fn step_rows(&self, sa: &StepAudio2) -> candle_core::Result<Vec<Tensor>> {
        let ids: Vec<u32> = self.live.iter().map(|t| t.greedy.next).collect();
        let embeds = sa.model.llm.embed(&ids)?;
        (0..ids.len())
            .map(|j| embeds.narrow(0, j, 1)?.unsqueeze(0))
            .collect()
    }

    /// The live turns take the next ids of a step run inside a prefill: their
    /// rows of `choices` from row `at` on. Reads everything before it changes
    /// a turn, so an error leaves every turn as it was.
    fn take_step_choices(
        &mut self,
        (ids, lps, logits): &Choices,
        at: usize,
    ) -> Result<(), ModelError> {
        let width = self.live.len();
        let lps = lps
            .narrow(0, at, width)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let recorded = self
            .live
            .iter()
            .enumerate()
            .map(|(j, t)| {
                t.opts
                    .record_logits
                    .then(|| logits.get(at + j)?.to_dtype(DType::F32))
                    .transpose()
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        for (j, (t, l)) in self.live.iter_mut().zip(recorded).enumerate() {
            t.greedy.take_fused(ids[at + j], lps[j], l, width);
        }
        Ok(())
    }

    /// The live turns' caches back to `lens` (a step inside a prefill that
    /// did not take).
    fn unstep(&mut self, lens: &[usize]) {
        for (t, &len) in self.live.iter_mut().zip(lens) {
            t.state.truncate(len);
        }
    }

    /// One greedy step of every decoding turn (none where the last admission
    /// took it); the keys of the turns ended since the last call (by this
    /// step, or already at their admission). A failed step fails every turn
    /// in it.
    pub fn step(&mut self, sa: &StepAudio2) -> Vec<u64> {
        if std::mem::take(&mut self.stepped) {
            return std::mem::take(&mut self.fresh);
        }
        if !self.live.is_empty() {
            let start = Instant::now();
            self.stats.steps += 1;
            self.stats.widest = self.stats.widest.max(self.live.len());
            match self.step_live(sa) {
                Ok(()) => self.sweep(sa, 0),
                Err(e) => {
                    for t in std::mem::take(&mut self.live) {
                        let err = ModelError::Invalid(format!("batched decode step: {e}"));
                        self.end(t.key, t.state, t.plan, t.commit, Err(err));
                    }
                }
            }
            self.stats.stepping += start.elapsed();
        }
        std::mem::take(&mut self.fresh)
    }

    /// The output of the ended turn `key`, its cache back in `session` (the
    /// turn committed, or rolled back); `None` for a key not ended here.
    pub fn finish(
        &mut self,
        key: u64,
        session: &mut Session,
    ) -> Option<Result<TurnOutput, ModelError>> {
        let k = self.ended.iter().position(|e| e.key == key)?;
        let e = self.ended.swap_remove(k);
        session.state = e.state;
        Some(session.close_turn(&e.plan, e.commit, e.result))
    }

    /// Drops the turn `key` wherever it is, its session's cache rolled back to
    /// its committed context; false for a key not here.
    pub fn abandon(&mut self, key: u64, session: &mut Session) -> bool {
        let (state, plan) = if let Some(k) = self.live.iter().position(|t| t.key == key) {
            let t = self.live.swap_remove(k);
            (t.state, t.plan)
        } else if let Some(k) = self.ended.iter().position(|e| e.key == key) {
            let e = self.ended.swap_remove(k);
            (e.state, e.plan)
        } else {
            return false;
        };
        self.fresh.retain(|&f| f != key);
        session.state = state;
        let dropped = Err(ModelError::Invalid("abandoned".into()));
        let _ = session.close_turn(&plan, false, dropped);
        true
    }

    /// Logs where the loop's time went since the last log (debug: read by
    /// `scripts/stage_times.py`).
    pub fn log(&mut self, what: &'static str) {
        let s = std::mem::take(&mut self.stats);
        tracing::debug!(
            turns = s.admitted,
            prefill_ms = s.prefill.as_secs_f64() * 1e3,
            decode_ms = s.stepping.as_secs_f64() * 1e3,
            steps = s.steps,
            steps_in_prefill = s.folded,
            widest = s.widest,
            drafted = s.drafted,
            draft_taken = s.draft_taken,
            prompt = s.prompt,
            reused = s.reused,
            seconds = s.since.elapsed().as_secs_f64(),
            "{what}"
        );
    }

    /// Logs once a second at most.
    pub fn log_every_second(&mut self, what: &'static str) {
        if self.stats.since.elapsed() >= Duration::from_secs(1) {
            self.log(what);
        }
    }

    /// One step of the live turns, each choosing its next id.
    fn step_live(&mut self, sa: &StepAudio2) -> Result<(), ModelError> {
        let llm = &sa.model.llm;
        let width = self.live.len();
        let ids: Vec<u32> = self.live.iter().map(|t| t.greedy.next).collect();
        let mut states: Vec<&mut llm::LlmState> =
            self.live.iter_mut().map(|t| &mut t.state).collect();
        let mut decoder = sa.batch_decoder.lock().unwrap_or_else(|e| e.into_inner());
        let fused = decoder.prepare(&self.weights).unwrap_or_else(|e| {
            tracing::warn!("batched fused decode unavailable ({e}); candle ops");
            None
        });
        match fused {
            Some(mut f) => {
                let outs = f.step(&ids, &mut states)?;
                drop(states);
                let record = self.live.iter().any(|t| t.opts.record_logits);
                let logits = if record { Some(f.logits()?) } else { None };
                for (row, (t, (next, lp))) in self.live.iter_mut().zip(outs).enumerate() {
                    let row_logits = match (&logits, t.opts.record_logits) {
                        (Some(l), true) => Some(l.get(row)?),
                        _ => None,
                    };
                    t.greedy.take_fused(next, lp, row_logits, width);
                }
            }
            None => {
                let embeds = llm.embed(&ids)?.unsqueeze(1)?;
                let hidden = llm.forward_step_batch(&embeds, &mut states)?;
                drop(states);
                let logits = llm.logits_rows(&hidden)?;
                for (row, t) in self.live.iter_mut().enumerate() {
                    t.greedy.choose(&logits.get(row)?, width, &t.opts)?;
                }
            }
        }
        Ok(())
    }

    /// Takes the chosen id of each live turn from index `from` on; the turns
    /// that ended leave the loop and are closed, the committed ones' tails as
    /// one batched forward (one at a time where it fails).
    fn sweep(&mut self, sa: &StepAudio2, from: usize) {
        let llm = &sa.model.llm;
        let eot = sa.tokenizer.eot;
        let mut ending = Vec::new();
        for mut t in self.live.split_off(from) {
            if t.greedy.accept(eot, &t.opts) {
                self.live.push(t);
            } else {
                ending.push(t);
            }
        }
        let committing: Vec<usize> = (0..ending.len()).filter(|&k| ending[k].commit).collect();
        let lengths: Vec<usize> = committing.iter().map(|&k| ending[k].state.len()).collect();
        let tails = committing
            .iter()
            .map(|&k| llm.embed(&ending[k].greedy.tail(eot))?.unsqueeze(0))
            .collect::<candle_core::Result<Vec<_>>>();
        let batched = match tails {
            Ok(tails) if !tails.is_empty() => {
                let mut states = states_at(&mut ending, &committing, |t| &mut t.state);
                let ok = forward_rows(sa, &self.weights, &tails, &mut states).is_ok();
                if !ok {
                    for (s, &len) in states.into_iter().zip(&lengths) {
                        s.truncate(len);
                    }
                }
                ok
            }
            _ => false,
        };
        for t in ending {
            let LoopTurn {
                key,
                mut state,
                plan,
                greedy,
                prefix,
                commit,
                ..
            } = t;
            let result = if commit && !batched {
                greedy.finish(sa, &self.weights, &mut state, &prefix, true)
            } else {
                greedy.output(sa, &prefix)
            };
            self.end(key, state, plan, commit, result);
        }
    }

    fn end(
        &mut self,
        key: u64,
        state: llm::LlmState,
        plan: TurnPlan,
        commit: bool,
        result: Result<TurnOutput, ModelError>,
    ) {
        self.fresh.push(key);
        self.ended.push(EndedTurn {
            key,
            state,
            plan,
            commit,
            result,
        });
    }
}

/// What a turn's prologue settled: its prompt, the greedy budget that fits
/// the model's positions, and the committed length it rolls back to.
#[derive(Clone)]
struct TurnPlan {
    prompt: super::prompt::PromptIds,
    /// Prompt + forced prefix tokens.
    turn_len: usize,
    budget: usize,
    /// Draft ids prefilled after the prefix.
    draft: usize,
    /// Prompt tokens already cached (reused from the last partial).
    reused: usize,
    /// Prompt tokens a partial leaves cached for the next one.
    keep: usize,
    base: usize,
    restarted: bool,
    /// Closed as a commit but held, not committed ([`TurnOptions::hold`]).
    hold: bool,
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
        weights: &DecodeWeights,
        state: &mut llm::LlmState,
        plan: &TurnPlan,
        audio: &[Tensor],
        prefix: &[u32],
        opts: &TurnOptions,
    ) -> Result<Self, ModelError> {
        let start = Instant::now();
        let embeds = Self::prompt_embeds(sa, plan, audio, prefix, opts)?;
        let hidden = forward_rows(sa, weights, &[embeds], &mut [&mut *state])?.remove(0);
        Self::prefilled(sa, plan, &hidden, state, opts, start)
    }

    /// The turn's prefill input `[1, n, H]`: prompt (audio patches replaced by
    /// `audio`) past its reused start, then the forced prefix and the draft.
    fn prompt_embeds(
        sa: &StepAudio2,
        plan: &TurnPlan,
        audio: &[Tensor],
        prefix: &[u32],
        opts: &TurnOptions,
    ) -> Result<Tensor, ModelError> {
        let mut embeds = sa.model.embed_prompt(&plan.prompt, audio)?;
        if plan.reused > 0 {
            embeds = embeds.narrow(0, plan.reused, embeds.dim(0)? - plan.reused)?;
        }
        let forced: Vec<u32> = prefix
            .iter()
            .chain(&opts.draft[..plan.draft])
            .copied()
            .collect();
        if !forced.is_empty() {
            embeds = Tensor::cat(&[embeds, sa.model.llm.embed(&forced)?], 0)?;
        }
        Ok(embeds.unsqueeze(0)?)
    }

    /// The turn after its prefill (`hidden` `[1, n, H]`, begun at `start`):
    /// its greedy choices at the prompt's end and after each draft id (see
    /// [`Self::started`]), if the budget allows one.
    fn prefilled(
        sa: &StepAudio2,
        plan: &TurnPlan,
        hidden: &Tensor,
        state: &mut llm::LlmState,
        opts: &TurnOptions,
        start: Instant,
    ) -> Result<Self, ModelError> {
        if plan.budget == 0 {
            return Ok(Self::new(plan, start));
        }
        let choices = predictions(sa, &[(hidden, plan.draft)])?;
        Self::started(sa, plan, state, &choices, 0, opts, start)
    }

    fn new(plan: &TurnPlan, start: Instant) -> Self {
        Greedy {
            out: TurnOutput::default(),
            budget: plan.budget,
            next: 0,
            pending: None,
            logprob: None,
            fused_logprob: 0.0,
            start,
            first_read: None,
        }
    }

    /// The turn from its prefill's greedy choices (its last `1 + plan.draft`
    /// rows in [`predictions`], from row `at`): the
    /// first id, then each draft id the choice before it agrees with is taken
    /// as a step would have taken it (its row already ran through the model),
    /// and the choice after the last agreeing one is next. The cache drops the
    /// rows of the draft ids not taken.
    #[allow(clippy::too_many_arguments)]
    fn started(
        sa: &StepAudio2,
        plan: &TurnPlan,
        state: &mut llm::LlmState,
        (ids, lps, logits): &Choices,
        at: usize,
        opts: &TurnOptions,
        start: Instant,
    ) -> Result<Self, ModelError> {
        let eot = sa.tokenizer.eot;
        let ids = &ids[at..at + 1 + plan.draft];
        let draft = &opts.draft[..plan.draft];
        let mut g = Self::new(plan, start);
        g.next = ids[0];
        let mut taken = 0;
        // Within the budget (`plan.draft` < budget), so `accept` goes on.
        while taken < draft.len()
            && g.next == draft[taken]
            && !(g.next == eot && opts.stop_at_eot)
            && g.accept(eot, opts)
        {
            taken += 1;
            g.next = ids[taken];
        }
        state.truncate(plan.base + plan.turn_len + taken);
        g.logprob = Some(lps.narrow(0, at, taken + 1)?.sum_keepdim(0)?);
        if opts.record_logits {
            for row in at..=at + taken {
                g.out
                    .step_logits
                    .push(logits.get(row)?.to_dtype(DType::F32)?);
            }
        }
        g.out.draft_offered = plan.draft;
        g.out.draft_taken = taken;
        g.first_read = Some(Instant::now());
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
        weights: &DecodeWeights,
        state: &mut llm::LlmState,
        prefix: &[u32],
        commit: bool,
    ) -> Result<TurnOutput, ModelError> {
        let llm = &sa.model.llm;
        if commit {
            let tail = llm.embed(&self.tail(sa.tokenizer.eot))?.unsqueeze(0)?;
            forward_rows(sa, weights, &[tail], &mut [state])?;
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
