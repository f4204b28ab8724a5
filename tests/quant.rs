//! Block formats against gguf-py's dequantization (`../shared/fixtures/quant/`)
//! and the SIMD dot-product kernels against the dequantized reference.

mod common;
use common::*;
use ruvllm::quant::{dequantize, GgmlType};
use ruvllm::tensor::{matmul, Matrix, Storage};
use ruvllm::threadpool::ThreadPool;
use std::sync::Arc;

const SUPPORTED: &[&str] = &[
    "F16",
    "BF16",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q8_0",
    "Q4_K",
    "Q6_K",
    "real_Q4_1",
    "real_Q5_0",
    "real_Q8_0",
    "llamacpp_Q2_K",
    "llamacpp_Q3_K",
    "llamacpp_Q4_K",
    "llamacpp_Q5_K",
    "llamacpp_Q6_K",
];

fn load_sample(name: &str) -> (Matrix, Vec<f32>) {
    let dir = fixtures().join("quant");
    let meta = read_json(&dir.join(format!("{name}.json")));
    let id = meta["ggml_type_id"].as_u64().unwrap() as u32;
    let ty = GgmlType::from_id(id).unwrap_or_else(|| panic!("{name}: type {id} unsupported"));
    let shape: Vec<usize> = meta["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let bytes = std::fs::read(dir.join(format!("{name}.bin"))).unwrap();
    let m = Matrix::new(ty, shape[0], shape[1], Storage::Bytes(Arc::new(bytes))).expect("sizes");
    (m, floats(&meta["dequantized"]))
}

#[test]
fn dequantization_is_bit_exact() {
    for name in SUPPORTED {
        let (m, want) = load_sample(name);
        let got = m.to_f32();
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(g.to_bits() == w.to_bits(), "{name}[{i}]: {g} != {w}");
        }
    }
}

#[test]
fn unsupported_types_are_rejected_by_id() {
    for name in ["TQ1_0", "TQ2_0", "MXFP4"] {
        let meta = read_json(&fixtures().join("quant").join(format!("{name}.json")));
        let id = meta["ggml_type_id"].as_u64().unwrap() as u32;
        assert!(GgmlType::from_id(id).is_none(), "{name}");
    }
}

/// Deterministic activations in roughly N(0, 1).
fn activations(n: usize, seed: u64) -> Vec<f32> {
    let mut r = ruvllm::sampling::Rng::new(seed);
    (0..n)
        .map(|_| (0..4).map(|_| r.next_f32()).sum::<f32>() * 1.7 - 3.4)
        .collect()
}

