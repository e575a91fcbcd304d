//! LoRA runs (`sd train unet --lora-rank R`): the model frozen, sd-lora's [`LoraNetwork`]
//! factors trained in its place (Hu et al. 2021), as kohya's sd-scripts and diffusers'
//! `train_text_to_image_lora.py` do. A checkpoint holds the factors and their Adam moments,
//! each as a LoRA file in kohya's layout, never a copy of the model.

use std::path::{Path, PathBuf};

use burn::module::{AutodiffModule, Module};
use burn::tensor::DType;
use burn::tensor::backend::AutodiffBackend;
use sd_lora::{Component, LoraFile, LoraNetwork, LoraTargets};

use crate::AdamW;
use crate::config::LoraConfig;
use crate::error::Result;

/// A frozen model and the LoRA that trains beside it.
pub(crate) struct LoraTrainee<AB: AutodiffBackend, M> {
    /// The model, its parameters out of the autodiff graph.
    base: M,
    /// Where the factors go.
    pub targets: LoraTargets,
    /// The trained factors.
    pub network: LoraNetwork<AB>,
}

/// How a model's parameters are named in its checkpoint (a Burn path to a key), and which of
/// its linear modules the checkpoint holds as 1×1 convolutions.
pub type ModuleNaming<'a> = (&'a dyn Fn(&str) -> Option<String>, &'a dyn Fn(&str) -> bool);

impl<AB: AutodiffBackend, M: Module<AB>> LoraTrainee<AB, M> {
    /// Fresh factors (`down` from `seed`, `up` zero) on `config.targets` of `base`.
    /// `stored_as_conv` names the linear modules the checkpoint holds as 1×1 convolutions
    /// ([`LoraTargets::with_conv_modules`]).
    pub fn new(
        base: M,
        component: Component,
        config: &LoraConfig,
        (checkpoint_key, stored_as_conv): ModuleNaming<'_>,
        seed: u64,
        device: &AB::Device,
    ) -> Result<Self> {
        let base = base.no_grad();
        let targets = LoraTargets::find(
            &base,
            component,
            &config.target_set()?,
            config.rank,
            config.alpha(),
            checkpoint_key,
        )?
        .with_conv_modules(stored_as_conv);
        let network = targets.init(config.init_kind()?, seed, device);
        Ok(Self {
            base,
            targets,
            network,
        })
    }

    /// The model as the forward pass sees it: every target `W + (α / r) · B A`.
    pub fn model(&self) -> M {
        self.targets.apply(&self.network, self.base.clone())
    }

    /// The factors as a LoRA file (named `name`, not written).
    pub fn file(&self, name: impl AsRef<Path>) -> LoraFile {
        self.targets.to_file(&self.network.valid(), name)
    }

    /// Writes `dir/lora_<stem>.safetensors` and its Adam moments under `dir/optimizer/`, all f32
    /// in kohya's layout.
    pub fn save(&self, adamw: &AdamW<AB::InnerBackend>, dir: &Path, stem: &str) -> Result<()> {
        let optimizer = dir.join("optimizer");
        std::fs::create_dir_all(&optimizer)
            .map_err(|e| crate::TrainError::Io(format!("{}: {e}", optimizer.display())))?;
        let inner = self.network.valid();
        let (first, second) = adamw.moment_modules(&inner)?;
        for (module, path) in [
            (&inner, factors_path(dir, stem)),
            (
                &first,
                optimizer.join(format!("lora_{stem}_exp_avg.safetensors")),
            ),
            (
                &second,
                optimizer.join(format!("lora_{stem}_exp_avg_sq.safetensors")),
            ),
        ] {
            self.targets
                .to_file(module, &path)
                .save_kohya(&path, DType::F32)?;
        }
        Ok(())
    }

    /// The factors and optimiser that [`Self::save`] wrote into `dir`, on the targets of a
    /// fresh trainee (the same model and settings).
    pub fn restore(
        mut self,
        dir: &Path,
        stem: &str,
        config: crate::AdamWConfig,
        step: u64,
        device: &AB::Device,
    ) -> Result<(Self, AdamW<AB::InnerBackend>)> {
        let read = |path: PathBuf| LoraFile::open(path);
        self.network = self
            .targets
            .read::<AB>(&read(factors_path(dir, stem))?, device)?;
        let optimizer = dir.join("optimizer");
        let moments = |which: &str| {
            self.targets.read::<AB::InnerBackend>(
                &read(optimizer.join(format!("lora_{stem}_{which}.safetensors")))?,
                device,
            )
        };
        let (first, second) = (moments("exp_avg")?, moments("exp_avg_sq")?);
        let adamw = AdamW::from_moment_modules(config, step, &first, &second)?;
        Ok((self, adamw))
    }
}

fn factors_path(dir: &Path, stem: &str) -> PathBuf {
    dir.join(format!("lora_{stem}.safetensors"))
}

/// One LoRA file from the trained parts (the U-Net's, and the text encoder's when it trains),
/// written in `format` (`kohya` or `diffusers`) at `path`, in f32 (the training dtype, as both
/// scripts save it without a save precision).
pub(crate) fn write_lora(parts: Vec<LoraFile>, format: &str, path: &Path) -> Result<()> {
    let mut layers = Vec::new();
    let mut metadata = std::collections::BTreeMap::new();
    for part in parts {
        if metadata.is_empty() {
            metadata = part.metadata.clone();
        }
        layers.extend(part.layers);
    }
    let file = LoraFile::new(path, sd_lora::LoraFormat::Kohya, layers, metadata);
    match format {
        "diffusers" => file.save_diffusers(path, DType::F32)?,
        _ => file.save_kohya(path, DType::F32)?,
    }
    Ok(())
}
