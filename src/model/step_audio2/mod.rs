//! Step-Audio 2 mini: a Whisper-style audio encoder with average pooling, an
//! adapter into the LLM's embedding space, and a Qwen2.5-shaped LLM that
//! writes the transcript; loaded from the published checkpoint layout.
//!
//! Long audio: the published code cuts it into 25 s pieces and runs their
//! mels through the encoder as **one batch** (zero-padded to the longest,
//! key-mask parity from the padded length). This implementation takes that
//! batched path ([`StepAudio2Model::audio_embeddings`]), since it is what the
//! weights were used with; a live segment (≤ 25 s) is a batch of one.
//!
//! Tensor code stays on the model's device and dtype; the decode loop reads
//! back only the sampled id per step. Live streams decoded at the same time
//! share each LLM decode step as one batch
//! ([`StepAudio2Recognizer::decode_batch`]), their new segments encoded in
//! batches of similar lengths. Each decode of an open segment carries the
//! segment's last hypothesis as its draft ([`TurnOptions::draft`]).

pub mod adapter;
pub mod config;
pub mod encoder;
pub mod llm;
pub mod load;
pub mod prompt;
pub mod session;

use crate::frontend::{
    LogMel, MelExtractor, HOP_LENGTH, STEP_AUDIO_PIECE_SAMPLES, STEP_AUDIO_TAIL_PADDING,
};
use crate::model::kv_pool::{KvPool, KvSlot};
use crate::model::recognizer::{FrontendSpec, Hypothesis, Recognizer, SegmentFeatures};
use crate::model::ModelError;
use adapter::Adapter;
use candle_core::{DType, Device, Tensor};
use config::StepAudio2Config;
use encoder::{AudioEncoder, EncoderOutput};
use llm::Qwen2Llm;
use prompt::{PromptIds, StepTokenizer};
pub use session::{Session, SessionOptions, TurnLoop, TurnOptions, TurnOutput, TurnRequest};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest audio of one piece / one live segment.
pub(crate) const MAX_SEGMENT_SECONDS: f64 = 25.0;
/// Mel frames of a full 25 s piece: (400000 + 479) / 160.
pub(crate) const MAX_PIECE_FRAMES: usize =
    (STEP_AUDIO_PIECE_SAMPLES + STEP_AUDIO_TAIL_PADDING) / HOP_LENGTH;

/// The weights: encoder, adapter and LLM on one device in one dtype.
pub struct StepAudio2Model {
    pub config: StepAudio2Config,
    pub encoder: AudioEncoder,
    pub adapter: Adapter,
    pub llm: Qwen2Llm,
    pub device: Device,
    pub dtype: DType,
}

impl StepAudio2Model {
    /// Bytes of KV cache one stream holds with the default session options: a
    /// pool slot of [`Session::positions_for`] positions (a session outside a
    /// pool starts with buffers of that size).
    pub fn kv_bytes_per_stream(&self) -> usize {
        let positions =
            Session::positions_for(&SessionOptions::default(), self.llm.max_positions());
        self.llm.slot_shape(positions).bytes(self.dtype)
    }

    /// Bytes of all weight tensors (as held on the device, fused q/k/v included).
    pub fn parameter_bytes(&self) -> usize {
        use crate::model::layers::{Conv1d, LayerNorm, Linear};
        let t = |x: &Tensor| x.elem_count() * x.dtype().size_in_bytes();
        let lin = |l: &Linear| t(&l.weight) + l.bias.as_ref().map_or(0, t);
        let ln = |l: &LayerNorm| t(&l.gamma) + t(&l.beta);
        let conv = |c: &Conv1d| t(&c.weight) + t(&c.bias);
        let e = &self.encoder;
        let mut n = conv(&e.conv1) + conv(&e.conv2) + t(&e.positions) + ln(&e.after_norm);
        for b in &e.blocks {
            n += ln(&b.attn_ln)
                + lin(&b.qkv)
                + lin(&b.out)
                + ln(&b.mlp_ln)
                + lin(&b.fc1)
                + lin(&b.fc2);
        }
        let a = &self.adapter;
        n += conv(&a.conv) + lin(&a.linear1) + lin(&a.linear2);
        let l = &self.llm;
        n += t(&l.embed_tokens) + t(&l.norm.weight) + lin(&l.lm_head) + t(&l.cos) + t(&l.sin);
        for y in &l.layers {
            n += t(&y.input_layernorm.weight)
                + lin(&y.qkv)
                + lin(&y.o_proj)
                + t(&y.post_attention_layernorm.weight)
                + lin(&y.gate_up)
                + lin(&y.down_proj);
        }
        n
    }

    /// Mels as one batch `[B, n_mels, T]`, zero-padded on the right to the
    /// longest (the published padding value), with their lengths.
    pub fn mel_batch(&self, mels: &[&LogMel]) -> Result<(Tensor, Vec<usize>), ModelError> {
        let n_mels = self.config.encoder.n_mels;
        if let Some(m) = mels.iter().find(|m| m.n_mels != n_mels) {
            return Err(ModelError::Invalid(format!(
                "log-mel has {} bins, the model expects {n_mels}",
                m.n_mels
            )));
        }
        let t = mels.iter().map(|m| m.n_frames).max().unwrap_or(0);
        let mut data = vec![0f32; mels.len() * n_mels * t];
        for (b, m) in mels.iter().enumerate() {
            for (row, src) in m.data.chunks_exact(m.n_frames.max(1)).enumerate() {
                let dst = (b * n_mels + row) * t;
                data[dst..dst + m.n_frames].copy_from_slice(&src[..m.n_frames]);
            }
        }
        let x =
            Tensor::from_vec(data, (mels.len(), n_mels, t), &self.device)?.to_dtype(self.dtype)?;
        Ok((x, mels.iter().map(|m| m.n_frames).collect()))
    }

    /// The encoder on a batch of mels (one per 25 s piece).
    pub fn encode(&self, mels: &[&LogMel]) -> Result<EncoderOutput, ModelError> {
        let (x, lens) = self.mel_batch(mels)?;
        Ok(self.encoder.forward(&x, &lens)?)
    }

