//! Memory-mapped safetensors checkpoints, single-file or sharded with
//! `model.safetensors.index.json`, with shape-checked loading.

use super::ModelError;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

pub(crate) struct SafetensorsStore {
    dir: PathBuf,
    files: MmapedSafetensors,
}

impl SafetensorsStore {
    /// Opens `model.safetensors` or every shard named in the index.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let index = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if index.is_file() {
            let json = super::read_json(&index)?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::config(&index, "no `weight_map` object"))?;
            let mut shards: Vec<String> = map
                .values()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            shards.sort();
            shards.dedup();
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        for p in &paths {
            if !p.is_file() {
                return Err(ModelError::Layout {
                    dir: dir.display().to_string(),
                    reason: format!("missing weight file {}", p.display()),
                });
            }
        }
        // SAFETY: read-only mapping of files treated as immutable.
        let files = unsafe { MmapedSafetensors::multi(&paths) }
            .map_err(|e| ModelError::corrupt(dir, format!("cannot read safetensors: {e}")))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
        })
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.files.get(name).is_ok()
    }

    pub(crate) fn names(&self) -> Vec<String> {
        self.files.tensors().into_iter().map(|(n, _)| n).collect()
    }

    pub(crate) fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.files.get(name).ok().map(|v| v.shape().to_vec())
    }

    /// Loads `name`, checking its shape when `expected` is given.
    pub fn tensor(
        &self,
        name: &str,
        expected: Option<&[usize]>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, ModelError> {
        let view = self
            .files
            .get(name)
            .map_err(|_| ModelError::MissingTensor {
                file: self.dir.display().to_string(),
                name: name.to_string(),
            })?;
        if let Some(exp) = expected {
            if view.shape() != exp {
                return Err(ModelError::Shape {
                    file: self.dir.display().to_string(),
                    name: name.to_string(),
                    expected: exp.to_vec(),
                    found: view.shape().to_vec(),
                });
            }
        }
        let t = self.files.load(name, &Device::Cpu)?;
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }
}
