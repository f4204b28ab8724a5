//! `ruvllm quantize IN OUT TYPE`: a GGUF file's F32/F16/BF16 weight
//! matrices quantized to TYPE (as `--isq` does at load, and as
//! `llama-quantize --pure` does: the same tensors, its fallback types),
//! written as a new GGUF file. TYPE f16 writes them as F16 instead; with
//! `--allow-requantize` (as llama-quantize's), quantized weight matrices
//! are dequantized first, so a quantized file can become a float one.

use ruvllm::gguf::{GgufFile, Value};
use ruvllm::gguf_writer::{GgufWriter, TensorHeader};
use ruvllm::progress::Progress;
use ruvllm::quant::quantize::{ensure_isq_type, fallback_type};
use ruvllm::quant::GgmlType;
use ruvllm::tensor::{Matrix, Storage};
use ruvllm::threadpool::ThreadPool;
use ruvllm::{Error, Result};
use std::path::Path;
use std::sync::Arc;

/// llama.cpp's `general.file_type` for a file mostly of `ty`
/// (`LLAMA_FTYPE_MOSTLY_*`).
fn file_type(ty: GgmlType) -> u32 {
    match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        GgmlType::Q8_0 => 7,
        GgmlType::Q5_0 => 8,
        GgmlType::Q5_1 => 9,
        GgmlType::Q2K => 10,
        GgmlType::Q3K => 11,
        // llama-quantize's names Q4_K and Q5_K stand for the _M mixes.
        GgmlType::Q4K => 15,
        GgmlType::Q5K => 17,
        GgmlType::Q6K => 18,
        GgmlType::BF16 => 32,
    }
}

/// Tensors llama-quantize leaves as they are although they are weights of
/// two or more dimensions: small or precision-critical ones.
const NOT_QUANTIZED: &[&str] = &[
    "_norm.weight",
    "ffn_gate_inp.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "time_mix_",
];

/// What llama-quantize quantizes: weights (names ending in `weight`) of two
/// or more dimensions (trailing ones not counted), not in its exceptions.
fn is_weight_to_quantize(name: &str, dims: &[usize]) -> bool {
    let n_dims = dims.len() - dims.iter().rev().take_while(|&&d| d == 1).count();
    name.ends_with("weight")
        && n_dims >= 2
        && name != "position_embd.weight"
        && name != "token_types.weight"
        && !NOT_QUANTIZED.iter().any(|p| name.contains(p))
}

