//! Strict safetensors loading with diffusers key names.
//!
//! The file is parsed and checked here (header, offsets, dtypes, every key and shape) before
//! burn-store applies it, so that a bad file comes back as one [`CoreError`] listing every
//! problem instead of a panic deep inside a backend. Every tensor is then read, cast and (for
//! PyTorch's `[out, in]` linear weights) transposed in one pass, in parallel ([`values`]), and
//! burn-store puts the values into the parameters, renaming the norms' `weight`/`bias` to
//! Burn's `gamma`/`beta`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use burn::module::{Module, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, TensorData};
pub use burn_store::TensorSnapshot;
use burn_store::{BurnToPyTorchAdapter, ModuleSnapshot, PyTorchToBurnAdapter};
use rayon::prelude::*;
use safetensors::Dtype;

use crate::error::{CoreError, Result, WeightProblem};

mod values;

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
    /// Refuse a tensor holding NaN or ±∞ (after the cast to [`LoadOptions::dtype`], so a value
    /// that overflows f16 is caught too). One pass over bytes already in memory: cheap next to
    /// reading them, and the only way to tell a damaged file from a black image.
    pub check_finite: bool,
    /// The dtype the matrices (`Linear` and `Conv2d` weights, nearly all of a model's bytes)
    /// are held in instead of [`LoadOptions::dtype`]: f16 or bf16 weights under f32 arithmetic,
    /// half the memory, each layer's CPU kernel widening the weights it multiplies (the
    /// layers' entry points in [`crate::layers`] cast them on any other path). `None`, or a
    /// dtype the backend cannot hold (NdArray's f16): every weight in `dtype`.
    pub matrix_dtype: Option<DType>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            reject_unexpected: true,
            check_finite: true,
            matrix_dtype: None,
        }
    }
}

/// A tensor's entry in a safetensors file, as checked by [`SafetensorsFile::open`].
#[derive(Debug, Clone)]
pub struct TensorEntry {
    /// The key, as stored.
    pub key: String,
    /// The stored dtype: a float one for weights, an integer one for buffers such as
    /// `position_ids` that checkpoints carry beside them.
    pub dtype: DType,
    /// The stored shape.
    pub shape: Vec<usize>,
}

impl TensorEntry {
    /// Whether the tensor holds floating-point values (the only kind a weight can be).
    pub fn is_float(&self) -> bool {
        self.dtype.is_float()
    }
}

/// Integer buffers that checkpoints carry next to the weights and no model here reads:
/// transformers' CLIP `embeddings.position_ids` (I64 in the original SD 1.x files, e.g.
/// `v1-5-pruned-emaonly.safetensors`) and BatchNorm's `num_batches_tracked`. They are skipped
/// by name wherever they appear; any other integer tensor a model needs is an error.
pub fn is_unused_buffer(key: &str) -> bool {
    key.ends_with("position_ids") || key.ends_with("num_batches_tracked")
}

/// Files larger than this are read tensor by tensor as the weights are applied instead of
/// whole: loading then needs little more memory than the model itself.
const STREAM_ABOVE: u64 = 64 << 20;

/// A tensor's stored dtype, shape and byte range in a file's data section.
type Span = (Dtype, Vec<usize>, usize, usize);

/// Where a file's tensor bytes come from.
enum Bytes {
    /// The whole file, in memory.
    Memory(Arc<Vec<u8>>),
    /// The open file, read tensor by tensor (positioned reads, from any thread).
    File(std::fs::File),
}

/// Where a file's tensor bytes are: the source, the offset of its data section, and each
/// tensor's dtype, shape and byte range within it (checked when the file was opened).
#[derive(Clone)]
struct Storage {
    bytes: Arc<Bytes>,
    data_start: usize,
    spans: Arc<HashMap<String, Span>>,
}

/// A safetensors file, validated: held in memory, or (when large) read tensor by tensor.
pub struct SafetensorsFile {
    path: std::path::PathBuf,
    storage: Storage,
    entries: Vec<TensorEntry>,
    metadata: BTreeMap<String, String>,
}

/// The largest header accepted: real checkpoints' are well under 1 MiB.
const MAX_HEADER: u64 = 100 << 20;

