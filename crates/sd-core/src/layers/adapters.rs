//! Low-rank updates kept beside a layer's weight and added at forward time: LoRA applied "on
//! the fly", as PEFT's unfused adapters are, instead of merged into the weight. The output of
//! an adapted layer is `layer(x) + up(down(x))` (Hu et al. 2021, eq. 3, with the scale
//! `α / r` and the user's weight folded into `up`), so adapters can be attached to a loaded
//! model and detached again between generations without reloading or changing a weight.
//!
//! Why a registry and not a field on each layer: the layers are Burn's `Linear` and `Conv2d`,
//! and the modules' trees are the checkpoints' key trees; an adapter slot in every layer would
//! put non-checkpoint state into every module. Instead each update is registered under the
//! [`ParamId`] of the weight it adapts, and [`linear_forward`](super::linear_forward),
//! [`linear_from_channels`](super::linear_from_channels),
//! [`linear_to_channels`](super::linear_to_channels) and
//! [`conv2d_forward`](super::conv2d_forward) look their layer's weight up. With nothing attached
//! the cost is one atomic load per layer call. A clone of a module shares its parameters' ids,
//! so it shares their adapters too; the updates apply to the backend type they were attached
//! for.

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use super::to_dtype;
use burn::module::{Param, ParamId};
use burn::nn::Linear;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;

/// One low-rank update of a weight.
#[derive(Debug, Clone)]
pub enum LowRankUpdate<B: Backend> {
    /// For a Burn `Linear` (`y = x W + b`, `W` stored `[in, out]`): `x · down · up`, both
    /// held as bias-free `Linear`s so that they run through the same fast paths as the layer.
    Linear(Box<LinearUpdate<B>>),
    /// For a `Conv2d`: `down` is a convolution with the layer's kernel size, stride, padding
    /// and dilation into `rank` channels, `up` a 1×1 convolution out of them (LoCon's form;
    /// for a 1×1 layer, plain LoRA).
    Conv {
        /// `[rank, in, kh, kw]`.
        down: Tensor<B, 4>,
        /// `[out, rank, 1, 1]`, times the scale.
        up: Tensor<B, 4>,
    },
}

/// [`LowRankUpdate::Linear`]'s factors.
#[derive(Debug, Clone)]
pub struct LinearUpdate<B: Backend> {
    /// `[in, rank]` (PyTorch's `lora_down` transposed).
    pub down: Linear<B>,
    /// `[rank, out]` (PyTorch's `lora_up` transposed, times the scale).
    pub up: Linear<B>,
}

impl<B: Backend> LowRankUpdate<B> {
    /// The update of a `Linear` from `down` (`[in, rank]`) and `up` (`[rank, out]`, scaled).
    pub fn linear(down: Tensor<B, 2>, up: Tensor<B, 2>) -> Self {
        // Laid out afresh (a transposed view would make the fast kernels copy it every call).
        let layer = |weight: Tensor<B, 2>| {
            let (device, dtype) = (weight.device(), weight.dtype());
            Linear {
                weight: Param::from_tensor(Tensor::from_data(weight.into_data(), (&device, dtype))),
                bias: None,
            }
        };
        Self::Linear(Box::new(LinearUpdate {
            down: layer(down),
            up: layer(up),
        }))
    }
}

type Entry = (u64, Arc<dyn Any + Send + Sync>);

/// Every attached update, by the id of the weight it adapts; each tagged with its set.
static REGISTRY: RwLock<Option<HashMap<ParamId, Vec<Entry>>>> = RwLock::new(None);
/// How many updates are attached (the forward's fast check).
static ATTACHED: AtomicUsize = AtomicUsize::new(0);
static NEXT_SET: AtomicU64 = AtomicU64::new(1);

/// A set of attached updates; dropping it (or [`AttachedUpdates::detach`]) takes them out.
#[derive(Debug)]
pub struct AttachedUpdates {
    set: u64,
    weights: Vec<ParamId>,
}

impl Default for AttachedUpdates {
    fn default() -> Self {
        Self::new()
    }
}

impl AttachedUpdates {
    /// An empty set.
    pub fn new() -> Self {
        Self {
            set: NEXT_SET.fetch_add(1, Ordering::Relaxed),
            weights: Vec::new(),
        }
    }

