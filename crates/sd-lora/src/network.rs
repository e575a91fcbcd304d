//! Training a LoRA: trainable factors beside a frozen model.
//!
//! [`LoraTargets::find`] picks the weights to adapt (kohya's set, diffusers' or named modules)
//! from a model whose parameters carry checkpoint key names; [`LoraNetwork`] is the Burn module
//! of their factors, the only thing an optimiser sees; [`LoraTargets::apply`] hands the frozen
//! model back with each adapted weight replaced by `W + (α / r) · B A` (Hu et al. 2021, eq. 3),
//! an expression of the factors, so that one backward pass through the model's own forward
//! reaches them. This equals PEFT's `W x + (α / r) · B (A x)` up to rounding, and works for any
//! module and backend: no layer needs a LoRA variant.

use std::collections::{BTreeMap, HashMap};

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use burn_store::{BurnToPyTorchAdapter, ModuleSnapshot};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal, Uniform};

use crate::error::{LoraError, Result};
use crate::file::{Component, LoraFile, LoraFormat, LoraLayer, ModuleName};
use crate::merge::{ModulePath, ParamChange, PathMapper, delta};

/// Which weights a trained LoRA adapts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetSet {
    /// kohya's sd-scripts (`networks/lora.py`): every linear layer and 1×1 convolution inside
    /// the U-Net's transformer blocks (`attentions.*`: `proj_in`, `proj_out`, the attention
    /// projections, the feed-forward), and the text encoder's attention and MLP.
    Kohya,
    /// diffusers' `train_text_to_image_lora.py`: the attention projections `to_q`, `to_k`,
    /// `to_v`, `to_out.0` (the text encoder's `q_proj`, `k_proj`, `v_proj`, `out_proj`).
    Diffusers,
    /// Modules named (PEFT's `target_modules` rule: the whole dotted path or its last
    /// components, `to_q` or `attn1.to_q`).
    Names(Vec<String>),
}

impl TargetSet {
    /// `kohya`, `diffusers`, or a comma-separated list of module names.
    pub fn parse(text: &str) -> Result<Self> {
        match text.trim() {
            "kohya" => Ok(Self::Kohya),
            "diffusers" => Ok(Self::Diffusers),
            "" => Err(LoraError::Spec(
                "--lora-targets: give `kohya`, `diffusers` or module names".into(),
            )),
            list => Ok(Self::Names(
                list.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect(),
            )),
        }
    }

    /// The form [`Self::parse`] reads.
    pub fn to_text(&self) -> String {
        match self {
            Self::Kohya => "kohya".into(),
            Self::Diffusers => "diffusers".into(),
            Self::Names(names) => names.join(","),
        }
    }

    fn selects(&self, component: Component, module: &str) -> bool {
        let ends = |name: &str| module == name || module.ends_with(&format!(".{name}"));
        match (self, component) {
            (Self::Kohya, Component::Unet) => module.contains("attentions."),
            (Self::Kohya, _) => module.contains(".self_attn.") || module.contains(".mlp."),
            (Self::Diffusers, Component::Unet) => {
                ["to_q", "to_k", "to_v", "to_out.0"].iter().any(|n| ends(n))
            }
            (Self::Diffusers, _) => ["q_proj", "k_proj", "v_proj", "out_proj"]
                .iter()
                .any(|n| ends(n)),
            (Self::Names(names), _) => names.iter().any(|n| ends(n)),
        }
    }
}

/// How the factors start (both leave the model unchanged: `up` is zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoraInit {
    /// kohya's and PEFT's default: `down` Kaiming-uniform with `a = √5` (torch's `Linear`
    /// initialisation, bound `1 / √fan_in`), `up` zeros.
    #[default]
    Kohya,
    /// PEFT's `init_lora_weights="gaussian"` (diffusers' training scripts): `down` normal with
    /// standard deviation `1 / rank`, `up` zeros.
    Gaussian,
}

impl LoraInit {
    /// `kohya` or `gaussian`.
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "kohya" => Ok(Self::Kohya),
            "gaussian" => Ok(Self::Gaussian),
            other => Err(LoraError::Spec(format!(
                "--lora-init `{other}`: expected `kohya` or `gaussian`"
            ))),
        }
    }

    /// The form [`Self::parse`] reads.
    pub fn name(self) -> &'static str {
        match self {
            Self::Kohya => "kohya",
            Self::Gaussian => "gaussian",
        }
    }
}

/// One adapted weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraTarget {
    /// The module's checkpoint path (`down_blocks.0.attentions.0.proj_in`).
    pub module: String,
    /// Output features (channels).
    pub out: usize,
    /// Input features (channels).
    pub inputs: usize,
    /// A 1×1 convolution (`[out, in, 1, 1]` factors' shapes), not a linear layer.
    pub conv: bool,
    /// The parameter's path in the Burn module.
    burn_path: String,
}

