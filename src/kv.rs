//! Paged KV cache: fixed-size blocks of key/value slots shared by all
//! sequences, addressed through per-sequence block tables.
//!
//! Layout per layer: `[block][kv_head][slot][head_dim]`, so one head's keys
//! within a block are contiguous and attention reads them in place. Keys and
//! values are stored as f32 (exact) or f16 (as llama.cpp does by default:
//! half the memory and half the bandwidth of decode attention).

use crate::error::{Error, Result};
use crate::simd::{dispatch, Kernel, Simd};
use half::f16;
use std::collections::{BTreeMap, HashMap};

mod sealed {
    /// Private supertrait of [`super::KvElem`]: only this module's impls exist.
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
}

/// An element type of the KV cache: `f32` or `f16`.
///
/// The trait is sealed (no other crate can implement it): the cache hands
/// out freshly zeroed and `madvise`d memory as elements, which is sound only
/// for types whose all-zero bit pattern is a value.
///
/// ```compile_fail
/// #[derive(Clone, Copy)]
/// struct Mine(f32);
/// impl ruvllm::kv::KvElem for Mine {
///     fn from_f32(v: f32) -> Self { Mine(v) }
///     fn to_f32(self) -> f32 { self.0 }
///     fn load8<S: ruvllm::simd::Simd>(_: S, s: &[Self]) -> [f32; 8] {
///         std::array::from_fn(|i| s[i].0)
///     }
///     fn store<S: ruvllm::simd::Simd>(_: S, src: &[f32], dst: &mut [Self]) {
///         dst.iter_mut().zip(src).for_each(|(d, s)| *d = Mine(*s));
///     }
/// }
/// ```
pub trait KvElem: sealed::Sealed + Copy + Send + Sync + 'static {
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
    /// The first eight elements of `src` as floats.
    fn load8<S: Simd>(s: S, src: &[Self]) -> [f32; 8];
    /// `dst[i] = src[i]` converted, over the shorter of the two.
    fn store<S: Simd>(s: S, src: &[f32], dst: &mut [Self]);
}

impl KvElem for f32 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn load8<S: Simd>(_: S, src: &[Self]) -> [f32; 8] {
        src[..8].try_into().expect("eight elements")
    }
    #[inline(always)]
    fn store<S: Simd>(_: S, src: &[f32], dst: &mut [Self]) {
        let n = src.len().min(dst.len());
        dst[..n].copy_from_slice(&src[..n]);
    }
}

impl KvElem for f16 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    /// One F16C instruction in the AVX2 copy.
    #[inline(always)]
    fn load8<S: Simd>(s: S, src: &[Self]) -> [f32; 8] {
        s.f16x8_to_f32(src[..8].try_into().expect("eight elements"))
    }
    #[inline(always)]
    fn store<S: Simd>(s: S, src: &[f32], dst: &mut [Self]) {
        let mut d8 = dst.chunks_exact_mut(8);
        let mut s8 = src.chunks_exact(8);
        for (d, v) in (&mut d8).zip(&mut s8) {
            d.copy_from_slice(&s.f32x8_to_f16(v.try_into().expect("eight elements")));
        }
        for (d, v) in d8.into_remainder().iter_mut().zip(s8.remainder()) {
            *d = f16::from_f32(*v);
        }
    }
}

/// `n` zeros from the allocator's zeroed memory: the pages stay untouched,
/// and so not resident, until written (`vec![x; n]` writes every element
/// unless `x` is a primitive zero).
fn zeroed<T: KvElem>(n: usize) -> Vec<T> {
    let layout = std::alloc::Layout::array::<T>(n).expect("KV cache size overflows");
    if layout.size() == 0 {
        return Vec::new();
    }
    // SAFETY: the layout has a non-zero size; a null result is handled; the
    // memory is allocated by the global allocator with T's layout for n
    // elements, so Vec may own and free it; all-zero bits are a valid T
    // (KvElem is sealed to f32 and f16, whose zero bits are 0.0).
    unsafe {
        let p = std::alloc::alloc_zeroed(layout) as *mut T;
        if p.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Vec::from_raw_parts(p, n, n)
    }
}

