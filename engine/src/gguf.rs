//! GGUF v3 reader: metadata, tensor directory, and dequantisation to f32 of the F32, F16, BF16,
//! Q8_0, Q4_0 and Q4_1 tensor types.
//!
//! The format (ggml's `gguf.md`): a little-endian header (`GGUF` magic, version, tensor count,
//! metadata count), typed key/value metadata, a tensor directory (name, dimensions with the
//! fastest-varying first, ggml type, offset), then the tensor data, which starts at the next
//! multiple of `general.alignment` (default 32) after the directory. Every length and offset read
//! from the file is checked before use, so a truncated or hostile file yields a [`GgufError`],
//! never a panic or a huge allocation.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use thiserror::Error;

const MAGIC: u32 = 0x4655_4747; // "GGUF" little-endian
const DEFAULT_ALIGNMENT: u64 = 32;
/// Upper bounds on counts read from a file, far above any real model, to refuse absurd sizes
/// before allocating for them.
const MAX_STRING: u64 = 1 << 28;
const MAX_ARRAY: u64 = 1 << 28;
const MAX_ENTRIES: u64 = 1 << 24;
const MAX_DIMS: u32 = 8;

/// Why a GGUF file could not be read.
#[derive(Debug, Error)]
pub enum GgufError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Not a GGUF file.
    #[error("not a GGUF file (magic {0:#010x})")]
    BadMagic(u32),
    /// A GGUF version this reader does not know.
    #[error("unsupported GGUF version {0} (expected 2 or 3)")]
    UnsupportedVersion(u32),
    /// The file ends inside a structure.
    #[error("truncated GGUF file: {what} at byte {at} needs {need} bytes, {left} left")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Where.
        at: usize,
        /// Bytes needed.
        need: u64,
        /// Bytes left in the file.
        left: usize,
    },
    /// A value that cannot be right (unknown type code, absurd count, bad UTF-8, ...).
    #[error("malformed GGUF file: {0}")]
    Malformed(String),
    /// A tensor that is not in the file.
    #[error("no tensor named {0:?}")]
    NoTensor(String),
    /// A tensor type this reader cannot dequantise.
    #[error(
        "tensor {name:?} has type {dtype}, which is not supported (F32, F16, BF16, Q8_0, Q4_0, Q4_1 are)"
    )]
    UnsupportedType {
        /// The tensor.
        name: String,
        /// Its type.
        dtype: GgmlType,
    },
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `uint8`.
    U8(u8),
    /// `int8`.
    I8(i8),
    /// `uint16`.
    U16(u16),
    /// `int16`.
    I16(i16),
    /// `uint32`.
    U32(u32),
    /// `int32`.
    I32(i32),
    /// `float32`.
    F32(f32),
    /// `bool`.
    Bool(bool),
    /// `string`.
    String(String),
    /// `array` of one element type.
    Array(Vec<Value>),
    /// `uint64`.
    U64(u64),
    /// `int64`.
    I64(i64),
    /// `float64`.
    F64(f64),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

/// A ggml tensor type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// Blocks of 32: f16 scale, 32 x i8.
    Q8_0,
    /// Blocks of 32: f16 scale, 16 bytes of 4-bit values offset by 8.
    Q4_0,
    /// Blocks of 32: f16 scale, f16 minimum, 16 bytes of 4-bit values.
    Q4_1,
    /// Any other ggml type code (readable directory entry, no dequantisation).
    Other(u32),
}

impl GgmlType {
    fn from_code(code: u32) -> GgmlType {
        match code {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            other => GgmlType::Other(other),
        }
    }

    /// The ggml type code.
    pub fn code(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::BF16 => 30,
            GgmlType::Other(c) => c,
        }
    }

    /// `(elements per block, bytes per block)`, for the supported types.
    pub fn block_layout(self) -> Option<(u64, u64)> {
        match self {
            GgmlType::F32 => Some((1, 4)),
            GgmlType::F16 | GgmlType::BF16 => Some((1, 2)),
            GgmlType::Q8_0 => Some((32, 2 + 32)),
            GgmlType::Q4_0 => Some((32, 2 + 16)),
            GgmlType::Q4_1 => Some((32, 2 + 2 + 16)),
            GgmlType::Other(_) => None,
        }
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GgmlType::Other(c) => write!(f, "ggml type {c}"),
            t => write!(f, "{t:?}"),
        }
    }
}

