//! Adding LoRA products into a module's weights, and taking them out again.

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use burn_store::{BurnToPyTorchAdapter, ModuleSnapshot};
use sd_core::layers::adapters::{AttachedUpdates, LowRankUpdate};

use crate::error::{LoraError, Result};
use crate::file::{Component, LoraFile, ModuleName};

/// A map from one module naming to another (see [`merge`]'s `rename`).
pub type Rename<'a> = &'a dyn Fn(&str) -> Option<String>;

/// How strict [`merge`] is.
#[derive(Debug, Clone, Copy, Default)]
pub struct MergeOptions {
    /// Leave out layers whose module the model does not have (they are counted in
    /// [`Merged::unmatched`]) instead of refusing the file.
    pub ignore_unmatched: bool,
}

/// What [`merge`] did: how many weights it changed, which layers it left out, and the original
/// tensors of the changed weights (so that [`Merged::restore`] undoes it exactly).
pub struct Merged<B: Backend> {
    /// Weights changed (a weight several LoRAs adapt counts once).
    pub weights: usize,
    /// Layers whose module the model lacks, as `file: key` (only with
    /// [`MergeOptions::ignore_unmatched`]).
    pub unmatched: Vec<String>,
    /// The replaced tensors by module path, flattened, in their own dtype and kept on the
    /// device (restoring copies nothing).
    originals: HashMap<String, Tensor<B, 1>>,
}

impl<B: Backend> Merged<B> {
    /// Puts the original weights back: the module is bit for bit what it was before the merge.
    pub fn restore<M: Module<B>>(self, module: M) -> Result<M> {
        let count = self.originals.len();
        let visit = Restore {
            originals: self.originals,
        };
        Ok(PathMapper::run(visit, module, count, "restoring after a LoRA")?.0)
    }
}

/// One weight's change, given its tensor and whether it sits in a Burn `Linear` (whose weight
/// is stored `[in, out]`, the transpose of PyTorch's).
pub(crate) trait ParamChange<B: Backend> {
    /// `None`: leave the tensor alone.
    fn change<const D: usize>(
        &mut self,
        path: &str,
        linear: bool,
        tensor: &Tensor<B, D>,
    ) -> Option<Tensor<B, D>>;
}

/// Where a module walk is: the module path (as burn-store's collector writes it) and the
/// types of the containers entered.
#[derive(Default)]
pub(crate) struct ModulePath {
    path: Vec<String>,
    containers: Vec<String>,
}

impl ModulePath {
    fn enter(&mut self, name: &str, container_type: &str) {
        self.path.push(name.to_string());
        self.containers.push(container_type.to_string());
    }

    fn exit(&mut self) {
        self.path.pop();
        self.containers.pop();
    }

    /// The current parameter's path, and whether its module is a Burn `Linear` (each entry is
    /// the type holding the field entered: the last is the parameter's module).
    fn here(&self) -> (String, bool) {
        let linear = self.containers.last().is_some_and(|c| c == "Struct:Linear");
        (self.path.join("."), linear)
    }
}

/// A [`ModuleMapper`] that knows each parameter's module path and its container's type.
pub(crate) struct PathMapper<V> {
    pub(crate) at: ModulePath,
    pub(crate) visit: V,
    pub(crate) done: usize,
}

impl<V> PathMapper<V> {
    /// Maps `module` with `visit`, which must change `expected` weights (an internal check:
    /// the walk finds every path it planned); `what` names the walk in the error.
    pub(crate) fn run<B: Backend, M: Module<B>>(
        visit: V,
        module: M,
        expected: usize,
        what: &str,
    ) -> Result<(M, V)>
    where
        V: ParamChange<B>,
    {
        let mut mapper = Self {
            at: ModulePath::default(),
            visit,
            done: 0,
        };
        let module = module.map(&mut mapper);
        if mapper.done != expected {
            return Err(LoraError::Spec(format!(
                "{what}: the walk found {} of the {expected} weights it had planned",
                mapper.done
            )));
        }
        Ok((module, mapper.visit))
    }
}

impl<B: Backend, V: ParamChange<B>> ModuleMapper<B> for PathMapper<V> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.at.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.at.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (path, linear) = self.at.here();
        let (id, tensor, mapper) = param.consume();
        match self.visit.change(&path, linear, &tensor) {
            Some(new) => {
                self.done += 1;
                Param::from_mapped_value(id, new, mapper)
            }
            None => Param::from_mapped_value(id, tensor, mapper),
        }
    }
}

