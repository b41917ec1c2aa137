//! Models: weight files (CTranslate2 and safetensors), the shared layers, the
//! Whisper family and Step-Audio 2 mini, and fetching models by name.

pub mod cpu_ops;
pub mod ct2;
pub mod hub;
pub mod kv_cache;
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
    #[error(
        "unknown model `{name}` (known names: {known}); pass a directory to use another model"
    )]
    UnknownName { name: String, known: String },
    #[error("fetching model `{name}` failed: {reason}")]
    Fetch { name: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            source,
        }
    }
    pub fn corrupt(path: &Path, reason: impl Into<String>) -> Self {
        Self::Corrupt {
            path: path.display().to_string(),
            reason: reason.into(),
        }
    }
    pub fn config(path: &Path, reason: impl Into<String>) -> Self {
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

pub fn detect_layout(dir: &Path) -> Result<WeightLayout, ModelError> {
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
pub fn read_json(path: &Path) -> Result<serde_json::Value, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::config(path, format!("invalid JSON: {e}")))
}

/// Loads the model named or found at `name_or_dir` as a live recogniser
/// (Whisper for now; the family is read off the directory).
pub fn load_recognizer(
    name_or_dir: &str,
    compute: crate::device::DeviceChoice,
    language: Option<&str>,
    encoder_context: whisper::streaming::EncoderContext,
) -> Result<Box<dyn recognizer::Recognizer>, anyhow::Error> {
    let device = crate::device::select_device(compute)?;
    let dir = hub::resolve_model(name_or_dir)?;
    let model = whisper::load::load_whisper(&dir, &device, candle_core::DType::F32)?;
    let recognizer = whisper::streaming::WhisperRecognizer::new(
        std::sync::Arc::new(model),
        language,
        crate::transcribe::Task::Transcribe,
        encoder_context,
    )?;
    Ok(Box::new(recognizer))
}
