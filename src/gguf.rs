//! GGUF reader (versions 2 and 3).
//!
//! The header is parsed with every count, length, offset and size checked
//! against the file before anything is allocated, so a truncated or hostile
//! file yields an [`Error::Gguf`] naming the problem. Tensor data stays in the
//! memory map: [`GgufFile::tensor_data`] hands out slices of it.

use crate::error::{Error, Result};
use crate::quant::GgmlType;
use memmap2::Mmap;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
const MAX_DIMS: u32 = 4;
/// Arrays nest at most this deep; deeper nesting only serves to overflow a stack.
const MAX_ARRAY_DEPTH: u32 = 4;

/// Bytes all metadata values may take in memory together. Real files need
/// a few MiB (a 256k-token vocabulary with its merges); the cap keeps a
/// hostile file from asking for more memory than it holds.
pub const MAX_METADATA_BYTES: usize = 256 << 20;

/// Longest key or tensor name accepted, in bytes (the GGUF specification's
/// limit for keys; ggml's own tensor names are far shorter).
pub const MAX_NAME_BYTES: u64 = 65_535;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Array),
}

/// A metadata array, stored as a vector of its element type (a token list
/// takes its text and one offset per token, not a `Value` per element).
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    String(Strings),
    Array(Vec<Array>),
}

/// A list of strings in one buffer.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Strings {
    text: String,
    /// End of string i in `text`; it starts where string i - 1 ends.
    ends: Vec<usize>,
}

impl Strings {
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<&str> {
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        Some(&self.text[start..end])
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        (0..self.len()).map(|i| self.get(i).expect("index in range"))
    }

    fn push(&mut self, s: &str) {
        self.text.push_str(s);
        self.ends.push(self.text.len());
    }
}

/// A borrowed metadata value: what [`Value`] holds, or one element of an
/// [`Array`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueRef<'a> {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(&'a str),
    Array(&'a Array),
}

impl<'a> ValueRef<'a> {
    pub fn as_u64(self) -> Option<u64> {
        match self {
            ValueRef::U8(v) => Some(v as u64),
            ValueRef::U16(v) => Some(v as u64),
            ValueRef::U32(v) => Some(v as u64),
            ValueRef::U64(v) => Some(v),
            ValueRef::I8(v) if v >= 0 => Some(v as u64),
            ValueRef::I16(v) if v >= 0 => Some(v as u64),
            ValueRef::I32(v) if v >= 0 => Some(v as u64),
            ValueRef::I64(v) if v >= 0 => Some(v as u64),
            ValueRef::Bool(v) => Some(v as u64),
            _ => None,
        }
    }