/// The updates of [`merge`]: per module path, the factors and their multipliers.
struct AddDeltas<'a, B: Backend> {
    plan: HashMap<String, Vec<(&'a crate::LoraLayer, f32)>>,
    originals: HashMap<String, Tensor<B, 1>>,
    device: B::Device,
}

impl<B: Backend> ParamChange<B> for AddDeltas<'_, B> {
    fn change<const D: usize>(
        &mut self,
        path: &str,
        linear: bool,
        tensor: &Tensor<B, D>,
    ) -> Option<Tensor<B, D>> {
        let layers = self.plan.get(path)?;
        let dims = tensor.dims();
        let dtype = tensor.dtype();
        let as_f32 = |data: &TensorData, rows: usize, cols: usize| {
            Tensor::<B, 2>::from_data(factor(data, vec![rows, cols]), (&self.device, DType::F32))
        };
        let mut sum: Option<Tensor<B, 2>> = None;
        for (layer, weight) in layers {
            let (out, inputs) = layer.delta_shape();
            let rank = layer.rank();
            let up = as_f32(&layer.up, out, rank);
            let down = as_f32(&layer.down, rank, inputs);
            let delta = delta(up, down, layer.scale() * weight, linear);
            sum = Some(match sum {
                Some(s) => s + delta,
                None => delta,
            });
        }
        let sum = sum?;
        self.originals
            .insert(path.to_string(), tensor.clone().flatten(0, D - 1));
        // In f32, then stored in the weight's own dtype.
        let merged = tensor.clone().cast(DType::F32) + sum.reshape(dims);
        Some(merged.cast(dtype))
    }
}

/// `scale · up · down`, the update a LoRA adds to a weight (`[out, in]`), transposed for a
/// Burn `Linear`, which holds `W^T` (`[in, out]`): then `scale · down^T · up^T`.
pub(crate) fn delta<B: Backend>(
    up: Tensor<B, 2>,
    down: Tensor<B, 2>,
    scale: f32,
    linear: bool,
) -> Tensor<B, 2> {
    let up = up.mul_scalar(scale);
    if linear {
        down.transpose().matmul(up.transpose())
    } else {
        up.matmul(down)
    }
}

/// A file's factor in f32, viewed as `shape` (its element count).
fn factor(data: &TensorData, shape: Vec<usize>) -> TensorData {
    let mut d = data.clone().convert_dtype(DType::F32);
    d.shape = shape.into();
    d
}

/// What [`Merged::restore`] puts back.
struct Restore<B: Backend> {
    originals: HashMap<String, Tensor<B, 1>>,
}

impl<B: Backend> ParamChange<B> for Restore<B> {
    fn change<const D: usize>(
        &mut self,
        path: &str,
        _linear: bool,
        tensor: &Tensor<B, D>,
    ) -> Option<Tensor<B, D>> {
        let original = self.originals.remove(path)?;
        Some(original.reshape(tensor.dims()))
    }
}

fn shape(data: &TensorData) -> Vec<usize> {
    data.shape.iter().copied().collect()
}

/// The module path nearest to `name` among `names` (for "did you mean").
fn closest<'a>(name: &str, names: impl Iterator<Item = &'a String>) -> Option<&'a String> {
    names.min_by_key(|n| strsim::levenshtein(name, n))
}

/// Adds `weight · (alpha / rank) · up · down` of every layer of `component` in each file into
/// `module`'s weights. `checkpoint_key` names a module parameter the way the checkpoint (and
/// so the LoRA file) does: `down_blocks.0.attentions.0.proj_in.weight`. `rename` gives
/// kohya's underscored names in another layout (SDXL's original `input_blocks_…`) their
/// underscored name in this one; it is asked only for names that match no module as they are.
///
/// Everything is checked before anything changes: a layer whose module the model lacks
/// (reported with the nearest module path) or whose factors do not fit the weight's shape
/// fails the merge with every such problem of the file listed. The sums are computed in f32
/// and stored in each weight's own dtype.
pub fn merge<B: Backend, M: Module<B>>(
    module: M,
    component: Component,
    files: &[(&LoraFile, f32)],
    checkpoint_key: &dyn Fn(&str) -> Option<String>,
    rename: Option<Rename<'_>>,
    options: MergeOptions,
    device: &B::Device,
) -> Result<(M, Merged<B>)> {
    let Plan { by_path, unmatched } =
        plan(&module, component, files, checkpoint_key, rename, options)?;
    // Add each weight's updates on the device, in one pass over the module.
    let count = by_path.len();
    let visit = AddDeltas {
        plan: by_path,
        originals: HashMap::new(),
        device: device.clone(),
    };
    let (module, visit) = PathMapper::run(visit, module, count, "merging")?;
    Ok((
        module,
        Merged {
            weights: count,
            unmatched,
            originals: visit.originals,
        },
    ))
}