    /// Encoder + adapter on mels already on the device (`[n_mels, L_i]`, any float
    /// dtype), batched like [`Self::audio_embeddings`]: zero-padded on the right to the
    /// longest.
    pub(crate) fn audio_embeddings_from_tensors(
        &self,
        mels: &[Tensor],
    ) -> Result<Vec<Tensor>, ModelError> {
        let lens = mels
            .iter()
            .map(|m| m.dim(1))
            .collect::<candle_core::Result<Vec<_>>>()?;
        if lens.iter().all(|&l| l < 3) {
            let h = self.config.text.hidden_size;
            return mels
                .iter()
                .map(|_| Ok(Tensor::zeros((0, h), self.dtype, &self.device)?))
                .collect();
        }
        let t = lens.iter().copied().max().unwrap_or(0);
        let padded = mels
            .iter()
            .zip(&lens)
            .map(|(m, &l)| m.to_dtype(self.dtype)?.pad_with_zeros(1, 0, t - l))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let x = Tensor::stack(&padded, 0)?;
        let enc = self.encoder.forward(&x, &lens)?;
        Ok(self.adapter.kept_rows(&enc)?.0)
    }

    /// Encoder + adapter: per mel, the `[n_i, H]` rows that replace its
    /// `<audio_patch>` embeddings. All mels go through as one batch.
    pub fn audio_embeddings(&self, mels: &[&LogMel]) -> Result<Vec<Tensor>, ModelError> {
        // Fewer than 3 frames (< 20 ms) leave the conv stack nothing to pool.
        if mels.iter().all(|m| m.n_frames < 3) {
            let h = self.config.text.hidden_size;
            return mels
                .iter()
                .map(|_| Ok(Tensor::zeros((0, h), self.dtype, &self.device)?))
                .collect();
        }
        let enc = self.encode(mels)?;
        Ok(self.adapter.kept_rows(&enc)?.0)
    }

