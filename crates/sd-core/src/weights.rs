//! Strict safetensors loading with diffusers key names.
//!
//! The file is parsed and checked here (header, offsets, dtypes, every key and shape) before
//! burn-store applies it, so that a bad file comes back as one [`CoreError`] listing every
//! problem instead of a panic deep inside a backend. burn-store's [`PyTorchToBurnAdapter`]
//! turns PyTorch's `[out, in]` linear weights and `weight`/`bias` norm names into Burn's.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use burn::module::{Module, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, TensorData};
use burn_store::{BurnToPyTorchAdapter, ModuleSnapshot, PyTorchToBurnAdapter, TensorSnapshot};
use safetensors::{Dtype, SafeTensors};

use crate::error::{CoreError, Result, WeightProblem};

/// How a file's keys become module paths: `None` leaves a key out (it belongs to another
/// component), `Some(path)` names the parameter it fills, in PyTorch naming
/// (`norm.weight`, not `norm.gamma`).
pub type KeyMap<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Options for [`load_safetensors`].
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// The dtype every floating-point weight is cast to (F16 and BF16 files upcast to F32).
    pub dtype: DType,
    /// Reject tensors in the file that the module has no parameter for (after the key map).
    pub reject_unexpected: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            reject_unexpected: true,
        }
    }
}

/// A tensor's entry in a safetensors file, as checked by [`SafetensorsFile::open`].
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub key: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

/// Files larger than this are read tensor by tensor as the weights are applied instead of
/// whole: loading then needs little more memory than the model itself.
const STREAM_ABOVE: u64 = 64 << 20;

/// A tensor's stored dtype, shape and byte range in a file's data section.
type Span = (Dtype, Vec<usize>, usize, usize);

/// Where a file's tensor bytes are.
#[derive(Clone)]
enum Storage {
    Memory(Arc<Vec<u8>>),
    /// The open file, the offset of its data section, and each tensor's dtype, shape and
    /// byte range within it (checked when the file was opened).
    File {
        file: Arc<Mutex<std::fs::File>>,
        data_start: u64,
        spans: Arc<HashMap<String, Span>>,
    },
}

/// A safetensors file, validated: held in memory, or (when large) read tensor by tensor.
pub struct SafetensorsFile {
    path: std::path::PathBuf,
    storage: Storage,
    entries: Vec<TensorEntry>,
}