/// How keys and values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    #[default]
    F32,
    F16,
}

impl KvDtype {
    pub fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }
}

pub struct KvCache<T: KvElem> {
    pub block_size: usize,
    pub n_blocks: usize,
    n_kv_heads: usize,
    head_dim: usize,
    k: Vec<Vec<T>>,
    v: Vec<Vec<T>>,
}

impl<T: KvElem> KvCache<T> {
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
            k: (0..n_layers).map(|_| zeroed(per_layer)).collect(),
            v: (0..n_layers).map(|_| zeroed(per_layer)).collect(),
        }
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
        let (start, hd) = (self.index(block, 0, slot), self.head_dim);
        // Head h of a block sits one head's slots after head h - 1.
        let stride = self.block_size * hd;
        let heads = self.n_kv_heads;
        for (dst, src) in [(&mut self.k[layer], k), (&mut self.v[layer], v)] {
            dispatch(Store {
                dst,
                src,
                start,
                stride,
                hd,
                heads,
            });
        }
    }

    /// Gives the memory of `blocks` back to the operating system; they read
    /// as zeros until written again.
    pub fn discard(&mut self, blocks: &[u32]) {
        let per_block = self.n_kv_heads * self.block_size * self.head_dim;
        // Runs of adjacent blocks: a block may be smaller than a page.
        let mut sorted = blocks.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for b in sorted.into_iter().map(|b| b as usize) {
            match runs.last_mut() {
                Some((_, end)) if *end == b => *end = b + 1,
                _ => runs.push((b, b + 1)),
            }
        }
        for layer in self.k.iter_mut().chain(self.v.iter_mut()) {
            for &(lo, hi) in &runs {
                release_pages(&mut layer[lo * per_block..hi * per_block]);
            }
        }
    }

    /// Keys (or values) of `head` for slots `0..n` of `block`, contiguous.
    #[inline]
    pub fn keys(&self, layer: usize, block: usize, head: usize, n: usize) -> &[T] {
        let i = self.index(block, head, 0);
        &self.k[layer][i..i + n * self.head_dim]
    }

    #[inline]
    pub fn values(&self, layer: usize, block: usize, head: usize, n: usize) -> &[T] {
        let i = self.index(block, head, 0);
        &self.v[layer][i..i + n * self.head_dim]
    }
}

/// Head h of `src` (`hd` values each) into `dst[start + h·stride..]`, converted.
struct Store<'a, T> {
    dst: &'a mut [T],
    src: &'a [f32],
    start: usize,
    stride: usize,
    hd: usize,
    heads: usize,
}

impl<T: KvElem> Kernel for Store<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        for h in 0..self.heads {
            let i = self.start + h * self.stride;
            T::store(
                s,
                &self.src[h * self.hd..(h + 1) * self.hd],
                &mut self.dst[i..i + self.hd],
            );
        }
    }
}

/// Drops the whole pages inside `data` from memory.
fn release_pages<T: KvElem>(data: &mut [T]) {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    let start = data.as_mut_ptr() as usize;
    let end = start + std::mem::size_of_val(data);
    let (lo, hi) = (start.next_multiple_of(page), end / page * page);
    if hi > lo {
        // SAFETY: [lo, hi) lies within `data`, which we borrow mutably, so no
        // one else reads it. MADV_DONTNEED keeps the private anonymous pages
        // mapped and makes them read as zeros, a valid value for the
        // float types the cache holds.
        unsafe { libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_DONTNEED) };
    }
}

/// A KV cache of either element type, chosen at load time.
pub enum AnyKvCache {
    F32(KvCache<f32>),
    F16(KvCache<f16>),
}

impl AnyKvCache {
    pub fn new(
        dtype: KvDtype,
        n_layers: usize,
        n_kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        n_blocks: usize,
    ) -> Self {
        match dtype {
            KvDtype::F32 => AnyKvCache::F32(KvCache::new(
                n_layers, n_kv_heads, head_dim, block_size, n_blocks,
            )),
            KvDtype::F16 => AnyKvCache::F16(KvCache::new(
                n_layers, n_kv_heads, head_dim, block_size, n_blocks,
            )),
        }
    }