    /// Input embeddings `[n, H]` of `prompt`, its `<audio_patch>` positions
    /// replaced by `audio[i]` for the i-th run.
    pub fn embed_prompt(&self, prompt: &PromptIds, audio: &[Tensor]) -> Result<Tensor, ModelError> {
        if prompt.patch_runs.len() != audio.len() {
            return Err(ModelError::Invalid(format!(
                "prompt has {} audio pieces, {} given",
                prompt.patch_runs.len(),
                audio.len()
            )));
        }
        let mut parts = Vec::with_capacity(2 * audio.len() + 1);
        let mut cur = 0;
        for (&(start, n), rows) in prompt.patch_runs.iter().zip(audio) {
            if rows.dim(0)? != n {
                return Err(ModelError::Invalid(format!(
                    "{} audio rows for {n} patches",
                    rows.dim(0)?
                )));
            }
            if start > cur {
                parts.push(self.llm.embed(&prompt.ids[cur..start])?);
            }
            if n > 0 {
                parts.push(rows.to_dtype(self.dtype)?);
            }
            cur = start + n;
        }
        if cur < prompt.ids.len() {
            parts.push(self.llm.embed(&prompt.ids[cur..])?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }
}

/// Weights, tokenizer and log-mel frontend: everything a stream needs.
pub struct StepAudio2 {
    pub model: StepAudio2Model,
    pub tokenizer: StepTokenizer,
    pub mel: Arc<MelExtractor>,
    /// The same log-mel computed on the model's device, where it has a kernel for it.
    pub device_mel: Option<crate::ops::fast::DeviceMel>,
    /// The fused decode step of several sessions at once (CUDA, bf16), shared by all
    /// sessions of this model: [`Session::run_turns`] steps its streams through it.
    pub(crate) batch_decoder: std::sync::Mutex<crate::ops::fast::FusedBatchDecoder>,
    /// The sessions' KV caches in one preallocated pool, once streams were
    /// planned ([`Self::plan_kv_slots`]).
    kv_pool: std::sync::Mutex<KvPoolPlan>,
    /// What one encoder pass costs apart from its frames, in padded mel
    /// frames: new segments of several streams are grouped into passes to
    /// minimise Σ (this + segments × longest). On a GPU a pass's launches
    /// cost as much as ~[`GPU_ENCODE_PASS_FRAMES`] frames; on a CPU a pass
    /// costs its frames, so only equal lengths share one.
    pub encode_pass_frames: usize,
    /// The KV caches of the system prompts sessions began with (the latest
    /// few): a new session with the same prompt copies them instead of
    /// prefilling it, so opening a stream costs copies, not a forward.
    system_prompts: std::sync::Mutex<SystemPromptCache>,
}

/// System prompts kept cached at most ([`StepAudio2::system_prompts`]).
const SYSTEM_PROMPTS_KEPT: usize = 4;

/// Cached system prompts, newest first, and how many sessions copied one.
#[derive(Default)]
struct SystemPromptCache {
    kept: Vec<(Vec<u32>, llm::LlmState)>,
    copies: usize,
}

/// [`StepAudio2::encode_pass_frames`] on a GPU: one H200 measured 1.50 ms a
/// pass + 2.14 µs a padded frame (`benchmark_encoder_passes`, 1–32 segments
/// of 100–600 frames; docs/gpu-results/h200-finals-admitted-early.md).
pub const GPU_ENCODE_PASS_FRAMES: usize = 700;

/// How many pool slots to hold, and the pool once the first session made it.
#[derive(Default)]
struct KvPoolPlan {
    slots: usize,
    /// The pool and the slots planned when it was made (it may hold fewer:
    /// the device's memory bounds it).
    pool: Option<(KvPool, usize)>,
}

impl StepAudio2 {
    pub fn new(model: StepAudio2Model, tokenizer: StepTokenizer) -> Result<Self, ModelError> {
        let vocab = model.config.text.vocab_size as u32;
        let t = &tokenizer;
        for (name, id) in [
            ("<|BOT|>", t.bot),
            ("<|EOT|>", t.eot),
            ("<audio_start>", t.audio_start),
            ("<audio_end>", t.audio_end),
            ("<audio_patch>", t.audio_patch),
        ] {
            if id >= vocab {
                return Err(ModelError::Invalid(format!(
                    "tokenizer id {id} of {name} is outside the model's vocabulary of {vocab}"
                )));
            }
        }
        let mel = Arc::new(MelExtractor::new(model.config.encoder.n_mels));
        let n_mels = model.config.encoder.n_mels;
        let device_mel = crate::ops::fast::DeviceMel::new(
            &crate::frontend::mel_filterbank(n_mels),
            n_mels,
            &model.device,
        )?;
        let encode_pass_frames = if model.device.is_cpu() {
            0
        } else {
            GPU_ENCODE_PASS_FRAMES
        };
        Ok(Self {
            model,
            tokenizer,
            mel,
            device_mel,
            batch_decoder: Default::default(),
            kv_pool: Default::default(),
            encode_pass_frames,
            system_prompts: Default::default(),
        })
    }

    /// Fills the empty cache `state` with the system prompt `ids`: a copy of
    /// the cache an earlier session prefilled for the same ids, else a
    /// prefill, which is then kept for the next sessions.
    pub(crate) fn prefill_system_prompt(
        &self,
        ids: &[u32],
        state: &mut llm::LlmState,
    ) -> Result<(), ModelError> {
        let llm = &self.model.llm;
        let mut cache = self.system_prompt_cache();
        if let Some(k) = cache.kept.iter().position(|(kept, _)| kept == ids) {
            let entry = cache.kept.remove(k);
            let copied = state.append_from(&entry.1);
            cache.kept.insert(0, entry);
            match copied {
                Ok(()) => {
                    cache.copies += 1;
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!("copying the cached system prompt failed ({e}); prefilling it")
                }
            }
            state.truncate(0);
        }
        drop(cache);
        let embeds = llm.embed(ids)?.unsqueeze(0)?;
        llm.forward(&embeds, state)?;
        let mut kept = llm.new_state(ids.len());
        match kept.append_from(state) {
            Ok(()) => {
                let mut cache = self.system_prompt_cache();
                cache.kept.retain(|(k, _)| k != ids);
                cache.kept.insert(0, (ids.to_vec(), kept));
                cache.kept.truncate(SYSTEM_PROMPTS_KEPT);
            }
            Err(e) => tracing::warn!("keeping the system prompt's cache failed ({e})"),
        }
        Ok(())
    }

    /// Sessions so far that copied a cached system prompt instead of
    /// prefilling it.
    pub fn system_prompt_copies(&self) -> usize {
        self.system_prompt_cache().copies
    }

    fn system_prompt_cache(&self) -> std::sync::MutexGuard<'_, SystemPromptCache> {
        self.system_prompts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Holds the KV caches of the next sessions in one pool of `slots` slots,
    /// allocated at once when the first of them is made (its positions size
    /// every slot). A session that finds no free slot, or needs more
    /// positions than a slot has, keeps buffers of its own.
    pub fn plan_kv_slots(&self, slots: usize) {
        let mut plan = self.kv_plan();
        plan.slots = slots;
        if plan
            .pool
            .as_ref()
            .is_some_and(|(_, planned)| *planned < slots)
        {
            // Live sessions keep the old pool's memory until they close.
            plan.pool = None;
        }
    }

    /// The pool, if one was made.
    pub fn kv_pool(&self) -> Option<KvPool> {
        self.kv_plan().pool.as_ref().map(|(p, _)| p.clone())
    }

    /// A pool slot of at least `positions` positions, allocating the pool of
    /// the planned slots the first time ([`Self::new_kv_pool`]); `None`
    /// without a plan, when the pool cannot be made, every slot is taken, or
    /// slots are smaller.
    pub(crate) fn take_kv_slot(&self, positions: usize) -> Option<KvSlot> {
        let mut plan = self.kv_plan();
        if plan.slots == 0 {
            return None;
        }
        if plan.pool.is_none() {
            let Some(pool) = self.new_kv_pool(plan.slots, positions) else {
                plan.slots = 0;
                return None;
            };
            plan.pool = Some((pool, plan.slots));
        }
        let pool = &plan.pool.as_ref()?.0;
        if pool.shape().positions < positions {
            tracing::warn!(
                positions,
                slot = pool.shape().positions,
                "a session needs more positions than a KV pool slot: its cache is its own"
            );
            return None;
        }
        let slot = pool.take();
        if slot.is_none() {
            tracing::warn!(
                slots = pool.slots(),
                "every KV pool slot is taken: this session's cache is its own"
            );
        }
        slot
    }

    /// A pool of `planned` slots of `positions` each, or as many as three
    /// quarters of the device's free memory hold; `None` (logged) when not
    /// even one fits or the allocation fails.
    fn new_kv_pool(&self, planned: usize, positions: usize) -> Option<KvPool> {
        let shape = self.model.llm.slot_shape(positions);
        let slot_bytes = shape.bytes(self.model.dtype).max(1);
        let slots = match crate::ops::fast::device_memory_free(&self.model.device) {
            Some(free) => planned.min(free / 4 * 3 / slot_bytes),
            None => planned,
        };
        let made = match slots {
            0 => Err(candle_core::Error::Msg("no room on the device".into())),
            n => KvPool::new(n, shape, self.model.dtype, &self.model.device),
        };
        match made {
            Ok(pool) => {
                tracing::info!(
                    slots,
                    planned,
                    positions,
                    mib = pool.bytes() >> 20,
                    "Step-Audio 2 KV caches: one pool allocated"
                );
                Some(pool)
            }
            Err(e) => {
                tracing::warn!(planned, "no KV pool ({e}): each session's cache is its own");
                None
            }
        }
    }

    fn kv_plan(&self) -> std::sync::MutexGuard<'_, KvPoolPlan> {
        // A plan is a count and a handle: consistent whatever a panicking holder did.
        self.kv_pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Encoder + adapter rows of a whole recording (16 kHz mono): 25 s pieces, each its
    /// own mel (on the device when it has a log-mel kernel and that fast path is on),
    /// encoded as one batch.
    pub fn audio_rows(&self, audio: &[f32]) -> Result<Vec<Tensor>, ModelError> {
        match &self.device_mel {
            Some(dm) if crate::ops::fast::fast_paths().mel => {
                let mels = audio
                    .chunks(STEP_AUDIO_PIECE_SAMPLES)
                    .map(|piece| dm.compute(piece, STEP_AUDIO_TAIL_PADDING))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                self.model.audio_embeddings_from_tensors(&mels)
            }
            _ => {
                let mels = self.mel.step_audio_pieces(audio);
                let refs: Vec<&LogMel> = mels.iter().collect();
                self.model.audio_embeddings(&refs)
            }
        }
    }

    pub fn session(&self, opts: SessionOptions) -> Result<Session, ModelError> {
        Session::new(self, opts)
    }

    /// Offline ASR of a whole recording (16 kHz mono) as one committed turn:
    /// 25 s pieces, each its own mel, encoded as one batch.
    pub fn transcribe(
        &self,
        session: &mut Session,
        audio: &[f32],
        opts: &TurnOptions,
    ) -> Result<TurnOutput, ModelError> {
        let rows = self.audio_rows(audio)?;
        session.decode_final(self, &rows, &[], opts)
    }
}

/// Patches (≈ 1 s) at the end of a partial's audio that the next partial
/// encodes and prefills again with its new audio: the encoder attends both
/// ways, so the last rows change most once more audio follows.
const OPEN_OVERLAP_PATCHES: usize = 12;
/// Patches (≈ 1 s) before the first re-encoded one whose mel frames the
/// encoder reads too, their rows dropped, so the new rows have audio on
/// their left.
const OPEN_CONTEXT_PATCHES: usize = 12;
/// Mel frames per audio patch (conv stride 2, pooling 2, adapter stride 2).
const MEL_FRAMES_PER_PATCH: usize = 8;

/// An open segment's audio as its last partial left it: the adapter rows of
/// its first patches, which that partial also left in the session's cache
/// after the human turn's header ([`TurnOptions::keep`]).
struct OpenAudio {
    /// Raw mel frames those rows were computed from: a later decode of the
    /// segment begins with them.
    read: Vec<f32>,
    /// The segment's log-mel maximum then (it sets the normalisation).
    max: f32,
    /// Adapter rows `[k, H]` of the first k patches.
    rows: Tensor,
}

/// How a partial's encoded mel (the whole segment's, or its frames from
/// [`OPEN_CONTEXT_PATCHES`] before the first new patch) makes its audio
/// rows: the open rows it goes after, and how many of its first rows to drop.
struct PartialJoin {
    open: Option<Tensor>,
    drop: usize,
    max: f32,
}

/// [`Recognizer`] over a [`StepAudio2`] and one persistent [`Session`].
pub(crate) struct StepAudio2Recognizer {
    sa: Arc<StepAudio2>,
    session: Session,
    turn: TurnOptions,
    /// Adapter rows of the last decoded segment, keyed by its frame data, so
    /// committing the segment right after decoding it does not re-encode it.
    last_audio: Option<(Vec<f32>, Tensor)>,
    /// The open segment's last hypothesis (forced prefix, then every id the
    /// greedy loop chose): the next decode of the segment takes what follows
    /// its own prefix as its draft ([`TurnOptions::draft`]).
    last_ids: Option<Vec<u32>>,
    /// The prefix of the decode in flight, and whether it commits.
    asked: Option<(Vec<u32>, bool)>,
    /// Whether decodes take drafts (on unless switched off to compare).
    pub(crate) drafts: bool,
    /// Whether a partial reuses the last partial's audio rows and cache
    /// for all of the segment but its last second (on unless switched off).
    pub(crate) bound_partials: bool,
    /// The open segment's audio from its last partial ([`OpenAudio`]).
    open: Option<OpenAudio>,
    /// What the partial in flight leaves for the next one.
    opening: Option<OpenAudio>,
    /// Index of the first `<audio_patch>` in a human turn's prompt.
    patch_start: usize,
}

impl StepAudio2Recognizer {
    pub fn new(sa: Arc<StepAudio2>, opts: SessionOptions) -> Result<Self, ModelError> {
        let turn = TurnOptions::new(opts.max_new_tokens);
        let session = Session::new(&sa, opts)?;
        let patch_start = sa.tokenizer.human_audio_turn(&[0]).patch_runs[0].0;
        Ok(Self {
            sa,
            session,
            turn,
            last_audio: None,
            last_ids: None,
            asked: None,
            drafts: true,
            bound_partials: true,
            open: None,
            opening: None,
            patch_start,
        })
    }

    /// What a partial of `features` encodes: after the open rows of its
    /// last partial when they still hold (same audio and level), else the
    /// whole segment.
    fn partial_mel(&self, features: &SegmentFeatures) -> Result<(LogMel, PartialJoin), ModelError> {
        let frames = features.raw_frames.len() / features.n_mels.max(1);
        let max = LogMel::raw_max(&features.raw_frames);
        let open = self.open.as_ref().filter(|o| {
            let (same_max, same_audio) = (o.max == max, features.raw_frames.starts_with(&o.read));
            // (a segment past one piece goes to `segment_mel`, which refuses it)
            let grew = o.rows.dim(0).unwrap_or(0) * MEL_FRAMES_PER_PATCH < frames
                && frames <= MAX_PIECE_FRAMES;
            tracing::trace!(same_max, same_audio, grew, "open segment rows");
            same_max && same_audio && grew
        });
        let Some(open) = open else {
            return Ok((
                segment_mel(features)?,
                PartialJoin {
                    open: None,
                    drop: 0,
                    max,
                },
            ));
        };
        let kept = open.rows.dim(0)?;
        let drop = kept.min(OPEN_CONTEXT_PATCHES);
        let from = (kept - drop) * MEL_FRAMES_PER_PATCH * features.n_mels;
        let mel = LogMel::from_raw_frames_with_max(
            features.n_mels,
            features.raw_frames[from..].to_vec(),
            max,
        );
        Ok((
            mel,
            PartialJoin {
                open: Some(open.rows.clone()),
                drop,
                max,
            },
        ))
    }

    /// A partial's audio rows from its encoded mel `rows` (see
    /// [`Self::partial_mel`]); sets what it reuses from the cache and leaves
    /// in it for the next partial.
    fn bound(
        &mut self,
        features: &SegmentFeatures,
        join: PartialJoin,
        rows: Tensor,
    ) -> Result<Tensor, ModelError> {
        let drop = join.drop.min(rows.dim(0)?);
        let new = rows.narrow(0, drop, rows.dim(0)? - drop)?;
        let reused = join.open.as_ref().map_or(Ok(0), |o| o.dim(0))?;
        let rows = match join.open {
            Some(open) => Tensor::cat(&[open, new], 0)?,
            None => new,
        };
        let keep = rows.dim(0)?.saturating_sub(OPEN_OVERLAP_PATCHES);
        self.turn.reuse = if reused > 0 {
            self.patch_start + reused
        } else {
            0
        };
        self.turn.keep = if keep > 0 { self.patch_start + keep } else { 0 };
        // A kept row reads a few frames past its own (convolutions).
        let read =
            ((keep + 1) * MEL_FRAMES_PER_PATCH * features.n_mels).min(features.raw_frames.len());
        self.opening = match keep {
            0 => None,
            _ => Some(OpenAudio {
                read: features.raw_frames[..read].to_vec(),
                max: join.max,
                rows: rows.narrow(0, 0, keep)?,
            }),
        };
        Ok(rows)
    }

    /// A decode that neither reuses nor leaves open rows (a final, a pause
    /// decode, or with bounding off).
    fn unbound(&mut self) {
        self.turn.reuse = 0;
        self.turn.keep = 0;
        self.opening = None;
        self.open = None;
    }

    /// A partial's audio rows, alone (see [`Self::partial_mel`]).
    fn partial_rows(&mut self, features: &SegmentFeatures) -> Result<Tensor, ModelError> {
        let (mel, join) = self.partial_mel(features)?;
        let rows = self.sa.model.audio_embeddings(&[&mel])?.remove(0);
        self.bound(features, join, rows)
    }

    /// Adapter rows of a segment's mel (≤ 25 s), reusing the last ones when
    /// the same frames come again (decode, then commit).
    fn audio_rows(&mut self, features: &SegmentFeatures) -> Result<Tensor, ModelError> {
        if let Some(rows) = self.cached_rows(features) {
            return Ok(rows);
        }
        let mel = segment_mel(features)?;
        let rows = self.sa.model.audio_embeddings(&[&mel])?.remove(0);
        self.last_audio = Some((features.raw_frames.clone(), rows.clone()));
        Ok(rows)
    }

    /// The rows of the last decode when `features` has the same frames.
    fn cached_rows(&self, features: &SegmentFeatures) -> Option<Tensor> {
        match &self.last_audio {
            Some((frames, rows)) if *frames == features.raw_frames => Some(rows.clone()),
            _ => None,
        }
    }

    fn run(
        &mut self,
        features: &SegmentFeatures,
        prefix: &[u32],
        commit: bool,
        partial: bool,
    ) -> Result<Hypothesis, ModelError> {
        let t0 = Instant::now();
        let rows = if partial && self.bound_partials {
            self.partial_rows(features)?
        } else {
            self.unbound();
            self.audio_rows(features)?
        };
        let t1 = Instant::now();
        self.ask(prefix, commit, partial);
        let out = self
            .session
            .run_turn(&self.sa.clone(), &[rows], prefix, commit, &self.turn)?;
        Ok(self.hypothesis(out, t1 - t0, t1.elapsed()))
    }

    /// Sets the draft of a decode of the open segment after `prefix`: what
    /// follows that prefix in the segment's last hypothesis, if it begins so;
    /// a pause decode (neither a final nor a partial) is held in the cache for
    /// [`Recognizer::commit`].
    fn ask(&mut self, prefix: &[u32], commit: bool, partial: bool) {
        self.turn.hold = !commit && !partial;
        self.turn.draft = match &self.last_ids {
            Some(ids) if self.drafts && ids.starts_with(prefix) => ids[prefix.len()..].to_vec(),
            _ => Vec::new(),
        };
        self.asked = Some((prefix.to_vec(), commit));
    }

    /// The hypothesis of a decode's output; remembers its ids as the next
    /// draft of the open segment (none after a final).
    fn hypothesis(
        &mut self,
        out: TurnOutput,
        encode_time: Duration,
        decode_time: Duration,
    ) -> Hypothesis {
        self.last_ids = match self.asked.take() {
            Some((mut ids, false)) => {
                ids.extend_from_slice(&out.generated);
                Some(ids)
            }
            _ => None,
        };
        self.open = self.opening.take();
        Hypothesis {
            text: self.sa.tokenizer.decode_text(&out.text_tokens),
            tokens: out.text_tokens,
            no_speech_prob: None,
            avg_logprob: out.sum_logprob / out.scored.max(1) as f64,
            encode_time,
            decode_time,
        }
    }
}

/// A segment's log-mel, refused past one encoder piece (25 s).
fn segment_mel(features: &SegmentFeatures) -> Result<LogMel, ModelError> {
    let mel = LogMel::from_raw_frames(features.n_mels, features.raw_frames.clone());
    if mel.n_frames > MAX_PIECE_FRAMES {
        return Err(ModelError::Invalid(format!(
            "segment of {} mel frames is longer than {MAX_SEGMENT_SECONDS} s ({MAX_PIECE_FRAMES} frames)",
            mel.n_frames
        )));
    }
    Ok(mel)
}

/// Padded mel frames one encoder pass may hold (160 s of audio): bounds the
/// pass's activations (its attention scores are `[n, heads, T/2, T/2]` f32).
const ENCODE_PASS_MAX_FRAMES: usize = 16_000;

/// New segments' encoder passes, for mel lengths `lens` sorted ascending:
/// contiguous ranges that minimise Σ (`fixed` + segments × longest), the cost
/// of a pass counted in padded mel frames, with `fixed` its cost apart from
/// the frames (launches, weight reads). A pass holds at most
/// [`ENCODE_PASS_MAX_FRAMES`] padded frames unless one segment is longer.
fn encode_passes(lens: &[usize], fixed: usize) -> Vec<std::ops::Range<usize>> {
    let n = lens.len();
    // best[i]: the cheapest passes of the first i segments, and where the last begins.
    let mut best: Vec<(usize, usize)> = vec![(0, 0); n + 1];
    for i in 1..=n {
        best[i] = (usize::MAX, i - 1);
        // Longer passes later: on a tie the fewer passes win.
        for j in (0..i).rev() {
            let width = (i - j) * lens[i - 1];
            if width > ENCODE_PASS_MAX_FRAMES && i - j > 1 {
                break;
            }
            let cost = best[j].0 + fixed + width;
            if cost <= best[i].0 {
                best[i] = (cost, j);
            }
        }
    }
    let mut passes = Vec::new();
    let mut i = n;
    while i > 0 {
        let j = best[i].1;
        passes.push(j..i);
        i = j;
    }
    passes.reverse();
    passes
}

/// A segment's adapter rows (one piece) and the encoder time they took.
type Encoded = ([Tensor; 1], Duration);

impl StepAudio2Recognizer {
    /// The adapter rows of each request's segment. Segments not seen before
    /// (a segment's rows are reused from the last decode of the same frames)
    /// go through the encoder and adapter in batches of similar lengths, each
    /// segment with its own key mask, one batch per model.
    fn encode_requests(
        requests: &mut [crate::model::batch::FamilyRequest<'_, Self>],
    ) -> Vec<Result<Encoded, ModelError>> {
        let mut encoded: Vec<Option<Result<Encoded, ModelError>>> =
            requests.iter().map(|_| None).collect();
        let mut todo: Vec<(usize, LogMel)> = Vec::new();
        // Partials bounded by their last partial's rows: what to join them to.
        let mut plans: Vec<Option<PartialJoin>> = requests.iter().map(|_| None).collect();
        for (i, r) in requests.iter_mut().enumerate() {
            if r.partial && r.recognizer.bound_partials {
                match r.recognizer.partial_mel(r.features) {
                    Ok((mel, join)) => {
                        todo.push((i, mel));
                        plans[i] = Some(join);
                    }
                    Err(e) => encoded[i] = Some(Err(e)),
                }
                continue;
            }
            r.recognizer.unbound();
            if let Some(rows) = r.recognizer.cached_rows(r.features) {
                encoded[i] = Some(Ok(([rows], Duration::ZERO)));
                continue;
            }
            match segment_mel(r.features) {
                Ok(mel) => todo.push((i, mel)),
                Err(e) => encoded[i] = Some(Err(e)),
            }
        }
        // Each model's segments by length, then into passes of similar lengths.
        let model = |i: usize| Arc::as_ptr(&requests[i].recognizer.sa) as usize;
        todo.sort_by_key(|(i, m)| (model(*i), m.n_frames));
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut from = 0;
        while from < todo.len() {
            let to = from + todo[from..].partition_point(|(i, _)| model(*i) == model(todo[from].0));
            let lens: Vec<usize> = todo[from..to].iter().map(|(_, m)| m.n_frames).collect();
            let fixed = requests[todo[from].0].recognizer.sa.encode_pass_frames;
            groups.extend(
                encode_passes(&lens, fixed)
                    .into_iter()
                    .map(|r| (from + r.start..from + r.end).collect()),
            );
            from = to;
        }
        let encode_start = Instant::now();
        for group in groups {
            let t0 = Instant::now();
            let mels: Vec<&LogMel> = group.iter().map(|&k| &todo[k].1).collect();
            let sa = requests[todo[group[0]].0].recognizer.sa.clone();
            match sa.model.audio_embeddings(&mels) {
                Ok(rows) => {
                    let took = t0.elapsed();
                    for (&k, rows) in group.iter().zip(rows) {
                        let i = todo[k].0;
                        let r = &mut requests[i];
                        encoded[i] = Some(match plans[i].take() {
                            Some(plan) => r
                                .recognizer
                                .bound(r.features, plan, rows)
                                .map(|rows| ([rows], took)),
                            None => {
                                r.recognizer.last_audio =
                                    Some((r.features.raw_frames.clone(), rows.clone()));
                                Ok(([rows], took))
                            }
                        });
                    }
                }
                Err(e) => {
                    for &k in &group {
                        let e = ModelError::Invalid(format!("batched encoder: {e}"));
                        encoded[todo[k].0] = Some(Err(e));
                    }
                }
            }
        }
        if tracing::enabled!(tracing::Level::DEBUG) {
            // The encoder's kernels run asynchronously: without a wait its time
            // would be counted in whatever reads the device next (the prefill).
            if let Some(r) = requests.first() {
                let _ = r.recognizer.sa.model.device.synchronize();
            }
        }
        tracing::debug!(
            segments = todo.len(),
            encode_ms = encode_start.elapsed().as_secs_f64() * 1e3,
            "encoded a batch's new segments"
        );
        encoded
            .into_iter()
            .map(|e| e.expect("every request is encoded or failed"))
            .collect()
    }

    /// The session turn of a request whose segment is `encoded`.
    fn turn_request<'a>(
        r: &'a mut crate::model::batch::FamilyRequest<'_, Self>,
        encoded: &'a Encoded,
    ) -> Option<TurnRequest<'a>> {
        let rec = &mut *r.recognizer;
        rec.ask(r.prefix, r.commit, r.partial);
        Some(TurnRequest {
            session: &mut rec.session,
            audio: &encoded.0,
            prefix: r.prefix,
            commit: r.commit,
            opts: &rec.turn,
        })
    }

    /// Several streams' turns in one batch (see [`crate::model::batch`]): each
    /// request gives what [`Self::run`] gives it alone. New segments are
    /// encoded together ([`Self::encode_requests`]); the LLM turns of the
    /// streams over the same weights go through [`Session::run_turns`], whose
    /// prefills and greedy steps are batched. A hypothesis' `decode_time` is
    /// its batch's whole LLM time, which is what the stream waited for.
    pub(crate) fn decode_batch(
        requests: &mut [crate::model::batch::FamilyRequest<'_, Self>],
    ) -> Vec<Result<Hypothesis, ModelError>> {
        let mut results: Vec<Option<Result<Hypothesis, ModelError>>> =
            requests.iter().map(|_| None).collect();
        let encoded: Vec<Option<Encoded>> = Self::encode_requests(requests)
            .into_iter()
            .zip(&mut results)
            .map(|(e, result)| e.map_err(|e| *result = Some(Err(e))).ok())
            .collect();
        // Streams batch only with streams over the same weights.
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            if encoded[i].is_none() {
                continue;
            }
            let sa = &r.recognizer.sa;
            match groups
                .iter_mut()
                .find(|g| Arc::ptr_eq(&requests[g[0]].recognizer.sa, sa))
            {
                Some(g) => g.push(i),
                None => groups.push(vec![i]),
            }
        }
        for group in groups {
            let sa = requests[group[0]].recognizer.sa.clone();
            let t1 = Instant::now();
            let mut turns: Vec<TurnRequest<'_>> = requests
                .iter_mut()
                .zip(&encoded)
                .enumerate()
                .filter(|(i, _)| group.contains(i))
                .filter_map(|(_, (r, e))| Self::turn_request(r, e.as_ref()?))
                .collect();
            let outs = Session::run_turns(&sa, &mut turns);
            drop(turns);
            let decode_time = t1.elapsed();
            for (&i, out) in group.iter().zip(outs) {
                let encode_time = encoded[i].as_ref().map_or(Duration::ZERO, |e| e.1);
                let rec = &mut *requests[i].recognizer;
                results[i] = Some(out.map(|o| rec.hypothesis(o, encode_time, decode_time)));
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every request is answered"))
            .collect()
    }
}

/// The continuous batch of the streams of one Step-Audio 2 model
/// ([`crate::model::batch::DecodeLoop`]): new segments encoded together at
/// admission, the turns in one [`TurnLoop`].
pub(crate) struct StepAudio2Loop {
    sa: Arc<StepAudio2>,
    turns: TurnLoop,
    /// Per admitted decode: its encoder time and when it was admitted.
    admitted: std::collections::HashMap<u64, (Duration, Instant)>,
}

impl StepAudio2Loop {
    pub fn new(sa: Arc<StepAudio2>) -> Self {
        Self {
            turns: TurnLoop::new(&sa),
            sa,
            admitted: Default::default(),
        }
    }

    /// The Step-Audio 2 recogniser behind `recognizer`, if it is one of this model's.
    fn ours<'a>(&self, recognizer: &'a mut dyn Recognizer) -> Option<&'a mut StepAudio2Recognizer> {
        recognizer
            .as_any_mut()
            .downcast_mut::<StepAudio2Recognizer>()
            .filter(|r| Arc::ptr_eq(&r.sa, &self.sa))
    }
}

impl crate::model::batch::DecodeLoop for StepAudio2Loop {
    fn admit(
        &mut self,
        keys: &[u64],
        requests: &mut [crate::model::batch::BatchRequest<'_>],
    ) -> Vec<Result<(), ModelError>> {
        let foreign = || ModelError::Invalid("not a stream of this Step-Audio 2 model".into());
        let Some(mut family) = crate::model::batch::downcast_all::<StepAudio2Recognizer>(requests)
            .filter(|f| f.iter().all(|r| Arc::ptr_eq(&r.recognizer.sa, &self.sa)))
        else {
            return keys.iter().map(|_| Err(foreign())).collect();
        };
        let mut results: Vec<Result<(), ModelError>> = keys.iter().map(|_| Ok(())).collect();
        let encoded: Vec<Option<Encoded>> = StepAudio2Recognizer::encode_requests(&mut family)
            .into_iter()
            .zip(&mut results)
            .map(|(e, result)| e.map_err(|e| *result = Err(e)).ok())
            .collect();
        let ok: Vec<usize> = (0..keys.len()).filter(|&i| encoded[i].is_some()).collect();
        let ok_keys: Vec<u64> = ok.iter().map(|&i| keys[i]).collect();
        let mut turns: Vec<TurnRequest<'_>> = family
            .iter_mut()
            .zip(&encoded)
            .filter_map(|(r, e)| StepAudio2Recognizer::turn_request(r, e.as_ref()?))
            .collect();
        let admitted = self.turns.admit(&self.sa, &ok_keys, &mut turns);
        let now = Instant::now();
        for ((&i, &key), r) in ok.iter().zip(&ok_keys).zip(admitted) {
            if r.is_ok() {
                let encode_time = encoded[i].as_ref().map_or(Duration::ZERO, |e| e.1);
                self.admitted.insert(key, (encode_time, now));
            }
            results[i] = r;
        }
        results
    }

    fn step(&mut self) -> Vec<u64> {
        let over = self.turns.step(&self.sa);
        self.turns.log_every_second("decode loop");
        over
    }

    fn finish(
        &mut self,
        key: u64,
        recognizer: &mut dyn Recognizer,
    ) -> Result<Hypothesis, ModelError> {
        let Some(rec) = self.ours(recognizer) else {
            return Err(ModelError::Invalid(
                "not a stream of this Step-Audio 2 model".into(),
            ));
        };
        let (encode_time, admitted) = self
            .admitted
            .remove(&key)
            .unwrap_or((Duration::ZERO, Instant::now()));
        match self.turns.finish(key, &mut rec.session) {
            Some(out) => out.map(|o| rec.hypothesis(o, encode_time, admitted.elapsed())),
            None => Err(ModelError::Invalid(format!("no ended decode {key}"))),
        }
    }

    fn abandon(&mut self, key: u64, recognizer: &mut dyn Recognizer) -> bool {
        self.admitted.remove(&key);
        match self.ours(recognizer) {
            Some(rec) => self.turns.abandon(key, &mut rec.session),
            None => false,
        }
    }

    fn running(&self) -> usize {
        self.turns.running()
    }
}

impl Recognizer for StepAudio2Recognizer {
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn name(&self) -> String {
        "step-audio-2".into()
    }

