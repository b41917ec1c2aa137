//! Whisper audio encoder: two convolutions, sinusoidal positions, pre-norm
//! transformer blocks, final LayerNorm.

use crate::model::layers::{
    attention, contiguous_pairs, merge_heads, narrow_positions, splice_cached_pair, split_heads,
    Conv1d, LayerNorm, Linear,
};
use crate::model::step_audio2::encoder as sa2;
use crate::ops::cpu::gelu_erf;
use candle_core::{DType, Result, Tensor};

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

/// Keys and values `[1, h, ·, dh]` one stream's block attends to besides its own.
struct Frozen<'a> {
    /// Positions before the block's own (audio encoded earlier).
    head: Option<&'a (Tensor, Tensor)>,
    /// A whole window, used after the own positions.
    whole: &'a (Tensor, Tensor),
    /// The stream's own positions (its rows of a batch past them are padding).
    own: usize,
}

/// The keys and values a block attends to: its own `k`, `v` `[b, h, t, dh]`, or with
/// `frozen` (one per batch row) each row's head, its own first `own`, then its whole
/// window's from there on — every row then has the whole window's length.
fn spliced(k: &Tensor, v: &Tensor, frozen: &[Frozen]) -> Result<(Tensor, Tensor)> {
    if frozen.is_empty() {
        return Ok((k.clone(), v.clone()));
    }
    let rows = frozen
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let own = |t: &Tensor| t.narrow(0, i, 1)?.narrow(2, 0, f.own);
            splice_cached_pair(f.head, (&own(k)?, &own(v)?), f.whole)
        })
        .collect::<Result<Vec<_>>>()?;
    if let [one] = rows.as_slice() {
        return Ok(one.clone());
    }
    let (ks, vs): (Vec<Tensor>, Vec<Tensor>) = rows.into_iter().unzip();
    Ok((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?))
}

impl EncoderBlock {
    /// One block over `x` `[b, t, d]`. With `frozen` (one per row of `x`),
    /// each row holds only the positions after its frozen head and attends
    /// to the head's keys, its own, then the whole window's from there on.
    /// Returns the output and this call's own keys and values.
    fn forward(
        &self,
        x: &Tensor,
        heads: usize,
        frozen: &[Frozen],
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        if x.dtype() == DType::BF16 && crate::ops::fast::available(x.device()) {
            return self.forward_fast(x, heads, frozen);
        }
        let d = x.dim(2)?;
        let h = self.attn_ln.forward(x)?;
        let qkv = self.qkv.forward(&h)?;
        let q = split_heads(&qkv.narrow(2, 0, d)?, heads)?.contiguous()?;
        let k = split_heads(&qkv.narrow(2, d, d)?, heads)?.contiguous()?;
        let v = split_heads(&qkv.narrow(2, 2 * d, d)?, heads)?.contiguous()?;
        let (keys, values) = spliced(&k, &v, frozen)?;
        let scale = ((d / heads) as f64).powf(-0.5);
        let a = merge_heads(&attention(&q, &keys, &values, scale, None)?)?;
        let x = (x + self.out.forward(&a)?)?;
        let h = self.mlp_ln.forward(&x)?;
        let h = self.fc2.forward(&gelu_erf(&self.fc1.forward(&h)?)?)?;
        Ok(((x + h)?, (k, v)))
    }

