//! The adapter between encoder and LLM: conv (k3, stride 2, padding 1) →
//! GELU → `linear1` → ReLU → `linear2` (→ the LLM's hidden size).
//!
//! As in the published code it runs on **all** P pooled encoder rows, and the
//! caller keeps the first n = (E − 1)//2 + 1 outputs. When P = E + 1 the last
//! kept output therefore also sees pooled row E through the conv: that is the
//! behaviour the weights were trained and evaluated with, so it is kept.

use super::config::adapter_keep_len;
use super::encoder::EncoderOutput;
use crate::model::layers::{Conv1d, Linear};
use candle_core::{Result, Tensor};

#[derive(Clone, Debug)]
pub struct Adapter {
    pub conv: Conv1d,
    pub linear1: Linear,
    pub linear2: Linear,
}

impl Adapter {
    pub(crate) fn stride(&self) -> usize {
        self.conv.stride
    }

    /// `[B, P, d_audio]` → `[B, P', d_llm]` over all rows.
    pub fn forward(&self, enc: &Tensor) -> Result<Tensor> {
        let x = enc.transpose(1, 2)?.contiguous()?;
        let h = self.conv.forward(&x)?.gelu_erf()?;
        let h = h.transpose(1, 2)?.contiguous()?;
        let h = self.linear1.forward(&h)?.relu()?;
        self.linear2.forward(&h)
    }

    /// Runs the adapter on a whole encoder batch and returns, per entry, the
    /// rows that replace its `<audio_patch>` embeddings (`[n_i, d_llm]`), and
    /// the full `[B, P', d_llm]` output.
    pub fn kept_rows(&self, enc: &EncoderOutput) -> Result<(Vec<Tensor>, Tensor)> {
        let all = self.forward(&enc.out)?;
        let stride = self.stride();
        let kept = enc
            .valid_len
            .iter()
            .enumerate()
            .map(|(i, &e)| all.get(i)?.narrow(0, 0, adapter_keep_len(e, stride)))
            .collect::<Result<Vec<_>>>()?;
        Ok((kept, all))
    }
}
