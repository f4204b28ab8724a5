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
    let m = &e.model;
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
