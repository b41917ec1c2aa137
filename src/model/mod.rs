//! Models: weight files (CTranslate2 and safetensors), the shared layers, the
//! Whisper family and Step-Audio 2 mini. Finding a model's files by name is
//! the job of `crate::fetch`; everything here starts from a directory.

pub mod batch;
pub mod ct2;
pub mod kv_cache;
pub mod kv_pool;
pub mod layers;
pub mod recognizer;
pub mod safetensors_store;
pub mod step_audio2;
pub mod whisper;

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Corrupt { path: String, reason: String },
    #[error("{file}: tensor `{name}` is missing")]
    MissingTensor { file: String, name: String },
    #[error("{file}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape {
        file: String,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{dir}: not a usable model directory: {reason}")]
    Layout { dir: String, reason: String },
    #[error("{path}: {reason}")]
    Config { path: String, reason: String },
    #[error("{path}: tokenizer: {reason}")]
    Tokenizer { path: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
}

impl ModelError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            source,
        }
    }
    pub(crate) fn corrupt(path: &Path, reason: impl Into<String>) -> Self {
        Self::Corrupt {
            path: path.display().to_string(),
            reason: reason.into(),
        }
    }
    pub(crate) fn config(path: &Path, reason: impl Into<String>) -> Self {
        Self::Config {
            path: path.display().to_string(),
            reason: reason.into(),
        }
    }
}

/// How the files of a model directory are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// CTranslate2: `model.bin`, `config.json`, `tokenizer.json`, `vocabulary.txt`.
    CTranslate2,
    /// Hugging Face: `model.safetensors` or shards with `model.safetensors.index.json`.
    HuggingFace,
}

pub(crate) fn detect_layout(dir: &Path) -> Result<WeightLayout, ModelError> {
    let layout_err = |reason: &str| ModelError::Layout {
        dir: dir.display().to_string(),
        reason: reason.to_string(),
    };
    if !dir.is_dir() {
        return Err(layout_err("no such directory"));
    }
    if dir.join("model.bin").is_file() {
        Ok(WeightLayout::CTranslate2)
    } else if dir.join("model.safetensors").is_file()
        || dir.join("model.safetensors.index.json").is_file()
    {
        Ok(WeightLayout::HuggingFace)
    } else {
        Err(layout_err(
            "expected model.bin (CTranslate2) or model.safetensors / model.safetensors.index.json (Hugging Face)",
        ))
    }
}

/// Reads and parses a JSON file with context in the error.
pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::config(path, format!("invalid JSON: {e}")))
}

/// Which model family a directory holds, from its `config.json`.
pub(crate) fn is_step_audio2_dir(dir: &Path) -> bool {
    read_json(&dir.join("config.json"))
        .map(|c| {
            c.get("audio_encoder_config").is_some()
                || c.get("model_type").and_then(|t| t.as_str()) == Some("step_audio_2")
        })
        .unwrap_or(false)
}

/// How live recognisers are made from a loaded model.
#[derive(Clone, Debug)]
pub struct RecognizerOptions {
    /// Spoken language for multilingual Whisper models (default en).
    pub language: Option<String>,
    pub step_audio_prompt: step_audio2::prompt::SystemPrompt,
    pub step_audio_max_context: usize,
    /// Step-Audio 2: greedy steps per turn at most.
    pub step_audio_max_new_tokens: usize,
    /// Step-Audio 2: a segment's last hypothesis is the draft of its next
    /// decode (lossless; agreeing ids cost no decode step).
    pub step_audio_drafts: bool,
    /// Whisper: encode the whole 30 s window for every decode instead of
    /// reusing the padding's states past the audio (see
    /// `WhisperModel::encode_fresh`).
    pub whisper_full_window: bool,
    /// Encode an open segment's whole audio for every partial instead of
    /// only what came since the last partial (plus 1 s encoded again), the
    /// rest reused from that partial (Whisper: its encoder states; Step-Audio
    /// 2: its audio rows and their place in the KV cache). Finals and pause
    /// decodes are always encoded whole.
    pub full_partials: bool,
    /// Whisper: a previous segment up to this long (s) is decoded again,
    /// its text forced, in front of the next (0: off).
    pub whisper_carry_seconds: f64,
}