    /// [`Self::forward`] through the GPU's fast paths: cuBLAS GEMMs with
    /// fused bias/GELU/residual/LayerNorm epilogues and the fused attention,
    /// which reads q (and, without `frozen`, k and v) in place from the
    /// fused projection. Each falls back to candle ops where it does not
    /// apply.
    fn forward_fast(
        &self,
        x: &Tensor,
        heads: usize,
        frozen: &[Frozen],
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let (b, t, d) = x.dims3()?;
        let hd = d / heads;
        let h = sa2::layer_norm(&self.attn_ln, x)?;
        let qkv = sa2::linear(&self.qkv, &h)?.reshape((b, t, 3, heads, hd))?;
        // [b, h, t, hd] views of the fused projection
        let part =
            |i: usize| -> Result<Tensor> { qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2) };
        let q = part(0)?;
        let rows: Vec<crate::ops::fast::SpliceRow> = frozen
            .iter()
            .map(|f| crate::ops::fast::SpliceRow {
                head: f.head.map(|(k, v)| (k, v)),
                whole: (&f.whole.0, &f.whole.1),
                own: f.own,
            })
            .collect();
        let fast = match rows.is_empty() {
            true => None,
            false => crate::ops::fast::splice_rows(&qkv, &rows)?,
        };
        // This block's own keys and values are returned (padding windows and
        // carried heads keep them): contiguous copies, or with the spliced
        // kernel views of the projection (the caller copies each row's).
        let ((keys, values), (k, v)) = match fast {
            Some(kv) => (kv, (part(1)?, part(2)?)),
            None => {
                let (k, v) = (part(1)?.contiguous()?, part(2)?.contiguous()?);
                (spliced(&k, &v, frozen)?, (k, v))
            }
        };
        let scale = (hd as f32).powf(-0.5);
        let a = match crate::ops::fast::attention(&q, &keys, &values, scale, false, None)? {
            Some(a) => a.reshape((b, t, d))?,
            None => merge_heads(&attention(
                &q.contiguous()?,
                &keys,
                &values,
                scale as f64,
                None,
            )?)?,
        };
        let (x, h) = sa2::linear_residual_norm(&self.out, &a, x, &self.mlp_ln)?;
        let h = sa2::linear_gelu(&self.fc1, &h)?;
        Ok((sa2::linear_residual(&self.fc2, &h, &x)?, (k, v)))
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

/// One stream's window for [`WhisperEncoder::forward_after_batch`]: its mel, new
/// positions, head and padding-only window (see [`WhisperEncoder::forward_after`]).
#[derive(Clone, Copy)]
pub struct AfterInput<'a> {
    pub mel: &'a Tensor,
    pub fresh: usize,
    pub head: Option<&'a EncodedHead>,
    pub silent: &'a SilentWindow,
}

impl AfterInput<'_> {
    /// The positions it encodes: its new ones, within the window.
    pub fn positions(&self) -> Result<usize> {
        let offset = self.head.map_or(0, EncodedHead::positions);
        Ok(self
            .fresh
            .min(self.silent.output.dim(1)?.saturating_sub(offset)))
    }
}

/// Windows of one encoder batch at most ([`WhisperEncoder::forward_after_grouped`]).
pub const MAX_WINDOW_GROUP: usize = 16;

/// Groups of `lens`' indices, longest first, each of at most `max` whose
/// shortest has at least half its longest's positions: a batch pads every
/// window to its longest, so a long window (a final with its carried audio)
/// does not make many short ones (partials) pay its length. Half, not four
/// fifths: on an H200 the host's launches cost more than that padding (at
/// 304 turbo-shaped streams end-of-speech→final p95 724 and 769 ms against
/// 765 and 867 ms, `docs/gpu-results/h200-whisper-window-groups-ab.txt`).
pub fn window_groups(lens: &[usize], max: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lens[i]));
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for i in order {
        match groups.last_mut() {
            Some(g) if g.len() < max && 2 * lens[i] >= lens[g[0]] => g.push(i),
            _ => groups.push(vec![i]),
        }
    }
    groups
}

/// Positions before the new audio whose mel frames
/// [`WhisperEncoder::forward_after`] takes for its convolutions (position p
/// reads frames from 2p − 3).
pub const HEAD_CONTEXT: usize = 2;

/// Encoder keys and values `[1, h, c, dh]`, per block, of audio encoded
/// alone at positions `0..c`, to stand in front of audio that follows it
/// ([`WhisperEncoder::forward_after`]).
#[derive(Clone, Debug)]
pub struct EncodedHead {
    pub keys_values: Vec<(Tensor, Tensor)>,
}

