//! Writing GGUF files (version 3): metadata, tensor infos, aligned data.
//! The reader is [`crate::gguf`]; what it parses, this writes back.

use crate::error::{Error, Result};
use crate::gguf::{Array, Value};
use crate::quant::GgmlType;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Alignment of tensor data (ggml's default; `general.alignment` absent).
const ALIGNMENT: u64 = 32;

/// A tensor's entry in the header: name, GGML-order dimensions, type.
pub struct TensorHeader {
    pub name: String,
    pub dims: Vec<usize>,
    pub ty: GgmlType,
}

impl TensorHeader {
    /// Bytes of the tensor's data, or `None` when its rows are not whole
    /// blocks of its type.
    pub fn size(&self) -> Option<usize> {
        let cols = *self.dims.first()?;
        let rows: usize = self.dims[1..].iter().product();
        self.ty.row_bytes(cols)?.checked_mul(rows)
    }
}

fn string(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

/// GGUF's type id of a value.
fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn array_type_id(a: &Array) -> u32 {
    match a {
        Array::U8(_) => 0,
        Array::I8(_) => 1,
        Array::U16(_) => 2,
        Array::I16(_) => 3,
        Array::U32(_) => 4,
        Array::I32(_) => 5,
        Array::F32(_) => 6,
        Array::Bool(_) => 7,
        Array::String(_) => 8,
        Array::Array(_) => 9,
        Array::U64(_) => 10,
        Array::I64(_) => 11,
        Array::F64(_) => 12,
    }
}

/// An array's element type, count and elements (what follows its type id).
fn array(w: &mut impl Write, a: &Array) -> std::io::Result<()> {
    w.write_all(&array_type_id(a).to_le_bytes())?;
    w.write_all(&(a.len() as u64).to_le_bytes())?;
    macro_rules! each {
        ($v:expr) => {
            for x in $v {
                w.write_all(&x.to_le_bytes())?;
            }
        };
    }
    match a {
        Array::U8(v) => w.write_all(v)?,
        Array::I8(v) => each!(v),
        Array::U16(v) => each!(v),
        Array::I16(v) => each!(v),
        Array::U32(v) => each!(v),
        Array::I32(v) => each!(v),
        Array::U64(v) => each!(v),
        Array::I64(v) => each!(v),
        Array::F32(v) => each!(v),
        Array::F64(v) => each!(v),
        Array::Bool(v) => each!(v.iter().map(|&b| b as u8)),
        Array::String(v) => {
            for s in v.iter() {
                string(w, s)?;
            }
        }
        Array::Array(v) => {
            for inner in v {
                array(w, inner)?;
            }
        }
    }
    Ok(())
}

fn value(w: &mut impl Write, v: &Value) -> std::io::Result<()> {
    w.write_all(&type_id(v).to_le_bytes())?;
    match v {
        Value::U8(x) => w.write_all(&[*x]),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[*x as u8]),
        Value::String(s) => string(w, s),
        Value::Array(a) => array(w, a),
    }
}

fn pad(w: &mut impl Write, written: u64) -> std::io::Result<u64> {
    let n = written.next_multiple_of(ALIGNMENT) - written;
    w.write_all(&vec![0u8; n as usize])?;
    Ok(n)
}

/// Streams a GGUF file: the header first, then each tensor's data in the
/// header's order, so that no more than one tensor need be in memory.
pub struct GgufWriter<W: Write> {
    w: W,
    /// Named in errors.
    path: PathBuf,
    sizes: Vec<usize>,
    written: usize,
}

impl<W: Write> GgufWriter<W> {
    /// Writes the header: `metadata` in the order given (a
    /// `general.alignment` among it is dropped: data is aligned to 32) and
    /// the tensor infos.
    pub fn new(
        mut w: W,
        path: &Path,
        metadata: &[(String, Value)],
        tensors: &[TensorHeader],
    ) -> Result<Self> {
        let io = |e| Error::io(path, e);
        let sizes = tensors
            .iter()
            .map(|t| {
                t.size().ok_or_else(|| {
                    Error::Internal(format!(
                        "tensor '{}': {:?} is not whole blocks of {}",
                        t.name,
                        t.dims,
                        t.ty.name()
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let meta: Vec<&(String, Value)> = metadata
            .iter()
            .filter(|(k, _)| k != "general.alignment")
            .collect();
        let mut head: Vec<u8> = Vec::new();
        head.extend_from_slice(b"GGUF");
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(meta.len() as u64).to_le_bytes());
        for (k, v) in meta {
            string(&mut head, k).map_err(io)?;
            value(&mut head, v).map_err(io)?;
        }
        let mut offset = 0u64;
        for (t, &size) in tensors.iter().zip(&sizes) {
            string(&mut head, &t.name).map_err(io)?;
            head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for &d in &t.dims {
                head.extend_from_slice(&(d as u64).to_le_bytes());
            }
            head.extend_from_slice(&t.ty.id().to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offset = (offset + size as u64).next_multiple_of(ALIGNMENT);
        }
        w.write_all(&head).map_err(io)?;
        pad(&mut w, head.len() as u64).map_err(io)?;
        Ok(GgufWriter {
            w,
            path: path.to_path_buf(),
            sizes,
            written: 0,
        })
    }

    /// The data of the next tensor of the header.
    pub fn tensor(&mut self, data: &[u8]) -> Result<()> {
        let Some(&want) = self.sizes.get(self.written) else {
            return Err(Error::Internal("more tensors than the header names".into()));
        };
        if data.len() != want {
            return Err(Error::Internal(format!(
                "tensor {}: {} bytes, the header says {want}",
                self.written,
                data.len()
            )));
        }
        let io = |e| Error::io(&self.path, e);
        self.w.write_all(data).map_err(io)?;
        pad(&mut self.w, data.len() as u64).map_err(io)?;
        self.written += 1;
        Ok(())
    }

    /// Checks that every tensor was written and flushes.
    pub fn finish(mut self) -> Result<W> {
        if self.written != self.sizes.len() {
            return Err(Error::Internal(format!(
                "{} of {} tensors written",
                self.written,
                self.sizes.len()
            )));
        }
        self.w.flush().map_err(|e| Error::io(&self.path, e))?;
        Ok(self.w)
    }
}