    fn frontend(&self) -> FrontendSpec {
        FrontendSpec {
            n_mels: self.sa.model.config.encoder.n_mels,
            tail_zeros: STEP_AUDIO_TAIL_PADDING,
        }
    }

    fn max_segment_seconds(&self) -> f64 {
        MAX_SEGMENT_SECONDS
    }

    fn decode(
        &mut self,
        features: &SegmentFeatures,
        prefix: &[u32],
    ) -> Result<Hypothesis, ModelError> {
        self.run(features, prefix, false, false)
    }

    fn decode_partial(
        &mut self,
        features: &SegmentFeatures,
        prefix: &[u32],
    ) -> Result<Hypothesis, ModelError> {
        self.run(features, prefix, false, true)
    }

    /// Commits the turn of the last decode where it was the pause decode of
    /// the same audio with this hypothesis (held in the cache, see
    /// [`TurnOptions::hold`]): no model work. Otherwise appends the turn with
    /// the hypothesis' ids forced and nothing generated: one prefill, then
    /// `<|EOT|>`.
    fn commit(
        &mut self,
        features: &SegmentFeatures,
        hypothesis: &Hypothesis,
    ) -> Result<(), ModelError> {
        self.unbound();
        let last_decode = self.cached_rows(features).is_some()
            && self
                .last_ids
                .as_ref()
                .is_some_and(|ids| self.sa.tokenizer.text_ids(ids) == hypothesis.tokens);
        if last_decode && self.session.commit_held() {
            self.last_ids = None;
            return Ok(());
        }
        let rows = self.audio_rows(features)?;
        let opts = TurnOptions {
            max_new_tokens: 0,
            hold: false,
            ..self.turn.clone()
        };
        // When `hypothesis` is the last decode's, every id it chose (non-text
        // ones too) is committed, as a decoded final commits them.
        let forced = match self.last_ids.take() {
            Some(ids) if self.sa.tokenizer.text_ids(&ids) == hypothesis.tokens => ids,
            _ => hypothesis.tokens.clone(),
        };
        self.session
            .run_turn(&self.sa.clone(), &[rows], &forced, true, &opts)?;
        Ok(())
    }