/// What [`merge`] and [`attach`] change: each adapted weight's layers (by the weight's module
/// path) and the layers left out.
struct Plan<'a> {
    by_path: HashMap<String, Vec<(&'a crate::LoraLayer, f32)>>,
    unmatched: Vec<String>,
}

/// Resolves every layer of every file to a weight of `module` and checks its shape, all
/// problems of a file reported at once (see [`merge`]).
fn plan<'a, B: Backend, M: Module<B>>(
    module: &M,
    component: Component,
    files: &[(&'a LoraFile, f32)],
    checkpoint_key: &dyn Fn(&str) -> Option<String>,
    rename: Option<Rename<'_>>,
    options: MergeOptions,
) -> Result<Plan<'a>> {
    let snapshots = module.collect(None, Some(Box::new(BurnToPyTorchAdapter)), false);
    let mut dotted: HashMap<String, usize> = HashMap::new();
    for (i, s) in snapshots.iter().enumerate() {
        let Some(key) = checkpoint_key(&s.full_path()) else {
            continue;
        };
        if let Some(module) = key.strip_suffix(".weight") {
            // transformers 5 names a CLIPTextModel's weights without `text_model.` (and
            // LoRA files written from it follow), a CLIPTextModelWithProjection's with it:
            // either finds the module.
            if let Some(short) = module.strip_prefix("text_model.") {
                dotted.insert(short.to_string(), i);
            }
            dotted.insert(module.to_string(), i);
        }
    }
    let underscored: HashMap<String, usize> = dotted
        .iter()
        .map(|(k, i)| (k.replace('.', "_"), *i))
        .collect();

    // Resolve and check every layer of every file first.
    let mut resolved: Vec<(usize, &crate::LoraLayer, f32)> = Vec::new();
    let mut unmatched = Vec::new();
    for (file, weight) in files {
        let mut problems = Vec::new();
        for layer in file.layers_of(component) {
            let (found, names) = match &layer.module {
                ModuleName::Dotted(m) => (dotted.get(m), &dotted),
                ModuleName::Underscored(m) => (
                    underscored.get(m).or_else(|| {
                        rename
                            .and_then(|r| r(m))
                            .and_then(|renamed| underscored.get(&renamed))
                    }),
                    &underscored,
                ),
            };
            let Some(&index) = found else {
                if options.ignore_unmatched {
                    unmatched.push(format!("{}: {}", file.path.display(), layer.key));
                } else {
                    let near = closest(layer.module.as_str(), names.keys())
                        .map(|n| format!(" (the nearest module is `{n}`)"))
                        .unwrap_or_default();
                    problems.push(format!(
                        "`{}` adapts `{}`, which the model has no weight for{near}",
                        layer.key,
                        layer.module.as_str()
                    ));
                }
                continue;
            };
            let target: Vec<usize> = snapshots[index].shape.iter().copied().collect();
            let (out, inputs) = layer.delta_shape();
            if target.first() != Some(&out) || target.iter().product::<usize>() != out * inputs {
                problems.push(format!(
                    "`{}`: down {:?} and up {:?} make a [{out}, {inputs}] update, which does not \
                     fit the weight's shape {target:?}",
                    layer.key,
                    shape(&layer.down),
                    shape(&layer.up)
                ));
                continue;
            }
            resolved.push((index, layer, *weight));
        }
        if !problems.is_empty() {
            return Err(LoraError::Mismatch {
                path: file.path.clone(),
                component: component.name().into(),
                problems,
            });
        }
    }

    let mut by_path: HashMap<String, Vec<(&crate::LoraLayer, f32)>> = HashMap::new();
    for (index, layer, weight) in resolved {
        by_path
            .entry(snapshots[index].full_path())
            .or_default()
            .push((layer, weight));
    }
    Ok(Plan { by_path, unmatched })
}

