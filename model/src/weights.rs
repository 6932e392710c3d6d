//! Memory-mapped safetensors checkpoints, single-file or sharded.
//!
//! Only the tensors a caller asks for are read (an expert node loads just its
//! own experts). Headers are validated by the safetensors crate, so a
//! truncated or corrupt file is an error naming the file, never a panic.

use crate::error::{ModelError, Result};
use crate::kernels::fp8::Fp8Matrix;
use crate::kernels::quant::QuantFormat;
use crate::options::{QuantTarget, WeightArgs};
use crate::tensor::{Matrix, Storage};
use memmap2::Mmap;
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, Metadata};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Offset of the data section (8-byte length + header).
    data_start: usize,
    meta: Metadata,
}

/// A checkpoint's tensors, addressed by name.
pub struct WeightStore {
    shards: Vec<Shard>,
    by_name: HashMap<String, usize>,
    fp8_block: Option<(usize, usize)>,
    opts: WeightArgs,
}

impl WeightStore {
    /// Opens `model.safetensors`, or the shards listed in
    /// `model.safetensors.index.json`.
    pub fn open(dir: &Path, fp8_block: Option<(usize, usize)>) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::Weights(format!("{}: {e}", index.display())))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::Weights(format!("{}: missing `weight_map`", index.display())))?;
            let mut names: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut shards = Vec::with_capacity(files.len());
        let mut by_name = HashMap::new();
        for path in files {
            let file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
            // SAFETY: the checkpoint is treated as read-only; a concurrent
            // writer would be a deployment error, as with every mmap loader.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
            let (header_len, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
                ModelError::Weights(format!("{}: corrupt or truncated safetensors file: {e}", path.display()))
            })?;
            let idx = shards.len();
            for name in meta.tensors().keys() {
                by_name.insert(name.clone(), idx);
            }
            shards.push(Shard { path, mmap, data_start: 8 + header_len, meta });
        }
        Ok(WeightStore { shards, by_name, fp8_block, opts: WeightArgs::default() })
    }

    /// The checkpoint in `dir` for the model `cfg` describes, its matrices
    /// loaded as `opts` says (a [`Precision`](crate::tensor::Precision)
    /// alone means unquantized).
    pub fn for_model(dir: &Path, cfg: &crate::config::ModelConfig, opts: impl Into<WeightArgs>) -> Result<Self> {
        let mut ws = Self::open(dir, cfg.fp8_block)?;
        ws.opts = opts.into();
        tracing::info!(
            precision = ?ws.opts.precision,
            bf16_weights_activations = ?ws.opts.precision.resolve(),
            "activation precision for bf16 weights"
        );
        Ok(ws)
    }

    /// `(format, group)` for weights of kind `target` under `--quantize`.
    pub fn quant_for(&self, target: QuantTarget) -> Option<(QuantFormat, usize)> {
        self.opts.quant_for(target)
    }

    /// The stored dtype of a tensor, lower-case (`"bf16"`, `"f32"`, …).
    pub fn dtype_name(&self, name: &str) -> Option<String> {
        let shard = &self.shards[*self.by_name.get(name)?];
        Some(format!("{:?}", shard.meta.info(name)?.dtype).to_lowercase())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    fn raw(&self, name: &str) -> Result<(Dtype, &[usize], &[u8])> {
        let idx = *self.by_name.get(name).ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        let shard = &self.shards[idx];
        let info = shard.meta.info(name).ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        let (a, b) = info.data_offsets;
        let bytes = shard.mmap.get(shard.data_start + a..shard.data_start + b).ok_or_else(|| {
            ModelError::Weights(format!("{}: tensor {name} lies past the end of the file", shard.path.display()))
        })?;
        Ok((info.dtype, &info.shape, bytes))
    }

    /// A `[rows, cols]` matrix. bf16 stays bf16, FP8 stays bytes with its
    /// `<name>_scale_inv` block scales (`kernels::fp8`); F32 and F16 become
    /// f32.
    /// With `--load-bf16`, f32 and F16 matrices are rounded to bf16.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        self.matrix_as(name, rows, cols, self.opts.load_bf16)
    }

    /// A gate's matrix: as [`matrix`](Self::matrix), never rounded to bf16
    /// (routing is computed in f32 from the stored weights).
    pub fn gate_matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        self.matrix_as(name, rows, cols, false)
    }

    fn matrix_as(&self, name: &str, rows: usize, cols: usize, to_bf16: bool) -> Result<Matrix> {
        let (dtype, shape, bytes) = self.raw(name)?;
        check_shape(name, shape, &[rows, cols])?;
        let storage = match dtype {
            Dtype::BF16 => Storage::Bf16(bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()),
            Dtype::F8_E4M3 => self.fp8(name, rows, cols, bytes)?,
            _ if to_bf16 => {
                Storage::Bf16(to_f32(name, dtype, bytes)?.into_iter().map(crate::tensor::f32_to_bf16).collect())
            }
            _ => Storage::F32(to_f32(name, dtype, bytes)?),
        };
        self.release(name);
        if dtype == Dtype::F8_E4M3 {
            self.release(&format!("{name}_scale_inv"));
        }
        let mut m = Matrix::new(rows, cols, storage);
        m.set_precision(self.opts.precision.resolve());
        Ok(m)
    }

    /// Drops this process's mapping of a tensor's pages once it has been
    /// copied out (every load copies: weights end up packed or widened), so
    /// that resident memory holds the loaded copy only, not the file beside
    /// it. The pages stay in the page cache; a later read faults them back.
    /// Pages shared with a neighbouring tensor are kept (the range is
    /// rounded inward to whole pages).
    fn release(&self, name: &str) {
        let Some(&idx) = self.by_name.get(name) else { return };
        let shard = &self.shards[idx];
        let Some(info) = shard.meta.info(name) else { return };
        let page = page_size();
        let start = (shard.data_start + info.data_offsets.0).next_multiple_of(page);
        let end = (shard.data_start + info.data_offsets.1).min(shard.mmap.len()) / page * page;
        if end <= start {
            return;
        }
        // SAFETY: the mapping is a read-only shared file mapping and nothing
        // keeps a reference into this range (loads copy out of it); after
        // MADV_DONTNEED a read refaults the same bytes from the file.
        if let Err(e) =
            unsafe { shard.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) }
        {
            tracing::debug!(tensor = name, error = %e, "releasing a loaded tensor's pages");
        }
    }

    /// A 1-D tensor (norm weights, biases) as f32.
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let (dtype, shape, bytes) = self.raw(name)?;
        check_shape(name, shape, &[len])?;
        let v = to_f32(name, dtype, bytes)?;
        self.release(name);
        Ok(v)
    }

    /// The tensor if present (optional biases), else `None`.
    pub fn opt_vector(&self, name: &str, len: usize) -> Result<Option<Vec<f32>>> {
        if self.contains(name) { self.vector(name, len).map(Some) } else { Ok(None) }
    }

    /// An FP8 matrix kept as bytes with its block scales, or widened to f32
    /// when its blocks are not whole 16-row blocks (`kernels::fp8`).
    fn fp8(&self, name: &str, rows: usize, cols: usize, bytes: &[u8]) -> Result<Storage> {
        let (br, bc) = self.fp8_block.ok_or_else(|| {
            ModelError::Weights(format!("tensor {name} is float8_e4m3fn but config.json has no quantization_config"))
        })?;
        let scale_name = format!("{name}_scale_inv");
        let (sr, sc) = (rows.div_ceil(br), cols.div_ceil(bc));
        let (sd, sshape, sbytes) = self.raw(&scale_name)?;
        check_shape(&scale_name, sshape, &[sr, sc])?;
        let scales = to_f32(&scale_name, sd, sbytes)?;
        Ok(match Fp8Matrix::from_checkpoint(bytes, &scales, rows, cols, (br, bc)) {
            Some(f) => Storage::Fp8(f),
            None => Storage::F32(dequant_fp8(bytes, &scales, rows, cols, (br, bc))),
        })
    }
}

