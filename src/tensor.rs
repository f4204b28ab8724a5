//! Weight matrices over memory-mapped or owned data, and the matmul that
//! drives the kernels across the thread pool.

use crate::quant::kernels::{act_kind, dot_rows, Acts, MAX_ROWS};
use crate::quant::quantize::{fallback_type, quantize_row, quantize_row_weighted, ISQ_TYPES};
use crate::quant::{dequantize, GgmlType};
use crate::simd::{dispatch, Kernel, Simd};
use crate::threadpool::{SyncPtr, ThreadPool};
use memmap2::Mmap;
use std::sync::Arc;

/// Bytes of a tensor: a range of a memory map (no copy) or an owned buffer.
#[derive(Clone)]
pub enum Storage {
    Mapped {
        map: Arc<Mmap>,
        offset: usize,
        len: usize,
    },
    /// f32 values; kept as `f32` so the buffer is aligned for SIMD loads.
    F32(Arc<Vec<f32>>),
    Bytes(Arc<Vec<u8>>),
}

impl Storage {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped { map, offset, len } => &map[*offset..*offset + *len],
            Storage::F32(v) => {
                // SAFETY: f32 has no padding and u8 has alignment 1.
                unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 4) }
            }
            Storage::Bytes(v) => v,
        }
    }

    pub fn is_mapped(&self) -> bool {
        matches!(self, Storage::Mapped { .. })
    }
}

/// A row-major `rows × cols` matrix of GGML type `ty` (each row is `cols`
/// elements, a whole number of blocks). A matrix may be a row range of a
/// larger tensor, as for fused QKV projections.
#[derive(Clone)]
pub struct Matrix {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    storage: Storage,
    /// Byte offset of row 0 within `storage`.
    start: usize,
}

impl Matrix {
    pub fn new(ty: GgmlType, rows: usize, cols: usize, storage: Storage) -> Option<Self> {
        let rb = ty.row_bytes(cols)?;
        if rb.checked_mul(rows)? != storage.bytes().len() {
            return None;
        }
        Some(Matrix {
            ty,
            rows,
            cols,
            storage,
            start: 0,
        })
    }

    pub fn from_f32(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        assert_eq!(data.len(), rows * cols);
        Matrix {
            ty: GgmlType::F32,
            rows,
            cols,
            storage: Storage::F32(Arc::new(data)),
            start: 0,
        }
    }

    pub fn row_bytes(&self) -> usize {
        self.ty
            .row_bytes(self.cols)
            .expect("checked at construction")
    }

    pub fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.storage.bytes()[self.start + r * rb..self.start + (r + 1) * rb]
    }

    /// Rows `r0..r0+n` as a matrix sharing this one's storage.
    pub fn slice_rows(&self, r0: usize, n: usize) -> Matrix {
        assert!(r0 + n <= self.rows);
        Matrix {
            rows: n,
            start: self.start + r0 * self.row_bytes(),
            ..self.clone()
        }
    }

    pub fn nbytes(&self) -> usize {
        self.rows * self.row_bytes()
    }

    /// All rows' bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.storage.bytes()[self.start..self.start + self.nbytes()]
    }

    pub fn is_mapped(&self) -> bool {
        self.storage.is_mapped()
    }

    /// Dequantizes row `r` into `out` (`cols` values).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        dequantize(self.ty, self.row(r), out);
    }

    /// Whole matrix as f32 (tests and small tensors).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut v = vec![0f32; self.rows * self.cols];
        for (r, o) in v.chunks_exact_mut(self.cols).enumerate() {
            self.dequantize_row(r, o);
        }
        v
    }

    /// Re-encodes an unquantized matrix as `ty`, rows spread over `pool`;
    /// rows that are not whole blocks of a K-quant take llama-quantize's
    /// fallback type ([`fallback_type`]). Returns false, leaving it as it
    /// is, when it is already quantized, no type fits its rows, or `ty` is
    /// not one [`quantize_row`] produces. With `importance` (one finite,
    /// non-negative value per column, else it is left as it is too), each
    /// block is fitted under it ([`quantize_row_weighted`]).
    pub fn quantize_to(
        &mut self,
        ty: GgmlType,
        importance: Option<&[f32]>,
        pool: &ThreadPool,
    ) -> bool {
        if self.ty.is_quantized() || !ISQ_TYPES.contains(&ty) {
            return false;
        }
        if importance.is_some_and(|i| {
            i.len() != self.cols || i.iter().any(|v| !(*v >= 0.0 && v.is_finite()))
        }) {
            return false;
        }
        let Some(ty) = fallback_type(ty, self.cols) else {
            return false;
        };
        let rb = ty.row_bytes(self.cols).expect("whole blocks");
        let mut data = vec![0u8; rb * self.rows];
        let this = &*self;
        pool.par_chunks_mut(&mut data, rb * ISQ_ROWS_PER_TASK, &|off, chunk| {
            let mut row = vec![0f32; this.cols];
            for (i, out) in chunk.chunks_exact_mut(rb).enumerate() {
                this.dequantize_row(off / rb + i, &mut row);
                let q = match importance {
                    Some(imp) => quantize_row_weighted(ty, &row, imp),
                    None => quantize_row(ty, &row),
                };
                out.copy_from_slice(&q.expect("checked type, length and importance"));
            }
        });
        *self = Matrix::new(ty, self.rows, self.cols, Storage::Bytes(Arc::new(data)))
            .expect("sizes match");
        true
    }
}

