//! Step-Audio 2's tokenizer and chat layout.
//!
//! Every special id is read from `tokenizer.json` by name: test checkpoints
//! use small tokenizers whose special ids lie elsewhere than the real model's.
//! A turn is `<|BOT|>{role}\n{content}<|EOT|>`, with no separator between
//! turns; audio in a human turn is, per 25 s piece, `<audio_start>` +
//! n × `<audio_patch>` + `<audio_end>`. Like the published code, the fixed
//! text pieces are tokenised separately and the ids concatenated.

use crate::model::ModelError;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// The ASR instruction of the published examples (default).
pub const ASR_PROMPT_ZH: &str = "请记录下你所听到的语音内容。";
pub const ASR_PROMPT_EN: &str = "Please record the audio content you hear.";

/// The system prompt of a stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SystemPrompt {
    #[default]
    Chinese,
    English,
    Custom(String),
}

impl SystemPrompt {
    pub fn text(&self) -> &str {
        match self {
            SystemPrompt::Chinese => ASR_PROMPT_ZH,
            SystemPrompt::English => ASR_PROMPT_EN,
            SystemPrompt::Custom(s) => s,
        }
    }
}

pub struct StepTokenizer {
    tokenizer: Tokenizer,
    path: PathBuf,
    pub bot: u32,
    pub eot: u32,
    pub audio_start: u32,
    pub audio_end: u32,
    pub audio_patch: u32,
    /// `<|audio_0|>`, the first audio-output token, when the vocabulary has any.
    pub audio_token_first: Option<u32>,
    pub n_audio_tokens: usize,
    /// Ids of `<|BOT|>human\n` and `<|BOT|>assistant\n`, tokenised once.
    human_header: Vec<u32>,
    assistant_header: Vec<u32>,
}

/// Token ids of a prompt piece and where its audio patches go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PromptIds {
    pub ids: Vec<u32>,
    /// `(first position, count)` of each run of `<audio_patch>` ids, one per
    /// audio piece, in order.
    pub patch_runs: Vec<(usize, usize)>,
}

impl PromptIds {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Appends `other`, shifting its patch positions.
    pub fn extend(&mut self, other: &PromptIds) {
        let off = self.ids.len();
        self.ids.extend_from_slice(&other.ids);
        self.patch_runs
            .extend(other.patch_runs.iter().map(|&(s, n)| (s + off, n)));
    }

    /// All patch positions, flattened (for tests and debugging).
    pub fn patch_positions(&self) -> Vec<usize> {
        self.patch_runs
            .iter()
            .flat_map(|&(s, n)| s..s + n)
            .collect()
    }
}

impl StepTokenizer {
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let err = |reason: String| ModelError::Tokenizer {
            path: path.display().to_string(),
            reason,
        };
        let tokenizer = Tokenizer::from_file(path).map_err(|e| err(e.to_string()))?;
        let need = |name: &str| {
            tokenizer.token_to_id(name).ok_or_else(|| {
                err(format!(
                    "special token {name} is missing; is this a Step-Audio 2 tokenizer?"
                ))
            })
        };
        let bot = need("<|BOT|>")?;
        let eot = need("<|EOT|>")?;
        let audio_start = need("<audio_start>")?;
        let audio_end = need("<audio_end>")?;
        let audio_patch = need("<audio_patch>")?;
        // Audio-output tokens `<|audio_k|>`: find the range by name and check
        // that it is contiguous, since ids are derived as first + k.
        let mut audio: Vec<(u64, u32)> = tokenizer
            .get_vocab(true)
            .into_iter()
            .filter_map(|(name, id)| {
                let k = name.strip_prefix("<|audio_")?.strip_suffix("|>")?;
                if k.is_empty() || !k.bytes().all(|c| c.is_ascii_digit()) {
                    return None;
                }
                Some((k.parse().ok()?, id))
            })
            .collect();
        audio.sort_unstable();
        let audio_token_first = audio.first().map(|&(_, id)| id);
        if let Some(first) = audio_token_first {
            let contiguous = audio
                .iter()
                .enumerate()
                .all(|(i, &(k, id))| k == i as u64 && id == first + i as u32);
            if !contiguous {
                return Err(err(
                    "the <|audio_k|> tokens do not form one contiguous id range".into(),
                ));
            }
        }
        let mut tok = Self {
            tokenizer,
            path: path.to_path_buf(),
            bot,
            eot,
            audio_start,
            audio_end,
            audio_patch,
            audio_token_first,
            n_audio_tokens: audio.len(),
            human_header: Vec::new(),
            assistant_header: Vec::new(),
        };
        tok.human_header = tok.encode("<|BOT|>human\n")?;
        tok.assistant_header = tok.encode("<|BOT|>assistant\n")?;
        Ok(tok)
    }

    /// Ids of `text`; special-token names inside it become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer {
                path: self.path.display().to_string(),
                reason: format!("cannot encode {text:?}: {e}"),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text ids are those below `<audio_start>` (the published filter).
    pub(crate) fn is_text(&self, id: u32) -> bool {
        id < self.audio_start
    }

    /// What an ASR result keeps: tokens before the first `<|EOT|>`, text ids only.
    pub(crate) fn text_ids(&self, tokens: &[u32]) -> Vec<u32> {
        tokens
            .iter()
            .copied()
            .take_while(|&t| t != self.eot)
            .filter(|&t| self.is_text(t))
            .collect()
    }

    /// The text of `tokens` (non-text and special tokens dropped).
    pub(crate) fn decode_text(&self, tokens: &[u32]) -> String {
        let ids = self.text_ids(tokens);
        self.tokenizer.decode(&ids, true).unwrap_or_default()
    }

    /// `<|BOT|>system\n{prompt}<|EOT|>`.
    pub fn system_turn(&self, prompt: &str) -> Result<Vec<u32>, ModelError> {
        self.encode(&format!("<|BOT|>system\n{prompt}<|EOT|>"))
    }

    /// A human turn holding audio pieces of `patch_counts` patches each, then
    /// the assistant header the answer follows:
    /// `<|BOT|>human\n` (`<audio_start>` n×`<audio_patch>` `<audio_end>`)…
    /// `<|EOT|><|BOT|>assistant\n`.
    pub fn human_audio_turn(&self, patch_counts: &[usize]) -> PromptIds {
        let total: usize = patch_counts.iter().map(|n| n + 2).sum();
        let mut ids =
            Vec::with_capacity(self.human_header.len() + total + 1 + self.assistant_header.len());
        ids.extend_from_slice(&self.human_header);
        let mut patch_runs = Vec::with_capacity(patch_counts.len());
        for &n in patch_counts {
            ids.push(self.audio_start);
            patch_runs.push((ids.len(), n));
            ids.extend(std::iter::repeat_n(self.audio_patch, n));
            ids.push(self.audio_end);
        }
        ids.push(self.eot);
        ids.extend_from_slice(&self.assistant_header);
        PromptIds { ids, patch_runs }
    }

    /// The single-turn ASR prompt: system turn, human audio turn, assistant header.
    pub fn asr_prompt(
        &self,
        system: &str,
        patch_counts: &[usize],
    ) -> Result<PromptIds, ModelError> {
        let mut p = PromptIds {
            ids: self.system_turn(system)?,
            patch_runs: Vec::new(),
        };
        p.extend(&self.human_audio_turn(patch_counts));
        Ok(p)
    }
}
