//! Reader for CTranslate2's `model.bin` (binary versions 4–6, the ones every
//! current converter writes). The file is memory-mapped; variables are
//! indexed by name and turned into candle tensors on request.
//!
//! Layout: u32 binary version, string spec name, u32 spec revision, u32
//! variable count, then per variable: string name, u8 rank, rank × u32 dims,
//! u8 dtype, u32 byte count, raw little-endian bytes; then u32 alias count and
//! (alias, target) string pairs. Strings are u16 length + bytes incl. NUL.

use super::ModelError;
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// CTranslate2's `DataType` enum values as stored in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ct2DType {
    F32,
    I8,
    I16,
    I32,
    F16,
    BF16,
}

impl Ct2DType {
    fn from_id(id: u8) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::I8,
            2 => Self::I16,
            3 => Self::I32,
            4 => Self::F16,
            5 => Self::BF16,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            Self::I8 => 1,
            Self::I16 | Self::F16 | Self::BF16 => 2,
            Self::F32 | Self::I32 => 4,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Ct2Variable {
    pub shape: Vec<usize>,
    pub dtype: Ct2DType,
    offset: usize,
    len: usize,
}

pub struct Ct2Model {
    path: PathBuf,
    pub spec: String,
    pub binary_version: u32,
    variables: HashMap<String, Ct2Variable>,
    mmap: Mmap,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ModelError> {
        if self.pos + n > self.bytes.len() {
            return Err(ModelError::corrupt(
                self.path,
                format!(
                    "file ends at byte {} while reading {what} ({n} bytes at offset {})",
                    self.bytes.len(),
                    self.pos
                ),
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8, ModelError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, ModelError> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap()))
    }
    fn u32(&mut self, what: &str) -> Result<u32, ModelError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn string(&mut self, what: &str) -> Result<String, ModelError> {
        let n = self.u16(what)? as usize;
        let raw = self.take(n, what)?;
        let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
        String::from_utf8(raw.to_vec())
            .map_err(|_| ModelError::corrupt(self.path, format!("{what} is not UTF-8")))
    }
}

impl Ct2Model {
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the file is opened read-only and treated as immutable; a
        // concurrent writer would be a user error as with any mmap loader.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let mut cur = Cursor {
            bytes: &mmap,
            pos: 0,
            path,
        };
        let binary_version = cur.u32("binary version")?;
        if !(4..=6).contains(&binary_version) {
            return Err(ModelError::corrupt(
                path,
                format!(
                    "CTranslate2 binary version {binary_version} is not supported (expected 4, 5 or 6); \
                     is this a CTranslate2 model.bin?"
                ),
            ));
        }
        let spec = cur.string("spec name")?;
        let _revision = cur.u32("spec revision")?;
        let count = cur.u32("variable count")? as usize;
        let mut variables = HashMap::with_capacity(count);
        for i in 0..count {
            let what = format!("variable #{i}");
            let name = cur.string(&what)?;
            let rank = cur.u8(&name)? as usize;
            let mut shape = Vec::with_capacity(rank);
            for _ in 0..rank {
                shape.push(cur.u32(&name)? as usize);
            }
            let type_id = cur.u8(&name)?;
            let dtype = Ct2DType::from_id(type_id).ok_or_else(|| {
                ModelError::corrupt(
                    path,
                    format!("variable {name}: unknown data type id {type_id}"),
                )
            })?;
            let len = cur.u32(&name)? as usize;
            let expected = shape.iter().product::<usize>() * dtype.size();
            if len != expected {
                return Err(ModelError::corrupt(
                    path,
                    format!("variable {name}: {len} bytes stored, shape {shape:?} of {dtype:?} needs {expected}"),
                ));
            }
            let offset = cur.pos;
            cur.take(len, &name)?;
            variables.insert(
                name,
                Ct2Variable {
                    shape,
                    dtype,
                    offset,
                    len,
                },
            );
        }
        let aliases = cur.u32("alias count")? as usize;
        for _ in 0..aliases {
            let alias = cur.string("alias")?;
            let target = cur.string("alias target")?;
            if let Some(v) = variables.get(&target).cloned() {
                variables.insert(alias, v);
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            spec,
            binary_version,
            variables,
            mmap,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub fn variable(&self, name: &str) -> Option<&Ct2Variable> {
        self.variables.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.variables.keys().map(String::as_str)
    }

    fn bytes(&self, v: &Ct2Variable) -> &[u8] {
        &self.mmap[v.offset..v.offset + v.len]
    }

    /// The stored bytes of a variable, as in the file.
    pub fn raw_bytes(&self, name: &str) -> Option<&[u8]> {
        self.variable(name).map(|v| self.bytes(v))
    }

    /// CTranslate2's numeric id of a variable's data type.
    pub fn dtype_id(&self, name: &str) -> Option<u8> {
        self.variable(name).map(|v| match v.dtype {
            Ct2DType::F32 => 0,
            Ct2DType::I8 => 1,
            Ct2DType::I16 => 2,
            Ct2DType::I32 => 3,
            Ct2DType::F16 => 4,
            Ct2DType::BF16 => 5,
        })
    }

    /// An integer scalar such as `encoder/num_heads`.
    pub(crate) fn scalar_int(&self, name: &str) -> Result<i64, ModelError> {
        let v = self.variable(name).ok_or_else(|| self.missing(name))?;
        let b = self.bytes(v);
        Ok(match v.dtype {
            Ct2DType::I8 => b[0] as i8 as i64,
            Ct2DType::I16 => i16::from_le_bytes([b[0], b[1]]) as i64,
            Ct2DType::I32 => i32::from_le_bytes(b[..4].try_into().unwrap()) as i64,
            other => {
                return Err(ModelError::corrupt(
                    &self.path,
                    format!("variable {name}: expected an integer scalar, found {other:?}"),
                ))
            }
        })
    }

    fn missing(&self, name: &str) -> ModelError {
        ModelError::MissingTensor {
            file: self.path.display().to_string(),
            name: name.to_string(),
        }
    }

    /// Loads a float variable as a tensor of `dtype` on `device`. int8 weights
    /// are dequantised with their per-row `<name>_scale` (q / scale, as
    /// CTranslate2 quantises w * scale).
    pub fn tensor(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor, ModelError> {
        let v = self.variable(name).ok_or_else(|| self.missing(name))?;
        let bytes = self.bytes(v);
        let cpu = &Device::Cpu;
        let t = match v.dtype {
            Ct2DType::F32 => Tensor::from_raw_buffer(bytes, DType::F32, &v.shape, cpu)?,
            Ct2DType::F16 => Tensor::from_raw_buffer(bytes, DType::F16, &v.shape, cpu)?,
            Ct2DType::BF16 => Tensor::from_raw_buffer(bytes, DType::BF16, &v.shape, cpu)?,
            Ct2DType::I8 => {
                let scale_name = format!("{name}_scale");
                let scale = self.tensor(&scale_name, DType::F32, cpu)?;
                let q: Vec<f32> = bytes.iter().map(|&b| b as i8 as f32).collect();
                let q = Tensor::from_vec(q, v.shape.as_slice(), cpu)?;
                let rows = v.shape[0];
                if scale.elem_count() != rows && scale.elem_count() != 1 {
                    return Err(ModelError::corrupt(
                        &self.path,
                        format!(
                            "{scale_name}: {} scales for {rows} rows",
                            scale.elem_count()
                        ),
                    ));
                }
                let mut bshape = vec![1usize; v.shape.len()];
                bshape[0] = scale.elem_count();
                q.broadcast_div(&scale.reshape(bshape)?)?
            }
            Ct2DType::I16 | Ct2DType::I32 => {
                return Err(ModelError::corrupt(
                    &self.path,
                    format!("variable {name}: {:?} weights are not supported", v.dtype),
                ))
            }
        };
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }
}
