//! Adding LoRA products into a module's weights, and taking them out again.

use std::collections::HashMap;

use burn::module::{Module, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use burn_store::{BurnToPyTorchAdapter, ModuleSnapshot, PyTorchToBurnAdapter, TensorSnapshot};

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

/// A weight as it was before [`merge`] changed it.
struct Original {
    path: Vec<String>,
    containers: Vec<String>,
    id: ParamId,
    data: TensorData,
}

/// What [`merge`] did: how many weights it changed, which layers it left out, and the original
/// values of the changed weights (so that [`Merged::restore`] undoes it exactly).
pub struct Merged {
    /// Weights changed (a weight several LoRAs adapt counts once).
    pub weights: usize,
    /// Layers whose module the model lacks, as `file: key` (only with
    /// [`MergeOptions::ignore_unmatched`]).
    pub unmatched: Vec<String>,
    originals: Vec<Original>,
}

impl Merged {
    /// Puts the original weights back: the module is bit for bit what it was before the merge.
    pub fn restore<B: Backend, M: Module<B>>(self, mut module: M) -> Result<M> {
        let count = self.originals.len();
        let snapshots = self
            .originals
            .into_iter()
            .map(|o| TensorSnapshot::from_data(o.data, o.path, o.containers, o.id))
            .collect();
        let result = module.apply(snapshots, None, Some(Box::new(PyTorchToBurnAdapter)), false);
        if !result.errors.is_empty() || result.applied.len() != count {
            return Err(LoraError::Spec(format!(
                "restoring {count} weights after a LoRA failed: {:?}",
                result.errors
            )));
        }
        Ok(module)
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
    mut module: M,
    component: Component,
    files: &[(&LoraFile, f32)],
    checkpoint_key: &dyn Fn(&str) -> Option<String>,
    rename: Option<Rename<'_>>,
    options: MergeOptions,
    device: &B::Device,
) -> Result<(M, Merged)> {
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
    let mut plan: Vec<(usize, &crate::LoraLayer, f32)> = Vec::new();
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
            plan.push((index, layer, *weight));
        }
        if !problems.is_empty() {
            return Err(LoraError::Mismatch {
                path: file.path.clone(),
                component: component.name().into(),
                problems,
            });
        }
    }

    // Sum each weight's updates, in f32 on the device.
    let mut sums: HashMap<usize, Tensor<B, 2>> = HashMap::new();
    let mut originals = Vec::new();
    let as_f32 = |data: &TensorData, rows: usize, cols: usize| {
        let mut d = data.clone().convert_dtype(DType::F32);
        d.shape = vec![rows, cols].into();
        Tensor::<B, 2>::from_data(d, (device, DType::F32))
    };
    for (index, layer, weight) in plan {
        let (out, inputs) = layer.delta_shape();
        let rank = layer.rank();
        let up = as_f32(&layer.up, out, rank);
        let down = as_f32(&layer.down, rank, inputs);
        let delta = up.matmul(down).mul_scalar(layer.scale() * weight);
        let sum = match sums.remove(&index) {
            Some(s) => s,
            None => {
                let data = snapshots[index].to_data().map_err(|e| {
                    LoraError::Spec(format!("reading `{}`: {e:?}", snapshots[index].full_path()))
                })?;
                let sum = as_f32(&data, out, inputs);
                originals.push(Original {
                    path: snapshots[index].path_stack.clone().unwrap_or_default(),
                    containers: snapshots[index].container_stack.clone().unwrap_or_default(),
                    id: snapshots[index].tensor_id.unwrap_or_default(),
                    data,
                });
                sum
            }
        };
        sums.insert(index, sum + delta);
    }

    let mut updated = Vec::new();
    for (index, sum) in sums {
        let s = &snapshots[index];
        let mut data = sum.into_data().convert_dtype(s.dtype);
        data.shape = s.shape.clone();
        updated.push(TensorSnapshot::from_data(
            data,
            s.path_stack.clone().unwrap_or_default(),
            s.container_stack.clone().unwrap_or_default(),
            s.tensor_id.unwrap_or_default(),
        ));
    }
    let count = updated.len();
    drop(snapshots);
    let result = module.apply(updated, None, Some(Box::new(PyTorchToBurnAdapter)), false);
    if !result.errors.is_empty() || result.applied.len() != count {
        return Err(LoraError::Spec(format!(
            "applying {count} merged weights failed: {:?}",
            result.errors
        )));
    }
    Ok((
        module,
        Merged {
            weights: count,
            unmatched,
            originals,
        },
    ))
}