/// One entry of the tensor directory.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions, fastest-varying first (a `[rows, cols]` matrix is stored as `[cols, rows]`).
    pub dims: Vec<u64>,
    /// Element type.
    pub dtype: GgmlType,
    /// Byte offset of the data from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file: its header in memory, its tensor data read on demand.
pub struct GgufFile {
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata by key.
    pub metadata: BTreeMap<String, Value>,
    /// Tensor directory, in file order.
    pub tensors: Vec<TensorInfo>,
    data: TensorData,
    data_start: u64,
}

/// Where tensor bytes come from. A file opened from disk is not read whole: each tensor is read
/// when it is dequantised, so loading never holds the file and its f32 weights at once (for an
/// 8B model the quantised file alone is several GiB). Memory-mapping would avoid even the
/// per-tensor copy, but it needs `unsafe`, which this project allows only in the CUDA backend,
/// and the weights are converted to f32 anyway, so the copy is not what costs.
enum TensorData {
    Memory(Vec<u8>),
    File { file: File, path: String, len: u64 },
}

impl TensorData {
    fn len(&self) -> u64 {
        match self {
            TensorData::Memory(b) => b.len() as u64,
            TensorData::File { len, .. } => *len,
        }
    }
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("bytes", &self.data.len())
            .finish()
    }
}

/// Header bytes read first when opening a file; doubled until the header fits.
const FIRST_HEADER_READ: u64 = 1 << 20;

impl GgufFile {
    /// Opens and parses a file, reading only its header now. The header (metadata, tokenizer
    /// and tensor directory) is read in growing prefixes until it parses.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let io = |source| GgufError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut want = FIRST_HEADER_READ.min(len);
        loop {
            // Bounded by the file's length, which the header needs to be read from anyway.
            let mut head = vec![0u8; want as usize];
            file.read_exact_at(&mut head, 0).map_err(io)?;
            match parse_header(&head) {
                Ok(h) => {
                    let data = TensorData::File {
                        file,
                        path: path.display().to_string(),
                        len,
                    };
                    return GgufFile::checked(h, data);
                }
                // The header runs past this prefix: read more, unless this was all of it.
                Err(GgufError::Truncated { .. }) if want < len => want = (want * 2).min(len),
                Err(e) => return Err(e),
            }
        }
    }

    /// Parses a whole file held in memory.
    pub fn parse(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        let h = parse_header(&bytes)?;
        GgufFile::checked(h, TensorData::Memory(bytes))
    }

    /// The file from its parsed header, once every tensor is checked to lie inside it.
    fn checked(h: Header, data: TensorData) -> Result<GgufFile, GgufError> {
        let file = GgufFile {
            version: h.version,
            metadata: h.metadata,
            tensors: h.tensors,
            data,
            data_start: h.data_start,
        };
        for t in &file.tensors {
            file.tensor_range(t)?;
        }
        Ok(file)
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// An unsigned integer metadata value.
    pub fn meta_u64(&self, key: &str) -> Option<u64> {
        self.metadata.get(key).and_then(Value::as_u64)
    }

    /// A numeric metadata value as f64.
    pub fn meta_f64(&self, key: &str) -> Option<f64> {
        self.metadata.get(key).and_then(Value::as_f64)
    }

    /// A string metadata value.
    pub fn meta_str(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).and_then(Value::as_str)
    }

    /// Byte range of a tensor's data in the file, checked to lie inside it (empty for a type
    /// whose size is unknown).
    fn tensor_range(&self, t: &TensorInfo) -> Result<std::ops::Range<u64>, GgufError> {
        let bad = |m: String| GgufError::Malformed(format!("tensor {:?}: {m}", t.name));
        let (per_block, block_bytes) = match t.dtype.block_layout() {
            Some(l) => l,
            // Unknown types: the directory entry is kept, its size cannot be checked.
            None => return Ok(0..0),
        };
        let elements = t
            .dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad("element count overflows".into()))?;
        if !elements.is_multiple_of(per_block) {
            return Err(bad(format!(
                "{elements} elements is not a multiple of the block size {per_block}"
            )));
        }
        let len = (elements / per_block)
            .checked_mul(block_bytes)
            .ok_or_else(|| bad("byte size overflows".into()))?;
        let start = self
            .data_start
            .checked_add(t.offset)
            .ok_or_else(|| bad("offset overflows".into()))?;
        let end = start
            .checked_add(len)
            .ok_or_else(|| bad("end overflows".into()))?;
        if end > self.data.len() {
            return Err(bad(format!(
                "data [{start}, {end}) lies beyond the end of the file ({} bytes)",
                self.data.len()
            )));
        }
        Ok(start..end)
    }

    /// The raw bytes of a tensor's data (read from disk for an opened file).
    pub fn tensor_bytes(&self, t: &TensorInfo) -> Result<Cow<'_, [u8]>, GgufError> {
        let r = self.tensor_range(t)?;
        match &self.data {
            // In range: `tensor_range` checked it against this length.
            TensorData::Memory(b) => Ok(Cow::Borrowed(&b[r.start as usize..r.end as usize])),
            TensorData::File { file, path, .. } => {
                let len = usize::try_from(r.end - r.start).map_err(|_| {
                    GgufError::Malformed(format!("tensor {:?} is too large", t.name))
                })?;
                let mut buf = vec![0u8; len];
                file.read_exact_at(&mut buf, r.start)
                    .map_err(|source| GgufError::Io {
                        path: path.clone(),
                        source,
                    })?;
                Ok(Cow::Owned(buf))
            }
        }
    }

    /// The tensor named `name`, dequantised to f32 in storage order.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let t = self
            .tensor(name)
            .ok_or_else(|| GgufError::NoTensor(name.to_string()))?;
        let bytes = self.tensor_bytes(t)?;
        dequantize(t.dtype, &bytes, t.elements() as usize).ok_or_else(|| {
            GgufError::UnsupportedType {
                name: name.to_string(),
                dtype: t.dtype,
            }
        })
    }
}