/// The weights a LoRA adapts in one model, with its rank and alpha.
#[derive(Debug, Clone)]
pub struct LoraTargets {
    /// The model adapted.
    pub component: Component,
    /// The adapted weights, in the model's parameter order.
    pub targets: Vec<LoraTarget>,
    /// The rank `r` of every pair of factors.
    pub rank: usize,
    /// The alpha `α`: updates are scaled by `α / r`.
    pub alpha: f32,
}

impl LoraTargets {
    /// The weights of `module` that `set` selects: linear layers, and convolutions with a 1×1
    /// kernel. `checkpoint_key` names a Burn parameter path the way the checkpoint does (as
    /// for [`crate::merge`]). A set that selects nothing is an error naming it.
    pub fn find<B: Backend, M: Module<B>>(
        module: &M,
        component: Component,
        set: &TargetSet,
        rank: usize,
        alpha: f32,
        checkpoint_key: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self> {
        if rank == 0 {
            return Err(LoraError::Spec("--lora-rank must be at least 1".into()));
        }
        if !(alpha.is_finite() && alpha > 0.0) {
            return Err(LoraError::Spec(format!(
                "--lora-alpha {alpha}: must be a positive number"
            )));
        }
        let mut targets = Vec::new();
        for snapshot in module.collect(None, Some(Box::new(BurnToPyTorchAdapter)), false) {
            let burn_path = snapshot.full_path();
            let Some(module_path) = checkpoint_key(&burn_path)
                .and_then(|k| k.strip_suffix(".weight").map(str::to_string))
            else {
                continue;
            };
            let container = snapshot.container_type();
            let shape: Vec<usize> = snapshot.shape.iter().copied().collect();
            let conv = match (container.as_str(), shape.as_slice()) {
                ("Struct:Linear", [_, _]) => false,
                (c, [_, _, 1, 1]) if c.contains("Conv") => true,
                _ => continue,
            };
            if !set.selects(component, &module_path) {
                continue;
            }
            targets.push(LoraTarget {
                module: module_path,
                out: shape[0],
                inputs: shape[1],
                conv,
                burn_path,
            });
        }
        if targets.is_empty() {
            return Err(LoraError::Spec(format!(
                "--lora-targets {}: no linear layer or 1×1 convolution of {} matches",
                set.to_text(),
                component.name()
            )));
        }
        Ok(Self {
            component,
            targets,
            rank,
            alpha,
        })
    }

    /// Marks the linear targets whose checkpoint holds the weight as a 1×1 convolution
    /// (`stored_as_conv(module)`; SD 1.x's `proj_in`/`proj_out`): their factors are then
    /// written `[r, in, 1, 1]` / `[out, r, 1, 1]`, the shapes kohya's sd-scripts and PEFT give a
    /// convolution's LoRA, which diffusers' `load_lora_weights` requires.
    pub fn with_conv_modules(mut self, stored_as_conv: &dyn Fn(&str) -> bool) -> Self {
        for target in &mut self.targets {
            target.conv |= stored_as_conv(&target.module);
        }
        self
    }

    /// `α / r`.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    /// Fresh factors: `down` drawn as `init` says from `seed`, `up` zeros.
    pub fn init<B: Backend>(
        &self,
        init: LoraInit,
        seed: u64,
        device: &B::Device,
    ) -> LoraNetwork<B> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut down = Vec::with_capacity(self.targets.len());
        let mut up = Vec::with_capacity(self.targets.len());
        for target in &self.targets {
            let n = self.rank * target.inputs;
            let values: Vec<f32> = match init {
                LoraInit::Kohya => {
                    let bound = 1.0 / (target.inputs as f32).sqrt();
                    let uniform = Uniform::new(-bound, bound).expect("a positive bound");
                    (0..n).map(|_| uniform.sample(&mut rng)).collect()
                }
                LoraInit::Gaussian => {
                    let normal =
                        Normal::new(0.0, 1.0 / self.rank as f32).expect("a positive deviation");
                    (0..n).map(|_| normal.sample(&mut rng)).collect()
                }
            };
            let d = TensorData::new(values, [self.rank, target.inputs]);
            down.push(Param::from_tensor(Tensor::from_data(d, device)));
            up.push(Param::from_tensor(Tensor::zeros(
                [target.out, self.rank],
                device,
            )));
        }
        LoraNetwork { down, up }
    }

