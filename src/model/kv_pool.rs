//! One preallocated block of memory holding many streams' key/value caches
//! in fixed slots.
//!
//! Why: hundreds of live streams each growing their own buffers fragment
//! device memory and leave what they may take unknown until they take it.
//! A pool is sized once (streams × positions), so a server knows up front
//! whether its streams fit, and a stream's cache never moves: a slot is
//! `[layers, kv_heads, positions, head_dim]` for keys and the same for
//! values, each layer a contiguous `[1, kv_heads, positions, head_dim]` view
//! — the layout the kernels already read through their per-row pointer
//! table, so they need no change. A stream keeps its own length in the slot;
//! a partial's rollback stays a length change. A slot goes back to the pool
//! when its stream's state is dropped.

use candle_core::{DType, Device, Result, Tensor};
use std::sync::{Arc, Mutex};

/// The shape of one slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub positions: usize,
    pub head_dim: usize,
}

impl SlotShape {
    /// Bytes of one slot's keys and values in `dtype`.
    pub fn bytes(&self, dtype: DType) -> usize {
        2 * self.layers * self.kv_heads * self.positions * self.head_dim * dtype.size_in_bytes()
    }
}

struct Pool {
    /// `[slots · layers, kv_heads, positions, head_dim]`.
    keys: Tensor,
    values: Tensor,
    shape: SlotShape,
    slots: usize,
    free: Mutex<Vec<usize>>,
}

/// A pool of `slots` fixed slots, all allocated when it is made.
#[derive(Clone)]
pub struct KvPool(Arc<Pool>);

impl KvPool {
    pub fn new(slots: usize, shape: SlotShape, dtype: DType, device: &Device) -> Result<Self> {
        if slots == 0 || shape.layers == 0 || shape.positions == 0 {
            candle_core::bail!("a KV pool needs slots, layers and positions ({slots}, {shape:?})");
        }
        let dims = (
            slots * shape.layers,
            shape.kv_heads,
            shape.positions,
            shape.head_dim,
        );
        Ok(Self(Arc::new(Pool {
            keys: Tensor::zeros(dims, dtype, device)?,
            values: Tensor::zeros(dims, dtype, device)?,
            shape,
            slots,
            // taken from the end: slot 0 first
            free: Mutex::new((0..slots).rev().collect()),
        })))
    }

    pub fn shape(&self) -> SlotShape {
        self.0.shape
    }

    pub fn slots(&self) -> usize {
        self.0.slots
    }

    /// Slots not taken now.
    pub fn free_slots(&self) -> usize {
        self.free_list().len()
    }

    /// Bytes the pool holds.
    pub fn bytes(&self) -> usize {
        self.0.slots * self.0.shape.bytes(self.0.keys.dtype())
    }

    /// A free slot, or `None` when every slot is taken.
    pub fn take(&self) -> Option<KvSlot> {
        let index = self.free_list().pop()?;
        Some(KvSlot {
            pool: self.0.clone(),
            index,
        })
    }

    fn free_list(&self) -> std::sync::MutexGuard<'_, Vec<usize>> {
        // The list stays consistent whatever a panicking holder did: every
        // change is one push or pop.
        self.0.free.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One stream's slot; back in the pool when dropped.
pub struct KvSlot {
    pool: Arc<Pool>,
    index: usize,
}

impl KvSlot {
    pub fn index(&self) -> usize {
        self.index
    }

    pub fn positions(&self) -> usize {
        self.pool.shape.positions
    }

    pub fn shape(&self) -> SlotShape {
        self.pool.shape
    }

    pub fn dtype(&self) -> DType {
        self.pool.keys.dtype()
    }

    /// Views of layer `layer`'s key and value buffers `[1, kv_heads,
    /// positions, head_dim]` (contiguous, inside the pool's memory).
    pub fn layer(&self, layer: usize) -> Result<(Tensor, Tensor)> {
        let layers = self.pool.shape.layers;
        if layer >= layers {
            candle_core::bail!("layer {layer} of a KV slot of {layers} layers");
        }
        let at = self.index * layers + layer;
        Ok((
            self.pool.keys.narrow(0, at, 1)?,
            self.pool.values.narrow(0, at, 1)?,
        ))
    }
}

impl Drop for KvSlot {
    fn drop(&mut self) {
        self.pool
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self.index);
    }
}

impl std::fmt::Debug for KvSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KvSlot({} of {})", self.index, self.pool.slots)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> SlotShape {
        SlotShape {
            layers: 3,
            kv_heads: 2,
            positions: 5,
            head_dim: 4,
        }
    }

    #[test]
    fn slots_are_disjoint_and_come_back_when_dropped() {
        let pool = KvPool::new(2, shape(), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(pool.bytes(), 2 * shape().bytes(DType::F32));
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        assert!(pool.take().is_none(), "two slots only");
        assert_ne!(a.index(), b.index());
        // Writing one slot's layer leaves the other slot and layers as they were.
        let (ka, _) = a.layer(1).unwrap();
        ka.slice_set(
            &Tensor::ones((1, 2, 5, 4), DType::F32, &Device::Cpu).unwrap(),
            2,
            0,
        )
        .unwrap();
        let sum = |t: Tensor| t.sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(sum(a.layer(1).unwrap().0), 40.0);
        assert_eq!(sum(a.layer(0).unwrap().0), 0.0);
        assert_eq!(sum(a.layer(1).unwrap().1), 0.0);
        assert_eq!(sum(b.layer(1).unwrap().0), 0.0);
        assert!(a.layer(3).is_err());
        drop(a);
        assert_eq!(pool.free_slots(), 1);
        let c = pool.take().unwrap();
        assert_ne!(c.index(), b.index());
    }
}