impl Default for RecognizerOptions {
    fn default() -> Self {
        Self {
            language: None,
            step_audio_prompt: Default::default(),
            step_audio_max_context: step_audio2::SessionOptions::default().max_context,
            step_audio_max_new_tokens: step_audio2::SessionOptions::default().max_new_tokens,
            step_audio_drafts: true,
            whisper_full_window: false,
            full_partials: false,
            whisper_carry_seconds: 10.0,
        }
    }
}

/// A loaded model whose weights every recogniser made from it shares.
#[derive(Clone)]
pub enum LoadedModel {
    Whisper(std::sync::Arc<whisper::WhisperModel>),
    StepAudio2(std::sync::Arc<step_audio2::StepAudio2>),
}

impl LoadedModel {
    /// Loads the model in `dir` on `compute`. `dtype` defaults to f32 on the
    /// CPU and bf16 on a GPU.
    pub fn load(
        dir: &Path,
        compute: crate::device::DeviceChoice,
        dtype: Option<candle_core::DType>,
        decoder_weights: whisper::DecoderWeights,
    ) -> Result<Self, ModelError> {
        let device = crate::device::select_device(compute)?;
        let dtype = dtype.unwrap_or_else(|| crate::device::default_dtype(&device));
        if is_step_audio2_dir(dir) {
            let sa = step_audio2::load::load_step_audio2(dir, &device, dtype)?;
            Ok(Self::StepAudio2(std::sync::Arc::new(sa)))
        } else {
            // Whisper on the CPU computes in f32 whatever the stored precision.
            let dtype = if device.is_cpu() {
                candle_core::DType::F32
            } else {
                dtype
            };
            Ok(Self::Whisper(std::sync::Arc::new(
                whisper::load::load_whisper_for_inference(dir, &device, dtype, decoder_weights)?,
            )))
        }
    }

    /// Sizes what recognisers share for `streams` streams at once (Whisper:
    /// the padding windows kept per level).
    pub fn plan_streams(&self, streams: usize) {
        if let Self::Whisper(model) = self {
            model.plan_streams(streams);
        }
    }

    /// Reserves what `streams` streams at most hold (Step-Audio 2: their KV
    /// caches as slots of one pool, allocated when the first stream opens).
    pub fn reserve_streams(&self, streams: usize) {
        if let Self::StepAudio2(sa) = self {
            sa.plan_kv_slots(streams);
        }
    }

    /// A loop that decodes this model's streams as one continuous batch
    /// (decodes join and leave between steps), for the families that have one:
    /// Step-Audio 2.
    pub fn decode_loop(&self) -> Option<Box<dyn batch::DecodeLoop>> {
        match self {
            Self::StepAudio2(sa) => Some(Box::new(step_audio2::StepAudio2Loop::new(sa.clone()))),
            Self::Whisper(_) => None,
        }
    }

    /// Streams whose state fits three quarters of the device memory free now
    /// (the rest kept for a batch's activations): Step-Audio 2 on a device
    /// that reports its memory, each stream's KV cache slot
    /// ([`step_audio2::StepAudio2Model::kv_bytes_per_stream`]); at least 1.
    /// `None` elsewhere.
    pub fn streams_fitting_memory(&self) -> Option<usize> {
        match self {
            Self::StepAudio2(sa) => {
                let free = crate::ops::fast::device_memory_free(&sa.model.device)?;
                let per = sa.model.kv_bytes_per_stream().max(1);
                Some((free / 4 * 3 / per).max(1))
            }
            Self::Whisper(_) => None,
        }
    }

    /// A recogniser with its own committed context over the shared weights.
    pub fn recognizer(
        &self,
        opts: &RecognizerOptions,
    ) -> Result<Box<dyn recognizer::Recognizer>, ModelError> {
        match self {
            Self::Whisper(model) => Ok(Box::new(whisper::streaming::WhisperRecognizer::new(
                model.clone(),
                opts.language.as_deref(),
                whisper::Task::Transcribe,
                !opts.whisper_full_window,
                opts.whisper_carry_seconds,
                !opts.full_partials,
            )?)),
            Self::StepAudio2(sa) => {
                let session = step_audio2::SessionOptions {
                    system_prompt: opts.step_audio_prompt.clone(),
                    max_context: opts.step_audio_max_context,
                    max_new_tokens: opts.step_audio_max_new_tokens,
                };
                let mut rec = step_audio2::StepAudio2Recognizer::new(sa.clone(), session)?;
                rec.drafts = opts.step_audio_drafts;
                rec.bound_partials = !opts.full_partials;
                Ok(Box::new(rec))
            }
        }
    }
}