/// Rows one in-situ quantization task takes.
const ISQ_ROWS_PER_TASK: usize = 16;
const CHUNKS_PER_THREAD: usize = 2;
/// Batches of this many rows or more are compute-bound: finer chunks there
/// balance the threads better than long prefetch-friendly ranges.
const BATCH_ROWS: usize = 8;
const BATCH_CHUNKS_PER_THREAD: usize = 8;
const MIN_ROW_CHUNK: usize = 16;

/// `out[i][j] = Σ_k x[i][k] · w[j][k]` for `n` rows of `x` (`n × w.cols`),
/// writing `out` as `n × w.rows`.
pub fn matmul(w: &Matrix, x: &[f32], n: usize, out: &mut [f32], pool: &ThreadPool) {
    let (m, k) = (w.rows, w.cols);
    // checked_mul: a wrapped product could make a huge `n` look consistent.
    assert_eq!(
        Some(x.len()),
        n.checked_mul(k),
        "matmul: input is not n × cols"
    );
    assert_eq!(
        Some(out.len()),
        n.checked_mul(m),
        "matmul: output is not n × rows"
    );
    if n == 0 {
        return;
    }
    let acts = Acts::new(act_kind(w.ty), x, n, k, pool);
    let outp = SyncPtr(out.as_mut_ptr());
    // Contiguous row ranges keep each core's weight stream sequential for the
    // prefetchers; a few chunks per thread still balance uneven progress.
    let per_thread = if n >= BATCH_ROWS {
        BATCH_CHUNKS_PER_THREAD
    } else {
        CHUNKS_PER_THREAD
    };
    let chunk = m.div_ceil(pool.n_threads() * per_thread).max(MIN_ROW_CHUNK);
    pool.for_each_chunk(m, chunk, &|rows| {
        let mut scratch = Vec::new();
        let mut tmp = [0f32; MAX_ROWS];
        let mut i = 0;
        while i < n {
            let nr = (n - i).min(MAX_ROWS);
            for j in rows.clone() {
                dot_rows(
                    w.ty,
                    w.row(j),
                    &acts,
                    i..i + nr,
                    &mut tmp[..nr],
                    &mut scratch,
                );
                for (r, &v) in tmp[..nr].iter().enumerate() {
                    // SAFETY: (i + r, j) is within n × m and each j belongs to
                    // exactly one chunk, so no two threads write the same element.
                    unsafe { *outp.get().add((i + r) * m + j) = v };
                }
            }
            i += nr;
        }
    });
}

/// Weight rows [`matmul_t`] adds per pass over a token's sums: each sum
/// is loaded and stored once per this many rows.
const T_ROWS: usize = 8;

/// `acc[i] += Σ_b dy[i][j0 + b] · block[b]` for every token `i`, over the
/// `rows` (≤ [`T_ROWS`]) dequantized weight rows of `block` (rows past
/// `rows` are zero).
struct TransposedBlock<'a> {
    block: &'a [f32],
    dy: &'a [f32],
    m: usize,
    j0: usize,
    rows: usize,
    acc: &'a mut [f32],
}

impl Kernel for TransposedBlock<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        let k = self.block.len() / T_ROWS;
        let w: [&[f32]; T_ROWS] = std::array::from_fn(|b| &self.block[b * k..(b + 1) * k]);
        for (i, acc) in self.acc.chunks_exact_mut(k).enumerate() {
            let d = &self.dy[i * self.m + self.j0..i * self.m + self.j0 + self.rows];
            let g: [f32; T_ROWS] = std::array::from_fn(|b| d.get(b).copied().unwrap_or(0.0));
            if g.iter().all(|&v| v == 0.0) {
                continue;
            }
            for (c, a) in acc.iter_mut().enumerate() {
                let mut v = *a;
                for b in 0..T_ROWS {
                    v = s.mul_add(g[b], w[b][c], v);
                }
                *a = v;
            }
        }
    }
}

