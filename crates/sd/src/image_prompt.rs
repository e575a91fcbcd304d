//! IP-Adapter image prompts in the pipeline (diffusers' `load_ip_adapter` +
//! `ip_adapter_image=`): the image embedded by a CLIP image encoder, projected to context tokens
//! by the adapter, and read by every cross-attention of the U-Net beside the text.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use sd_conditioner::image_processor::{CLIP_SIZE, Resampler, clip_crop_with, clip_input};
use sd_conditioner::{ClipVisionConfig, ClipVisionModel};
use sd_core::weights::SafetensorsFile;
use sd_unet::IpAdapter;

use crate::error::{Result, SdError, model_error};
use crate::model::Model;

/// An image prompt: the adapter, the image encoder it was trained with, the image and its weight.
#[derive(Debug, Clone)]
pub struct ImagePrompt {
    /// The IP-Adapter file (`ip-adapter_sd15.safetensors`).
    pub adapter: PathBuf,
    /// The CLIP image encoder folder (`CLIPVisionModelWithProjection`: `config.json` and
    /// `model.safetensors`).
    pub image_encoder: PathBuf,
    /// The image.
    pub image: image::RgbImage,
    /// λ: the image prompt's weight against the text (diffusers' `set_ip_adapter_scale`).
    pub scale: f64,
}

impl ImagePrompt {
    /// The image encoder for `adapter` when none is named: an `image_encoder/` folder beside
    /// the adapter file or one level up (the layout of the released repository:
    /// `models/image_encoder/` next to `models/ip-adapter_sd15.safetensors`), else the model
    /// folder's own `image_encoder/`.
    pub fn find_image_encoder(adapter: &Path, model: &Model) -> Result<PathBuf> {
        let beside = adapter.parent().map(|d| d.join("image_encoder"));
        let above = adapter
            .parent()
            .and_then(Path::parent)
            .map(|d| d.join("image_encoder"));
        let in_model = Some(model.path().join("image_encoder"));
        [beside, above, in_model]
            .into_iter()
            .flatten()
            .find(|d| d.join("config.json").is_file())
            .ok_or_else(|| {
                model_error(
                    adapter,
                    "no image_encoder/ folder beside this IP-Adapter, above it, or in the model \
                     folder: name the CLIP image encoder it was trained with",
                )
            })
    }

    /// Checks the weight.
    pub(crate) fn check(&self) -> Result<()> {
        if !self.scale.is_finite() || self.scale.abs() > 100.0 {
            return Err(SdError::InvalidOptions(format!(
                "image prompt scale {} is outside [-100, 100]",
                self.scale
            )));
        }
        if self.image.width() == 0 || self.image.height() == 0 {
            return Err(SdError::InvalidOptions("the image prompt is empty".into()));
        }
        Ok(())
    }

    /// The adapter (to attach to the U-Net) and the image-prompt tokens for `n` images:
    /// `[negative × n; image × n]` when guided, the negative half from a zero image embedding
    /// as diffusers makes it. The image encoder is dropped on return.
    pub fn encode<B: Backend>(
        &self,
        model: &Model,
        n: usize,
        guided: bool,
        device: &B::Device,
    ) -> Result<(IpAdapter<B>, Tensor<B, 3>)> {
        let options = model.weight_load_options();
        let adapter = IpAdapter::<B>::load(&self.adapter, options, device)?;
        let embeds = {
            let dir = &self.image_encoder;
            let config = ClipVisionConfig::from_file(dir.join("config.json"))?;
            let file = SafetensorsFile::open(dir.join("model.safetensors"))?;
            let encoder =
                ClipVisionModel::<B>::new(&config, device)?.load_weights(&file, options)?;
            let (w, h) = (self.image.width() as usize, self.image.height() as usize);
            // diffusers' `load_ip_adapter` makes a default `CLIPImageProcessor`: torchvision's
            // resize in transformers 5.
            let crop = clip_crop_with(self.image.as_raw(), w, h, Resampler::Torchvision);
            let pixels = clip_input(&crop);
            let pixels = Tensor::<B, 4>::from_data(
                TensorData::new(pixels, [1, 3, CLIP_SIZE, CLIP_SIZE]),
                device,
            )
            .cast(model.dtype());
            encoder.forward(pixels)?.image_embeds
        };
        let width = adapter.embedding_width();
        if embeds.dims()[1] != width {
            return Err(model_error(
                &self.image_encoder,
                format!(
                    "this image encoder embeds images in {} values; the IP-Adapter {} takes {width}",
                    embeds.dims()[1],
                    self.adapter.display()
                ),
            ));
        }
        let image = adapter.image_tokens(embeds.clone())?;
        let image = Tensor::cat(vec![image; n], 0);
        let tokens = if guided {
            let negative = adapter.image_tokens(embeds.zeros_like())?;
            Tensor::cat(vec![Tensor::cat(vec![negative; n], 0), image], 0)
        } else {
            image
        };
        Ok((adapter, tokens))
    }

    /// The name A1111 records: the adapter file's stem.
    pub fn name(&self) -> String {
        self.adapter
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}