pub fn run(
    input: &Path,
    output: &Path,
    ty: GgmlType,
    threads: usize,
    allow_requantize: bool,
) -> Result<()> {
    if ty != GgmlType::F16 {
        ensure_isq_type(ty, "quantizing")?;
    }
    if input.is_dir() {
        return Err(Error::NotImplemented(
            "quantize reads GGUF files; a Hugging Face folder is quantized at load with --isq"
                .into(),
        ));
    }
    let Some(out_name) = output.file_name().filter(|_| !output.is_dir()) else {
        return Err(Error::InvalidRequest(format!(
            "{}: the output must be a file path",
            output.display()
        )));
    };
    let g = GgufFile::open(input)?;
    let mut headers = Vec::with_capacity(g.tensors.len());
    for t in &g.tensors {
        let mut out_ty = t.ty;
        if is_weight_to_quantize(&t.name, &t.dims) {
            if t.ty.is_quantized() && !allow_requantize {
                return Err(Error::InvalidRequest(format!(
                    "{}: tensor '{}' is already {}; quantize a float (F32/F16/BF16) GGUF, or \
                     pass --allow-requantize to dequantize it first (which compounds the \
                     rounding of both)",
                    input.display(),
                    t.name,
                    t.ty.name()
                )));
            }
            // Rows no quantized type fits are stored as F16, as llama-quantize does.
            out_ty = match ty {
                GgmlType::F16 => GgmlType::F16,
                _ => fallback_type(ty, t.dims[0]).unwrap_or(GgmlType::F16),
            };
        }
        headers.push(TensorHeader {
            name: t.name.clone(),
            dims: t.dims.clone(),
            ty: out_ty,
        });
    }
    // The quantization's own keys are rewritten; a shard's split keys do
    // not describe the single file written.
    let mut metadata: Vec<(String, Value)> = g
        .metadata
        .iter()
        .filter(|(k, _)| {
            *k != "general.file_type"
                && *k != "general.quantization_version"
                && !k.starts_with("split.")
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    metadata.push(("general.file_type".into(), Value::U32(file_type(ty))));
    metadata.push(("general.quantization_version".into(), Value::U32(2)));

    // Written beside OUT and renamed over it when complete: a failure leaves
    // no half file, and OUT may even be IN (whose map stays valid).
    let part = output.with_file_name(format!(".{}.part", out_name.to_string_lossy()));
    let file = std::fs::File::create(&part).map_err(|e| Error::io(&part, e))?;
    // A panic (a bug) must not leave the part file behind either.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<()> {
        let mut w = GgufWriter::new(std::io::BufWriter::new(file), &part, &metadata, &headers)?;
        let pool = ThreadPool::new(threads);
        let mut bar = Progress::new(format!("quantizing to {}", ty.name()), true);
        let mut counts: Vec<(GgmlType, usize)> = Vec::new();
        for (i, (t, h)) in g.tensors.iter().zip(&headers).enumerate() {
            if h.ty == t.ty {
                w.tensor(g.tensor_data(t))?;
            } else {
                let (cols, rows) = (t.dims[0], t.dims[1..].iter().product());
                let storage = Storage::Mapped {
                    map: g.mmap().clone(),
                    offset: t.offset,
                    len: t.size,
                };
                let m = Matrix::new(t.ty, rows, cols, storage).ok_or_else(|| {
                    Error::Gguf(format!("tensor '{}' does not hold {:?}", t.name, t.dims))
                })?;
                if h.ty == GgmlType::F16 {
                    let f16: Vec<u8> = m
                        .to_f32()
                        .into_iter()
                        .flat_map(|v| half::f16::from_f32(v).to_le_bytes())
                        .collect();
                    w.tensor(&f16)?;
                } else {
                    let mut m = if m.ty.is_quantized() {
                        // --allow-requantize: from the dequantized values.
                        let bytes = m.to_f32().iter().flat_map(|v| v.to_le_bytes()).collect();
                        Matrix::new(GgmlType::F32, rows, cols, Storage::Bytes(Arc::new(bytes)))
                            .expect("sizes match")
                    } else {
                        m
                    };
                    if !m.quantize_to(h.ty, None, &pool) {
                        return Err(Error::Internal(format!(
                            "tensor '{}' could not be quantized to {}",
                            t.name,
                            h.ty.name()
                        )));
                    }
                    w.tensor(m.bytes())?;
                }
            }
            match counts.iter_mut().find(|(c, _)| *c == h.ty) {
                Some((_, n)) => *n += 1,
                None => counts.push((h.ty, 1)),
            }
            bar.update(i + 1, g.tensors.len());
        }
        w.finish()?
            .into_inner()
            .map_err(|e| Error::io(&part, e.into_error()))?
            .sync_all()
            .map_err(|e| Error::io(&part, e))?;
        let mix: Vec<String> = counts
            .iter()
            .map(|(t, n)| format!("{}: {n}", t.name()))
            .collect();
        eprintln!(
            "wrote {} ({} tensors; {})",
            output.display(),
            g.tensors.len(),
            mix.join(", ")
        );
        Ok(())
    }))
    .unwrap_or_else(|p| {
        let _ = std::fs::remove_file(&part);
        std::panic::resume_unwind(p)
    });
    let result =
        result.and_then(|()| std::fs::rename(&part, output).map_err(|e| Error::io(output, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    result
}