    pub fn as_i64(self) -> Option<i64> {
        match self {
            ValueRef::I8(v) => Some(v as i64),
            ValueRef::I16(v) => Some(v as i64),
            ValueRef::I32(v) => Some(v as i64),
            ValueRef::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(self) -> Option<f64> {
        match self {
            ValueRef::F32(v) => Some(v as f64),
            ValueRef::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(self) -> Option<bool> {
        match self {
            ValueRef::Bool(v) => Some(v),
            _ => self.as_u64().map(|v| v != 0),
        }
    }

    pub fn as_str(self) -> Option<&'a str> {
        match self {
            ValueRef::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(self) -> Option<&'a Array> {
        match self {
            ValueRef::Array(a) => Some(a),
            _ => None,
        }
    }
}

impl Value {
    pub fn as_ref(&self) -> ValueRef<'_> {
        match self {
            Value::U8(v) => ValueRef::U8(*v),
            Value::I8(v) => ValueRef::I8(*v),
            Value::U16(v) => ValueRef::U16(*v),
            Value::I16(v) => ValueRef::I16(*v),
            Value::U32(v) => ValueRef::U32(*v),
            Value::I32(v) => ValueRef::I32(*v),
            Value::U64(v) => ValueRef::U64(*v),
            Value::I64(v) => ValueRef::I64(*v),
            Value::F32(v) => ValueRef::F32(*v),
            Value::F64(v) => ValueRef::F64(*v),
            Value::Bool(v) => ValueRef::Bool(*v),
            Value::String(s) => ValueRef::Str(s),
            Value::Array(a) => ValueRef::Array(a),
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        self.as_ref().as_u64()
    }

    pub fn as_i64(&self) -> Option<i64> {
        self.as_ref().as_i64()
    }

    pub fn as_f64(&self) -> Option<f64> {
        self.as_ref().as_f64()
    }

    pub fn as_bool(&self) -> Option<bool> {
        self.as_ref().as_bool()
    }

    pub fn as_str(&self) -> Option<&str> {
        self.as_ref().as_str()
    }

    pub fn as_array(&self) -> Option<&Array> {
        self.as_ref().as_array()
    }
}

impl Array {
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::F64(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::Array(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, i: usize) -> Option<ValueRef<'_>> {
        Some(match self {
            Array::U8(v) => ValueRef::U8(*v.get(i)?),
            Array::I8(v) => ValueRef::I8(*v.get(i)?),
            Array::U16(v) => ValueRef::U16(*v.get(i)?),
            Array::I16(v) => ValueRef::I16(*v.get(i)?),
            Array::U32(v) => ValueRef::U32(*v.get(i)?),
            Array::I32(v) => ValueRef::I32(*v.get(i)?),
            Array::U64(v) => ValueRef::U64(*v.get(i)?),
            Array::I64(v) => ValueRef::I64(*v.get(i)?),
            Array::F32(v) => ValueRef::F32(*v.get(i)?),
            Array::F64(v) => ValueRef::F64(*v.get(i)?),
            Array::Bool(v) => ValueRef::Bool(*v.get(i)?),
            Array::String(v) => ValueRef::Str(v.get(i)?),
            Array::Array(v) => ValueRef::Array(v.get(i)?),
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = ValueRef<'_>> {
        (0..self.len()).map(|i| self.get(i).expect("index in range"))
    }
}

/// Where one tensor lies in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// GGML order: `dims[0]` is the contiguous (row) dimension.
    pub dims: Vec<usize>,
    pub ty: GgmlType,
    /// Absolute byte offset in the file.
    pub offset: usize,
    pub size: usize,
}

/// A parsed, memory-mapped GGUF file.
pub struct GgufFile {
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    map: Arc<Mmap>,
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; the file is treated as immutable while loaded,
        // as every mmap-based model loader does.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::from_mmap(Arc::new(map))
    }

    pub fn from_mmap(map: Arc<Mmap>) -> Result<Self> {
        let (version, metadata, tensors) = parse(&map)?;
        let index = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(GgufFile {
            version,
            metadata,
            tensors,
            index,
            map,
        })
    }

    pub fn mmap(&self) -> &Arc<Mmap> {
        &self.map
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        &self.map[t.offset..t.offset + t.size]
    }
}

/// Parses header, metadata and tensor infos of a GGUF image. Public so the
/// fuzz target can drive it on raw bytes.
pub fn parse(buf: &[u8]) -> Result<(u32, HashMap<String, Value>, Vec<TensorInfo>)> {
    let mut r = Reader {
        buf,
        pos: 0,
        budget: MAX_METADATA_BYTES,
    };
    let magic = r.bytes(4, "magic")?;
    if magic != MAGIC {
        return Err(bad(format!("bad magic {magic:02x?}, expected \"GGUF\"")));
    }
    let version = r.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(bad(format!(
            "unsupported version {version} (2 and 3 are supported)"
        )));
    }
    let n_tensors = r.u64("tensor count")?;
    let n_kv = r.u64("metadata count")?;
    // Each KV needs at least 8 (key length) + 4 (type) + 1 bytes; each tensor
    // info at least 8 + 4 + 4 + 8. Counts beyond that cannot fit in the file.
    r.check_count(n_kv, 13, || "metadata count".into())?;
    r.check_count(n_tensors, 24, || "tensor count".into())?;

    let mut metadata = HashMap::new();
    for i in 0..n_kv {
        let key = r.name(&format!("key of metadata entry {i}"))?;
        r.charge(key.len() + std::mem::size_of::<(String, Value)>(), || {
            format!("metadata '{key}'")
        })?;
        let ty = r.u32(&format!("type of metadata '{key}'"))?;
        let value = r.value(ty, &key, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(bad(format!("duplicate metadata key '{key}'")));
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(Value::U32(a)) if *a > 0 && a.is_power_of_two() => *a as u64,
        Some(v) => {
            return Err(bad(format!(
                "general.alignment must be a power-of-two u32, got {v:?}"
            )))
        }
    };

    let mut raw = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for i in 0..n_tensors {
        let name = r.name(&format!("name of tensor {i}"))?;
        // The entry below and its copy in `seen`.
        r.charge(2 * name.len() + 128, || format!("tensor '{name}'"))?;
        if !seen.insert(name.clone()) {
            return Err(bad(format!("duplicate tensor name '{name}'")));
        }
        let n_dims = r.u32(&format!("dimension count of '{name}'"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(bad(format!(
                "tensor '{name}' has {n_dims} dimensions (1..={MAX_DIMS} allowed)"
            )));
        }
        r.charge(8 * n_dims as usize, || format!("tensor '{name}'"))?;
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            let v = r.u64(&format!("dimension {d} of '{name}'"))?;
            if v == 0 || v > i64::MAX as u64 {
                return Err(bad(format!("tensor '{name}' dimension {d} is {v}")));
            }
            dims.push(v);
        }
        let ty_id = r.u32(&format!("type of '{name}'"))?;
        let ty = GgmlType::from_id(ty_id)
            .ok_or_else(|| bad(format!("tensor '{name}' has unsupported type id {ty_id}")))?;
        let offset = r.u64(&format!("offset of '{name}'"))?;
        raw.push((name, dims, ty, offset));
    }

    let data_start = align_up(r.pos as u64, alignment)
        .ok_or_else(|| bad("data section offset overflows".into()))?;
    let file_len = buf.len() as u64;
    if !raw.is_empty() && data_start > file_len {
        return Err(bad(format!(
            "file truncated: tensor data would start at {data_start}, file is {file_len} bytes"
        )));
    }

    let mut tensors = Vec::with_capacity(raw.len());
    for (name, dims, ty, offset) in raw {
        let n = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= (1u64 << 48))
            .ok_or_else(|| bad(format!("tensor '{name}' has too many elements: {dims:?}")))?;
        if dims[0] % ty.block_size() as u64 != 0 {
            return Err(bad(format!(
                "tensor '{name}' row length {} is not a multiple of the {} block size {}",
                dims[0],
                ty.name(),
                ty.block_size()
            )));
        }
        let size = n / ty.block_size() as u64 * ty.type_size() as u64;
        if offset % alignment != 0 {
            return Err(bad(format!(
                "tensor '{name}' offset {offset} is not aligned to {alignment}"
            )));
        }
        let start = data_start
            .checked_add(offset)
            .ok_or_else(|| bad(format!("tensor '{name}' offset overflows")))?;
        let end = start
            .checked_add(size)
            .filter(|&e| e <= file_len)
            .ok_or_else(|| {
                bad(format!(
                    "tensor '{name}' ({size} bytes at {start}) lies beyond the end of the file ({file_len} bytes)"
                ))
            })?;
        debug_assert!(end <= file_len);
        tensors.push(TensorInfo {
            name,
            dims: dims.iter().map(|&d| d as usize).collect(),
            ty,
            offset: start as usize,
            size: size as usize,
        });
    }

    let mut order: Vec<&TensorInfo> = tensors.iter().collect();
    order.sort_by_key(|t| t.offset);
    for w in order.windows(2) {
        if w[0].offset + w[0].size > w[1].offset {
            return Err(bad(format!(
                "tensors '{}' and '{}' overlap",
                w[0].name, w[1].name
            )));
        }
    }
    Ok((version, metadata, tensors))
}

fn bad(msg: String) -> Error {
    Error::Gguf(msg)
}

fn align_up(v: u64, a: u64) -> Option<u64> {
    v.checked_add(a - 1).map(|x| x / a * a)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Bytes of metadata memory still allowed.
    budget: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(bad(format!(
                "file truncated while reading {what} at offset {} (needs {n} bytes, {} left)",
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// Takes `bytes` from the metadata memory budget, before allocating them.
    /// `what` names the item, and is only built when the budget is exceeded
    /// (building it every time would copy keys once per element).
    fn charge(&mut self, bytes: usize, what: impl FnOnce() -> String) -> Result<()> {
        self.budget = self.budget.checked_sub(bytes).ok_or_else(|| {
            bad(format!(
                "{} needs more memory than the {} MiB allowed for all metadata",
                what(),
                MAX_METADATA_BYTES >> 20
            ))
        })?;
        Ok(())
    }

    fn check_count(
        &self,
        count: u64,
        min_item_bytes: u64,
        what: impl FnOnce() -> String,
    ) -> Result<()> {
        if count.saturating_mul(min_item_bytes) > self.remaining() as u64 {
            return Err(bad(format!(
                "{} {count} cannot fit in the {} bytes left in the file",
                what(),
                self.remaining()
            )));
        }
        Ok(())
    }

    /// `raw` as text, charging what it takes beyond `raw.len()` (the caller
    /// charges that) before allocating it: valid UTF-8 is borrowed; each
    /// invalid byte may grow into a 3-byte replacement character.
    fn text(
        &mut self,
        raw: &'a [u8],
        what: impl FnOnce() -> String,
    ) -> Result<std::borrow::Cow<'a, str>> {
        if let Ok(s) = std::str::from_utf8(raw) {
            return Ok(std::borrow::Cow::Borrowed(s));
        }
        let bound = 2 * raw.len();
        self.charge(bound, what)?;
        let s = String::from_utf8_lossy(raw).into_owned();
        self.budget += bound - (s.len() - raw.len());
        Ok(std::borrow::Cow::Owned(s))
    }

    /// A key or tensor name: at most [`MAX_NAME_BYTES`] long.
    fn name(&mut self, what: &str) -> Result<String> {
        let raw = self.str_bytes(what)?;
        if raw.len() as u64 > MAX_NAME_BYTES {
            return Err(bad(format!(
                "{what} is {} bytes long (at most {MAX_NAME_BYTES} allowed)",
                raw.len()
            )));
        }
        Ok(String::from_utf8_lossy(raw).into_owned())
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.bytes(N, what)?.try_into().expect("length checked"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A string's bytes.
    fn str_bytes(&mut self, what: &str) -> Result<&'a [u8]> {
        let len = self.u64(what)?;
        if len > self.remaining() as u64 {
            return Err(bad(format!(
                "{what}: string length {len} exceeds the {} bytes left in the file",
                self.remaining()
            )));
        }
        self.bytes(len as usize, what)
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => Value::Bool(self.bool(key)?),
            8 => {
                let raw = self.str_bytes(key)?;
                self.charge(raw.len(), || format!("metadata '{key}'"))?;
                Value::String(self.text(raw, || format!("metadata '{key}'"))?.into_owned())
            }
            9 => Value::Array(self.array_value(key, depth)?),
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            t => return Err(bad(format!("metadata '{key}': unknown value type {t}"))),
        })
    }

    fn bool(&mut self, key: &str) -> Result<bool> {
        match self.array::<1>(key)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(bad(format!("metadata '{key}': invalid bool byte {b}"))),
        }
    }

    /// An array's element type and count, then its elements. Every count is
    /// checked against the bytes left in the file and the memory budget
    /// before anything is allocated.
    fn array_value(&mut self, key: &str, depth: u32) -> Result<Array> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(bad(format!("metadata '{key}': arrays nested too deeply")));
        }
        let elem_ty = self.u32(key)?;
        let count = self.u64(key)?;
        // Bytes one element takes in the file at least, and in memory.
        let (file_min, mem) = match elem_ty {
            0 | 1 | 7 => (1, 1),
            2 | 3 => (2, 2),
            4..=6 => (4, 4),
            10..=12 => (8, 8),
            8 => (8, std::mem::size_of::<usize>()),
            9 => (12, std::mem::size_of::<Array>()),
            t => {
                return Err(bad(format!(
                    "metadata '{key}': unknown array element type {t}"
                )))
            }
        };
        let what = || format!("metadata '{key}'");
        self.check_count(count, file_min, || format!("{}: array length", what()))?;
        let n = count as usize;
        self.charge(n.saturating_mul(mem), || {
            format!("{} ({n} elements)", what())
        })?;
        macro_rules! numbers {
            ($variant:ident, $t:ty) => {{
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(<$t>::from_le_bytes(self.array(key)?));
                }
                Array::$variant(v)
            }};
        }
        Ok(match elem_ty {
            0 => numbers!(U8, u8),
            1 => numbers!(I8, i8),
            2 => numbers!(U16, u16),
            3 => numbers!(I16, i16),
            4 => numbers!(U32, u32),
            5 => numbers!(I32, i32),
            6 => numbers!(F32, f32),
            10 => numbers!(U64, u64),
            11 => numbers!(I64, i64),
            12 => numbers!(F64, f64),
            7 => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.bool(key)?);
                }
                Array::Bool(v)
            }
            8 => {
                // Lengths first, so that the text is allocated once, at its size.
                let start = self.pos;
                let mut total = 0;
                for _ in 0..n {
                    total += self.str_bytes(key)?.len();
                }
                self.pos = start;
                self.charge(total, what)?;
                let mut v = Strings {
                    text: String::with_capacity(total),
                    ends: Vec::with_capacity(n),
                };
                for _ in 0..n {
                    let raw = self.str_bytes(key)?;
                    let s = self.text(raw, what)?;
                    v.push(&s);
                }
                Array::String(v)
            }
            _ => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.array_value(key, depth + 1)?);
                }
                Array::Array(v)
            }
        })
    }
}