/// FP8 bytes times their block scales, as f32.
fn dequant_fp8(bytes: &[u8], scales: &[f32], rows: usize, cols: usize, (br, bc): (usize, usize)) -> Vec<f32> {
    let (sc, lut) = (cols.div_ceil(bc), fp8_e4m3_table());
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            out.push(lut[bytes[r * cols + c] as usize] * scales[(r / br) * sc + c / bc]);
        }
    }
    out
}

/// The system's page size (4 KiB where it cannot be read).
fn page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *PAGE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    })
}

fn check_shape(name: &str, found: &[usize], expected: &[usize]) -> Result<()> {
    if found != expected {
        return Err(ModelError::Shape { name: name.to_string(), expected: expected.to_vec(), found: found.to_vec() });
    }
    Ok(())
}

fn to_f32(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::BF16 => {
            bytes.chunks_exact(2).map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect()
        }
        Dtype::F16 => {
            bytes.chunks_exact(2).map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect()
        }
        other => {
            return Err(ModelError::Weights(format!(
                "tensor {name} has dtype {other:?}; supported: F32, BF16, F16 (and F8_E4M3 for weight matrices)"
            )));
        }
    })
}

/// Decodes one float8_e4m3fn value (checkpoint weights and the wire codec
/// share this table).
#[inline]
pub fn fp8_e4m3_to_f32(b: u8) -> f32 {
    fp8_e4m3_table()[b as usize]
}

/// float8_e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no
/// infinities, S.1111.111 is NaN.
fn fp8_e4m3_table() -> &'static [f32; 256] {
    static TABLE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [0f32; 256];
        for (i, v) in t.iter_mut().enumerate() {
            let sign = if i & 0x80 != 0 { -1.0 } else { 1.0 };
            let exp = ((i >> 3) & 0xf) as i32;
            let man = (i & 7) as f32;
            *v = if exp == 0xf && (i & 7) == 7 {
                f32::NAN
            } else if exp == 0 {
                sign * man / 8.0 * 2f32.powi(-6)
            } else {
                sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
            };
        }
        t
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_table_known_values() {
        let t = fp8_e4m3_table();
        assert_eq!(t[0x00], 0.0);
        assert_eq!(t[0x38], 1.0);
        assert_eq!(t[0x7e], 448.0);
        assert_eq!(t[0xfe], -448.0);
        assert_eq!(t[0x01], 2f32.powi(-9));
        assert!(t[0x7f].is_nan());
    }

    #[test]
    fn truncated_file_is_an_error() {
        let dir = std::env::temp_dir().join(format!("em-trunc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data: Vec<u8> = (0..64u8).collect();
        let view = safetensors::tensor::TensorView::new(Dtype::F32, vec![4, 4], &data).unwrap();
        let bytes = safetensors::serialize([("w", view)], None).unwrap();
        std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() - 10]).unwrap();
        let err = WeightStore::open(&dir, None).err().expect("must fail");
        assert!(err.to_string().contains("truncated"), "{err}");
        std::fs::write(dir.join("model.safetensors"), &bytes).unwrap();
        let ws = WeightStore::open(&dir, None).unwrap();
        let err = ws.matrix("w", 2, 8).unwrap_err();
        assert!(err.to_string().contains("[2, 8]") && err.to_string().contains("[4, 4]"), "{err}");
        assert!(ws.matrix("missing", 1, 1).unwrap_err().to_string().contains("missing"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
