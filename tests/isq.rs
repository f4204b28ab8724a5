//! In-situ quantization (`--isq`) against llama.cpp's quantizer: the tiny
//! llama fixture quantized at load equals `llama-quantize --pure` of the
//! same weights (tests/fixtures/isq/, from scripts/make-isq-fixtures.sh).

mod common;
use common::*;
use ruvllm::engine::{Engine, EngineOptions};
use ruvllm::gguf::GgufFile;
use ruvllm::quant::GgmlType;
use ruvllm::tensor::Matrix;
use std::path::Path;

const TYPES: [GgmlType; 5] = [
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
];

fn isq_engine(path: &Path, ty: Option<GgmlType>) -> Engine {
    Engine::load(
        path,
        &EngineOptions {
            threads: 2,
            context: Some(64),
            isq: ty,
            ..Default::default()
        },
    )
    .unwrap()
}

fn reference(ty: GgmlType) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/fixtures/isq/llama-{}.gguf", ty.name()))
}

/// Every weight matrix of `e`'s model with its GGUF name.
fn named_matrices(e: &Engine) -> Vec<(String, &Matrix)> {
    let m = e.model();
    let mut v = vec![
        ("token_embd.weight".to_string(), &m.embed),
        ("output.weight".into(), &m.output.w),
    ];
    for (i, l) in m.layers.iter().enumerate() {
        let p = |n: &str| format!("blk.{i}.{n}.weight");
        v.extend([
            (p("attn_q"), &l.q.w),
            (p("attn_k"), &l.k.w),
            (p("attn_v"), &l.v.w),
            (p("attn_output"), &l.o.w),
            (p("ffn_gate"), &l.gate.as_ref().unwrap().w),
            (p("ffn_up"), &l.up.w),
            (p("ffn_down"), &l.down.w),
        ]);
    }
    v
}

#[test]
fn isq_weights_equal_llama_quantize_bit_for_bit() {
    let f32_gguf = fixtures().join("llama/model-f32.gguf");
    for ty in TYPES {
        let e = isq_engine(&f32_gguf, Some(ty));
        let g = GgufFile::open(reference(ty)).unwrap();
        for (name, m) in named_matrices(&e) {
            let t = g.tensor(&name).unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(t.ty, ty, "{name}: llama-quantize's type");
            assert_eq!(m.ty, ty, "{name}: ours");
            let ours: Vec<u8> = (0..m.rows).flat_map(|r| m.row(r).to_vec()).collect();
            assert!(
                ours == g.tensor_data(t),
                "{}: {name} differs from llama-quantize's",
                ty.name()
            );
        }
    }
}

/// From a Hugging Face folder too (q/k rows in their own order), the
/// quantized model computes what llama.cpp's quantized file computes.
#[test]
fn isq_from_safetensors_matches_the_llama_quantize_file() {
    let dir = fixtures().join("llama");
    let input = ids(&read_json(&dir.join("expected.json"))["input_ids"]);
    let rows: Vec<usize> = (0..input.len()).collect();
    let f32_logits = isq_engine(&dir, None)
        .forward_sequence(&input, &rows, false)
        .unwrap()
        .logits;
    for ty in TYPES {
        let ours = isq_engine(&dir, Some(ty))
            .forward_sequence(&input, &rows, false)
            .unwrap()
            .logits;
        let theirs = isq_engine(&reference(ty), None)
            .forward_sequence(&input, &rows, false)
            .unwrap()
            .logits;
        let d = max_abs_diff(&ours, &theirs);
        assert!(d <= 1e-3, "{}: {d}", ty.name());
        assert!(
            max_abs_diff(&ours, &f32_logits) > 1e-3,
            "{}: nothing was quantized",
            ty.name()
        );
    }
}

#[test]
fn isq_to_a_type_it_cannot_make_is_a_clear_error() {
    let err = Engine::load(
        &fixtures().join("llama/model-f32.gguf"),
        &EngineOptions {
            isq: Some(GgmlType::Q2K),
            ..Default::default()
        },
    )
    .err()
    .expect("Q2_K in-situ quantization is not implemented");
    assert!(
        err.to_string().contains("Q2_K") && err.to_string().contains("Q4_0"),
        "{err}"
    );
}

/// The error each K-quant's search minimises: squared error weighted per
/// value as ggml weighs it without an importance matrix (Q4_K, Q5_K: the
/// RMS of its 32 values plus its magnitude; Q6_K: its square).
fn weighted_error(ty: GgmlType, x: &[f32], y: &[f32]) -> f64 {
    let mut e = 0f64;
    for (xs, ys) in x.chunks(32).zip(y.chunks(32)) {
        let rms = (xs.iter().map(|v| v * v).sum::<f32>() / 32.0).sqrt();
        for (&a, &b) in xs.iter().zip(ys) {
            let w = match ty {
                GgmlType::Q6K => a * a,
                _ => rms + a.abs(),
            };
            e += w as f64 * ((a - b) as f64).powi(2);
        }
    }
    e
}