/// Checks a header against the data section's length: JSON, supported dtypes, and byte ranges
/// that tile the data exactly, each the size of its shape. Every error names the tensor.
fn parse_header(path: &Path, header: &[u8], data_len: usize) -> Result<Header> {
    let bad = |reason: String| CoreError::Safetensors {
        path: path.to_path_buf(),
        reason,
    };
    // Parsed entry by entry (not as safetensors' `Metadata`, whose errors name no tensor).
    let map: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| bad(format!("header: {e}")))?;
    let mut infos = Vec::new();
    let mut metadata = BTreeMap::new();
    for (key, value) in map {
        if key == "__metadata__" {
            // String to string, as the format says; a value of another kind is kept as its
            // JSON text rather than refusing the file over a field only tools read.
            if let serde_json::Value::Object(fields) = value {
                for (k, v) in fields {
                    let v = match v {
                        serde_json::Value::String(s) => s,
                        other => other.to_string(),
                    };
                    metadata.insert(k, v);
                }
            }
            continue;
        }
        let info: safetensors::tensor::TensorInfo =
            serde_json::from_value(value).map_err(|e| bad(format!("tensor `{key}`: {e}")))?;
        infos.push((key, info));
    }
    infos.sort_by_key(|(_, info)| info.data_offsets);
    let mut spans = HashMap::new();
    let mut entries = Vec::new();
    let mut end = 0;
    for (key, info) in &infos {
        let key = key.clone();
        let (s, e) = info.data_offsets;
        // Checked: a hostile header's shape must not overflow the byte count.
        let bytes = info
            .shape
            .iter()
            .try_fold(info.dtype.bitsize(), |n, d| n.checked_mul(*d))
            .map(|bits| bits.div_ceil(8));
        if s != end || e < s || bytes != Some(e - s) || e > data_len {
            return Err(bad(format!(
                "tensor `{key}`: byte range {s}..{e} does not fit (dtype {:?}, shape {:?}, {} \
                 data bytes)",
                info.dtype, info.shape, data_len
            )));
        }
        end = e;
        let dtype = stored_dtype(info.dtype).ok_or_else(|| CoreError::UnsupportedDtype {
            path: path.to_path_buf(),
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
    Ok((entries, spans, metadata))
}

/// A parsed header: the entries, each tensor's byte span, and `__metadata__`.
type Header = (
    Vec<TensorEntry>,
    HashMap<String, Span>,
    BTreeMap<String, String>,
);

/// The header's length from the first 8 bytes, checked against the file's length.
fn header_length(path: &Path, first: [u8; 8], len: u64) -> Result<u64> {
    let n = u64::from_le_bytes(first);
    if n > MAX_HEADER || n.saturating_add(8) > len {
        return Err(CoreError::Safetensors {
            path: path.to_path_buf(),
            reason: format!("header length {n} does not fit a {len}-byte file"),
        });
    }
    Ok(n)
}

impl SafetensorsFile {
    /// Reads and validates a file: header length, JSON, offsets and supported dtypes. The path
    /// must be a regular file (a FIFO would block).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let len = crate::files::regular_file(path)?.len();
        if len > STREAM_ABOVE {
            return Self::open_streaming(path);
        }
        let bytes = crate::files::read_regular(path)?;
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
        crate::files::regular_file(&path)?;
        let mut file = std::fs::File::open(&path).map_err(|e| CoreError::io(&path, e))?;
        let len = file.metadata().map_err(|e| CoreError::io(&path, e))?.len();
        let mut first = [0u8; 8];
        file.read_exact(&mut first)
            .map_err(|_| bad("shorter than its 8-byte header length".into()))?;
        let n = header_length(&path, first, len)?;
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header)
            .map_err(|e| bad(format!("header: {e}")))?;
        let (entries, spans, metadata) = parse_header(&path, &header, (len - 8 - n) as usize)?;
        Ok(Self {
            path,
            storage: Storage {
                bytes: Arc::new(Bytes::File(file)),
                data_start: 8 + n as usize,
                spans: Arc::new(spans),
            },
            entries,
            metadata,
        })
    }

    /// A PyTorch checkpoint (`torch.save`'s zip format or the legacy one), read by burn-store's
    /// parser, which runs no pickled code, its float tensors re-encoded in memory as f32
    /// safetensors so that they go through the same strict loading as a `.safetensors` file.
    /// Nested dicts become dotted keys (`params_ema.conv_first.weight`); the unused buffers of
    /// [`is_unused_buffer`] are left out.
    pub fn from_pytorch(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let fail = |reason: String| CoreError::Config {
            path: path.to_path_buf(),
            reason,
        };
        crate::files::regular_file(path)?;
        let reader = burn_store::pytorch::PytorchReader::new(path)
            .map_err(|e| fail(format!("not a readable PyTorch checkpoint ({e})")))?;
        let mut tensors = Vec::new();
        let mut keys = reader.keys();
        keys.sort();
        for key in &keys {
            if is_unused_buffer(key) {
                continue;
            }
            let snapshot = reader
                .get(key)
                .ok_or_else(|| fail(format!("`{key}` is listed but cannot be read")))?;
            let data = snapshot
                .to_data()
                .map_err(|e| fail(format!("`{key}`: {e:?}")))?
                .convert::<f32>();
            let values = data
                .to_vec::<f32>()
                .map_err(|e| fail(format!("`{key}`: {e:?}")))?;
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            tensors.push((key.clone(), data.shape.to_vec(), bytes));
        }
        let views = tensors
            .iter()
            .map(|(key, shape, bytes)| {
                safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes)
                    .map(|view| (key.clone(), view))
                    .map_err(|e| fail(format!("`{key}`: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let bytes = safetensors::serialize(views, None).map_err(|e| fail(e.to_string()))?;
        Self::from_bytes(path, bytes)
    }

    /// Opens a `.safetensors` file, or any other as a PyTorch checkpoint ([`Self::from_pytorch`]).
    pub fn open_any(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let is_safetensors = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
        if is_safetensors {
            Self::open(path)
        } else {
            Self::from_pytorch(path)
        }
    }

    /// Validates bytes already in memory; `path` only names them in errors.
    pub fn from_bytes(path: impl AsRef<Path>, bytes: Vec<u8>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let len = bytes.len() as u64;
        let first: [u8; 8] = bytes
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| CoreError::Safetensors {
                path: path.clone(),
                reason: "shorter than its 8-byte header length".into(),
            })?;
        let n = header_length(&path, first, len)? as usize;
        let (entries, spans, metadata) =
            parse_header(&path, &bytes[8..8 + n], bytes.len() - 8 - n)?;
        Ok(Self {
            path,
            storage: Storage {
                bytes: Arc::new(Bytes::Memory(Arc::new(bytes))),
                data_start: 8 + n,
                spans: Arc::new(spans),
            },
            entries,
            metadata,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The header's `__metadata__` (string to string; empty when the file has none).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
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

/// The stored dtype as Burn names it: the floats weights come in, and the integer and boolean
/// dtypes of the buffers files carry beside them (accepted when the file is opened, refused
/// only if a model asks for such a tensor).
fn stored_dtype(dtype: Dtype) -> Option<DType> {
    float_dtype(dtype).or(match dtype {
        Dtype::I64 => Some(DType::I64),
        Dtype::I32 => Some(DType::I32),
        Dtype::I16 => Some(DType::I16),
        Dtype::I8 => Some(DType::I8),
        Dtype::U64 => Some(DType::U64),
        Dtype::U32 => Some(DType::U32),
        Dtype::U16 => Some(DType::U16),
        Dtype::U8 => Some(DType::U8),
        Dtype::BOOL => Some(DType::Bool(burn::tensor::BoolStore::Native)),
        _ => None,
    })
}

fn read_tensor(
    storage: &Storage,
    key: &str,
    dtype: DType,
) -> std::result::Result<TensorData, String> {
    read_tensor_as(storage, key, dtype, false).map(|(data, _)| data)
}

/// A tensor's values cast to `dtype` and how many of them are NaN or ±∞; with `transpose`, a
/// 2-D tensor comes back transposed.
fn read_tensor_as(
    storage: &Storage,
    key: &str,
    dtype: DType,
    transpose: bool,
) -> std::result::Result<(TensorData, usize), String> {
    let (stored, shape, s, _) = storage
        .spans
        .get(key)
        .ok_or_else(|| format!("no tensor `{key}`"))?;
    let source = float_dtype(*stored).ok_or_else(|| {
        format!("tensor `{key}` is stored as {stored:?}, not as floating-point values")
    })?;
    let start = storage.data_start + s;
    let bytes = match storage.bytes.as_ref() {
        Bytes::Memory(bytes) => values::Source::Memory(&bytes[start..]),
        Bytes::File(file) => values::Source::File(file, start as u64),
    };
    // A 1×1 convolution's `[out, in, 1, 1]` read into a linear layer is transposed as
    // `[out, in]`.
    let mut dims = &shape[..];
    while transpose && dims.len() > 2 && dims.last() == Some(&1) {
        dims = &dims[..dims.len() - 1];
    }
    values::read_values(bytes, source, dtype, dims, transpose)
        .map_err(|e| format!("reading `{key}`: {e}"))
}

/// Starts the message of a non-finite tensor, so that it can be found inside burn-store's
/// wrapping of it.
const NON_FINITE_MARK: &str = "non-finite: ";

/// Refuses a tensor holding `bad` NaN or ±∞ values, naming it and saying whether the file
/// holds them or the cast to a narrower dtype made them (an f32 value beyond f16's range).
fn check_finite_values(
    storage: &Storage,
    key: &str,
    data: &TensorData,
    bad: usize,
) -> std::result::Result<(), String> {
    if bad == 0 {
        return Ok(());
    }
    let total = data.num_elements();
    let stored = storage.spans.get(key).and_then(|s| float_dtype(s.0));
    let in_file = match stored {
        Some(stored) if stored != data.dtype => read_tensor_as(storage, key, stored, false)
            .map(|(_, bad)| bad > 0)
            .unwrap_or(true),
        _ => true,
    };
    Err(if in_file {
        format!(
            "{NON_FINITE_MARK}tensor `{key}` holds {bad} NaN or infinite value(s) of {total} \
             (the file is damaged; --skip-weight-check loads it anyway)"
        )
    } else {
        format!(
            "{NON_FINITE_MARK}tensor `{key}` has {bad} value(s) of {total} beyond the range of \
             {:?} (load it in f32)",
            data.dtype
        )
    })
}

/// `found` is `expected` with trailing unit dimensions (`[o, i, 1, 1]` for `[o, i]`).
fn squeezes_to(found: &[usize], expected: &[usize]) -> bool {
    found.len() > expected.len()
        && found[..expected.len()] == *expected
        && found[expected.len()..].iter().all(|d| *d == 1)
}

/// A module's parameters under PyTorch names, with PyTorch shapes, read without materialising
/// any value. burn-store's `collect` reads every parameter, which runs the random
/// initialisation of a model whose weights are about to be overwritten: 12.4 s for SD 1.5's
/// U-Net in the test profile, against milliseconds from the shapes alone.
pub fn expected_shapes<B: Backend, M: Module<B>>(module: &M) -> BTreeMap<String, Vec<usize>> {
    expected_params(module)
        .into_iter()
        .map(|(path, e)| (path, e.shape))
        .collect()
}

/// [`expected_shapes`], with whether Burn holds each parameter transposed from PyTorch's
/// layout (a linear weight: `[in, out]` against `[out, in]`, burn-store's adapter rule) and
/// whether it is a layer's matrix.
fn expected_params<B: Backend, M: Module<B>>(module: &M) -> BTreeMap<String, Expected> {
    #[derive(Default)]
    struct Shapes {
        path: Vec<String>,
        containers: Vec<String>,
        found: Vec<TensorSnapshot>,
    }
    impl Shapes {
        fn push(&mut self, shape: burn::tensor::Shape, id: ParamId) {
            // Never called: only the names and shapes are read.
            let no_values = Rc::new(|| {
                Err(burn_store::TensorSnapshotError::DataError(
                    "shape-only snapshot".into(),
                ))
            });
            self.found.push(TensorSnapshot::from_closure(
                no_values,
                DType::F32,
                shape,
                self.path.clone(),
                self.containers.clone(),
                id,
            ));
        }
    }
    impl<B: Backend> burn::module::ModuleVisitor<B> for Shapes {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.containers.push(container_type.to_string());
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.containers.pop();
            self.path.pop();
        }
        fn visit_float<const D: usize>(
            &mut self,
            param: &burn::module::Param<burn::tensor::Tensor<B, D>>,
        ) {
            self.push(param.lazy_shape(), param.id);
        }
        fn visit_int<const D: usize>(
            &mut self,
            param: &burn::module::Param<burn::tensor::Tensor<B, D, burn::tensor::Int>>,
        ) {
            self.push(param.lazy_shape(), param.id);
        }
    }
    let mut shapes = Shapes::default();
    module.visit(&mut shapes);
    let adapter = BurnToPyTorchAdapter;
    shapes
        .found
        .iter()
        .map(|s| {
            let transposed = is_linear_weight(s);
            let matrix = transposed || is_conv_weight(s);
            let s = burn_store::ModuleAdapter::adapt(&adapter, s);
            let expected = Expected {
                shape: s.shape.to_vec(),
                transposed,
                matrix,
            };
            (s.full_path(), expected)
        })
        .collect()
}

/// What [`expected_params`] knows of one parameter.
struct Expected {
    /// Its shape in PyTorch's layout.
    shape: Vec<usize>,
    /// Whether Burn holds it transposed (a `Linear`'s weight).
    transposed: bool,
    /// Whether it is a layer's matrix (a `Linear`'s or `Conv2d`'s weight), which
    /// [`LoadOptions::matrix_dtype`] applies to.
    matrix: bool,
}

/// A `Conv2d`'s 4-D weight.
fn is_conv_weight(snapshot: &TensorSnapshot) -> bool {
    snapshot.shape.len() == 4
        && snapshot.module_type().as_deref() == Some("Struct:Conv2d")
        && snapshot
            .path_stack
            .as_ref()
            .and_then(|p| p.last())
            .is_some_and(|name| name == "weight")
}

/// Whether burn-store's PyTorch adapters transpose this parameter: a `Linear`'s 2-D weight.
fn is_linear_weight(snapshot: &TensorSnapshot) -> bool {
    snapshot.shape.len() == 2
        && snapshot.module_type().as_deref() == Some("Struct:Linear")
        && snapshot
            .path_stack
            .as_ref()
            .and_then(|p| p.last())
            .is_some_and(|name| name == "weight")
}

/// burn-store's [`PyTorchToBurnAdapter`] without its transpose: [`load_safetensors`] reads
/// linear weights already transposed (in the same pass as the cast), so only the norms'
/// `weight`/`bias` → `gamma`/`beta` renaming is left to do.
#[derive(Clone)]
struct RenameNorms;

impl burn_store::ModuleAdapter for RenameNorms {
    fn adapt(&self, snapshot: &TensorSnapshot) -> TensorSnapshot {
        if is_linear_weight(snapshot) {
            snapshot.clone()
        } else {
            PyTorchToBurnAdapter.adapt(snapshot)
        }
    }

    fn get_alternative_param_name(&self, param_name: &str, container_type: &str) -> Option<String> {
        PyTorchToBurnAdapter.get_alternative_param_name(param_name, container_type)
    }

    fn clone_box(&self) -> Box<dyn burn_store::ModuleAdapter> {
        Box::new(self.clone())
    }
}

/// One tensor [`load_safetensors`] reads: its key in the file, the parameter's path, whether
/// Burn holds it transposed, and the shape Burn holds it in.
struct Job {
    key: String,
    path: String,
    transposed: bool,
    burn_shape: Vec<usize>,
    dtype: DType,
}

/// `module` with its matrices (every `Linear` and `Conv2d` weight) cast to `dtype`, the rest
/// left as they are: what [`LoadOptions::matrix_dtype`] gives at load time, for a module built
/// in memory (a benchmark's random model, say).
pub fn hold_matrices_in<B: Backend, M: Module<B>>(module: M, dtype: DType) -> M {
    struct Narrow {
        dtype: DType,
        names: Vec<String>,
        containers: Vec<String>,
    }
    impl<B: Backend> burn::module::ModuleMapper<B> for Narrow {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.names.push(name.to_string());
            self.containers.push(container_type.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.names.pop();
            self.containers.pop();
        }
        fn map_float<const D: usize>(
            &mut self,
            param: burn::module::Param<burn::tensor::Tensor<B, D>>,
        ) -> burn::module::Param<burn::tensor::Tensor<B, D>> {
            let owner = self
                .containers
                .iter()
                .rev()
                .find(|c| c.starts_with("Struct:") || c.starts_with("Enum:"));
            let matrix = self.names.last().is_some_and(|n| n == "weight")
                && matches!(
                    (owner.map(String::as_str), D),
                    (Some("Struct:Linear"), 2) | (Some("Struct:Conv2d"), 4)
                );
            if matrix {
                let dtype = self.dtype;
                param.map(|t| t.cast(dtype))
            } else {
                param
            }
        }
    }
    module.map(&mut Narrow {
        dtype,
        names: Vec::new(),
        containers: Vec::new(),
    })
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
    let expected = expected_params(&module);
    // Matrices narrower than the arithmetic only where the backend holds that dtype (NdArray
    // holds no f16): elsewhere they load in `dtype` like the rest. Asked of the default device
    // (support is the backend's): the module's own would initialise every lazy parameter.
    let matrix_dtype = options
        .matrix_dtype
        .filter(|d| B::supports_dtype(&Default::default(), *d));

    let mut problems = Vec::new();
    let mut jobs = Vec::new();
    let mut present = BTreeSet::new();
    for entry in &file.entries {
        if !entry.is_float() && is_unused_buffer(&entry.key) {
            continue;
        }
        let Some(path) = key_map(&entry.key) else {
            continue;
        };
        if expected.contains_key(&path) {
            present.insert(path.clone());
            if !entry.is_float() {
                problems.push(WeightProblem::NotFloat {
                    key: entry.key.clone(),
                    dtype: format!("{:?}", entry.dtype),
                });
                continue;
            }
        }
        // A 1×1 convolution's [out, in, 1, 1] weight loads into a linear layer's [out, in]:
        // on tokens the two are the same map (SD 1.x's transformer projections, the
        // original-layout VAE attention).
        let shape = match expected.get(&path) {
            Some(e) if squeezes_to(&entry.shape, &e.shape) => e.shape.clone(),
            _ => entry.shape.clone(),
        };
        match expected
            .get(&path)
            .map(|e| (&e.shape, e.transposed, e.matrix))
        {
            None => {
                if options.reject_unexpected {
                    problems.push(WeightProblem::Unexpected {
                        key: entry.key.clone(),
                        found: entry.shape.clone(),
                    });
                }
            }
            Some((expected_shape, _, _)) if *expected_shape != shape => {
                problems.push(WeightProblem::ShapeMismatch {
                    key: entry.key.clone(),
                    expected: expected_shape.clone(),
                    found: entry.shape.clone(),
                })
            }
            Some((_, transposed, matrix)) => {
                let mut burn_shape = shape;
                if transposed {
                    burn_shape.reverse();
                }
                let dtype = match matrix_dtype {
                    Some(dtype) if matrix => dtype,
                    _ => options.dtype,
                };
                jobs.push(Job {
                    key: entry.key.clone(),
                    path,
                    transposed,
                    burn_shape,
                    dtype,
                })
            }
        }
    }
    for (path, e) in &expected {
        if !present.contains(path) {
            problems.push(WeightProblem::Missing {
                key: path.clone(),
                expected: e.shape.clone(),
            });
        }
    }
    if !problems.is_empty() {
        return Err(CoreError::Weights {
            path: file.path.clone(),
            problems,
        });
    }

    // Every tensor read, cast (and transposed) at once, in parallel: each is read with
    // positioned reads into the buffer the model will hold, so there is no more memory in use
    // than the model's own. burn-store then puts each into its parameter.
    let storage = &file.storage;
    let loaded: Vec<std::result::Result<TensorData, String>> = jobs
        .par_iter()
        .map(|job| {
            let (mut data, bad) = read_tensor_as(storage, &job.key, job.dtype, job.transposed)?;
            if options.check_finite {
                check_finite_values(storage, &job.key, &data, bad)?;
            }
            data.shape = job.burn_shape.clone().into();
            Ok(data)
        })
        .collect();
    let snapshots = jobs
        .into_iter()
        .zip(loaded)
        .map(|(job, data)| {
            let data = std::cell::RefCell::new(Some(data));
            let data_fn = Rc::new(move || {
                data.borrow_mut()
                    .take()
                    .unwrap_or_else(|| Err("read twice".into()))
                    .map_err(burn_store::TensorSnapshotError::DataError)
            });
            TensorSnapshot::from_closure(
                data_fn,
                job.dtype,
                job.burn_shape.into(),
                job.path.split('.').map(str::to_string).collect(),
                Vec::new(),
                ParamId::new(),
            )
        })
        .collect();
    let result = module.apply(snapshots, None, Some(Box::new(RenameNorms)), false);
    // Everything but the values was checked above; what burn-store still reports is a tensor
    // whose values were refused (non-finite) or a mapping bug, and is returned as an error
    // rather than leaving a parameter at its random initial value.
    let mut problems: Vec<WeightProblem> = result
        .errors
        .iter()
        .map(|e| {
            let message = e.to_string();
            // burn-store wraps the closure's message; keep only ours when it is there.
            let message = match message.find(NON_FINITE_MARK) {
                Some(at) => message[at + NON_FINITE_MARK.len()..].to_string(),
                None => message,
            };
            WeightProblem::Other {
                key: String::new(),
                message,
            }
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

/// The safetensors name of a float dtype weights are saved in.
fn safetensors_dtype(dtype: DType) -> Option<Dtype> {
    match dtype {
        DType::F64 => Some(Dtype::F64),
        DType::F32 => Some(Dtype::F32),
        DType::F16 => Some(Dtype::F16),
        DType::BF16 => Some(Dtype::BF16),
        _ => None,
    }
}

/// Saves `module`'s parameters as a safetensors file, the mirror of [`load_safetensors`]: in
/// PyTorch naming and layout (burn-store's [`BurnToPyTorchAdapter`] transposes linear weights
/// back to `[out, in]` and renames `gamma`/`beta` to `weight`/`bias`), each module path renamed
/// by `key_map` (`None` leaves a parameter out), every tensor cast to `dtype`.
///
/// The file is written tensor by tensor (the header first, from the shapes), so saving needs
/// no second copy of the model in memory, and atomically
/// ([`crate::files::write_atomic`]): it appears complete or not at all. `metadata` goes in the
/// header's `__metadata__` (diffusers writes `{"format": "pt"}`).
pub fn save_safetensors<B: Backend, M: Module<B>>(
    module: &M,
    path: impl AsRef<Path>,
    key_map: KeyMap<'_>,
    dtype: DType,
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<()> {
    save_tensors(module_tensors(module, key_map), path, dtype, metadata)
}

/// A module's parameters under their file keys, in PyTorch naming and layout, as
/// [`save_safetensors`] writes them (read lazily: nothing is copied until written). Several
/// modules' tensors can go into one file ([`save_tensors`]), as diffusers keeps both VAE
/// halves in `vae/`.
pub fn module_tensors<B: Backend, M: Module<B>>(
    module: &M,
    key_map: KeyMap<'_>,
) -> Vec<(String, TensorSnapshot)> {
    module
        .collect(None, Some(Box::new(BurnToPyTorchAdapter)), false)
        .into_iter()
        .filter_map(|s| key_map(&s.full_path()).map(|key| (key, s)))
        .collect()
}

/// `snapshot` with its values read as `shape` (same element count): how a linear weight
/// `[out, in]` is saved as the 1×1 convolution `[out, in, 1, 1]` a checkpoint holds there
/// (the inverse of the squeeze [`load_safetensors`] accepts).
pub fn reshaped(snapshot: TensorSnapshot, shape: Vec<usize>) -> TensorSnapshot {
    let data = snapshot.clone_data_fn();
    let target = shape.clone();
    TensorSnapshot::from_closure(
        Rc::new(move || {
            let mut d = data()?;
            d.shape = target.clone().into();
            Ok(d)
        }),
        snapshot.dtype,
        shape.into(),
        snapshot.path_stack.clone().unwrap_or_default(),
        snapshot.container_stack.clone().unwrap_or_default(),
        snapshot.tensor_id.unwrap_or_default(),
    )
}

/// Writes tensors under their keys as a safetensors file, each cast to `dtype`: see
/// [`save_safetensors`].
pub fn save_tensors(
    mut tensors: Vec<(String, TensorSnapshot)>,
    path: impl AsRef<Path>,
    dtype: DType,
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<()> {
    let path = path.as_ref();
    let stored = safetensors_dtype(dtype).ok_or_else(|| CoreError::UnsupportedDtype {
        path: path.to_path_buf(),
        key: String::new(),
        dtype: format!("{dtype:?}"),
    })?;
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(pair) = tensors.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(CoreError::Safetensors {
            path: path.to_path_buf(),
            reason: format!("two parameters map to the key `{}`", pair[0].0),
        });
    }
    let size = stored.bitsize() / 8;
    let mut header = serde_json::Map::new();
    if let Some(metadata) = metadata {
        header.insert("__metadata__".into(), serde_json::json!(metadata));
    }
    let mut offset = 0usize;
    for (key, snapshot) in &tensors {
        let shape: Vec<usize> = snapshot.shape.to_vec();
        let bytes = shape.iter().product::<usize>() * size;
        header.insert(
            key.clone(),
            serde_json::json!({
                "dtype": format!("{stored:?}"),
                "shape": shape,
                "data_offsets": [offset, offset + bytes],
            }),
        );
        offset += bytes;
    }
    let mut header = serde_json::to_vec(&serde_json::Value::Object(header))
        .map_err(|e| CoreError::io(path, std::io::Error::other(e)))?;
    // The data section starts 8-byte aligned, as the reference writer pads it.
    header.resize(header.len().next_multiple_of(8), b' ');
    crate::files::write_atomic(path, |out| {
        use std::io::Write;
        out.write_all(&(header.len() as u64).to_le_bytes())
            .and_then(|()| out.write_all(&header))
            .map_err(|e| e.to_string())?;
        for (key, snapshot) in &tensors {
            let data = snapshot
                .to_data()
                .map_err(|e| format!("reading `{key}`: {e}"))?;
            let data = if data.dtype == dtype {
                data
            } else {
                data.convert_dtype(dtype)
            };
            out.write_all(data.as_bytes())
                .map_err(|e| format!("writing `{key}`: {e}"))?;
        }
        Ok(())
    })
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
    if path.exists() {
        // There, but perhaps a FIFO or a folder: say so rather than "no such file".
        crate::files::regular_file(&path)?;
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
    use safetensors::SafeTensors;
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

    /// `matrix_dtype` holds the linear weight in f16 (transposed as ever) and leaves its bias
    /// and the norm in f32; `hold_matrices_in` does the same to a module in memory.
    #[test]
    fn matrices_load_narrower_than_the_rest() {
        let file = file(Dtype::F32, &tiny_tensors());
        let options = LoadOptions {
            matrix_dtype: Some(DType::F16),
            ..LoadOptions::default()
        };
        let model = load_safetensors(tiny(), &file, &|k| Some(k.to_string()), options).unwrap();
        let weight = model.proj.weight.val();
        assert_eq!((weight.dtype(), weight.dims()), (DType::F16, [3, 2]));
        assert_eq!(
            values(weight.cast(DType::F32)),
            vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]
        );
        let bias = model.proj.bias.as_ref().unwrap().val();
        assert_eq!(bias.dtype(), DType::F32);
        assert_eq!(model.norm.gamma.as_ref().unwrap().val().dtype(), DType::F32);

        let held = hold_matrices_in(tiny(), DType::BF16);
        assert_eq!(held.proj.weight.val().dtype(), DType::BF16);
        assert_eq!(held.proj.bias.unwrap().val().dtype(), DType::F32);
        assert_eq!(held.norm.gamma.unwrap().val().dtype(), DType::F32);
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

    /// `tiny_tensors` plus extra tensors of any dtype, serialised.
    fn file_with(
        extra: &[(&str, Dtype, Vec<usize>, Vec<u8>)],
        f32s: &[(&str, Vec<usize>, Vec<f32>)],
    ) -> Vec<u8> {
        let bytes: Vec<Vec<u8>> = f32s
            .iter()
            .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let mut views: Vec<(String, TensorView<'_>)> = f32s
            .iter()
            .zip(&bytes)
            .map(|((k, shape, _), b)| {
                (
                    k.to_string(),
                    TensorView::new(Dtype::F32, shape.clone(), b).unwrap(),
                )
            })
            .collect();
        for (k, dtype, shape, b) in extra {
            views.push((
                k.to_string(),
                TensorView::new(*dtype, shape.clone(), b).unwrap(),
            ));
        }
        safetensors::serialize(views, None).unwrap()
    }

    fn load(bytes: Vec<u8>, options: LoadOptions) -> Result<Tiny<Flex>> {
        let file = SafetensorsFile::from_bytes("memory.safetensors", bytes)?;
        load_safetensors(tiny(), &file, &|k| Some(k.to_string()), options)
    }

    #[test]
    fn integer_buffers_are_skipped_by_name_and_refused_where_a_weight_goes() {
        let ids: Vec<u8> = (0i64..77).flat_map(|i| i.to_le_bytes()).collect();
        let extra = [
            (
                "text_model.embeddings.position_ids",
                Dtype::I64,
                vec![1, 77],
                ids.clone(),
            ),
            (
                "bn.num_batches_tracked",
                Dtype::I64,
                vec![],
                0i64.to_le_bytes().to_vec(),
            ),
        ];
        load(file_with(&extra, &tiny_tensors()), LoadOptions::default()).unwrap();
        // An integer tensor where the model needs floats names the key and the dtype.
        let mut tensors = tiny_tensors();
        tensors.retain(|(k, _, _)| *k != "proj.bias");
        let bias: Vec<u8> = [1i64, 2].iter().flat_map(|i| i.to_le_bytes()).collect();
        let err = load(
            file_with(&[("proj.bias", Dtype::I64, vec![2], bias)], &tensors),
            LoadOptions::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`proj.bias` is stored as I64"), "{err}");
        assert!(!err.contains("missing"), "{err}");
    }

    #[test]
    fn non_finite_weights_are_refused_by_name() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut tensors = tiny_tensors();
            tensors[2].2[1] = bad;
            let err = load(file_with(&[], &tensors), LoadOptions::default())
                .map(|_| ())
                .expect_err("refused")
                .to_string();
            assert!(
                err.contains("tensor `norm.weight` holds 1 NaN or infinite value(s) of 2"),
                "{err}"
            );
            let skip = LoadOptions {
                check_finite: false,
                ..LoadOptions::default()
            };
            load(file_with(&[], &tensors), skip).unwrap();
        }
        // The streaming path (files over 64 MiB) checks the same way.
        let mut tensors = tiny_tensors();
        tensors[1].2[0] = f32::NAN;
        let path = std::env::temp_dir().join(format!("sd-nan-{}.safetensors", std::process::id()));
        std::fs::write(&path, file_with(&[], &tensors)).unwrap();
        let streamed = SafetensorsFile::open_streaming(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let err = load_safetensors(
            tiny(),
            &streamed,
            &|k| Some(k.to_string()),
            LoadOptions::default(),
        )
        .map(|_| ())
        .expect_err("refused")
        .to_string();
        assert!(err.contains("tensor `proj.bias` holds 1 NaN"), "{err}");
        // Finite in the file, infinite once cast to f16.
        let mut tensors = tiny_tensors();
        tensors[0].2[0] = 1e6;
        let f16 = LoadOptions {
            dtype: DType::F16,
            ..LoadOptions::default()
        };
        let err = load(file_with(&[], &tensors), f16)
            .map(|_| ())
            .expect_err("refused")
            .to_string();
        assert!(err.contains("beyond the range of F16"), "{err}");
    }

    #[test]
    fn a_bad_byte_range_names_the_tensor() {
        let mut bytes = file_with(&[], &tiny_tensors());
        // Shrink the data section by one byte: the last tensor no longer fits.
        bytes.pop();
        let err = SafetensorsFile::from_bytes("memory.safetensors", bytes)
            .map(|_| ())
            .expect_err("refused")
            .to_string();
        assert!(err.contains("tensor `"), "{err}");
        // A shape whose byte count overflows.
        let header =
            r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,0]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        let err = SafetensorsFile::from_bytes("memory.safetensors", bytes)
            .map(|_| ())
            .expect_err("refused")
            .to_string();
        assert!(err.contains("tensor `w`"), "{err}");
    }

    #[test]
    fn weight_errors_list_twenty_problems_and_count_the_rest() {
        let problems: Vec<WeightProblem> = (0..25)
            .map(|i| WeightProblem::Missing {
                key: format!("k{i}"),
                expected: vec![1],
            })
            .collect();
        let err = CoreError::Weights {
            path: "f".into(),
            problems,
        }
        .to_string();
        assert_eq!(err.lines().count(), 22, "{err}");
        assert!(err.ends_with("… and 5 more"), "{err}");
    }

    #[test]
    fn saved_weights_load_back_identical_in_every_dtype() {
        let file = file(Dtype::F32, &tiny_tensors());
        let model = load_safetensors(
            tiny(),
            &file,
            &|k| Some(k.to_string()),
            LoadOptions::default(),
        )
        .unwrap();
        let dir = std::env::temp_dir().join(format!("sd-save-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let path = dir.join(format!("{dtype:?}.safetensors"));
            save_safetensors(&model, &path, &|k| Some(k.to_string()), dtype, Some(&meta)).unwrap();
            let saved = SafetensorsFile::open(&path).unwrap();
            // PyTorch's names and layout: the linear weight back as [out, in].
            let keys: Vec<_> = saved
                .entries()
                .iter()
                .map(|e| (e.key.as_str(), e.shape.clone(), e.dtype))
                .collect();
            assert_eq!(
                keys,
                vec![
                    ("norm.bias", vec![2], dtype),
                    ("norm.weight", vec![2], dtype),
                    ("proj.bias", vec![2], dtype),
                    ("proj.weight", vec![2, 3], dtype),
                ]
            );
            // safetensors' own reader accepts the file, metadata included.
            let bytes = std::fs::read(&path).unwrap();
            let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
            assert_eq!(header.metadata().as_ref().unwrap()["format"], "pt");
            let back = load_safetensors(
                tiny(),
                &saved,
                &|k| Some(k.to_string()),
                LoadOptions::default(),
            )
            .unwrap();
            // The test values are exact in every dtype.
            assert_eq!(
                values(back.proj.weight.val()),
                values(model.proj.weight.val())
            );
            assert_eq!(values(back.norm.gamma.unwrap().val()), vec![2.0, 3.0]);
        }
        // Key maps rename and leave out.
        let path = dir.join("renamed.safetensors");
        let map = |k: &str| (!k.starts_with("norm.")).then(|| format!("model.{k}"));
        save_safetensors(&model, &path, &map, DType::F32, None).unwrap();
        let keys: Vec<String> = SafetensorsFile::open(&path)
            .unwrap()
            .entries()
            .iter()
            .map(|e| e.key.clone())
            .collect();
        assert_eq!(keys, ["model.proj.bias", "model.proj.weight"]);
        // Two parameters onto one key is an error, and writes nothing.
        let path = dir.join("clash.safetensors");
        let err = save_safetensors(&model, &path, &|_| Some("same".into()), DType::F32, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("two parameters map to the key `same`"),
            "{err}"
        );
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
