//! Paged KV cache: fixed-size blocks of key/value slots shared by all
//! sequences, addressed through per-sequence block tables.
//!
//! Layout per layer: `[block][kv_head][slot][head_dim]`, so one head's keys
//! within a block are contiguous and attention reads them in place.

use crate::error::{Error, Result};

pub struct KvCache {
    pub block_size: usize,
    pub n_blocks: usize,
    n_kv_heads: usize,
    head_dim: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl KvCache {
    /// Allocates `n_blocks` blocks for every layer. Pages of the allocation are
    /// only touched (and so only become resident) as blocks are written.
    pub fn new(
        n_layers: usize,
        n_kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        n_blocks: usize,
    ) -> Self {
        let per_layer = n_blocks * block_size * n_kv_heads * head_dim;
        KvCache {
            block_size,
            n_blocks,
            n_kv_heads,
            head_dim,
            k: (0..n_layers).map(|_| vec![0.0; per_layer]).collect(),
            v: (0..n_layers).map(|_| vec![0.0; per_layer]).collect(),
        }
    }

    /// Bytes one token takes across all layers.
    pub fn bytes_per_token(n_layers: usize, n_kv_heads: usize, head_dim: usize) -> usize {
        2 * n_layers * n_kv_heads * head_dim * std::mem::size_of::<f32>()
    }

    #[inline]
    fn index(&self, block: usize, head: usize, slot: usize) -> usize {
        ((block * self.n_kv_heads + head) * self.block_size + slot) * self.head_dim
    }

    /// The block and slot of position `pos` in a sequence's block table.
    #[inline]
    pub fn locate(&self, table: &[u32], pos: usize) -> Result<(usize, usize)> {
        let b = *table.get(pos / self.block_size).ok_or_else(|| {
            Error::InvalidRequest(format!("position {pos} is beyond the sequence's KV blocks"))
        })? as usize;
        if b >= self.n_blocks {
            return Err(Error::InvalidRequest(format!("KV block {b} out of range")));
        }
        Ok((b, pos % self.block_size))
    }

    /// Stores one token's keys and values (`n_kv_heads × head_dim` each).
    pub fn write(&mut self, layer: usize, block: usize, slot: usize, k: &[f32], v: &[f32]) {
        let hd = self.head_dim;
        for h in 0..self.n_kv_heads {
            let i = self.index(block, h, slot);
            self.k[layer][i..i + hd].copy_from_slice(&k[h * hd..(h + 1) * hd]);
            self.v[layer][i..i + hd].copy_from_slice(&v[h * hd..(h + 1) * hd]);
        }
    }

    /// Keys (or values) of `head` for slots `0..n` of `block`, contiguous.
    #[inline]
    pub fn keys(&self, layer: usize, block: usize, head: usize, n: usize) -> &[f32] {
        let i = self.index(block, head, 0);
        &self.k[layer][i..i + n * self.head_dim]
    }

    #[inline]
    pub fn values(&self, layer: usize, block: usize, head: usize, n: usize) -> &[f32] {
        let i = self.index(block, head, 0);
        &self.v[layer][i..i + n * self.head_dim]
    }
}

/// Hands out free blocks. Blocks are freed when their owner drops them.
pub struct BlockAllocator {
    free: Vec<u32>,
    total: usize,
}

impl BlockAllocator {
    pub fn new(n_blocks: usize) -> Self {
        BlockAllocator {
            free: (0..n_blocks as u32).rev().collect(),
            total: n_blocks,
        }
    }

    pub fn allocate(&mut self) -> Option<u32> {
        self.free.pop()
    }

    pub fn release(&mut self, blocks: impl IntoIterator<Item = u32>) {
        self.free.extend(blocks);
    }

    pub fn n_free(&self) -> usize {
        self.free.len()
    }

    pub fn total(&self) -> usize {
        self.total
    }
}
