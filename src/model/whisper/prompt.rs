//! Whisper's task and prompt: the special tokens that start a decode
//! (`<|startoftranscript|>`, language, task, `<|notimestamps|>`), the
//! previous text fed back in front of them, and language detection. Used by
//! the live recogniser and by the offline driver in `crate::transcribe`.

use super::decoder::CrossAttention;
use super::WhisperModel;
use crate::model::ModelError;

/// What the decoder is asked to produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Task {
    /// Text in the spoken language.
    #[default]
    Transcribe,
    /// English text (multilingual models).
    Translate,
}

impl WhisperModel {
    /// The previous text fed back as a prompt is capped at half the text context.
    fn prompt_budget(&self) -> usize {
        self.decoder.n_text_ctx() / 2 - 1
    }

    /// `<|startoftranscript|>` plus language and task tokens (multilingual
    /// models) and `<|notimestamps|>` when timestamps are off.
    pub fn task_tokens(
        &self,
        language: Option<&str>,
        task: Task,
        timestamps: bool,
    ) -> Result<Vec<u32>, ModelError> {
        let tok = &self.tokenizer;
        let mut out = vec![tok.sot];
        if self.config.is_multilingual() {
            let lang = language.unwrap_or("en");
            let id = tok.language_token(lang).ok_or_else(|| {
                ModelError::Invalid(format!(
                    "unknown language `{lang}`; this model knows: {}",
                    tok.languages
                        .iter()
                        .map(|(c, _)| c.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
            out.push(id);
            let task_tok = match task {
                Task::Transcribe => tok.transcribe,
                Task::Translate => tok.translate,
            };
            out.extend(task_tok);
        } else if language.is_some_and(|l| l != "en") {
            return Err(ModelError::Invalid(format!(
                "this model is English-only; `--language {}` needs a multilingual model",
                language.unwrap_or_default()
            )));
        }
        if !timestamps {
            out.push(tok.no_timestamps);
        }
        Ok(out)
    }

    /// Builds `[<|startofprev|> previous…] <|startoftranscript|> …` and
    /// returns it with the index of `<|startoftranscript|>`.
    pub(crate) fn build_prompt(&self, previous: &[u32], task_tokens: &[u32]) -> (Vec<u32>, usize) {
        let mut prompt = Vec::with_capacity(previous.len() + task_tokens.len() + 1);
        if !previous.is_empty() {
            let keep = self.prompt_budget();
            prompt.push(self.tokenizer.sot_prev);
            prompt.extend_from_slice(&previous[previous.len().saturating_sub(keep)..]);
        }
        let sot_index = prompt.len();
        prompt.extend_from_slice(task_tokens);
        (prompt, sot_index)
    }

    /// Most likely language of an encoded window (multilingual models).
    pub(crate) fn detect_language(
        &self,
        cross: &CrossAttention,
    ) -> candle_core::Result<Option<String>> {
        if !self.config.is_multilingual() || self.tokenizer.languages.is_empty() {
            return Ok(None);
        }
        let mut state = self.decoder.new_state();
        let hidden = self
            .decoder
            .forward_hidden(&[self.tokenizer.sot], &mut state, cross)?;
        let logits = self
            .decoder
            .logits(&hidden, &[0])?
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        let best = self
            .tokenizer
            .languages
            .iter()
            .max_by(|a, b| logits[a.1 as usize].total_cmp(&logits[b.1 as usize]))
            .map(|(c, _)| c.clone());
        Ok(best)
    }
}
