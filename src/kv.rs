//! Paged KV cache: fixed-size blocks of key/value slots shared by all
//! sequences, addressed through per-sequence block tables.
//!
//! Layout per layer: `[block][kv_head][slot][head_dim]`, so one head's keys
//! within a block are contiguous and attention reads them in place. Keys and
//! values are stored as f32 (exact), f16 (as llama.cpp does by default:
//! half the memory and half the bandwidth of decode attention), or in
//! ggml's Q8_0 / Q4_0 blocks of 32 (llama.cpp's `-ctk/-ctv q8_0|q4_0`:
//! 3.8× / 7.1× the tokens of f32 in the same memory), which attention
//! dequantizes as it reads them.

use crate::error::{Error, Result};
use crate::quant::quantize::{q4_0_block, q8_0_block};
use crate::quant::QK;
use crate::simd::{dispatch, Kernel, Simd};
use half::f16;
use std::collections::{BTreeMap, HashMap};

mod sealed {
    /// Private supertrait of [`super::KvElem`]: only this module's impls exist.
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for super::BlockQ8_0 {}
    impl Sealed for super::BlockQ4_0 {}
}

/// A stored element of the KV cache: an `f32` or `f16` value, or a block of
/// [`KvElem::PER`] quantized values. A head's key (or value) vector is
/// `head_dim / PER` elements.
///
/// The trait is sealed (no other crate can implement it): the cache hands
/// out freshly zeroed and `madvise`d memory as elements, which is sound only
/// for types whose all-zero bit pattern is a value.
///
/// ```compile_fail
/// #[derive(Clone, Copy, Default)]
/// struct Mine(f32);
/// impl ruvllm::kv::KvElem for Mine {
///     const PER: usize = 1;
///     fn load8<S: ruvllm::simd::Simd>(_: S, v: &[Self], c: usize) -> [f32; 8] {
///         std::array::from_fn(|i| v[c + i].0)
///     }
///     fn get(v: &[Self], i: usize) -> f32 { v[i].0 }
///     fn store<S: ruvllm::simd::Simd>(_: S, src: &[f32], dst: &mut [Self]) {
///         dst.iter_mut().zip(src).for_each(|(d, s)| *d = Mine(*s));
///     }
/// }
/// ```
pub trait KvElem: sealed::Sealed + Copy + Default + Send + Sync + 'static {
    /// Values one element holds.
    const PER: usize;
    /// Whether storing rounds to a few bits per value (and so whether
    /// attention rotates keys and values first: [`KvRotation`]).
    const QUANTIZED: bool = false;
    /// Values `c..c + 8` of the vector `v` (`c` a multiple of 8).
    fn load8<S: Simd>(s: S, v: &[Self], c: usize) -> [f32; 8];
    /// Value `i` of the vector `v`.
    fn get(v: &[Self], i: usize) -> f32;
    /// Stores the vector `src` (`dst.len() · PER` values) into `dst`.
    fn store<S: Simd>(s: S, src: &[f32], dst: &mut [Self]);
}

impl KvElem for f32 {
    const PER: usize = 1;
    #[inline(always)]
    fn load8<S: Simd>(_: S, v: &[Self], c: usize) -> [f32; 8] {
        v[c..c + 8].try_into().expect("eight elements")
    }
    #[inline(always)]
    fn get(v: &[Self], i: usize) -> f32 {
        v[i]
    }
    #[inline(always)]
    fn store<S: Simd>(_: S, src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src);
    }
}

impl KvElem for f16 {
    const PER: usize = 1;
    /// One F16C instruction in the AVX2 copy.
    #[inline(always)]
    fn load8<S: Simd>(s: S, v: &[Self], c: usize) -> [f32; 8] {
        s.f16x8_to_f32(v[c..c + 8].try_into().expect("eight elements"))
    }
    #[inline(always)]
    fn get(v: &[Self], i: usize) -> f32 {
        v[i].to_f32()
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

/// 32 values as ggml's Q8_0 stores them: `x ≈ d · q`, q in -127..=127.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK],
}

/// 32 values as ggml's Q4_0 stores them: `x ≈ d · (q - 8)`, q in 0..=15,
/// value j in the low nibble of byte j and value j + 16 in its high nibble.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; QK / 2],
}

impl KvElem for BlockQ8_0 {
    const PER: usize = QK;
    const QUANTIZED: bool = true;
    #[inline(always)]
    fn load8<S: Simd>(_: S, v: &[Self], c: usize) -> [f32; 8] {
        let b = &v[c / QK];
        let (d, o) = (b.d.to_f32(), c % QK);
        std::array::from_fn(|l| d * b.qs[o + l] as f32)
    }
    #[inline(always)]
    fn get(v: &[Self], i: usize) -> f32 {
        let b = &v[i / QK];
        b.d.to_f32() * b.qs[i % QK] as f32
    }
    fn store<S: Simd>(_: S, src: &[f32], dst: &mut [Self]) {
        for (d, x) in dst.iter_mut().zip(src.chunks_exact(QK)) {
            let (scale, qs) = q8_0_block(x);
            *d = BlockQ8_0 { d: scale, qs };
        }
    }
}