    /// Decoding and committing in one pass: the turn stays in the cache.
    fn decode_final(
        &mut self,
        features: &SegmentFeatures,
        prefix: &[u32],
    ) -> Result<Hypothesis, ModelError> {
        self.run(features, prefix, true, false)
    }

    fn detokenize(&self, tokens: &[u32]) -> String {
        self.sa.tokenizer.decode_text(tokens)
    }

    fn starts_word(&self, token: u32) -> bool {
        // Byte-level BPE: a leading space starts a word; a CJK character is a word by itself.
        let text = self.sa.tokenizer.decode_text(&[token]);
        text.starts_with(' ') || text.chars().next().is_some_and(|c| c as u32 >= 0x2E80)
    }

    fn after_final(&mut self) -> Result<(), ModelError> {
        self.last_ids = None;
        self.unbound();
        Ok(())
    }

    fn reset_context(&mut self) {
        self.last_audio = None;
        self.last_ids = None;
        self.unbound();
        if self.session.state().num_layers() > 0 {
            self.session.reset();
            return;
        }
        // The cache was lost (a decode loop panicked while it held it): a
        // fresh session, system prompt prefilled again.
        match Session::new(&self.sa, self.session.options().clone()) {
            Ok(session) => self.session = session,
            Err(e) => tracing::error!("cannot restart a Step-Audio 2 session: {e}"),
        }
    }
}

/// Loads a Step-Audio 2 checkpoint directory as a live recogniser.
pub fn load_step_audio2_recognizer(
    dir: &Path,
    device: &Device,
    dtype: DType,
    opts: SessionOptions,
) -> Result<Box<dyn Recognizer>, ModelError> {
    let sa = load::load_step_audio2(dir, device, dtype)?;
    Ok(Box::new(StepAudio2Recognizer::new(Arc::new(sa), opts)?))
}

#[cfg(test)]
mod tests {
    use super::{encode_passes, ENCODE_PASS_MAX_FRAMES};