/// Our K-quant blocks against llama-quantize's for the same rows
/// (`../shared/fixtures/quant/llamacpp_*`): each super-block is the same
/// bytes or has no larger weighted error, and the rows' plain squared error
/// is no larger either.
#[test]
fn k_quant_blocks_are_llama_quantizes_or_better() {
    use ruvllm::quant::{dequantize, quantize::quantize_row};
    for ty in [GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K] {
        let dir = fixtures().join("quant");
        let meta = read_json(&dir.join(format!("llamacpp_{}.json", ty.name())));
        let theirs = std::fs::read(dir.join(format!("llamacpp_{}.bin", ty.name()))).unwrap();
        let src = floats(&meta["source_f32"]);
        let ours = quantize_row(ty, &src).expect("K-quant ISQ");
        assert_eq!(ours.len(), theirs.len(), "{ty:?}");
        let (bs, n) = (ty.type_size(), ty.block_size());
        let (mut same, mut total) = (0, 0);
        let (mut sq_ours, mut sq_theirs) = (0f64, 0f64);
        for (i, (a, b)) in ours.chunks(bs).zip(theirs.chunks(bs)).enumerate() {
            let x = &src[i * n..(i + 1) * n];
            let (mut ya, mut yb) = (vec![0f32; n], vec![0f32; n]);
            dequantize(ty, a, &mut ya);
            dequantize(ty, b, &mut yb);
            total += 1;
            if a == b {
                same += 1;
                continue;
            }
            let (ea, eb) = (weighted_error(ty, x, &ya), weighted_error(ty, x, &yb));
            assert!(
                ea <= eb * (1.0 + 1e-6),
                "{ty:?} super-block {i}: weighted error {ea} > llama-quantize's {eb}"
            );
            let sq = |y: &[f32]| {
                x.iter()
                    .zip(y)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum::<f64>()
            };
            sq_ours += sq(&ya);
            sq_theirs += sq(&yb);
        }
        assert!(
            sq_ours <= sq_theirs * (1.0 + 1e-6),
            "{ty:?}: {sq_ours} > {sq_theirs}"
        );
        // On these samples the search reproduces llama-quantize's exactly.
        assert_eq!(
            same, total,
            "{ty:?}: super-blocks identical to llama-quantize's"
        );
    }
}