impl KvElem for BlockQ4_0 {
    const PER: usize = QK;
    const QUANTIZED: bool = true;
    #[inline(always)]
    fn load8<S: Simd>(_: S, v: &[Self], c: usize) -> [f32; 8] {
        let b = &v[c / QK];
        let (d, o) = (b.d.to_f32(), c % QK);
        // Values 0..16 are the low nibbles, 16..32 the high ones.
        let (bytes, shift) = (&b.qs[o % (QK / 2)..o % (QK / 2) + 8], 4 * (o / (QK / 2)));
        std::array::from_fn(|l| d * (((bytes[l] >> shift) & 0xF) as i32 - 8) as f32)
    }
    #[inline(always)]
    fn get(v: &[Self], i: usize) -> f32 {
        let b = &v[i / QK];
        let o = i % QK;
        let q = (b.qs[o % (QK / 2)] >> (4 * (o / (QK / 2)))) & 0xF;
        b.d.to_f32() * (q as i32 - 8) as f32
    }
    fn store<S: Simd>(_: S, src: &[f32], dst: &mut [Self]) {
        for (d, x) in dst.iter_mut().zip(src.chunks_exact(QK)) {
            let (scale, qs) = q4_0_block(x);
            *d = BlockQ4_0 { d: scale, qs };
        }
    }
}

/// The orthonormal Walsh-Hadamard rotations attention applies around a
/// quantized cache, as llama.cpp does: a block of 32 values shares one
/// scale, so a single large channel (keys have a few) costs the rest of its
/// block their precision; rotated, every value carries a share of it.
/// Queries and keys are rotated alike (dot products are unchanged), values
/// before they are stored and the attention output back after (the
/// rotation is its own inverse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvRotation {
    /// Keys and queries: chunks of the largest power of two dividing the
    /// head dimension.
    pub k: usize,
    /// Values and the output: chunks of 64.
    pub v: usize,
}

impl KvRotation {
    /// The rotation for a cache of `T` and heads of `head_dim`: none for
    /// float caches, nor for heads that are not whole multiples of 64.
    pub fn for_cache<T: KvElem>(head_dim: usize) -> Option<KvRotation> {
        if !T::QUANTIZED || head_dim == 0 || !head_dim.is_multiple_of(64) {
            return None;
        }
        Some(KvRotation {
            k: 1 << head_dim.trailing_zeros(),
            v: 64,
        })
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
    // (KvElem is sealed to f32 and f16, whose zero bits are 0.0, and to
    // blocks of an f16 and integers, whose zero bits are a zero block).
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
    Q8_0,
    Q4_0,
}

impl KvDtype {
    pub const ALL: [KvDtype; 4] = [KvDtype::F32, KvDtype::F16, KvDtype::Q8_0, KvDtype::Q4_0];

