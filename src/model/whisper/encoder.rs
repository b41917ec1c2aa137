//! Whisper audio encoder: two convolutions, sinusoidal positions, pre-norm
//! transformer blocks, final LayerNorm.

use crate::model::cpu_ops::gelu_erf;
use crate::model::layers::{attention, merge_heads, split_heads, Conv1d, LayerNorm, Linear};
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
    fn forward(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        let d = x.dim(2)?;
        let h = self.attn_ln.forward(x)?;
        let qkv = self.qkv.forward(&h)?;
        let q = split_heads(&qkv.narrow(2, 0, d)?, heads)?.contiguous()?;
        let k = split_heads(&qkv.narrow(2, d, d)?, heads)?.contiguous()?;
        let v = split_heads(&qkv.narrow(2, 2 * d, d)?, heads)?;
        let scale = ((d / heads) as f64).powf(-0.5);
        let a = merge_heads(&attention(&q, &k, &v, scale, None)?)?;
        let x = (x + self.out.forward(&a)?)?;
        let h = self.mlp_ln.forward(&x)?;
        let h = self.fc2.forward(&gelu_erf(&self.fc1.forward(&h)?)?)?;
        x + h
    }
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
        let t = x.dim(1)?;
        let max = self.positions.dim(0)?;
        if t > max {
            candle_core::bail!("encoder input of {t} positions exceeds the model's {max}");
        }
        let mut x = x.broadcast_add(&self.positions.narrow(0, 0, t)?)?;
        for block in &self.blocks {
            x = block.forward(&x, self.heads)?;
        }
        self.ln_post.forward(&x)
    }
}