/// What the header of a GGUF file says.
struct Header {
    version: u32,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    /// Byte offset of the tensor data section.
    data_start: u64,
}

/// Parses the header at the start of `bytes` (which may stop anywhere after it).
fn parse_header(bytes: &[u8]) -> Result<Header, GgufError> {
    let mut r = Reader { b: bytes, pos: 0 };
    let magic = r.u32("magic")?;
    if magic != MAGIC {
        return Err(GgufError::BadMagic(magic));
    }
    let version = r.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::UnsupportedVersion(version));
    }
    let n_tensors = r.count("tensor count", MAX_ENTRIES)?;
    let n_kv = r.count("metadata count", MAX_ENTRIES)?;
    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = r.string("metadata key")?;
        let ty = r.u32("metadata type")?;
        let value = r.value(ty, 0)?;
        metadata.insert(key, value);
    }
    let mut tensors = Vec::with_capacity(n_tensors.min(4096) as usize);
    for _ in 0..n_tensors {
        let name = r.string("tensor name")?;
        let n_dims = r.u32("tensor rank")?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(GgufError::Malformed(format!(
                "tensor {name:?} has {n_dims} dimensions"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64("tensor dimension")?);
        }
        let dtype = GgmlType::from_code(r.u32("tensor type")?);
        let offset = r.u64("tensor offset")?;
        tensors.push(TensorInfo {
            name,
            dims,
            dtype,
            offset,
        });
    }
    let alignment = metadata
        .get("general.alignment")
        .and_then(Value::as_u64)
        .unwrap_or(DEFAULT_ALIGNMENT);
    if alignment == 0 || !alignment.is_power_of_two() {
        return Err(GgufError::Malformed(format!(
            "alignment {alignment} is not a power of two"
        )));
    }
    let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
    Ok(Header {
        version,
        metadata,
        tensors,
        data_start,
    })
}

/// Dequantises `n` elements of type `dtype` from `bytes` (which must hold exactly them).
/// `None` for an unsupported type or a length mismatch.
pub fn dequantize(dtype: GgmlType, bytes: &[u8], n: usize) -> Option<Vec<f32>> {
    let (per_block, block_bytes) = dtype.block_layout()?;
    let (per_block, block_bytes) = (per_block as usize, block_bytes as usize);
    if !n.is_multiple_of(per_block) || bytes.len() != n / per_block * block_bytes {
        return None;
    }
    let mut out = Vec::with_capacity(n);
    match dtype {
        GgmlType::F32 => {
            out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
        GgmlType::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))),
        ),
        GgmlType::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)),
        ),
        GgmlType::Q8_0 => {
            for b in bytes.chunks_exact(block_bytes) {
                let d = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
                out.extend(b[2..].iter().map(|&q| f32::from(q as i8) * d));
            }
        }
        GgmlType::Q4_0 => {
            for b in bytes.chunks_exact(block_bytes) {
                let d = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
                unpack_nibbles(&b[2..], &mut out, |q| (f32::from(q) - 8.0) * d);
            }
        }
        GgmlType::Q4_1 => {
            for b in bytes.chunks_exact(block_bytes) {
                let d = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
                let m = f16_to_f32(u16::from_le_bytes([b[2], b[3]]));
                unpack_nibbles(&b[4..], &mut out, |q| f32::from(q) * d + m);
            }
        }
        GgmlType::Other(_) => return None,
    }
    Some(out)
}