    /// The name `--kv-dtype` takes.
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
            KvDtype::Q8_0 => "q8_0",
            KvDtype::Q4_0 => "q4_0",
        }
    }

    pub fn from_name(name: &str) -> Option<KvDtype> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Values per stored element (the quantized types store blocks of 32).
    pub fn values_per_element(self) -> usize {
        match self {
            KvDtype::F32 | KvDtype::F16 => 1,
            KvDtype::Q8_0 | KvDtype::Q4_0 => QK,
        }
    }

    /// Bytes of one stored element.
    pub fn element_bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
            KvDtype::Q8_0 => std::mem::size_of::<BlockQ8_0>(),
            KvDtype::Q4_0 => std::mem::size_of::<BlockQ4_0>(),
        }
    }

    /// Bytes of one head's key (or value) vector of `head_dim` values.
    pub fn vector_bytes(self, head_dim: usize) -> usize {
        head_dim.div_ceil(self.values_per_element()) * self.element_bytes()
    }

    /// Refuses a head dimension the type cannot store whole blocks of.
    pub fn check(self, head_dim: usize) -> Result<()> {
        let per = self.values_per_element();
        if !head_dim.is_multiple_of(per) {
            return Err(Error::Unsupported(format!(
                "--kv-dtype {} stores blocks of {per} values, and this model's head \
                 dimension ({head_dim}) is not a multiple of {per}; use f16 or f32",
                self.name()
            )));
        }
        Ok(())
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

pub struct KvCache<T: KvElem> {
    pub block_size: usize,
    pub n_blocks: usize,
    n_kv_heads: usize,
    /// Elements of one head's vector: `head_dim / T::PER`.
    unit: usize,
    k: Vec<Vec<T>>,
    v: Vec<Vec<T>>,
}

impl<T: KvElem> KvCache<T> {
    /// Allocates `n_blocks` blocks for every layer. Pages of the allocation are
    /// only touched (and so only become resident) as blocks are written.
    /// `head_dim` must be a multiple of `T::PER` ([`KvDtype::check`]).
    pub fn new(
        n_layers: usize,
        n_kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        n_blocks: usize,
    ) -> Self {
        assert!(
            head_dim.is_multiple_of(T::PER),
            "head dimension {head_dim} is not whole blocks of {}",
            T::PER
        );
        let unit = head_dim / T::PER;
        let per_layer = n_blocks * block_size * n_kv_heads * unit;
        KvCache {
            block_size,
            n_blocks,
            n_kv_heads,
            unit,
            k: (0..n_layers).map(|_| zeroed(per_layer)).collect(),
            v: (0..n_layers).map(|_| zeroed(per_layer)).collect(),
        }
    }

    #[inline]
    fn index(&self, block: usize, head: usize, slot: usize) -> usize {
        ((block * self.n_kv_heads + head) * self.block_size + slot) * self.unit
    }

    /// Elements of one head's key (or value) vector.
    #[inline]
    pub fn vector_len(&self) -> usize {
        self.unit
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
        let (start, unit) = (self.index(block, 0, slot), self.unit);
        // Head h of a block sits one head's slots after head h - 1.
        let stride = self.block_size * unit;
        let heads = self.n_kv_heads;
        for (dst, src) in [(&mut self.k[layer], k), (&mut self.v[layer], v)] {
            dispatch(Store {
                dst,
                src,
                start,
                stride,
                unit,
                heads,
            });
        }
    }

    /// Gives the memory of `blocks` back to the operating system; they read
    /// as zeros until written again.
    pub fn discard(&mut self, blocks: &[u32]) {
        let per_block = self.n_kv_heads * self.block_size * self.unit;
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

    /// Keys (or values) of `head` for slots `0..n` of `block`, contiguous:
    /// [`KvCache::vector_len`] elements per slot.
    #[inline]
    pub fn keys(&self, layer: usize, block: usize, head: usize, n: usize) -> &[T] {
        let i = self.index(block, head, 0);
        &self.k[layer][i..i + n * self.unit]
    }

    #[inline]
    pub fn values(&self, layer: usize, block: usize, head: usize, n: usize) -> &[T] {
        let i = self.index(block, head, 0);
        &self.v[layer][i..i + n * self.unit]
    }
}

/// Head h of `src` (`unit · T::PER` values each) into `unit` elements at
/// `dst[start + h·stride..]`, converted.
struct Store<'a, T> {
    dst: &'a mut [T],
    src: &'a [f32],
    start: usize,
    stride: usize,
    unit: usize,
    heads: usize,
}

impl<T: KvElem> Kernel for Store<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        let hd = self.unit * T::PER;
        for h in 0..self.heads {
            let i = self.start + h * self.stride;
            T::store(
                s,
                &self.src[h * hd..(h + 1) * hd],
                &mut self.dst[i..i + self.unit],
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
        // mapped and makes them read as zeros, a valid value for every
        // element type the cache holds (KvElem is sealed).
        unsafe { libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_DONTNEED) };
    }
}

/// A KV cache of any element type, chosen at load time.
pub enum AnyKvCache {
    F32(KvCache<f32>),
    F16(KvCache<f16>),
    Q8_0(KvCache<BlockQ8_0>),
    Q4_0(KvCache<BlockQ4_0>),
}

/// `$body` with `$c` bound to the cache, whatever its element type.
macro_rules! with_kv_cache {
    ($kv:expr, $c:ident => $body:expr) => {
        match $kv {
            $crate::kv::AnyKvCache::F32($c) => $body,
            $crate::kv::AnyKvCache::F16($c) => $body,
            $crate::kv::AnyKvCache::Q8_0($c) => $body,
            $crate::kv::AnyKvCache::Q4_0($c) => $body,
        }
    };
}
pub(crate) use with_kv_cache;

impl AnyKvCache {
    /// Fails (before allocating) for a head dimension `dtype` cannot store.
    pub fn new(
        dtype: KvDtype,
        n_layers: usize,
        n_kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        n_blocks: usize,
    ) -> Result<Self> {
        dtype.check(head_dim)?;
        let a = (n_layers, n_kv_heads, head_dim, block_size, n_blocks);
        Ok(match dtype {
            KvDtype::F32 => AnyKvCache::F32(KvCache::new(a.0, a.1, a.2, a.3, a.4)),
            KvDtype::F16 => AnyKvCache::F16(KvCache::new(a.0, a.1, a.2, a.3, a.4)),
            KvDtype::Q8_0 => AnyKvCache::Q8_0(KvCache::new(a.0, a.1, a.2, a.3, a.4)),
            KvDtype::Q4_0 => AnyKvCache::Q4_0(KvCache::new(a.0, a.1, a.2, a.3, a.4)),
        })
    }