/// `dx[i][k] += Σ_j dy[i][j] · w[j][k]`: the product with the transposed
/// weights, which carries a gradient back through a projection. `dy` is
/// `n × w.rows`, `dx` is `n × w.cols`. Each thread dequantizes its own
/// range of weight rows once and sums into a buffer of its own; the
/// buffers are added in a fixed order, so the result does not depend on
/// timing.
pub fn matmul_t(w: &Matrix, dy: &[f32], n: usize, dx: &mut [f32], pool: &ThreadPool) {
    let (m, k) = (w.rows, w.cols);
    assert_eq!(
        Some(dy.len()),
        n.checked_mul(m),
        "matmul_t: dy is not n × rows"
    );
    assert_eq!(
        Some(dx.len()),
        n.checked_mul(k),
        "matmul_t: dx is not n × cols"
    );
    if n == 0 || m == 0 || k == 0 {
        return;
    }
    // Each thread's buffer holds `tokens × cols` sums: tokens go in
    // chunks that keep all buffers under 16 MiB, so that a long sequence
    // through a wide projection does not take gigabytes (a chunk pays one
    // more dequantization of the weights).
    matmul_t_within(w, dy, n, dx, pool, 16 << 20);
}

/// [`matmul_t`] with its buffers under `budget` bytes.
fn matmul_t_within(
    w: &Matrix,
    dy: &[f32],
    n: usize,
    dx: &mut [f32],
    pool: &ThreadPool,
    budget: usize,
) {
    let (m, k) = (w.rows, w.cols);
    let parts = pool.n_threads().min(m.div_ceil(MIN_ROW_CHUNK)).max(1);
    let chunk = (budget / (4 * parts * k)).max(1).min(n);
    for (dy, dx) in dy.chunks(chunk * m).zip(dx.chunks_mut(chunk * k)) {
        matmul_t_chunk(w, dy, dy.len() / m, dx, parts, pool);
    }
}

fn matmul_t_chunk(
    w: &Matrix,
    dy: &[f32],
    n: usize,
    dx: &mut [f32],
    parts: usize,
    pool: &ThreadPool,
) {
    let (m, k) = (w.rows, w.cols);
    let per = m.div_ceil(parts).next_multiple_of(T_ROWS);
    let mut sums = vec![0f32; parts * n * k];
    pool.par_chunks_mut(&mut sums, n * k, &|off, acc| {
        let part = off / (n * k);
        let mut block = vec![0f32; T_ROWS * k];
        let mut j0 = part * per;
        let end = ((part + 1) * per).min(m);
        while j0 < end {
            let rows = (end - j0).min(T_ROWS);
            for (b, row) in block.chunks_exact_mut(k).enumerate() {
                if b < rows {
                    w.dequantize_row(j0 + b, row);
                } else {
                    row.fill(0.0);
                }
            }
            dispatch(TransposedBlock {
                block: &block,
                dy,
                m,
                j0,
                rows,
                acc,
            });
            j0 += rows;
        }
    });
    for part in sums.chunks_exact(n * k) {
        dx.iter_mut().zip(part).for_each(|(d, s)| *d += s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposed_product_equals_the_dequantized_sum_for_every_type() {
        let pool = ThreadPool::new(2);
        let (rows, cols, n) = (70, 256, 5);
        let mut rng = crate::sampling::Rng::new(11);
        let mut rand =
            |len: usize| -> Vec<f32> { (0..len).map(|_| rng.next_f32() * 2.0 - 1.0).collect() };
        let base = rand(rows * cols);
        let dy = rand(n * rows);
        for ty in [
            GgmlType::F32,
            GgmlType::Q8_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q4K,
            GgmlType::Q6K,
        ] {
            let mut w = Matrix::from_f32(rows, cols, base.clone());
            if ty != GgmlType::F32 {
                assert!(w.quantize_to(ty, None, &pool), "{ty:?}");
            }
            let deq = w.to_f32();
            let mut got = vec![1f32; n * cols];
            matmul_t(&w, &dy, n, &mut got, &pool);
            // Tokens taken a few at a time sum the same.
            let mut chunked = vec![1f32; n * cols];
            matmul_t_within(&w, &dy, n, &mut chunked, &pool, 2 * 4 * 2 * cols);
            assert_eq!(got, chunked, "{ty:?}");
            for i in 0..n {
                for k in 0..cols {
                    let want: f64 = (0..rows)
                        .map(|j| dy[i * rows + j] as f64 * deq[j * cols + k] as f64)
                        .sum::<f64>()
                        + 1.0;
                    let g = got[i * cols + k] as f64;
                    assert!(
                        (g - want).abs() <= 1e-4,
                        "{ty:?} [{i}][{k}]: {g} against {want}"
                    );
                }
            }
        }
    }
}
