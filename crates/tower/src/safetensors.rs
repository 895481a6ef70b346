//! Safetensors weights: the container read by the `safetensors` crate, with our strict header
//! checks and dtype conversion (F32/F16/BF16 to f32) on top, and an F32 writer for tests and
//! fixtures.
//!
//! Layout: 8-byte little-endian header length N, N bytes of JSON header (an object mapping tensor
//! names to `{"dtype", "shape", "data_offsets": [begin, end]}`, plus an optional `__metadata__`
//! object of strings), then the data buffer. Offsets are relative to the data buffer.

use crate::error::{json_type, Result, TowerError};
use serde_json::Value;

/// The largest accepted JSON header, in bytes.
pub const MAX_HEADER_BYTES: usize = 100_000_000;
/// The largest accepted file, in bytes (PostgreSQL's `bytea` limit).
pub const MAX_FILE_BYTES: usize = 1 << 30;

/// Tensors whose name ends with this are PyTorch BatchNorm bookkeeping: validated for layout,
/// then ignored (any dtype).
pub const IGNORED_SUFFIX: &str = "num_batches_tracked";

/// Element types a safetensors header may declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    BF16,
    F64,
    F8E4M3,
    F8E5M2,
    I64,
    I32,
    I16,
    I8,
    U64,
    U32,
    U16,
    U8,
    Bool,
}

impl Dtype {
    pub fn parse(s: &str) -> Option<Dtype> {
        Some(match s {
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "F64" => Dtype::F64,
            "F8_E4M3" => Dtype::F8E4M3,
            "F8_E5M2" => Dtype::F8E5M2,
            "I64" => Dtype::I64,
            "I32" => Dtype::I32,
            "I16" => Dtype::I16,
            "I8" => Dtype::I8,
            "U64" => Dtype::U64,
            "U32" => Dtype::U32,
            "U16" => Dtype::U16,
            "U8" => Dtype::U8,
            "BOOL" => Dtype::Bool,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::F64 => "F64",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::I64 => "I64",
            Dtype::I32 => "I32",
            Dtype::I16 => "I16",
            Dtype::I8 => "I8",
            Dtype::U64 => "U64",
            Dtype::U32 => "U32",
            Dtype::U16 => "U16",
            Dtype::U8 => "U8",
            Dtype::Bool => "BOOL",
        }
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 | Dtype::U64 => 8,
            Dtype::F32 | Dtype::I32 | Dtype::U32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 | Dtype::U16 => 2,
            Dtype::F8E4M3 | Dtype::F8E5M2 | Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
        }
    }
}

/// One float tensor, converted to f32 (row-major). Non-finite values are kept as they are; the
/// model loader rejects them with the tensor's name.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorView {
    pub name: String,
    /// The dtype stored in the file (F32, F16 or BF16).
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

fn bad(reason: impl Into<String>) -> TowerError {
    TowerError::Safetensors {
        reason: reason.into(),
    }
}

fn as_index(v: &Value, what: &str) -> Result<usize> {
    v.as_u64()
        .and_then(|u| usize::try_from(u).ok())
        .ok_or_else(|| bad(format!("{what} must be a non-negative integer, got {v}")))
}

/// Our checks of the header on top of the container's: strict JSON (no duplicate keys, which
/// serde would silently resolve), every entry an object of exactly `dtype`, `shape` and
/// `data_offsets`, a known dtype, and `__metadata__` an object of strings.
fn check_header(header: &[u8]) -> Result<()> {
    let header = crate::json::parse_strict(header).map_err(|e| bad(format!("header: {e}")))?;
    let Value::Object(map) = header else {
        return Err(bad(format!(
            "header must be a JSON object, got {}",
            json_type(&header)
        )));
    };
    for (name, info) in &map {
        if name == "__metadata__" {
            let Value::Object(meta) = info else {
                return Err(bad("__metadata__ must be an object of strings"));
            };
            if let Some((k, _)) = meta.iter().find(|(_, v)| !v.is_string()) {
                return Err(bad(format!("__metadata__ value \"{k}\" is not a string")));
            }
            continue;
        }
        let Value::Object(info) = info else {
            return Err(bad(format!("tensor \"{name}\": entry must be an object")));
        };
        if let Some(k) = info
            .keys()
            .find(|k| !matches!(k.as_str(), "dtype" | "shape" | "data_offsets"))
        {
            return Err(bad(format!("tensor \"{name}\": unknown key \"{k}\"")));
        }
        let dtype_s = info
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("tensor \"{name}\": dtype must be a string")))?;
        if Dtype::parse(dtype_s).is_none() {
            return Err(bad(format!(
                "tensor \"{name}\": unknown dtype \"{dtype_s}\""
            )));
        }
        let shape = info
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad(format!("tensor \"{name}\": shape must be an array")))?;
        for d in shape {
            as_index(d, &format!("tensor \"{name}\": shape entry"))?;
        }
    }
    Ok(())
}