    pub fn block_size(&self) -> usize {
        match self {
            AnyKvCache::F32(c) => c.block_size,
            AnyKvCache::F16(c) => c.block_size,
        }
    }

    pub fn discard(&mut self, blocks: &[u32]) {
        match self {
            AnyKvCache::F32(c) => c.discard(blocks),
            AnyKvCache::F16(c) => c.discard(blocks),
        }
    }
}

/// Bytes one token takes across all layers.
pub fn bytes_per_token(
    n_layers: usize,
    n_kv_heads: usize,
    head_dim: usize,
    dtype: KvDtype,
) -> usize {
    2 * n_layers * n_kv_heads * head_dim * dtype.size()
}

/// Identity of a full block: a hash chained over every token from the
/// start of the sequence up to the block's end (SHA-256, truncated).
pub type BlockHash = [u8; 16];

/// Hands out KV blocks with reference counts and prefix caching.
///
/// A block that filled up is registered under the chained hash of the tokens
/// that produced it; a later sequence with the same prefix reuses it instead
/// of recomputing. Blocks whose last owner left stay cached until the pool
/// needs them, least recently released first.
pub struct BlockManager {
    refs: Vec<u32>,
    hash: Vec<Option<BlockHash>>,
    cached: HashMap<BlockHash, u32>,
    /// Unowned blocks in hand-out order: uncached ones (negative keys) before
    /// cached ones, which go oldest release first.
    idle: BTreeMap<i64, u32>,
    idle_key: Vec<i64>,
    /// Idle blocks that hold a cached prefix.
    idle_cached: usize,
    clock: i64,
    front: i64,
}

impl BlockManager {
    pub fn new(n_blocks: usize) -> Self {
        let mut m = BlockManager {
            refs: vec![0; n_blocks],
            hash: vec![None; n_blocks],
            cached: HashMap::new(),
            idle: BTreeMap::new(),
            idle_key: vec![0; n_blocks],
            idle_cached: 0,
            clock: 0,
            front: 0,
        };
        for b in 0..n_blocks as u32 {
            m.make_idle(b);
        }
        m
    }

    pub fn n_blocks(&self) -> usize {
        self.refs.len()
    }

    /// Blocks that can be handed out now (free or cached-but-unowned).
    pub fn n_available(&self) -> usize {
        self.idle.len()
    }

    /// Unowned blocks kept for prefix reuse.
    pub fn n_cached_idle(&self) -> usize {
        self.idle_cached
    }

    /// Forgets the prefixes of all unowned blocks and returns those blocks.
    pub fn evict_idle_cached(&mut self) -> Vec<u32> {
        let evicted: Vec<u32> = self
            .idle
            .values()
            .copied()
            .filter(|&b| self.hash[b as usize].is_some())
            .collect();
        for &b in &evicted {
            self.idle.remove(&self.idle_key[b as usize]);
            let h = self.hash[b as usize].take().expect("cached");
            self.cached.remove(&h);
            self.idle_cached -= 1;
            self.make_idle(b);
        }
        evicted
    }

    fn make_idle(&mut self, b: u32) {
        let key = if self.hash[b as usize].is_some() {
            self.idle_cached += 1;
            self.clock += 1;
            self.clock
        } else {
            self.front -= 1;
            self.front
        };
        self.idle_key[b as usize] = key;
        self.idle.insert(key, b);
    }

    /// Where the hash chain of a sequence starts: all zeros, or a hash of
    /// the request's cache salt, so that tenants with different salts never
    /// share (or learn about) each other's cached prefixes.
    pub fn chain_root(salt: Option<&str>) -> BlockHash {
        use sha2::{Digest, Sha256};
        match salt {
            None => [0; 16],
            Some(s) => {
                let mut out = [0u8; 16];
                out.copy_from_slice(&Sha256::digest(format!("ruvllm-cache-salt:{s}"))[..16]);
                out
            }
        }
    }

