//! A preallocated key/value cache for one attention layer, laid out
//! `[batch, heads, capacity, head_dim]`, that grows by appending along the
//! sequence axis and rolls back by truncation (the stored prefix is never
//! touched, so a rollback leaves it bit-identical). A cache may instead be
//! given fixed buffers (a slot of a [`super::kv_pool::KvPool`]), which it
//! never outgrows.

use candle_core::{Result, Tensor};

const SEQ_DIM: usize = 2;

#[derive(Clone, Debug)]
pub(crate) struct KvCache {
    keys: Option<Tensor>,
    values: Option<Tensor>,
    len: usize,
    /// Initial capacity in positions; the buffer doubles when it fills.
    initial_capacity: usize,
    /// The buffers were given (a pool slot): never reallocated.
    fixed: bool,
}

impl KvCache {
    pub fn new(initial_capacity: usize) -> Self {
        Self {
            keys: None,
            values: None,
            len: 0,
            initial_capacity: initial_capacity.max(1),
            fixed: false,
        }
    }

    /// A cache over the given key and value buffers `[b, h, capacity, d]`
    /// (views into a pool slot), which it fills from position 0 and never
    /// reallocates.
    pub fn in_buffers(keys: Tensor, values: Tensor) -> Result<Self> {
        if keys.dims() != values.dims() || keys.rank() != 4 || !keys.is_contiguous() {
            candle_core::bail!(
                "KV cache buffers {:?} and {:?}: want two equal contiguous [b, h, capacity, d]",
                keys.dims(),
                values.dims()
            );
        }
        let capacity = keys.dim(SEQ_DIM)?;
        Ok(Self {
            keys: Some(keys),
            values: Some(values),
            len: 0,
            initial_capacity: capacity.max(1),
            fixed: true,
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn capacity(&self) -> usize {
        self.keys
            .as_ref()
            .map_or(0, |k| k.dim(SEQ_DIM).unwrap_or(0))
    }

    /// Forgets positions from `len` on. Never reallocates.
    pub(crate) fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    fn ensure_capacity(&mut self, like: &Tensor, needed: usize) -> Result<()> {
        let cap = self.capacity();
        if needed <= cap {
            return Ok(());
        }
        if self.fixed {
            candle_core::bail!("a KV cache slot of {cap} positions cannot hold {needed}");
        }
        let mut new_cap = cap.max(self.initial_capacity);
        while new_cap < needed {
            new_cap *= 2;
        }
        let (b, h, _, d) = like.dims4()?;
        let alloc = || Tensor::zeros((b, h, new_cap, d), like.dtype(), like.device());
        let (k, v) = (alloc()?, alloc()?);
        if let (Some(old_k), Some(old_v)) = (&self.keys, &self.values) {
            if self.len > 0 {
                k.slice_set(
                    &old_k.narrow(SEQ_DIM, 0, self.len)?.contiguous()?,
                    SEQ_DIM,
                    0,
                )?;
                v.slice_set(
                    &old_v.narrow(SEQ_DIM, 0, self.len)?.contiguous()?,
                    SEQ_DIM,
                    0,
                )?;
            }
        }
        self.keys = Some(k);
        self.values = Some(v);
        Ok(())
    }

    /// Appends `[b, h, n, d]` keys and values and returns views of the whole
    /// cached sequence `[b, h, len, d]`.
    pub(crate) fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = k.dim(SEQ_DIM)?;
        self.ensure_capacity(k, self.len + n)?;
        let (ck, cv) = (self.keys.as_ref().unwrap(), self.values.as_ref().unwrap());
        ck.slice_set(&k.contiguous()?, SEQ_DIM, self.len)?;
        cv.slice_set(&v.contiguous()?, SEQ_DIM, self.len)?;
        self.len += n;
        Ok((
            ck.narrow(SEQ_DIM, 0, self.len)?,
            cv.narrow(SEQ_DIM, 0, self.len)?,
        ))
    }

    /// Makes room for `needed` positions without appending (reallocating, with the
    /// stored prefix copied, if the buffer is smaller). The cache must have been
    /// allocated by a first [`Self::append`], which fixes its shape.
    pub(crate) fn reserve(&mut self, needed: usize) -> Result<()> {
        let like = match &self.keys {
            Some(k) => k.clone(),
            None => candle_core::bail!("KV cache reserve before the first append"),
        };
        self.ensure_capacity(&like, needed)
    }

    /// Counts `n` positions that a fused kernel wrote into the buffers directly (at
    /// `len..len + n`), as if they had been appended.
    pub(crate) fn advance(&mut self, n: usize) -> Result<()> {
        if self.len + n > self.capacity() {
            candle_core::bail!(
                "KV cache advance to {} past its capacity {}",
                self.len + n,
                self.capacity()
            );
        }
        self.len += n;
        Ok(())
    }

    /// The whole key and value buffers `[b, h, capacity, d]`, once allocated.
    pub(crate) fn buffers(&self) -> Option<(&Tensor, &Tensor)> {
        match (&self.keys, &self.values) {
            (Some(k), Some(v)) => Some((k, v)),
            _ => None,
        }
    }

    /// Views of the cached keys and values, if any.
    pub(crate) fn current(&self) -> Result<Option<(Tensor, Tensor)>> {
        match (&self.keys, &self.values) {
            (Some(k), Some(v)) if self.len > 0 => Ok(Some((
                k.narrow(SEQ_DIM, 0, self.len)?,
                v.narrow(SEQ_DIM, 0, self.len)?,
            ))),
            _ => Ok(None),
        }
    }
}