/// ggml's 4-bit layout: the low nibbles of the 16 bytes are elements 0..16 of the block, the
/// high nibbles elements 16..32.
fn unpack_nibbles(qs: &[u8], out: &mut Vec<f32>, f: impl Fn(u8) -> f32) {
    out.extend(qs.iter().map(|&q| f(q & 0x0f)));
    out.extend(qs.iter().map(|&q| f(q >> 4)));
}

/// IEEE 754 half to single precision, exact for every input (subnormals, infinities, NaN).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: value = man * 2^-24, exactly representable as a normal f32.
            let v = man as f32 * f32::from_bits(0x3380_0000); // 2^-24
            return if sign != 0 { -v } else { v };
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, _) => sign | 0x7fc0_0000 | (man << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: u64, what: &'static str) -> Result<&[u8], GgufError> {
        let left = self.b.len() - self.pos;
        if n > left as u64 {
            return Err(GgufError::Truncated {
                what,
                at: self.pos,
                need: n,
                left,
            });
        }
        let s = &self.b[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N as u64, what)?);
        Ok(a)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn count(&mut self, what: &'static str, max: u64) -> Result<u64, GgufError> {
        let n = self.u64(what)?;
        if n > max {
            return Err(GgufError::Malformed(format!("{what} {n} exceeds {max}")));
        }
        Ok(n)
    }

    fn string(&mut self, what: &'static str) -> Result<String, GgufError> {
        let len = self.count(what, MAX_STRING)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| GgufError::Malformed(format!("{what} at byte {} is not UTF-8", self.pos)))
    }

    fn value(&mut self, ty: u32, depth: u32) -> Result<Value, GgufError> {
        const W: &str = "metadata value";
        Ok(match ty {
            0 => Value::U8(self.array::<1>(W)?[0]),
            1 => Value::I8(i8::from_le_bytes(self.array(W)?)),
            2 => Value::U16(u16::from_le_bytes(self.array(W)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(W)?)),
            4 => Value::U32(u32::from_le_bytes(self.array(W)?)),
            5 => Value::I32(i32::from_le_bytes(self.array(W)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(W)?)),
            7 => match self.array::<1>(W)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(GgufError::Malformed(format!("bool value {b}"))),
            },
            8 => Value::String(self.string(W)?),
            9 => {
                if depth > 0 {
                    return Err(GgufError::Malformed("nested metadata arrays".into()));
                }
                let inner = self.u32("array type")?;
                let n = self.count("array length", MAX_ARRAY)?;
                // Every element takes at least one byte: a count beyond what is left is a lie.
                if n > (self.b.len() - self.pos) as u64 {
                    return Err(GgufError::Malformed(format!(
                        "array of {n} elements in a shorter file"
                    )));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(inner, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(u64::from_le_bytes(self.array(W)?)),
            11 => Value::I64(i64::from_le_bytes(self.array(W)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(W)?)),
            other => {
                return Err(GgufError::Malformed(format!(
                    "unknown metadata value type {other}"
                )));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_floats_convert_exactly() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(f16_to_f32(0x3555), 0.333_251_95);
    }

    #[test]
    fn q4_1_uses_low_nibbles_first() {
        // d = 1.0, m = -8.0; byte j holds element j (low) and j + 16 (high).
        let mut block = vec![0x00, 0x3c, 0x00, 0xc8];
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let v = dequantize(GgmlType::Q4_1, &block, 32).unwrap();
        assert_eq!(v[0], -8.0);
        assert_eq!(v[15], 7.0);
        assert_eq!(v[16], 7.0);
        assert_eq!(v[31], -8.0);
    }

    #[test]
    fn length_mismatches_are_refused() {
        assert!(dequantize(GgmlType::Q8_0, &[0; 33], 32).is_none());
        assert!(dequantize(GgmlType::F32, &[0; 8], 3).is_none());
        assert!(dequantize(GgmlType::Other(12), &[], 0).is_none());
    }
}