impl EncodedHead {
    pub fn positions(&self) -> usize {
        self.keys_values
            .first()
            .map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    /// The first `n` positions.
    pub fn narrow(&self, n: usize) -> Result<Self> {
        Ok(Self {
            keys_values: narrow_positions(&self.keys_values, n)?,
        })
    }

    /// These positions, then `next`'s, in new contiguous tensors.
    pub fn append(&self, next: &Self) -> Result<Self> {
        let keys_values = self
            .keys_values
            .iter()
            .zip(&next.keys_values)
            .map(|((k, v), (nk, nv))| Ok((Tensor::cat(&[k, nk], 2)?, Tensor::cat(&[v, nv], 2)?)))
            .collect::<Result<_>>()?;
        Ok(Self { keys_values })
    }

    /// The same positions in contiguous tensors of their own (not views of
    /// a larger window's).
    pub fn contiguous(&self) -> Result<Self> {
        Ok(Self {
            keys_values: contiguous_pairs(&self.keys_values)?,
        })
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
        let mut x = self.embed(mel, 0, mel.dim(2)? / 2)?;
        for block in &self.blocks {
            x = block.forward(&x, self.heads, &[])?.0;
        }
        self.ln_post.forward(&x)
    }

    /// Runs a full window of padding (`mel` `[1, n_mels, 2·n_audio_ctx]`) and
    /// keeps every block's keys and values.
    pub fn silent_window(&self, mel: &Tensor) -> Result<SilentWindow> {
        let mut x = self.embed(mel, 0, mel.dim(2)? / 2)?;
        let mut keys_values = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let (y, kv) = block.forward(&x, self.heads, &[])?;
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
        Ok(self.forward_after(mel, fresh, None, silent)?.0)
    }

    /// As [`Self::forward_fresh`] for audio that follows `head` (positions
    /// `0..c`): `mel` holds the window's frames from `2·(c − k)` on, with
    /// `k = min(c, HEAD_CONTEXT)` (the frames before the new audio that its
    /// first position's convolutions read), and the new audio is encoded at
    /// positions `c..c + fresh`; they attend to the head's keys and values too, which
    /// are not recomputed (they leave out what the new audio would change
    /// in them, as the padding's do). Returns the fresh positions' output
    /// and their keys and values.
    pub fn forward_after(
        &self,
        mel: &Tensor,
        fresh: usize,
        head: Option<&EncodedHead>,
        silent: &SilentWindow,
    ) -> Result<(Tensor, EncodedHead)> {
        let input = AfterInput {
            mel,
            fresh,
            head,
            silent,
        };
        Ok(self.forward_after_batch(&[input])?.remove(0))
    }

    /// [`Self::forward_after`] for several streams' windows as one batch:
    /// their new positions stacked (shorter ones padded, the padding never
    /// attended to), each attending to its own head and padding states, so
    /// each result is what it would be alone.
    pub fn forward_after_batch(&self, inputs: &[AfterInput]) -> Result<Vec<(Tensor, EncodedHead)>> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let mut rows = Vec::with_capacity(inputs.len());
        for input in inputs {
            let offset = input.head.map_or(0, EncodedHead::positions);
            let context = offset.min(HEAD_CONTEXT);
            let fresh = input.positions()?;
            // Conv receptive fields: position p reads mel frames 2p − 3 ..= 2p + 2.
            let frames = (2 * (fresh + context) + 4).min(input.mel.dim(2)?);
            let x = self.embed(
                &input.mel.narrow(2, 0, frames)?,
                offset - context,
                fresh + context,
            )?;
            rows.push(x.narrow(1, context, x.dim(1)? - context)?);
        }
        let lens: Vec<usize> = rows.iter().map(|x| x.dim(1)).collect::<Result<_>>()?;
        let longest = lens.iter().copied().max().unwrap_or(0);
        let mut x = if let [one] = rows.as_slice() {
            one.clone()
        } else {
            let padded = rows
                .iter()
                .zip(&lens)
                .map(|(x, &n)| x.pad_with_zeros(1, 0, longest - n))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&padded, 0)?
        };
        let mut keys_values: Vec<Vec<(Tensor, Tensor)>> = inputs
            .iter()
            .map(|_| Vec::with_capacity(self.blocks.len()))
            .collect();
        for (i, block) in self.blocks.iter().enumerate() {
            let frozen: Vec<Frozen> = inputs
                .iter()
                .zip(&lens)
                .map(|(input, &own)| Frozen {
                    head: input.head.map(|h| &h.keys_values[i]),
                    whole: &input.silent.keys_values[i],
                    own,
                })
                .collect();
            let (y, (k, v)) = block.forward(&x, self.heads, &frozen)?;
            for (s, (kv, &n)) in keys_values.iter_mut().zip(&lens).enumerate() {
                let own = |t: &Tensor| t.narrow(0, s, 1)?.narrow(2, 0, n)?.contiguous();
                kv.push((own(&k)?, own(&v)?));
            }
            x = y;
        }
        let x = self.ln_post.forward(&x)?;
        keys_values
            .into_iter()
            .zip(&lens)
            .enumerate()
            .map(|(s, (keys_values, &n))| {
                Ok((
                    x.narrow(0, s, 1)?.narrow(1, 0, n)?,
                    EncodedHead { keys_values },
                ))
            })
            .collect()
    }

    /// [`Self::forward_after_batch`] over [`window_groups`] of at most
    /// `max_group` windows (1: each alone, as [`Self::forward_after`]), the
    /// results in the inputs' order. Why: on a GPU a window of a few seconds
    /// costs the host ~500 kernel launches whatever its length, so windows of
    /// similar lengths share them.
    pub fn forward_after_grouped(
        &self,
        inputs: &[AfterInput],
        max_group: usize,
    ) -> Result<Vec<(Tensor, EncodedHead)>> {
        let lens = inputs
            .iter()
            .map(AfterInput::positions)
            .collect::<Result<Vec<_>>>()?;
        let mut out: Vec<Option<(Tensor, EncodedHead)>> = inputs.iter().map(|_| None).collect();
        for group in window_groups(&lens, max_group.max(1)) {
            let batch: Vec<AfterInput> = group.iter().map(|&i| inputs[i]).collect();
            for (&i, r) in group.iter().zip(self.forward_after_batch(&batch)?) {
                out[i] = Some(r);
            }
        }
        Ok(out
            .into_iter()
            .map(|r| r.expect("every window is in a group"))
            .collect())
    }

    /// Convolutions and positions: the first `positions` of `[1, t, d]`,
    /// numbered from `offset`.
    fn embed(&self, mel: &Tensor, offset: usize, positions: usize) -> Result<Tensor> {
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
        if offset + t > max {
            candle_core::bail!(
                "encoder input of {t} positions after {offset} exceeds the model's {max}"
            );
        }
        x.narrow(1, 0, t)?
            .broadcast_add(&self.positions.narrow(0, offset, t)?)
    }
}

#[cfg(test)]
mod tests {
    use super::window_groups;

    #[test]
    fn groups_hold_similar_lengths_longest_first_up_to_the_most() {
        assert_eq!(window_groups(&[], 4), Vec::<Vec<usize>>::new());
        // 100, 80, 79 and 63 share, up to 4; 50 (half of 100) starts the
        // next group, which 32 joins and 24 (< half of 50) does not.
        assert_eq!(
            window_groups(&[80, 100, 79, 50, 63, 32, 24], 4),
            vec![vec![1, 0, 2, 4], vec![3, 5], vec![6]]
        );
        assert_eq!(window_groups(&[5, 5, 5], 2), vec![vec![0, 1], vec![2]]);
        assert_eq!(window_groups(&[5, 5], 1), vec![vec![0], vec![1]]);
    }
}