    /// Factors read from a LoRA file (any layout) that adapts exactly these weights with this
    /// rank: what a checkpoint holds. Every missing, extra or misshapen layer is reported.
    pub fn read<B: Backend>(&self, file: &LoraFile, device: &B::Device) -> Result<LoraNetwork<B>> {
        let mut by_name: HashMap<String, &LoraLayer> = HashMap::new();
        for layer in file.layers_of(self.component) {
            let name = match &layer.module {
                ModuleName::Dotted(m) => m.replace('.', "_"),
                ModuleName::Underscored(m) => m.clone(),
            };
            by_name.insert(strip_text_model(&name).to_string(), layer);
        }
        let mut problems = Vec::new();
        let (mut down, mut up) = (Vec::new(), Vec::new());
        for target in &self.targets {
            let name = target.module.replace('.', "_");
            let Some(layer) = by_name.remove(strip_text_model(&name)) else {
                problems.push(format!("no factors for `{}`", target.module));
                continue;
            };
            let (out, inputs) = layer.delta_shape();
            if layer.rank() != self.rank || out != target.out || inputs != target.inputs {
                problems.push(format!(
                    "`{}`: rank {} and a [{out}, {inputs}] update where rank {} and [{}, {}] \
                     were expected",
                    layer.key,
                    layer.rank(),
                    self.rank,
                    target.out,
                    target.inputs
                ));
                continue;
            }
            let factor = |data: &TensorData, rows: usize, cols: usize| {
                let mut d = data.clone().convert_dtype(DType::F32);
                d.shape = vec![rows, cols].into();
                Param::from_tensor(Tensor::<B, 2>::from_data(d, device))
            };
            down.push(factor(&layer.down, self.rank, inputs));
            up.push(factor(&layer.up, out, self.rank));
        }
        problems.extend(
            by_name
                .values()
                .map(|l| format!("`{}` is not trained here", l.key)),
        );
        if !problems.is_empty() {
            return Err(LoraError::Mismatch {
                path: file.path.clone(),
                component: self.component.name().into(),
                problems,
            });
        }
        Ok(LoraNetwork { down, up })
    }

    /// `module` with every adapted weight `W` replaced by `W + (α / r) · up · down`, computed
    /// from `network`'s current factors (on an autodiff backend the gradient flows into them).
    /// `module` must be the model the targets were found in (or a clone of it).
    pub fn apply<B: Backend, M: Module<B>>(&self, network: &LoraNetwork<B>, module: M) -> M {
        let index: HashMap<&str, usize> = self
            .targets
            .iter()
            .enumerate()
            .map(|(i, t)| (t.burn_path.as_str(), i))
            .collect();
        let mut mapper = PathMapper {
            at: ModulePath::default(),
            visit: AddFactors {
                index,
                network,
                scale: self.scale(),
            },
            done: 0,
        };
        module.map(&mut mapper)
    }

    /// The factors as a [`LoraFile`] (module names dotted, alpha on every layer), to write with
    /// [`LoraFile::save_kohya`] or [`LoraFile::save_diffusers`].
    pub fn to_file<B: Backend>(
        &self,
        network: &LoraNetwork<B>,
        name: impl AsRef<std::path::Path>,
    ) -> LoraFile {
        let layers = self
            .targets
            .iter()
            .zip(network.down.iter().zip(&network.up))
            .map(|(target, (down, up))| {
                let shape = |rows: usize, cols: usize| {
                    if target.conv {
                        vec![rows, cols, 1, 1]
                    } else {
                        vec![rows, cols]
                    }
                };
                let mut down = down.val().into_data().convert_dtype(DType::F32);
                down.shape = shape(self.rank, target.inputs).into();
                let mut up = up.val().into_data().convert_dtype(DType::F32);
                up.shape = shape(target.out, self.rank).into();
                LoraLayer {
                    component: self.component,
                    module: ModuleName::Dotted(target.module.clone()),
                    key: target.module.clone(),
                    down,
                    up,
                    alpha: Some(self.alpha),
                }
            })
            .collect();
        let metadata = BTreeMap::from([
            ("ss_network_dim".to_string(), self.rank.to_string()),
            ("ss_network_alpha".to_string(), format!("{}", self.alpha)),
        ]);
        LoraFile::new(name, LoraFormat::Kohya, layers, metadata)
    }
}

/// kohya's text-encoder names with or without `text_model_` in front find each other.
fn strip_text_model(name: &str) -> &str {
    name.strip_prefix("text_model_").unwrap_or(name)
}

/// The trainable factors of a LoRA: `down[i]` (`A`, `[rank, in]`) and `up[i]` (`B`,
/// `[out, rank]`) for the `i`-th of its [`LoraTargets`] (1×1 convolutions held flattened).
#[derive(Module, Debug)]
pub struct LoraNetwork<B: Backend> {
    /// `A` of every target.
    pub down: Vec<Param<Tensor<B, 2>>>,
    /// `B` of every target.
    pub up: Vec<Param<Tensor<B, 2>>>,
}