impl SafetensorsFile {
    /// Reads and validates a file: header length, JSON, offsets and supported dtypes.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let len = std::fs::metadata(path)
            .map_err(|e| CoreError::io(path, e))?
            .len();
        if len > STREAM_ABOVE {
            return Self::open_streaming(path);
        }
        let bytes = std::fs::read(path).map_err(|e| CoreError::io(path, e))?;
        Self::from_bytes(path, bytes)
    }

    /// Reads and validates only the header (length, JSON, dtypes, offsets against the file
    /// size); tensors are read from the file when asked for.
    pub fn open_streaming(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let bad = |reason: String| CoreError::Safetensors {
            path: path.clone(),
            reason,
        };
        let mut file = std::fs::File::open(&path).map_err(|e| CoreError::io(&path, e))?;
        let len = file.metadata().map_err(|e| CoreError::io(&path, e))?.len();
        let mut n = [0u8; 8];
        file.read_exact(&mut n)
            .map_err(|_| bad("shorter than its 8-byte header length".into()))?;
        let n = u64::from_le_bytes(n);
        if n > 100 << 20 || 8 + n > len {
            return Err(bad(format!(
                "header length {n} does not fit a {len}-byte file"
            )));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header)
            .map_err(|e| bad(format!("header: {e}")))?;
        let metadata: safetensors::tensor::Metadata =
            serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
        let data_len = (len - 8 - n) as usize;
        let mut infos: Vec<(String, &safetensors::tensor::TensorInfo)> =
            metadata.tensors().into_iter().collect();
        infos.sort_by_key(|(_, info)| info.data_offsets);
        let mut spans = HashMap::new();
        let mut entries = Vec::new();
        let mut end = 0;
        for (key, info) in infos {
            let (s, e) = info.data_offsets;
            let bytes = info.shape.iter().product::<usize>() * info.dtype.bitsize() / 8;
            if s != end || e < s || e - s != bytes || e > data_len {
                return Err(bad(format!(
                    "tensor `{key}`: byte range {s}..{e} does not fit (shape {:?}, {} data bytes)",
                    info.shape, data_len
                )));
            }
            end = e;
            let dtype = float_dtype(info.dtype).ok_or_else(|| CoreError::UnsupportedDtype {
                path: path.clone(),
                key: key.clone(),
                dtype: format!("{:?}", info.dtype),
            })?;
            entries.push(TensorEntry {
                key: key.clone(),
                dtype,
                shape: info.shape.clone(),
            });
            spans.insert(key, (info.dtype, info.shape.clone(), s, e));
        }
        if end != data_len {
            return Err(bad(format!(
                "the tensors cover {end} of the {data_len} data bytes"
            )));
        }
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(Self {
            path,
            storage: Storage::File {
                file: Arc::new(Mutex::new(file)),
                data_start: 8 + n,
                spans: Arc::new(spans),
            },
            entries,
        })
    }

    /// Validates bytes already in memory; `path` only names them in errors.
    pub fn from_bytes(path: impl AsRef<Path>, bytes: Vec<u8>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let entries = {
            let parsed = SafeTensors::deserialize(&bytes).map_err(|e| CoreError::Safetensors {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            let mut entries = Vec::new();
            for (key, view) in parsed.tensors() {
                let dtype =
                    float_dtype(view.dtype()).ok_or_else(|| CoreError::UnsupportedDtype {
                        path: path.clone(),
                        key: key.clone(),
                        dtype: format!("{:?}", view.dtype()),
                    })?;
                entries.push(TensorEntry {
                    key,
                    dtype,
                    shape: view.shape().to_vec(),
                });
            }
            entries.sort_by(|a, b| a.key.cmp(&b.key));
            entries
        };
        Ok(Self {
            path,
            storage: Storage::Memory(Arc::new(bytes)),
            entries,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor in the file, sorted by key.
    pub fn entries(&self) -> &[TensorEntry] {
        &self.entries
    }

    /// Reads one tensor, cast to `dtype`.
    pub fn tensor_data(&self, key: &str, dtype: DType) -> Result<TensorData> {
        read_tensor(&self.storage, key, dtype).map_err(|reason| CoreError::Safetensors {
            path: self.path.clone(),
            reason,
        })
    }
}

fn float_dtype(dtype: Dtype) -> Option<DType> {
    match dtype {
        Dtype::F64 => Some(DType::F64),
        Dtype::F32 => Some(DType::F32),
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

fn read_tensor(
    storage: &Storage,
    key: &str,
    dtype: DType,
) -> std::result::Result<TensorData, String> {
    let (raw, shape, stored) = match storage {
        Storage::Memory(bytes) => {
            let parsed = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
            let view = parsed.tensor(key).map_err(|e| e.to_string())?;
            (view.data().to_vec(), view.shape().to_vec(), view.dtype())
        }
        Storage::File {
            file,
            data_start,
            spans,
        } => {
            let (stored, shape, s, e) = spans
                .get(key)
                .ok_or_else(|| format!("no tensor `{key}`"))?
                .clone();
            let mut raw = vec![0u8; e - s];
            let mut file = file
                .lock()
                .map_err(|_| "the file lock is poisoned".to_string())?;
            file.seek(SeekFrom::Start(data_start + s as u64))
                .and_then(|_| file.read_exact(&mut raw))
                .map_err(|e| format!("reading `{key}`: {e}"))?;
            (raw, shape, stored)
        }
    };
    let source = float_dtype(stored).ok_or_else(|| format!("`{key}` is not a float tensor"))?;
    let data = TensorData::from_bytes_vec(raw, shape, source);
    Ok(if source == dtype {
        data
    } else {
        data.convert_dtype(dtype)
    })
}

/// `found` is `expected` with trailing unit dimensions (`[o, i, 1, 1]` for `[o, i]`).
fn squeezes_to(found: &[usize], expected: &[usize]) -> bool {
    found.len() > expected.len()
        && found[..expected.len()] == *expected
        && found[expected.len()..].iter().all(|d| *d == 1)
}

/// Loads `file` into `module`, strictly: every parameter of the module must be in the file with
/// its shape, and (with [`LoadOptions::reject_unexpected`]) every mapped key of the file must
/// name a parameter. All problems come back together in one [`CoreError::Weights`].
pub fn load_safetensors<B: Backend, M: Module<B>>(
    mut module: M,
    file: &SafetensorsFile,
    key_map: KeyMap<'_>,
    options: LoadOptions,
) -> Result<M> {
    // What the module expects, in PyTorch naming and layout.
    let expected: BTreeMap<String, Vec<usize>> = module
        .collect(None, Some(Box::new(BurnToPyTorchAdapter)), false)
        .into_iter()
        .map(|s| (s.full_path(), s.shape.to_vec()))
        .collect();

    let mut problems = Vec::new();
    let mut snapshots = Vec::new();
    let mut present = BTreeSet::new();
    for entry in &file.entries {
        let Some(path) = key_map(&entry.key) else {
            continue;
        };
        if expected.contains_key(&path) {
            present.insert(path.clone());
        }
        // A 1×1 convolution's [out, in, 1, 1] weight loads into a linear layer's [out, in]:
        // on tokens the two are the same map (SD 1.x's transformer projections, the
        // original-layout VAE attention).
        let shape = match expected.get(&path) {
            Some(e) if squeezes_to(&entry.shape, e) => e.clone(),
            _ => entry.shape.clone(),
        };
        match expected.get(&path) {
            None => {
                if options.reject_unexpected {
                    problems.push(WeightProblem::Unexpected {
                        key: entry.key.clone(),
                        found: entry.shape.clone(),
                    });
                }
            }
            Some(expected_shape) if *expected_shape != shape => {
                problems.push(WeightProblem::ShapeMismatch {
                    key: entry.key.clone(),
                    expected: expected_shape.clone(),
                    found: entry.shape.clone(),
                })
            }
            Some(_) => {
                let bytes = file.storage.clone();
                let key = entry.key.clone();
                let dtype = options.dtype;
                let target_shape = shape.clone();
                let data_fn = Rc::new(move || {
                    let mut data = read_tensor(&bytes, &key, dtype)
                        .map_err(burn_store::TensorSnapshotError::DataError)?;
                    data.shape = target_shape.clone().into();
                    Ok(data)
                });
                snapshots.push(TensorSnapshot::from_closure(
                    data_fn,
                    options.dtype,
                    shape.clone().into(),
                    path.split('.').map(str::to_string).collect(),
                    Vec::new(),
                    ParamId::new(),
                ));
            }
        }
    }
    for (path, shape) in &expected {
        if !present.contains(path) {
            problems.push(WeightProblem::Missing {
                key: path.clone(),
                expected: shape.clone(),
            });
        }
    }
    if !problems.is_empty() {
        return Err(CoreError::Weights {
            path: file.path.clone(),
            problems,
        });
    }

    let result = module.apply(snapshots, None, Some(Box::new(PyTorchToBurnAdapter)), false);
    // Everything was checked above; anything burn-store still reports is a mapping bug, and is
    // returned as an error rather than leaving a parameter at its random initial value.
    let mut problems: Vec<WeightProblem> = result
        .errors
        .iter()
        .map(|e| WeightProblem::Other {
            key: String::new(),
            message: e.to_string(),
        })
        .collect();
    problems.extend(result.missing.iter().map(|(path, _)| WeightProblem::Other {
        key: path.clone(),
        message: "not applied by burn-store".into(),
    }));
    if problems.is_empty() {
        Ok(module)
    } else {
        Err(CoreError::Weights {
            path: file.path.clone(),
            problems,
        })
    }
}

/// The weights file of a diffusers component folder (`vae/`, `unet/`, ...):
/// `diffusion_pytorch_model.safetensors`, or `diffusion_pytorch_model.{variant}.safetensors`
/// when a variant such as `fp16` is asked for.
pub fn diffusers_weights_path(
    dir: impl AsRef<Path>,
    variant: Option<&str>,
) -> Result<std::path::PathBuf> {
    let dir = dir.as_ref();
    let name = match variant {
        Some(v) => format!("diffusion_pytorch_model.{v}.safetensors"),
        None => "diffusion_pytorch_model.safetensors".to_string(),
    };
    let path = dir.join(&name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(CoreError::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no {name} in this folder"),
            ),
        ))
    }
}

/// A key map that keeps the keys under any of `prefixes` unchanged and leaves the rest out:
/// how one component takes its part of a shared file (the encoder's half of a VAE file).
pub fn keep_prefixes<'a>(prefixes: &'a [&'a str]) -> impl Fn(&str) -> Option<String> + 'a {
    move |key| {
        prefixes
            .iter()
            .any(|p| key.starts_with(p))
            .then(|| key.to_string())
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use burn::module::Module;
    use burn::nn::{GroupNorm, GroupNormConfig, Linear, LinearConfig};
    use burn::tensor::Tensor;
    use safetensors::tensor::TensorView;

    use super::*;
    use crate::backend::Flex;

    #[derive(Module, Debug)]
    struct Tiny<B: Backend> {
        proj: Linear<B>,
        norm: GroupNorm<B>,
    }

    fn tiny() -> Tiny<Flex> {
        let device = Default::default();
        Tiny {
            proj: LinearConfig::new(3, 2).init(&device),
            norm: GroupNormConfig::new(1, 2).init(&device),
        }
    }

    /// A safetensors file in memory whose tensors are `values` in `dtype`.
    fn file(dtype: Dtype, tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> SafetensorsFile {
        let bytes: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, _, values)| match dtype {
                Dtype::BF16 => values
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                    .collect(),
                Dtype::F16 => values
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect(),
                _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            })
            .collect();
        let views: Vec<(&str, TensorView<'_>)> = tensors
            .iter()
            .zip(&bytes)
            .map(|((k, shape, _), b)| (*k, TensorView::new(dtype, shape.clone(), b).unwrap()))
            .collect();
        let data = safetensors::serialize(views, None).unwrap();
        SafetensorsFile::from_bytes("memory.safetensors", data).unwrap()
    }

    fn values<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().unwrap()
    }

    fn tiny_tensors() -> Vec<(&'static str, Vec<usize>, Vec<f32>)> {
        vec![
            // PyTorch's [out, in] layout.
            (
                "proj.weight",
                vec![2, 3],
                vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            ),
            ("proj.bias", vec![2], vec![0.5, -0.5]),
            ("norm.weight", vec![2], vec![2.0, 3.0]),
            ("norm.bias", vec![2], vec![-1.0, 1.0]),
        ]
    }

    #[test]
    fn bf16_and_f16_files_load_as_f32_with_torch_layout_converted() {
        for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32] {
            let file = file(dtype, &tiny_tensors());
            let model = load_safetensors(
                tiny(),
                &file,
                &|k| Some(k.to_string()),
                LoadOptions::default(),
            )
            .unwrap();
            let weight = model.proj.weight.val();
            assert_eq!(weight.dtype(), DType::F32);
            // Burn keeps linear weights as [in, out]: the transpose of PyTorch's.
            assert_eq!(weight.dims(), [3, 2]);
            assert_eq!(values(weight), vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
            assert_eq!(values(model.norm.gamma.unwrap().val()), vec![2.0, 3.0]);
            assert_eq!(values(model.norm.beta.unwrap().val()), vec![-1.0, 1.0]);
        }
    }

    #[test]
    fn key_maps_select_and_rename() {
        let mut tensors = tiny_tensors();
        tensors.push(("other.weight", vec![1], vec![0.0]));
        let renamed: Vec<(String, Vec<usize>, Vec<f32>)> = tensors
            .iter()
            .map(|(k, s, v)| (format!("model.{k}"), s.clone(), v.clone()))
            .collect();
        let named: Vec<(&str, Vec<usize>, Vec<f32>)> = renamed
            .iter()
            .map(|(k, s, v)| (k.as_str(), s.clone(), v.clone()))
            .collect();
        let file = file(Dtype::F32, &named);
        let strip = |k: &str| {
            k.strip_prefix("model.")
                .filter(|k| !k.starts_with("other."))
                .map(str::to_string)
        };
        load_safetensors(tiny(), &file, &strip, LoadOptions::default()).unwrap();
        // Without the filter, `other.weight` is unexpected unless the options allow it.
        let all = |k: &str| k.strip_prefix("model.").map(str::to_string);
        let err = load_safetensors(tiny(), &file, &all, LoadOptions::default()).unwrap_err();
        assert!(
            err.to_string()
                .contains("unexpected key `model.other.weight`"),
            "{err}"
        );
        let lenient = LoadOptions {
            reject_unexpected: false,
            ..LoadOptions::default()
        };
        load_safetensors(tiny(), &file, &all, lenient).unwrap();
    }
}