    pub fn dtype(&self) -> KvDtype {
        match self {
            AnyKvCache::F32(_) => KvDtype::F32,
            AnyKvCache::F16(_) => KvDtype::F16,
            AnyKvCache::Q8_0(_) => KvDtype::Q8_0,
            AnyKvCache::Q4_0(_) => KvDtype::Q4_0,
        }
    }

    pub fn block_size(&self) -> usize {
        with_kv_cache!(self, c => c.block_size)
    }

    pub fn discard(&mut self, blocks: &[u32]) {
        with_kv_cache!(self, c => c.discard(blocks))
    }
}

/// Bytes one token takes across all layers.
pub fn bytes_per_token(
    n_layers: usize,
    n_kv_heads: usize,
    head_dim: usize,
    dtype: KvDtype,
) -> usize {
    2 * n_layers * n_kv_heads * dtype.vector_bytes(head_dim)
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
    use crate::quant::{dequantize, quantize::quantize_row, GgmlType};
    use crate::simd::Portable;

    /// Values of every magnitude and sign, with ties at the rounding points.
    fn sample(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|i| {
                x = x.wrapping_mul(1664525).wrapping_add(1013904223);
                let v = (x >> 8) as f32 / (1 << 24) as f32 - 0.5;
                v * (1 + i % 7) as f32
            })
            .collect()
    }

    fn bytes_of<T: KvElem>(v: &[T]) -> &[u8] {
        // SAFETY: the block types are repr(C) of an f16 and byte arrays
        // (no padding: size 34 and 18), so every byte is initialised.
        unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
    }

    /// The cache's blocks are ggml's (bit for bit what the ISQ quantizer,
    /// itself equal to llama-quantize's, makes), and reading them gives what
    /// ggml's dequantizer gives, through every accessor.
    fn quantized_cache_is_ggml<T: KvElem>(ty: GgmlType) {
        let (heads, hd, bs) = (2, 64, 4);
        let mut c = KvCache::<T>::new(1, heads, hd, bs, 3);
        let (k, v) = (sample(heads * hd, 1), sample(heads * hd, 2));
        c.write(0, 2, 3, &k, &v);
        for h in 0..heads {
            for (stored, src) in [
                (c.keys(0, 2, h, 4), &k[h * hd..(h + 1) * hd]),
                (c.values(0, 2, h, 4), &v[h * hd..(h + 1) * hd]),
            ] {
                let slot = &stored[3 * c.vector_len()..];
                assert_eq!(slot.len() * T::PER, hd);
                assert_eq!(bytes_of(slot), quantize_row(ty, src).unwrap());
                let mut want = vec![0f32; hd];
                dequantize(ty, bytes_of(slot), &mut want);
                for (i, w) in want.iter().enumerate() {
                    assert_eq!(T::get(slot, i).to_bits(), w.to_bits(), "value {i}");
                }
                for c8 in (0..hd).step_by(8) {
                    assert_eq!(T::load8(Portable, slot, c8), want[c8..c8 + 8]);
                }
                // Slots not written read as zeros.
                assert!((0..hd).all(|i| T::get(&stored[..c.vector_len()], i) == 0.0));
            }
        }
    }

    #[test]
    fn quantized_blocks_match_ggml() {
        quantized_cache_is_ggml::<BlockQ8_0>(GgmlType::Q8_0);
        quantized_cache_is_ggml::<BlockQ4_0>(GgmlType::Q4_0);
    }

    #[test]
    fn sizes_and_refusals() {
        assert_eq!(std::mem::size_of::<BlockQ8_0>(), GgmlType::Q8_0.type_size());
        assert_eq!(std::mem::size_of::<BlockQ4_0>(), GgmlType::Q4_0.type_size());
        // SmolLM2's shape: 30 layers, 3 KV heads of 64.
        let per = |t| bytes_per_token(30, 3, 64, t);
        assert_eq!(per(KvDtype::F32), 2 * 30 * 3 * 64 * 4);
        assert_eq!(per(KvDtype::Q8_0), 2 * 30 * 3 * 2 * 34);
        assert_eq!(per(KvDtype::Q4_0), 2 * 30 * 3 * 2 * 18);
        for t in KvDtype::ALL {
            assert_eq!(KvDtype::from_name(t.name()), Some(t));
        }
        let err = AnyKvCache::new(KvDtype::Q8_0, 1, 1, 48, 16, 1)
            .err()
            .unwrap();
        assert!(err.to_string().contains("not a multiple of 32"), "{err}");
        assert!(AnyKvCache::new(KvDtype::F16, 1, 1, 48, 16, 1).is_ok());
    }

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