/// Parses a safetensors byte string. The container (header length, offsets inside the buffer
/// and matching each tensor's byte size, tensors packed without gaps or overlaps, the whole
/// buffer used) is read by the `safetensors` crate; on top of it the header is checked strictly
/// ([`check_header`]), tensors ending in `num_batches_tracked` are dropped, and any other
/// tensor that is not F32/F16/BF16 is a [`TowerError::TensorDtype`]. Returns the tensors sorted
/// by name, converted to f32.
pub fn parse(bytes: &[u8]) -> Result<Vec<TensorView>> {
    if bytes.len() > MAX_FILE_BYTES {
        return Err(TowerError::TooLarge {
            what: format!("safetensors file of {} bytes", bytes.len()),
            limit: MAX_FILE_BYTES,
        });
    }
    let Some(len_bytes) = bytes.get(..8) else {
        return Err(bad(format!(
            "file is {} bytes, shorter than the 8-byte header length",
            bytes.len()
        )));
    };
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(len_bytes);
    let n = u64::from_le_bytes(len8);
    if n > MAX_HEADER_BYTES as u64 {
        return Err(TowerError::TooLarge {
            what: format!("safetensors header length {n}"),
            limit: MAX_HEADER_BYTES,
        });
    }
    let Some(header) = bytes.get(8..8 + n as usize) else {
        return Err(bad(format!(
            "header length {n} runs past the end of the {}-byte file",
            bytes.len()
        )));
    };
    check_header(header)?;
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
    let mut tensors = st.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = Vec::with_capacity(tensors.len());
    for (name, view) in tensors {
        if name.ends_with(IGNORED_SUFFIX) {
            continue;
        }
        let raw = view.data();
        let (dtype, data): (Dtype, Vec<f32>) = match view.dtype() {
            safetensors::Dtype::F32 => (
                Dtype::F32,
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            safetensors::Dtype::F16 => (
                Dtype::F16,
                raw.chunks_exact(2)
                    .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                    .collect(),
            ),
            safetensors::Dtype::BF16 => (
                Dtype::BF16,
                raw.chunks_exact(2)
                    .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                    .collect(),
            ),
            other => {
                let dtype = format!("{other:?}");
                return Err(TowerError::TensorDtype {
                    name,
                    dtype: Dtype::parse(&dtype).map_or(dtype, |d| d.name().to_owned()),
                });
            }
        };
        out.push(TensorView {
            name,
            dtype,
            shape: view.shape().to_vec(),
            data,
        });
    }
    Ok(out)
}

/// Writes F32 tensors (name, shape, row-major data) as a safetensors byte string, in the given
/// order, the header padded with spaces to a multiple of 8 bytes.
///
/// Panics if a tensor's data length differs from its shape product (a programming error in the
/// caller: this is for tests, benchmarks and fixtures, never for user input).
pub fn write_f32(tensors: &[(&str, &[usize], &[f32])]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape, data) in tensors {
        let numel: usize = shape.iter().product();
        assert_eq!(
            numel,
            data.len(),
            "tensor {name}: data length != shape product"
        );
        let end = offset + 4 * numel;
        header.insert(
            (*name).to_owned(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut h = Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + offset);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    for (_, _, data) in tensors {
        for v in *data {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// Like [`write_f32`] but for raw tensors of any dtype: (name, dtype name, shape, raw LE bytes).
/// No checks at all, so tests can also write malformed files.
pub fn write_raw(tensors: &[(&str, &str, &[usize], &[u8])]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, dtype, shape, data) in tensors {
        let end = offset + data.len();
        header.insert(
            (*name).to_owned(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut h = Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + offset);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    for (_, _, _, data) in tensors {
        out.extend_from_slice(data);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_header(h: &str, data: &[u8]) -> Vec<u8> {
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn roundtrip_f32() {
        let b = write_f32(&[("a", &[2, 3], &[1., 2., 3., 4., 5., 6.]), ("b", &[], &[7.])]);
        let t = parse(&b).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].name, "a");
        assert_eq!(t[0].shape, vec![2, 3]);
        assert_eq!(t[0].data, vec![1., 2., 3., 4., 5., 6.]);
        assert_eq!(t[1].shape, Vec::<usize>::new());
        assert_eq!(t[1].data, vec![7.]);
    }

    #[test]
    fn f16_and_bf16() {
        let h: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes())
            .collect();
        let b16: Vec<u8> = [0.25f32, 3.0]
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes())
            .collect();
        let b = write_raw(&[("h", "F16", &[2], &h), ("b", "BF16", &[2], &b16)]);
        let t = parse(&b).unwrap();
        // Returned sorted by name.
        assert_eq!(t[1].name, "h");
        assert_eq!(t[1].data, vec![1.5, -2.0]);
        assert_eq!(t[1].dtype, Dtype::F16);
        assert_eq!(t[0].data, vec![0.25, 3.0]);
        assert_eq!(t[0].dtype, Dtype::BF16);
    }

    #[test]
    fn num_batches_tracked_is_ignored() {
        let b = write_raw(&[
            ("bn.num_batches_tracked", "I64", &[], &7i64.to_le_bytes()),
            ("w", "F32", &[1], &1f32.to_le_bytes()),
        ]);
        let t = parse(&b).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].name, "w");
    }

    #[test]
    fn other_dtype_rejected_with_name() {
        let b = write_raw(&[("w", "F64", &[1], &1f64.to_le_bytes())]);
        assert_eq!(
            parse(&b),
            Err(TowerError::TensorDtype {
                name: "w".into(),
                dtype: "F64".into()
            })
        );
        let b = write_raw(&[("w", "Q4", &[1], &[0])]);
        assert!(matches!(parse(&b), Err(TowerError::Safetensors { .. })));
    }

    #[test]
    fn metadata() {
        let d = 1f32.to_le_bytes();
        let ok = with_header(
            r#"{"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            &d,
        );
        assert_eq!(parse(&ok).unwrap().len(), 1);
        let bad_meta = with_header(
            r#"{"__metadata__":{"format":1},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            &d,
        );
        assert!(parse(&bad_meta).is_err());
    }

    #[test]
    fn malformed() {
        let d = [0u8; 16];
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![1, 2, 3],
            100u64.to_le_bytes().to_vec(),
            u64::MAX.to_le_bytes().to_vec(),
            with_header("not json", &d),
            with_header("[1,2]", &d),
            with_header(r#"{"w":1}"#, &d),
            with_header(
                r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
                &d,
            ),
            with_header(
                r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,40]}}"#,
                &d,
            ),
            with_header(
                r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#,
                &d,
            ),
            with_header(
                r#"{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
                &d,
            ),
            with_header(
                r#"{"w":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}}"#,
                &d,
            ),
            with_header(
                r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0]}}"#,
                &d,
            ),
            with_header(
                r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}}"#,
                &d,
            ),
            with_header(r#"{"w":{"shape":[1],"data_offsets":[0,4]}}"#, &d),
            with_header(
                r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,4]}}"#,
                &d,
            ),
            with_header(
                r#"{"w":{"dtype":"F32","shape":[18446744073709551615,2],"data_offsets":[0,4]}}"#,
                &d,
            ),
            with_header(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                &d,
            ),
            with_header(
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                &d,
            ),
        ];
        for (i, c) in cases.iter().enumerate() {
            let r = parse(c);
            assert!(
                matches!(
                    r,
                    Err(TowerError::Safetensors { .. }) | Err(TowerError::TooLarge { .. })
                ),
                "case {i}: {r:?}"
            );
        }
    }

    #[test]
    fn truncated_everywhere() {
        let b = write_f32(&[("a", &[2, 3], &[1., 2., 3., 4., 5., 6.])]);
        for cut in 0..b.len() {
            assert!(parse(&b[..cut]).is_err(), "cut {cut}");
        }
    }
}
