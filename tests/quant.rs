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
        for n in [1usize, 3, 4, 7] {
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
        let x = activations(7 * m.cols, 99);
        let mut batched = vec![0f32; 7 * m.rows];
        matmul(&m, &x, 7, &mut batched, &pool);
        for i in 0..7 {
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
    let q = ruvllm::quant::quantize_q8_0(&x);
    let mut back = vec![0f32; 256];
    dequantize(GgmlType::Q8_0, &q, &mut back);
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    assert!(max_abs_diff(&x, &back) <= amax / 127.0);
}
