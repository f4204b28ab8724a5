//! Quantizing f32 rows into GGML blocks (in-situ quantization of weights).
//!
//! The legacy types round to nearest exactly as ggml's reference quantizers
//! do (same scale choice, same comparisons, same f32 arithmetic, and float
//! to int8 conversion as x86 performs C's cast), so their blocks equal
//! llama-quantize's bit for bit. The committed samples check ordinary
//! blocks; NaN, signed zeros and tiny blocks follow ggml's code paths too.

use super::{GgmlType, QK};
use half::f16;

/// The types [`quantize_row`] can produce.
pub const ISQ_TYPES: &[GgmlType] = &[
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
];

/// Quantizes `src` (a whole number of `ty` blocks) into `ty` blocks.
/// Returns `None` for a type it cannot produce or a length that is not
/// whole blocks.
pub fn quantize_row(ty: GgmlType, src: &[f32]) -> Option<Vec<u8>> {
    if !ISQ_TYPES.contains(&ty) || !src.len().is_multiple_of(ty.block_size()) {
        return None;
    }
    let mut out = Vec::with_capacity(src.len() / ty.block_size() * ty.type_size());
    for b in src.chunks_exact(QK) {
        match ty {
            GgmlType::Q8_0 => q8_0(b, &mut out),
            GgmlType::Q4_0 => q4_0(b, &mut out),
            GgmlType::Q4_1 => q4_1(b, &mut out),
            GgmlType::Q5_0 => q5_0(b, &mut out),
            GgmlType::Q5_1 => q5_1(b, &mut out),
            _ => unreachable!("checked against ISQ_TYPES"),
        }
    }
    Some(out)
}

fn push_f16(out: &mut Vec<u8>, v: f32) {
    out.extend_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// The value of largest magnitude, with its sign (the first one on ties).
fn signed_absmax(b: &[f32]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in b {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn inverse(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// C's `(int8_t)` of a float as x86 compiles it: truncation to a 32-bit
/// integer (out of range and NaN give `INT_MIN`), then its low byte.
fn c_i8(v: f32) -> u8 {
    let i = if v.is_nan() || v.abs() >= 2_147_483_648.0 {
        i32::MIN
    } else {
        v as i32
    };
    i as u8
}

fn q8_0(b: &[f32], out: &mut Vec<u8>) {
    // ggml's MAX(a, b) is `a > b ? a : b`: a NaN is taken, then replaced
    // by the next value.
    let amax = b
        .iter()
        .fold(0f32, |a, &v| if a > v.abs() { a } else { v.abs() });
    let d = amax / 127.0;
    let id = inverse(d);
    push_f16(out, d);
    out.extend(b.iter().map(|&v| c_i8((v * id).round())));
}

/// Symmetric 4 or 5 bits: the scale maps the signed extreme to -2^(bits-1),
/// values are offset by 2^(bits-1) and truncated after adding one half.
fn symmetric(b: &[f32], levels: f32) -> (f32, [u8; QK]) {
    let d = signed_absmax(b) / -levels;
    let id = inverse(d);
    let top = (2.0 * levels - 1.0) as u8;
    let mut q = [0u8; QK];
    for (q, &v) in q.iter_mut().zip(b) {
        // One addition of `levels + 0.5` (as the reference's `x0 + 8.5f`),
        // and `as i8` truncates toward zero, as the C cast does.
        *q = (c_i8(v * id + (levels + 0.5)) as i8).min(top as i8) as u8;
    }
    (d, q)
}

/// Asymmetric 4 or 5 bits: `x ≈ d·q + min`. ggml clamps Q4_1's levels to
/// `top` but not Q5_1's (`clamp`).
fn asymmetric(b: &[f32], top: f32, clamp: bool) -> (f32, f32, [u8; QK]) {
    // Strict comparisons, first value kept on ties (as ggml: signed zeros
    // and NaN come out the same).
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in b {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    let d = (max - min) / top;
    let id = inverse(d);
    let mut q = [0u8; QK];
    for (q, &v) in q.iter_mut().zip(b) {
        let l = c_i8((v - min) * id + 0.5);
        *q = if clamp {
            (l as i8).min(top as i8) as u8
        } else {
            l
        };
    }
    (d, min, q)
}

/// Low nibbles: element j in byte j's low half, element j + 16 in its high half.
fn push_nibbles(out: &mut Vec<u8>, q: &[u8; QK]) {
    out.extend((0..QK / 2).map(|j| (q[j] & 0xF) | ((q[j + QK / 2] & 0xF) << 4)));
}

/// Fifth bits: element j's in bit j of a little-endian u32.
fn push_high_bits(out: &mut Vec<u8>, q: &[u8; QK]) {
    let qh = q
        .iter()
        .enumerate()
        .fold(0u32, |h, (j, &v)| h | (((v as u32 >> 4) & 1) << j));
    out.extend_from_slice(&qh.to_le_bytes());
}

fn q4_0(b: &[f32], out: &mut Vec<u8>) {
    let (d, q) = symmetric(b, 8.0);
    push_f16(out, d);
    push_nibbles(out, &q);
}

fn q5_0(b: &[f32], out: &mut Vec<u8>) {
    let (d, q) = symmetric(b, 16.0);
    push_f16(out, d);
    push_high_bits(out, &q);
    push_nibbles(out, &q);
}

fn q4_1(b: &[f32], out: &mut Vec<u8>) {
    let (d, m, q) = asymmetric(b, 15.0, true);
    push_f16(out, d);
    push_f16(out, m);
    push_nibbles(out, &q);
}

fn q5_1(b: &[f32], out: &mut Vec<u8>) {
    let (d, m, q) = asymmetric(b, 31.0, false);
    push_f16(out, d);
    push_f16(out, m);
    push_high_bits(out, &q);
    push_nibbles(out, &q);
}