/// Activations as the SIMD kernels see them: symmetric 8-bit blocks of 32
/// (legacy types) or 256 (K-quants); float types see them unchanged.
fn quantized_like_kernel(ty: GgmlType, x: &[f32]) -> Vec<f32> {
    use ruvllm::quant::kernels::{act_kind, ActKind};
    let (block, f16_scale) = match act_kind(ty) {
        ActKind::F32 => return x.to_vec(),
        ActKind::Q8Legacy => (32, true),
        ActKind::Q8K => (256, false),
    };
    x.chunks(block)
        .flat_map(|b| {
            let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
            let id = if amax == 0.0 { 0.0 } else { 127.0 / amax };
            let d = amax / 127.0;
            let d = if f16_scale {
                half::f16::from_f32(d).to_f32()
            } else {
                d
            };
            b.iter()
                .map(move |v| (v * id).round_ties_even().clamp(-127.0, 127.0) * d)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn kernels_match_the_dequantized_reference() {
    let pools = [ThreadPool::new(1), ThreadPool::new(2)];
    for name in SUPPORTED {
        let (m, _) = load_sample(name);
        let w = m.to_f32();
        // Every row count a kernel call takes (1..=8) and one past it.
        for n in [1usize, 2, 3, 4, 5, 6, 7, 8, 11] {
            let x = activations(n * m.cols, n as u64);
            let mut outs = Vec::new();
            for pool in &pools {
                let mut out = vec![0f32; n * m.rows];
                matmul(&m, &x, n, &mut out, pool);
                outs.push(out);
            }
            assert_eq!(outs[0], outs[1], "{name}: thread count changed results");
            for i in 0..n {
                for j in 0..m.rows {
                    let xr = &x[i * m.cols..(i + 1) * m.cols];
                    let wr = &w[j * m.cols..(j + 1) * m.cols];
                    let exact: f64 = xr.iter().zip(wr).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let scale: f64 = xr
                        .iter()
                        .zip(wr)
                        .map(|(a, b)| (*a as f64 * *b as f64).abs())
                        .sum();
                    let got = outs[0][i * m.rows + j] as f64;
                    // 8-bit activations: error well under 2% of the absolute sum.
                    assert!(
                        (got - exact).abs() <= 0.02 * scale + 1e-5,
                        "{name} n={n} ({i},{j}): {got} vs {exact} (scale {scale})"
                    );
                    // And exactly the product with the 8-bit activations themselves.
                    let xq = quantized_like_kernel(m.ty, xr);
                    let exact_q: f64 = xq.iter().zip(wr).map(|(a, b)| *a as f64 * *b as f64).sum();
                    // (Q*_1 types round the block sums to f16, as llama.cpp does.)
                    assert!(
                        (got - exact_q).abs() <= 2e-3 * scale + 1e-6,
                        "{name} n={n} ({i},{j}): {got} vs {exact_q} with 8-bit activations"
                    );
                }
            }
        }
    }
}

#[test]
fn a_row_computes_the_same_alone_or_batched() {
    let pool = ThreadPool::new(2);
    for name in SUPPORTED {
        let (m, _) = load_sample(name);
        // 11 rows: one call of 8 and one of 3.
        let x = activations(11 * m.cols, 99);
        let mut batched = vec![0f32; 11 * m.rows];
        matmul(&m, &x, 11, &mut batched, &pool);
        for i in 0..11 {
            let mut alone = vec![0f32; m.rows];
            matmul(&m, &x[i * m.cols..(i + 1) * m.cols], 1, &mut alone, &pool);
            assert_eq!(
                alone,
                &batched[i * m.rows..(i + 1) * m.rows],
                "{name} row {i}"
            );
        }
    }
}

#[test]
fn q8_0_quantization_round_trips() {
    let x = activations(256, 5);
    let q = ruvllm::quant::quantize::quantize_row(ruvllm::quant::GgmlType::Q8_0, &x).unwrap();
    let mut back = vec![0f32; 256];
    dequantize(GgmlType::Q8_0, &q, &mut back);
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    assert!(max_abs_diff(&x, &back) <= amax / 127.0);
}

/// The kernel level a forced run (`RUVLLM_SIMD`, `RUVLLM_NO_SIMD`) asked for
/// is the one every test here ran with, so the run cannot silently test
/// another path.
#[test]
fn the_requested_kernels_are_the_ones_in_use() {
    use ruvllm::simd::{level, Level};
    let want = if std::env::var_os("RUVLLM_NO_SIMD").is_some() {
        Some(Level::Portable)
    } else {
        std::env::var("RUVLLM_SIMD")
            .ok()
            .filter(|v| v != "auto")
            .map(|v| Level::from_name(&v).unwrap_or_else(|| panic!("RUVLLM_SIMD={v}")))
    };
    eprintln!("kernels: {}", level().name());
    if let Some(want) = want {
        assert_eq!(level(), want);
    }
}

fn panics(f: impl FnOnce()) -> bool {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err()
}

#[test]
fn kernels_refuse_inputs_of_the_wrong_shape() {
    use ruvllm::quant::kernels::{act_kind, dot_rows, ActKind, Acts};
    let pool = ThreadPool::new(2);
    for name in ["Q4_0", "Q8_0", "Q4_K", "Q6_K", "F16", "BF16"] {
        let (m, _) = load_sample(name);
        let (k, kind) = (m.cols, act_kind(m.ty));
        let x = activations(3 * k, 1);
        let mut scratch = Vec::new();
        // Activations that are not n × k, or not whole blocks.
        assert!(
            panics(|| drop(Acts::new(kind, &x[1..], 3, k, &pool))),
            "{name}"
        );
        assert!(
            panics(|| drop(Acts::new(kind, &x, 3, k + 1, &pool))),
            "{name}"
        );
        assert!(
            panics(|| drop(Acts::new(kind, &x, usize::MAX, 2, &pool))),
            "{name}"
        );
        if kind != ActKind::F32 {
            assert!(
                panics(|| drop(Acts::new(kind, &x[..3 * (k - 16)], 3, k - 16, &pool))),
                "{name}: partial blocks"
            );
        }
        let a = Acts::new(kind, &x, 3, k, &pool);
        let row = m.row(0);
        let mut out = [0f32; 8];
        // The well-formed call works.
        dot_rows(m.ty, row, &a, 1..3, &mut out[..2], &mut scratch);
        // Rows beyond the activations, none, or more than a call takes.
        assert!(panics(|| dot_rows(
            m.ty,
            row,
            &a,
            2..4,
            &mut out[..2],
            &mut scratch
        )));
        assert!(panics(|| dot_rows(
            m.ty,
            row,
            &a,
            1..1,
            &mut out[..0],
            &mut scratch
        )));
        let big = Acts::new(kind, &x[..k], 1, k, &pool);
        assert!(panics(|| dot_rows(
            m.ty,
            row,
            &big,
            0..9,
            &mut [0f32; 9],
            &mut scratch
        )));
        // An output of the wrong length.
        assert!(panics(|| dot_rows(
            m.ty,
            row,
            &a,
            0..2,
            &mut out[..1],
            &mut scratch
        )));
        // A weight row that is short, or of another type.
        let short = &row[..row.len() - 1];
        assert!(panics(|| dot_rows(
            m.ty,
            short,
            &a,
            0..2,
            &mut out[..2],
            &mut scratch
        )));
        assert!(panics(|| dot_rows(
            m.ty,
            &[],
            &a,
            0..2,
            &mut out[..2],
            &mut scratch
        )));
        let other = if m.ty == GgmlType::Q4K {
            GgmlType::Q8_0
        } else {
            GgmlType::Q4K
        };
        let long = vec![0u8; other.row_bytes(k).unwrap()];
        if act_kind(other) != kind {
            assert!(
                panics(|| dot_rows(other, &long, &a, 0..2, &mut out[..2], &mut scratch)),
                "{name}: activations prepared for another type"
            );
        }
    }
}

/// Rows whose length is not a whole number of vectors end exactly where the
/// weights end: a kernel that loads a full vector at the tail reads into the
/// unmapped page after them and crashes.
#[test]
fn float_rows_with_odd_lengths_read_only_their_own_bytes() {
    use memmap2::MmapMut;
    let page = 4096;
    let pool = ThreadPool::new(1);
    for (ty, size) in [(GgmlType::F32, 4), (GgmlType::F16, 2), (GgmlType::BF16, 2)] {
        for cols in [1usize, 7, 20, 37] {
            let bytes = cols * size;
            let mut map = MmapMut::map_anon(2 * page).unwrap();
            let w: Vec<f32> = (0..cols).map(|i| (i as f32 - 3.0) * 0.25).collect();
            let at = page - bytes;
            for (i, v) in w.iter().enumerate() {
                let b = &mut map[at + i * size..at + (i + 1) * size];
                match ty {
                    GgmlType::F32 => b.copy_from_slice(&v.to_le_bytes()),
                    GgmlType::F16 => b.copy_from_slice(&half::f16::from_f32(*v).to_le_bytes()),
                    _ => b.copy_from_slice(&half::bf16::from_f32(*v).to_le_bytes()),
                }
            }
            let map = map.make_read_only().unwrap();
            // SAFETY (test): the second page lies inside our own mapping.
            let guard = unsafe { map.as_ptr().add(page) } as *mut libc::c_void;
            assert_eq!(unsafe { libc::mprotect(guard, page, libc::PROT_NONE) }, 0);
            let storage = Storage::Mapped {
                map: Arc::new(map),
                offset: at,
                len: bytes,
            };
            let m = Matrix::new(ty, 1, cols, storage).unwrap();
            for n in [1usize, 3] {
                let x = activations(n * cols, 3);
                let mut out = vec![0f32; n];
                matmul(&m, &x, n, &mut out, &pool);
                for (i, o) in out.iter().enumerate() {
                    let xr = &x[i * cols..(i + 1) * cols];
                    let want: f32 = xr.iter().zip(&w).map(|(a, b)| a * b).sum();
                    let scale: f32 = xr.iter().zip(&w).map(|(a, b)| (a * b).abs()).sum();
                    assert!(
                        (o - want).abs() <= 1e-5 * scale,
                        "{ty:?} cols={cols}: {o} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn non_finite_activations_give_non_finite_outputs_not_garbage() {
    let pool = ThreadPool::new(2);
    for name in SUPPORTED {
        let (m, _) = load_sample(name);
        for bad in [f32::NAN, f32::INFINITY] {
            // Row 1 holds one bad value (twice in one block, which must not
            // overflow any sum); rows 0 and 2 are clean.
            let mut x = activations(3 * m.cols, 7);
            x[m.cols + 5] = bad;
            x[m.cols + 6] = -bad;
            let mut out = vec![0f32; 3 * m.rows];
            matmul(&m, &x, 3, &mut out, &pool);
            for j in 0..m.rows {
                assert!(out[j].is_finite(), "{name}: clean row 0 col {j}");
                assert!(
                    out[2 * m.rows + j].is_finite(),
                    "{name}: clean row 2 col {j}"
                );
            }
            assert!(
                out[m.rows..2 * m.rows].iter().any(|v| !v.is_finite()),
                "{name}: a row with {bad} gave only finite outputs"
            );
        }
    }
}

/// In-situ quantization of the legacy types: the blocks equal those of
/// ggml's reference quantizer (through gguf-py) bit for bit, on the
/// synthetic samples with their planted zeros, extremes and ramps.
#[test]
fn isq_blocks_equal_the_reference_quantizers() {
    use ruvllm::quant::quantize::quantize_row;
    let dir = fixtures().join("quant");
    for name in ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"] {
        let meta = read_json(&dir.join(format!("{name}.json")));
        let src = floats(&meta["source_f32"]);
        let ty = GgmlType::from_id(meta["ggml_type_id"].as_u64().unwrap() as u32).unwrap();
        let want = std::fs::read(dir.join(format!("{name}.bin"))).unwrap();
        let got = quantize_row(ty, &src).unwrap();
        assert_eq!(got.len(), want.len(), "{name}");
        let bad = (0..want.len()).find(|&i| got[i] != want[i]);
        assert!(
            bad.is_none(),
            "{name}: first differing byte {bad:?} (block {:?})",
            bad.map(|i| i / ty.type_size())
        );
    }
    // Lengths that are not whole blocks are refused, not padded.
    assert!(quantize_row(GgmlType::Q4_0, &[0.0; 33]).is_none());
}
