//! A sequence's KV cache for the stage's layers: per layer, buffers that grow in place.

use candle_core::Tensor;

use crate::error::Result;

/// One sequence's keys and values for the stage's layers.
pub(super) struct SequenceCache {
    pub(super) layers: Vec<LayerKv>,
    /// Tokens already in the cache: the position the next chunk must start at.
    pub(super) len: usize,
}

/// One layer's keys and values for one sequence: buffers of `(1, kv_heads, capacity, head_dim)`
/// filled to `len`. A step is written in place; when full, the capacity doubles (at least
/// [`KV_MIN_CAPACITY`] positions). Concatenating each step onto the cache instead copied all of
/// it every step, into fresh memory.
#[derive(Default)]
pub(super) struct LayerKv {
    pub(super) k: Option<Tensor>,
    pub(super) v: Option<Tensor>,
    pub(super) len: usize,
}

/// Positions a layer's cache holds at first: small enough that a short request reserves little.
pub(super) const KV_MIN_CAPACITY: usize = 64;

impl LayerKv {
    /// Appends `k` and `v` (`(1, kv_heads, n, head_dim)`) and returns the keys and values of
    /// every position so far: views of the buffers, contiguous within each head.
    pub(super) fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let need = self.len + k.dim(2)?;
        let capacity = match &self.k {
            Some(t) => t.dim(2)?,
            None => 0,
        };
        if need > capacity {
            let capacity = need.max(2 * capacity).max(KV_MIN_CAPACITY);
            self.k = Some(Self::grow(self.k.as_ref(), k, self.len, capacity)?);
            self.v = Some(Self::grow(self.v.as_ref(), v, self.len, capacity)?);
        }
        let (Some(kb), Some(vb)) = (&self.k, &self.v) else {
            unreachable!("the buffers exist once the capacity is above zero");
        };
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = need;
        Ok((kb.narrow(2, 0, need)?, vb.narrow(2, 0, need)?))
    }

    /// A buffer of `capacity` positions shaped like `like`, holding the first `len` of `old`.
    fn grow(old: Option<&Tensor>, like: &Tensor, len: usize, capacity: usize) -> Result<Tensor> {
        let (b, heads, _, d) = like.dims4()?;
        let buf = Tensor::zeros((b, heads, capacity, d), like.dtype(), like.device())?;
        if let Some(old) = old
            && len > 0
        {
            buf.slice_set(&old.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
        }
        Ok(buf)
    }
}
