//! Whisper's tokenizer and special tokens, all read from `tokenizer.json`.

use crate::model::ModelError;
use std::path::Path;
use tokenizers::Tokenizer;

pub struct WhisperTokenizer {
    tokenizer: Tokenizer,
    pub eot: u32,
    pub sot: u32,
    pub sot_prev: u32,
    pub no_timestamps: u32,
    /// First timestamp token (`<|0.00|>`); timestamps step by 0.02 s.
    pub timestamp_begin: u32,
    pub transcribe: Option<u32>,
    pub translate: Option<u32>,
    pub no_speech: Option<u32>,
    /// Language codes and their token ids, in the model's order.
    pub languages: Vec<(String, u32)>,
}

/// Seconds per timestamp token step.
pub(crate) const TIMESTAMP_STEP: f64 = 0.02;

impl WhisperTokenizer {
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let tokenizer = Tokenizer::from_file(path).map_err(|e| ModelError::Tokenizer {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let need = |name: &str| {
            tokenizer
                .token_to_id(name)
                .ok_or_else(|| ModelError::Tokenizer {
                    path: path.display().to_string(),
                    reason: format!(
                        "special token {name} is missing; is this a Whisper tokenizer?"
                    ),
                })
        };
        let eot = need("<|endoftext|>")?;
        let sot = need("<|startoftranscript|>")?;
        let sot_prev = need("<|startofprev|>")?;
        let no_timestamps = need("<|notimestamps|>")?;
        let transcribe = tokenizer.token_to_id("<|transcribe|>");
        let translate = tokenizer.token_to_id("<|translate|>");
        let no_speech = tokenizer
            .token_to_id("<|nospeech|>")
            .or_else(|| tokenizer.token_to_id("<|nocaptions|>"));
        // Language tokens are the `<|xx|>` tokens between <|startoftranscript|> and <|translate|>.
        let lang_end = translate.unwrap_or(sot + 1);
        let languages = (sot + 1..lang_end)
            .filter_map(|id| {
                let tok = tokenizer.id_to_token(id)?;
                let code = tok.strip_prefix("<|")?.strip_suffix("|>")?;
                Some((code.to_string(), id))
            })
            .collect();
        Ok(Self {
            tokenizer,
            eot,
            sot,
            sot_prev,
            no_timestamps,
            timestamp_begin: no_timestamps + 1,
            transcribe,
            translate,
            no_speech,
            languages,
        })
    }

    pub(crate) fn language_token(&self, code: &str) -> Option<u32> {
        self.languages
            .iter()
            .find(|(c, _)| c == code)
            .map(|&(_, id)| id)
    }

    pub(crate) fn is_timestamp(&self, token: u32) -> bool {
        token >= self.timestamp_begin
    }

    pub(crate) fn timestamp_seconds(&self, token: u32) -> f64 {
        (token - self.timestamp_begin) as f64 * TIMESTAMP_STEP
    }

    /// Text of the ordinary (non-special, non-timestamp) tokens.
    pub fn decode_text(&self, tokens: &[u32]) -> String {
        let text: Vec<u32> = tokens.iter().copied().filter(|&t| t < self.eot).collect();
        self.tokenizer.decode(&text, true).unwrap_or_default()
    }

    /// Token ids of `text` without special tokens (for prompts).
    pub(crate) fn encode_text(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer {
                path: "tokenizer.json".into(),
                reason: e.to_string(),
            })?;
        Ok(enc.get_ids().to_vec())
    }
}