    /// The passes' sizes (they are contiguous, in order).
    fn sizes(lens: &[usize], fixed: usize) -> Vec<usize> {
        let passes = encode_passes(lens, fixed);
        assert_eq!(passes.first().map_or(0, |r| r.start), 0);
        assert!(passes.windows(2).all(|w| w[0].end == w[1].start));
        assert_eq!(passes.last().map_or(0, |r| r.end), lens.len());
        passes.iter().map(|r| r.len()).collect()
    }

    #[test]
    fn encoder_passes_trade_a_pass_s_fixed_cost_against_padding() {
        let lens = [100, 110, 1000, 1050];
        // Free passes: only equal lengths would share one.
        assert_eq!(sizes(&lens, 0), [1, 1, 1, 1]);
        assert_eq!(sizes(&[300, 300], 0), [2]);
        // 300 frames a pass: the short two and the long two (2 920 frames against
        // 4 500 in one pass and 3 460 alone).
        assert_eq!(sizes(&lens, 300), [2, 2]);
        // A pass dearer than any padding: one pass.
        assert_eq!(sizes(&lens, 5000), [4]);
        assert!(sizes(&[], 1500).is_empty());
    }

    #[test]
    fn an_encoder_pass_holds_a_bounded_number_of_padded_frames() {
        let per_pass = ENCODE_PASS_MAX_FRAMES / 2500;
        let got = sizes(&[2500; 13], 1_000_000);
        assert!(got.iter().all(|&n| n <= per_pass), "{got:?}");
        assert_eq!(got.len(), 13usize.div_ceil(per_pass));
        // A segment longer than the bound still gets a pass of its own.
        assert_eq!(sizes(&[20_000, 20_000], 1500), [1, 1]);
    }
}