    /// The hash of a block of `tokens` that follows a block hashed `prev`
    /// ([`BlockManager::chain_root`] for the first block).
    pub fn chain_hash(prev: &BlockHash, tokens: &[u32]) -> BlockHash {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(prev);
        for t in tokens {
            h.update(t.to_le_bytes());
        }
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.finalize()[..16]);
        out
    }

    /// A fresh block, evicting the least recently released cached one if need be.
    pub fn allocate(&mut self) -> Option<u32> {
        let (_, b) = self.idle.pop_first()?;
        if let Some(h) = self.hash[b as usize].take() {
            self.cached.remove(&h);
            self.idle_cached -= 1;
        }
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// Takes a reference on the cached blocks of the longest prefix of
    /// `hashes` (chained block hashes, first block first) and returns them.
    pub fn lookup_prefix(&mut self, hashes: &[BlockHash]) -> Vec<u32> {
        let mut table = Vec::new();
        for h in hashes {
            let Some(&b) = self.cached.get(h) else { break };
            if self.refs[b as usize] == 0 {
                self.idle.remove(&self.idle_key[b as usize]);
                self.idle_cached -= 1;
            }
            self.refs[b as usize] += 1;
            table.push(b);
        }
        table
    }

    /// Offers a full block for reuse under hash `h` (unless another block
    /// already holds that prefix).
    pub fn register(&mut self, b: u32, h: BlockHash) {
        if self.hash[b as usize].is_none() && !self.cached.contains_key(&h) {
            self.hash[b as usize] = Some(h);
            self.cached.insert(h, b);
        }
    }

    /// Marks the idle block holding prefix `h`, if any, as just released,
    /// so that it is evicted after blocks released before now.
    pub fn touch_idle(&mut self, h: &BlockHash) {
        let Some(&b) = self.cached.get(h) else { return };
        if self.refs[b as usize] == 0 {
            self.idle.remove(&self.idle_key[b as usize]);
            self.idle_cached -= 1;
            self.make_idle(b);
        }
    }

    /// Unowned blocks that hold no cached prefix: their contents are never
    /// read again, so their memory can go back to the system.
    pub fn idle_uncached(&self) -> Vec<u32> {
        self.idle
            .values()
            .copied()
            .filter(|&b| self.hash[b as usize].is_none())
            .collect()
    }

    /// Drops references; blocks nobody owns stay cached until reused. Blocks
    /// are released in table order, so the last of `table` is evicted
    /// first: callers pass a sequence's blocks tail first, which keeps the
    /// head of a cached chain (what every lookup needs) the longest.
    pub fn release(&mut self, table: &[u32]) {
        for &b in table {
            let r = &mut self.refs[b as usize];
            debug_assert!(*r > 0, "releasing a free block");
            *r -= 1;
            if *r == 0 {
                self.make_idle(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_blocks_are_shared_then_evicted_oldest_first() {
        let mut m = BlockManager::new(4);
        let toks = [1, 2, 3, 4, 5];
        let (a, b) = (m.allocate().unwrap(), m.allocate().unwrap());
        let h1 = BlockManager::chain_hash(&[0; 16], &toks[..2]);
        let h2 = BlockManager::chain_hash(&h1, &toks[2..4]);
        m.register(a, h1);
        m.register(b, h2);
        m.release(&[a, b]);
        assert_eq!(m.n_available(), 4);

        // A sequence with the same prefix gets both blocks back, shared.
        let table = m.lookup_prefix(&[h1, h2]);
        assert_eq!(table, vec![a, b]);
        let again = m.lookup_prefix(&[h1, h2]);
        assert_eq!(again, table);
        assert_eq!(m.n_available(), 2);
        // A different first token shares nothing: the hash is chained.
        let other = BlockManager::chain_hash(&[0; 16], &[9, 2]);
        assert!(m
            .lookup_prefix(&[other, BlockManager::chain_hash(&other, &toks[2..4])])
            .is_empty());
        m.release(&table);
        m.release(&again);

        // Uncached blocks go out first, then cached ones, least recently released first.
        let order: Vec<u32> = (0..4).map(|_| m.allocate().unwrap()).collect();
        assert_eq!(&order[2..], &[a, b]);
        assert!(m.allocate().is_none());
        assert!(
            m.lookup_prefix(&[h1, h2]).is_empty(),
            "evicted blocks are no longer cached"
        );
    }
}
