//! Whisper audio encoder: two convolutions, sinusoidal positions, pre-norm
//! transformer blocks, final LayerNorm.

use crate::model::cpu_ops::gelu_erf;
use crate::model::layers::{
    attention, merge_heads, split_heads, with_cached_tail, Conv1d, LayerNorm, Linear,
};
use candle_core::{Result, Tensor};

#[derive(Clone, Debug)]
pub struct EncoderBlock {
    pub attn_ln: LayerNorm,
    /// Fused query/key/value projection, `[3·d, d]` (the key bias is zero).
    pub qkv: Linear,
    pub out: Linear,
    pub mlp_ln: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
}

impl EncoderBlock {
    /// One block over `x` `[1, t, d]`. With `frozen` (keys and values of a
    /// whole window `[1, h, T, dh]`), `x` holds only the first `t` positions
    /// and attends to its own keys followed by the frozen ones from `t` on.
    /// Returns the output and this call's own keys and values.
    fn forward(
        &self,
        x: &Tensor,
        heads: usize,
        frozen: Option<&(Tensor, Tensor)>,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let d = x.dim(2)?;
        let h = self.attn_ln.forward(x)?;
        let qkv = self.qkv.forward(&h)?;
        let q = split_heads(&qkv.narrow(2, 0, d)?, heads)?.contiguous()?;
        let k = split_heads(&qkv.narrow(2, d, d)?, heads)?.contiguous()?;
        let v = split_heads(&qkv.narrow(2, 2 * d, d)?, heads)?.contiguous()?;
        let (keys, values) = match frozen {
            Some((fk, fv)) => (with_cached_tail(&k, fk)?, with_cached_tail(&v, fv)?),
            None => (k.clone(), v.clone()),
        };
        let scale = ((d / heads) as f64).powf(-0.5);
        let a = merge_heads(&attention(&q, &keys, &values, scale, None)?)?;
        let x = (x + self.out.forward(&a)?)?;
        let h = self.mlp_ln.forward(&x)?;
        let h = self.fc2.forward(&gelu_erf(&self.fc1.forward(&h)?)?)?;
        Ok(((x + h)?, (k, v)))
    }
}

/// The encoder's states for a window of nothing but padding at one level:
/// per block the keys and values `[1, h, T, dh]` of every position, and the
/// output `[1, T, d]`. [`WhisperEncoder::forward_fresh`] reuses them for
/// the positions past the audio of a mostly empty window.
#[derive(Clone, Debug)]
pub struct SilentWindow {
    pub keys_values: Vec<(Tensor, Tensor)>,
    pub output: Tensor,
}

#[derive(Clone, Debug)]
pub struct WhisperEncoder {
    pub conv1: Conv1d,
    pub conv2: Conv1d,
    /// `[n_audio_ctx, d]` sinusoidal position table.
    pub positions: Tensor,
    pub blocks: Vec<EncoderBlock>,
    pub ln_post: LayerNorm,
    pub heads: usize,
}

impl WhisperEncoder {
    /// Encodes a log-mel `[1, n_mels, frames]` (frames ≤ 2·n_audio_ctx, even)
    /// into `[1, frames/2, d]`. Fewer than 3000 frames is the streaming
    /// shortcut: positions are taken from the start of the table.
    pub fn forward(&self, mel: &Tensor) -> Result<Tensor> {
        let mut x = self.embed(mel, mel.dim(2)? / 2)?;
        for block in &self.blocks {
            x = block.forward(&x, self.heads, None)?.0;
        }
        self.ln_post.forward(&x)
    }

    /// Runs a full window of padding (`mel` `[1, n_mels, 2·n_audio_ctx]`) and
    /// keeps every block's keys and values.
    pub fn silent_window(&self, mel: &Tensor) -> Result<SilentWindow> {
        let mut x = self.embed(mel, mel.dim(2)? / 2)?;
        let mut keys_values = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let (y, kv) = block.forward(&x, self.heads, None)?;
            keys_values.push(kv);
            x = y;
        }
        Ok(SilentWindow {
            keys_values,
            output: self.ln_post.forward(&x)?,
        })
    }

    /// Encodes the first `fresh` positions `[1, fresh, d]` of a full window
    /// whose mel frames from `2·fresh` on are padding at the level `silent`
    /// was made with. The fresh positions attend to the padding's keys and
    /// values from `silent` instead of recomputing them; the padding
    /// positions' output is `silent`'s. Exact when `fresh` covers the window;
    /// otherwise it leaves out how the audio would have changed the states
    /// of the padding.
    pub fn forward_fresh(
        &self,
        mel: &Tensor,
        fresh: usize,
        silent: &SilentWindow,
    ) -> Result<Tensor> {
        let fresh = fresh.min(silent.output.dim(1)?);
        // Conv receptive fields: position p reads mel frames up to 2p + 2.
        let frames = (2 * fresh + 4).min(mel.dim(2)?);
        let mut x = self.embed(&mel.narrow(2, 0, frames)?, fresh)?;
        for (block, frozen) in self.blocks.iter().zip(&silent.keys_values) {
            x = block.forward(&x, self.heads, Some(frozen))?.0;
        }
        self.ln_post.forward(&x)
    }

    /// Convolutions and positions: the first `positions` of `[1, t, d]`.
    fn embed(&self, mel: &Tensor, positions: usize) -> Result<Tensor> {
        let x = if mel.device().is_cpu() {
            // conv1 (80 mel bins in) as one im2col GEMM is ~1.5× faster than
            // candle's conv1d on the CPU; for the stride-2 conv2 the gathering
            // costs more than it saves (examples/profile_encoder.rs).
            let x = gelu_erf(
                &self
                    .conv1
                    .forward_time_major(&mel.transpose(1, 2)?.contiguous()?)?,
            )?;
            let x = self.conv2.forward(&x.transpose(1, 2)?.contiguous()?)?;
            gelu_erf(&x.transpose(1, 2)?.contiguous()?)?
        } else {
            let x = gelu_erf(&self.conv1.forward(mel)?)?;
            gelu_erf(&self.conv2.forward(&x)?)?.transpose(1, 2)?
        };
        let t = positions.min(x.dim(1)?);
        let max = self.positions.dim(0)?;
        if t > max {
            candle_core::bail!("encoder input of {t} positions exceeds the model's {max}");
        }
        x.narrow(1, 0, t)?
            .broadcast_add(&self.positions.narrow(0, 0, t)?)
    }
}