/// [`LoraTargets::apply`]'s change: the weight plus its factors' product.
struct AddFactors<'a, B: Backend> {
    index: HashMap<&'a str, usize>,
    network: &'a LoraNetwork<B>,
    scale: f32,
}

impl<B: Backend> ParamChange<B> for AddFactors<'_, B> {
    fn change<const D: usize>(
        &mut self,
        path: &str,
        linear: bool,
        tensor: &Tensor<B, D>,
    ) -> Option<Tensor<B, D>> {
        let &i = self.index.get(path)?;
        let (up, down) = (self.network.up[i].val(), self.network.down[i].val());
        let delta = delta(up, down, self.scale, linear);
        Some(tensor.clone() + delta.reshape(tensor.dims()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};

    type B = burn::backend::Autodiff<sd_core::backend::DefaultBackend>;

    #[derive(Module, Debug)]
    struct Block<B: Backend> {
        to_q: Linear<B>,
        to_k: Linear<B>,
    }

    fn key(path: &str) -> Option<String> {
        Some(format!("attentions.0.{path}"))
    }

    #[test]
    fn apply_adds_the_scaled_product_and_its_gradient_reaches_the_factors() {
        let device = Default::default();
        let block = Block::<B> {
            to_q: LinearConfig::new(3, 2).init(&device),
            to_k: LinearConfig::new(3, 2).init(&device),
        }
        .no_grad();
        let targets =
            LoraTargets::find(&block, Component::Unet, &TargetSet::Diffusers, 2, 1.0, &key)
                .unwrap();
        assert_eq!(targets.targets.len(), 2);
        assert_eq!(targets.targets[0].module, "attentions.0.to_q");
        let mut network = targets.init::<B>(LoraInit::Kohya, 7, &device);
        // up = 0 at the start: the model is unchanged.
        let x = Tensor::<B, 2>::from_floats([[1.0, -2.0, 0.5]], &device);
        let before = block.to_q.forward(x.clone());
        let applied = targets.apply(&network, block.clone());
        let same = applied.to_q.forward(x.clone());
        assert!((before.clone() - same).abs().max().into_scalar() == 0.0);

        network.up[0] = Param::from_tensor(Tensor::from_floats([[1.0, 0.0], [0.0, 2.0]], &device));
        let applied = targets.apply(&network, block.clone());
        let y = applied.to_q.forward(x.clone());
        // W x + (α / r) · B (A x), with α / r = ½.
        let a = network.down[0].val();
        let expected = before
            + x.clone()
                .matmul(a.transpose())
                .matmul(network.up[0].val().transpose())
                .mul_scalar(0.5);
        let err: f32 = (y.clone() - expected).abs().max().into_scalar();
        assert!(err < 1e-6, "{err}");
        let grads = y.sum().backward();
        assert!(network.up[0].val().grad(&grads).is_some());
        assert!(network.down[0].val().grad(&grads).is_some());
        assert!(block.to_q.weight.val().grad(&grads).is_none());
    }

    #[test]
    fn saved_factors_read_back_for_the_same_targets() {
        let device = Default::default();
        let block = Block::<B> {
            to_q: LinearConfig::new(3, 2).init(&device),
            to_k: LinearConfig::new(3, 4).init(&device),
        };
        let set = TargetSet::parse("to_k").unwrap();
        let targets = LoraTargets::find(&block, Component::Unet, &set, 2, 4.0, &key).unwrap();
        assert_eq!(targets.targets.len(), 1);
        let network = targets.init::<B>(LoraInit::Gaussian, 1, &device);
        let dir = std::env::temp_dir().join(format!("sd-lora-net-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lora.safetensors");
        targets
            .to_file(&network, &path)
            .save_kohya(&path, DType::F32)
            .unwrap();
        let file = LoraFile::open(&path).unwrap();
        assert_eq!(file.layers[0].alpha, Some(4.0));
        let back = targets.read::<B>(&file, &device).unwrap();
        let diff: f32 = (back.down[0].val() - network.down[0].val())
            .abs()
            .max()
            .into_scalar();
        assert_eq!(diff, 0.0);
        let other = LoraTargets::find(&block, Component::Unet, &TargetSet::Diffusers, 2, 4.0, &key)
            .unwrap();
        let e = other.read::<B>(&file, &device).unwrap_err().to_string();
        assert!(e.contains("no factors for `attentions.0.to_q`"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
        let none = LoraTargets::find(
            &block,
            Component::Unet,
            &TargetSet::parse("ff").unwrap(),
            2,
            1.0,
            &key,
        );
        assert!(none.unwrap_err().to_string().contains("no linear layer"));
    }
}