/// `ruvllm quantize` writes what llama-quantize --pure writes: the same
/// tensors with the same types and bytes, the same metadata; a file
/// llama.cpp and we load. A damaged input or an unknown type is an error
/// that leaves no output behind, and OUT may be IN.
#[test]
fn quantize_writes_llama_quantizes_file() {
    let dir = std::env::temp_dir().join(format!("ruvllm-quantize-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixtures().join("llama/model-f32.gguf");
    let run = |args: &[&std::ffi::OsStr]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ruvllm"))
            .arg("quantize")
            .args(args)
            .output()
            .unwrap()
    };
    for ty in TYPES {
        let out = dir.join(format!("{}.gguf", ty.name()));
        let r = run(&[src.as_os_str(), out.as_os_str(), ty.name().as_ref()]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let (ours, theirs) = (
            GgufFile::open(&out).unwrap(),
            GgufFile::open(reference(ty)).unwrap(),
        );
        assert_eq!(ours.tensors.len(), theirs.tensors.len());
        for t in &theirs.tensors {
            let o = ours.tensor(&t.name).unwrap();
            assert_eq!((o.ty, &o.dims), (t.ty, &t.dims), "{}", t.name);
            assert!(
                ours.tensor_data(o) == theirs.tensor_data(t),
                "{ty:?} {}: bytes differ",
                t.name
            );
        }
        for (k, v) in &theirs.metadata {
            assert_eq!(ours.get(k), Some(v), "{ty:?}: metadata {k}");
        }
        assert_eq!(ours.metadata.len(), theirs.metadata.len());
        // It loads and computes what the in-situ quantized model computes.
        let (mut a, mut b) = (isq_engine(&out, None), isq_engine(&src, Some(ty)));
        let tokens = [1, 5, 9, 200, 7];
        assert_eq!(
            a.decode_logits(&tokens).unwrap(),
            b.decode_logits(&tokens).unwrap(),
            "{ty:?}"
        );
    }
    // In place: IN is replaced by its quantized copy only when complete.
    let inplace = dir.join("inplace.gguf");
    std::fs::copy(&src, &inplace).unwrap();
    let r = run(&[inplace.as_os_str(), inplace.as_os_str(), "q8_0".as_ref()]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(
        std::fs::read(&inplace).unwrap(),
        std::fs::read(dir.join("Q8_0.gguf")).unwrap()
    );
    // A truncated input and a type we cannot make: errors, no output.
    let bad = dir.join("bad.gguf");
    let bytes = std::fs::read(&src).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let quantized = dir.join("Q4_0.gguf");
    for (input, ty, msg) in [
        (&bad, "q8_0", "invalid GGUF"),
        (&src, "q2_k", "type q2_k"),
        (&quantized, "q8_0", "already Q4_0"),
    ] {
        let out = dir.join("never.gguf");
        let r = run(&[input.as_os_str(), out.as_os_str(), ty.as_ref()]);
        assert!(!r.status.success());
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.contains(msg), "{err}");
        assert!(!out.exists());
    }
    // --allow-requantize: a quantized file becomes a float one, holding
    // exactly the dequantized values (rounded to f16); without it, refused.
    let back = dir.join("back-f16.gguf");
    let r = run(&[
        quantized.as_os_str(),
        back.as_os_str(),
        "f16".as_ref(),
        "--allow-requantize".as_ref(),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let (q, f) = (
        GgufFile::open(&quantized).unwrap(),
        GgufFile::open(&back).unwrap(),
    );
    let mut converted = 0;
    for t in &q.tensors {
        let o = f.tensor(&t.name).unwrap();
        if t.ty != GgmlType::Q4_0 {
            assert_eq!(f.tensor_data(o), q.tensor_data(t), "{}", t.name);
            continue;
        }
        assert_eq!(o.ty, GgmlType::F16, "{}", t.name);
        let (cols, rows) = (t.dims[0], t.dims[1..].iter().product());
        let m = |ty, data: &[u8]| {
            Matrix::new(
                ty,
                rows,
                cols,
                ruvllm::tensor::Storage::Bytes(std::sync::Arc::new(data.to_vec())),
            )
            .unwrap()
            .to_f32()
        };
        let want: Vec<f32> = m(t.ty, q.tensor_data(t))
            .into_iter()
            .map(|v| half::f16::from_f32(v).to_f32())
            .collect();
        assert_eq!(m(o.ty, f.tensor_data(o)), want, "{}", t.name);
        converted += 1;
    }
    assert!(converted > 0);
    // A directory is no output file.
    let r = run(&[src.as_os_str(), dir.as_os_str(), "q8_0".as_ref()]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("must be a file path"));
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A reproducible stream of values in [0, 1).
fn lcg(seed: u64) -> impl FnMut() -> f32 {
    let mut s = seed;
    move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Importance-weighted quantization fits what matters: over rows of
/// bell-shaped weights and columns of very unequal importance, the
/// importance-weighted squared error is lower than round-to-nearest's for
/// every type it changes (Q8_0, which ignores importance, comes out the
/// same); an importance of the wrong length, or negative, is refused.
#[test]
fn importance_weighted_blocks_lose_less_where_it_matters() {
    use ruvllm::quant::dequantize;
    use ruvllm::quant::quantize::{quantize_row, quantize_row_weighted, ISQ_TYPES};
    let cols = 512;
    let mut u = lcg(7);
    let importance: Vec<f32> = (0..cols).map(|_| (5.0 * u()).exp()).collect();
    let rows: Vec<Vec<f32>> = (0..32)
        .map(|_| {
            (0..cols)
                .map(|_| (0..4).map(|_| u() - 0.5).sum::<f32>())
                .collect()
        })
        .collect();
    for &ty in ISQ_TYPES {
        let (mut plain, mut weighted) = (0f64, 0f64);
        for x in &rows {
            let err = |q: &[u8]| {
                let mut y = vec![0f32; cols];
                dequantize(ty, q, &mut y);
                x.iter()
                    .zip(&y)
                    .zip(&importance)
                    .map(|((a, b), w)| *w as f64 * ((a - b) as f64).powi(2))
                    .sum::<f64>()
            };
            let p = quantize_row(ty, x).unwrap();
            let w = quantize_row_weighted(ty, x, &importance).unwrap();
            if ty == GgmlType::Q8_0 {
                assert_eq!(p, w, "Q8_0 ignores importance");
            }
            plain += err(&p);
            weighted += err(&w);
        }
        if ty != GgmlType::Q8_0 {
            assert!(
                weighted < plain * 0.95,
                "{ty:?}: weighted error {weighted} is not below round-to-nearest's {plain}"
            );
        }
    }
    let x = &rows[0];
    assert!(quantize_row_weighted(GgmlType::Q4_0, x, &importance[1..]).is_none());
    let mut negative = importance.clone();
    negative[3] = -1.0;
    assert!(quantize_row_weighted(GgmlType::Q4_0, x, &negative).is_none());
    // No importance anywhere in a block: it is rounded as without.
    assert_eq!(
        quantize_row_weighted(GgmlType::Q4_0, x, &vec![0.0; cols]).unwrap(),
        quantize_row(GgmlType::Q4_0, x).unwrap()
    );
}

/// The target of activation-aware quantization: at 4 bits, calibrated on
/// one half of the text, SmolLM2 scores a better perplexity on the other
/// half than round-to-nearest does. The float model comes from the
/// default Q4_1 file through `quantize f16 --allow-requantize`.
#[test]
fn calibrated_quantization_beats_round_to_nearest_on_perplexity() {
    let dir = std::env::temp_dir().join(format!("ruvllm-calibrate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = env!("CARGO_BIN_EXE_ruvllm");
    let f16 = dir.join("smol-f16.gguf");
    let r = std::process::Command::new(bin)
        .arg("quantize")
        .arg(models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf"))
        .arg(&f16)
        .args(["f16", "--allow-requantize"])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let text =
        std::fs::read_to_string(fixtures().join("../text/licenses-gpl3-apache2.txt")).unwrap();
    let half = text
        .match_indices('\n')
        .map(|(i, _)| i)
        .take_while(|&i| i <= text.len() / 2)
        .last()
        .unwrap();
    let (scored, calibration) = (dir.join("scored.txt"), dir.join("calibration.txt"));
    std::fs::write(&scored, &text[..half]).unwrap();
    std::fs::write(&calibration, &text[half..]).unwrap();
    let ppl = |extra: &[&std::ffi::OsStr]| -> f64 {
        let args: Vec<&std::ffi::OsStr> = ["-c", "512", "--chunks", "4", "--isq", "q4_0", "-m"]
            .iter()
            .map(|a| a.as_ref())
            .chain([f16.as_os_str(), "-f".as_ref(), scored.as_os_str()])
            .chain(extra.iter().copied())
            .collect();
        perplexity_json(&args)["ppl"].as_f64().unwrap()
    };
    let rtn = ppl(&[]);
    let calibrated = ppl(&[
        "--calibrate".as_ref(),
        calibration.as_os_str(),
        "--calibrate-windows".as_ref(),
        "4".as_ref(),
    ]);
    assert!(
        calibrated.is_finite() && calibrated < rtn,
        "calibrated Q4_0 perplexity {calibrated} is not below round-to-nearest's {rtn}"
    );
    // Calibration needs something to quantize, and text enough for a window.
    let tiny = dir.join("tiny.txt");
    std::fs::write(&tiny, "Too short.").unwrap();
    for (args, msg) in [
        (vec!["--calibrate", "x.txt"], "--isq"),
        (
            vec!["--isq", "q4_0", "--calibrate", tiny.to_str().unwrap()],
            "fewer than one window",
        ),
    ] {
        let out = std::process::Command::new(bin)
            .args(["perplexity", "-f", scored.to_str().unwrap(), "-m"])
            .arg(&f16)
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(msg), "{err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Blocks of zeros, of values too small to scale (below ggml's group
/// epsilon) and zero sub-blocks beside normal ones: every type comes back
/// with zeros where a block of 32 was zero and finite values everywhere,
/// with and without importance.
#[test]
fn zero_and_tiny_blocks_quantize_to_finite_values() {
    use ruvllm::quant::dequantize;
    use ruvllm::quant::quantize::{quantize_row, quantize_row_weighted, ISQ_TYPES};
    let n = 512;
    let mut mixed = vec![0f32; n];
    for (i, v) in mixed.iter_mut().enumerate().skip(64) {
        *v = ((i * 37 % 101) as f32 - 50.0) / 25.0;
    }
    let rows = [vec![0f32; n], vec![1e-30f32; n], mixed];
    let importance: Vec<f32> = (0..n).map(|i| 1.0 + (i % 7) as f32).collect();
    for &ty in ISQ_TYPES {
        for (ri, x) in rows.iter().enumerate() {
            for q in [
                quantize_row(ty, x).unwrap(),
                quantize_row_weighted(ty, x, &importance).unwrap(),
            ] {
                let mut y = vec![f32::NAN; n];
                dequantize(ty, &q, &mut y);
                for (i, (&a, &b)) in x.iter().zip(&y).enumerate() {
                    assert!(b.is_finite(), "{ty:?} row {ri}[{i}]: {b}");
                    // Exact only where a whole block of 32 is zero (an
                    // offset cannot hit a lone zero of a block).
                    if x[i / 32 * 32..][..32].iter().all(|&v| v == 0.0) {
                        assert_eq!((a, b), (0.0, 0.0), "{ty:?} row {ri}[{i}]");
                    }
                }
            }
        }
    }
}