    /// Adds `update` to the weight `weight` (a layer's `weight.id`): from now on that layer's
    /// forward adds it, until this set is dropped.
    pub fn attach<B: Backend>(&mut self, weight: ParamId, update: LowRankUpdate<B>) {
        let mut registry = REGISTRY.write().unwrap_or_else(PoisonError::into_inner);
        registry
            .get_or_insert_with(HashMap::new)
            .entry(weight)
            .or_default()
            .push((self.set, Arc::new(update)));
        ATTACHED.fetch_add(1, Ordering::Release);
        self.weights.push(weight);
    }

    /// How many updates this set holds.
    pub fn len(&self) -> usize {
        self.weights.len()
    }

    /// Whether this set holds no update.
    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// Takes this set's updates out (what dropping it does).
    pub fn detach(self) {}
}

impl Drop for AttachedUpdates {
    fn drop(&mut self) {
        if self.weights.is_empty() {
            return;
        }
        let mut registry = REGISTRY.write().unwrap_or_else(PoisonError::into_inner);
        let Some(map) = registry.as_mut() else {
            return;
        };
        for weight in &self.weights {
            if let Some(entries) = map.get_mut(weight) {
                let before = entries.len();
                entries.retain(|(set, _)| *set != self.set);
                ATTACHED.fetch_sub(before - entries.len(), Ordering::Release);
                if entries.is_empty() {
                    map.remove(weight);
                }
            }
        }
    }
}

/// The updates attached to `weight` for backend `B` (none in the common case, cheaply).
fn updates_of<B: Backend>(weight: ParamId) -> Vec<LowRankUpdate<B>> {
    if ATTACHED.load(Ordering::Acquire) == 0 {
        return Vec::new();
    }
    let registry = REGISTRY.read().unwrap_or_else(PoisonError::into_inner);
    registry
        .as_ref()
        .and_then(|map| map.get(&weight))
        .map(|entries| {
            entries
                .iter()
                .filter_map(|(_, update)| update.downcast_ref::<LowRankUpdate<B>>().cloned())
                .collect()
        })
        .unwrap_or_default()
}

/// The `(down, up)` pairs attached to `layer`'s weight (empty in the common case, cheaply).
pub(crate) fn linear_updates<B: Backend>(layer: &Linear<B>) -> Vec<(Linear<B>, Linear<B>)> {
    updates_of::<B>(layer.weight.id)
        .into_iter()
        .filter_map(|update| match update {
            LowRankUpdate::Linear(update) => Some((update.down, update.up)),
            LowRankUpdate::Conv { .. } => None,
        })
        .collect()
}

/// Whether low-rank updates are attached to `conv`'s weight (asked only before a Flex
/// kernel).
#[cfg(feature = "flex")]
pub(crate) fn has_updates<B: Backend>(conv: &Conv2d<B>) -> bool {
    !updates_of::<B>(conv.weight.id).is_empty()
}

/// The sum of the updates attached to `conv` applied to `x`, or `None` when there are none.
pub(crate) fn conv_delta<B: Backend>(conv: &Conv2d<B>, x: &Tensor<B, 4>) -> Option<Tensor<B, 4>> {
    let updates = updates_of::<B>(conv.weight.id);
    if updates.is_empty() {
        return None;
    }
    let mut sum: Option<Tensor<B, 4>> = None;
    for update in updates {
        if let LowRankUpdate::Conv { down, up } = update {
            // In the input's dtype: updates take the weight's, which may be held narrower
            // than the arithmetic (`LoadOptions::matrix_dtype`).
            let (down, up) = (to_dtype(down, x.dtype()), to_dtype(up, x.dtype()));
            // The layer's own stride, padding and dilation, through Burn's convolution.
            let [rank, _, kh, kw] = down.dims();
            let into_rank = Conv2d {
                weight: Param::from_tensor(down),
                bias: None,
                stride: conv.stride,
                kernel_size: [kh, kw],
                dilation: conv.dilation,
                groups: 1,
                padding: conv.padding.clone(),
            };
            debug_assert_eq!(into_rank.weight.dims()[0], rank);
            let hidden = into_rank.forward(x.clone());
            let delta = conv2d(
                hidden,
                up,
                None,
                ConvOptions::new([1, 1], [0, 0], [1, 1], 1),
            );
            sum = Some(match sum {
                Some(s) => s + delta,
                None => delta,
            });
        }
    }
    sum
}