/// What [`attach`] did: the updates it attached (taken out again when this is dropped or
/// [`Attached::detach`]ed), how many weights they adapt and which layers it left out.
#[derive(Debug)]
pub struct Attached {
    /// Weights adapted (a weight several LoRAs adapt counts once).
    pub weights: usize,
    /// Layers whose module the model lacks, as `file: key` (only with
    /// [`MergeOptions::ignore_unmatched`]).
    pub unmatched: Vec<String>,
    updates: AttachedUpdates,
}

impl Attached {
    /// Takes the updates out: the module computes as it did before [`attach`].
    pub fn detach(self) {
        self.updates.detach();
    }
}

/// Like [`merge`], with the same checks, but leaves the weights alone: each layer's factors are
/// kept beside the weight it adapts and added at forward time (`x W + (α / r) · w · x Aᵀ Bᵀ`,
/// as PEFT's unfused adapters; `sd_core::layers::adapters`), so that LoRAs can be switched
/// between generations without reloading or changing the model. The factors are held in the
/// weights' dtype. Clones of `module` share its parameters and so the updates.
pub fn attach<B: Backend, M: Module<B>>(
    module: &M,
    component: Component,
    files: &[(&LoraFile, f32)],
    checkpoint_key: &dyn Fn(&str) -> Option<String>,
    rename: Option<Rename<'_>>,
    options: MergeOptions,
    device: &B::Device,
) -> Result<Attached> {
    let Plan { by_path, unmatched } =
        plan(module, component, files, checkpoint_key, rename, options)?;
    let count = by_path.len();
    let mut visitor = AttachVisitor {
        at: ModulePath::default(),
        plan: by_path,
        updates: AttachedUpdates::new(),
        device: device.clone(),
        done: 0,
        problems: Vec::new(),
    };
    module.visit(&mut visitor);
    if !visitor.problems.is_empty() {
        return Err(LoraError::Spec(visitor.problems.join("; ")));
    }
    if visitor.done != count {
        return Err(LoraError::Spec(format!(
            "attaching found {} of the {count} weights it had planned",
            visitor.done
        )));
    }
    Ok(Attached {
        weights: count,
        unmatched,
        updates: visitor.updates,
    })
}

/// Walks a module as [`PathMapper`] does and attaches the planned layers' updates.
struct AttachVisitor<'a, B: Backend> {
    at: ModulePath,
    plan: HashMap<String, Vec<(&'a crate::LoraLayer, f32)>>,
    updates: AttachedUpdates,
    device: B::Device,
    done: usize,
    problems: Vec<String>,
}

impl<B: Backend> ModuleVisitor<B> for AttachVisitor<'_, B> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.at.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.at.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let (path, linear) = self.at.here();
        let Some(layers) = self.plan.get(&path) else {
            return;
        };
        let weight = param.val();
        let (dims, dtype) = (weight.dims(), weight.dtype());
        for (layer, user_weight) in layers {
            let (out, inputs) = layer.delta_shape();
            let rank = layer.rank();
            let scale = layer.scale() * user_weight;
            let update = match (linear, dims.as_slice()) {
                (true, [_, _]) => {
                    let down = Tensor::<B, 2>::from_data(
                        factor(&layer.down, vec![rank, inputs]),
                        (&self.device, DType::F32),
                    );
                    let up = Tensor::<B, 2>::from_data(
                        factor(&layer.up, vec![out, rank]),
                        (&self.device, DType::F32),
                    );
                    LowRankUpdate::linear(
                        down.transpose().cast(dtype),
                        up.mul_scalar(scale).transpose().cast(dtype),
                    )
                }
                (false, &[o, i, kh, kw]) if o == out && i * kh * kw == inputs => {
                    let down = Tensor::<B, 4>::from_data(
                        factor(&layer.down, vec![rank, i, kh, kw]),
                        (&self.device, DType::F32),
                    );
                    let up = Tensor::<B, 4>::from_data(
                        factor(&layer.up, vec![out, rank, 1, 1]),
                        (&self.device, DType::F32),
                    );
                    LowRankUpdate::Conv {
                        down: down.cast(dtype),
                        up: up.mul_scalar(scale).cast(dtype),
                    }
                }
                _ => {
                    self.problems.push(format!(
                        "`{}` adapts `{path}` ({dims:?}), which is neither a linear layer nor a \
                         convolution: it can be merged but not attached",
                        layer.key
                    ));
                    continue;
                }
            };
            self.updates.attach(param.id, update);
        }
        self.done += 1;
    }
}
