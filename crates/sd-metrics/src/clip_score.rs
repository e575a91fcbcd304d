//! CLIP score (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image
//! Captioning", eq. 1 with w = 100 as torchmetrics defines it): `100 · max(cos(E_I, E_C), 0)`
//! for each image and its caption, `E_I` the CLIP model's projected image embedding and `E_C`
//! its projected text embedding; the score of a set is the mean.
//!
//! The model is a transformers `CLIPModel` folder (`openai/clip-vit-large-patch14`, as
//! torchmetrics defaults to): one `model.safetensors` holding both towers, `config.json` with
//! `text_config`, `vision_config` and the shared `projection_dim`, and the tokenizer files.
//! Images go through `CLIPImageProcessor`'s PIL path ([`crate::preprocess::clip_crop`]);
//! captions are cut to 77 tokens with the end token kept (torchmetrics' own truncation drops
//! it, a known bug; transformers' tokenizer keeps it).

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use sd_conditioner::{
    ClipTextConfig, ClipTextModel, ClipTokenizer, ClipVisionConfig, ClipVisionModel, padding_of,
};
use sd_core::CoreError;
use sd_core::weights::{LoadOptions, SafetensorsFile};

use crate::error::{MetricsError, Result};
use crate::preprocess::{CLIP_SIZE, clip_crop, clip_input};

/// A CLIP model for scoring image–caption pairs.
pub struct ClipScorer<B: Backend> {
    text: ClipTextModel<B>,
    vision: ClipVisionModel<B>,
    tokenizer: ClipTokenizer,
    device: B::Device,
}

/// A `CLIPModel` config's section (`text_config` / `vision_config`) with the model's
/// `projection_dim` (the towers' own default, 512, is not what the projections use).
fn section(json: &serde_json::Value, name: &str) -> serde_json::Value {
    let mut section = json.get(name).cloned().unwrap_or(serde_json::Value::Null);
    if let (Some(dim), Some(map)) = (json.get("projection_dim"), section.as_object_mut()) {
        map.insert("projection_dim".into(), dim.clone());
    }
    section
}

impl<B: Backend> ClipScorer<B> {
    /// Loads a transformers `CLIPModel` folder (`config.json`, `model.safetensors`, tokenizer).
    pub fn load(dir: impl AsRef<Path>, device: &B::Device) -> Result<Self> {
        let dir = dir.as_ref();
        let config_path = dir.join("config.json");
        let text = sd_core::files::read_regular_to_string(&config_path)?;
        let bad = |reason: String| MetricsError::from(CoreError::config(&config_path, reason));
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        if json.get("text_config").is_none() || json.get("vision_config").is_none() {
            return Err(bad(
                "not a CLIPModel config (no `text_config` and `vision_config`)".into(),
            ));
        }
        let text_config: ClipTextConfig = sd_core::config_checks::from_value(
            section(&json, "text_config"),
            ClipTextConfig::REQUIRED,
        )
        .map_err(|e| bad(format!("text_config: {e}")))?;
        text_config
            .validate()
            .map_err(|e| bad(format!("text_config: {e}")))?;
        let vision_config: ClipVisionConfig =
            sd_core::config_checks::from_value(section(&json, "vision_config"), &[])
                .map_err(|e| bad(format!("vision_config: {e}")))?;
        vision_config
            .validate()
            .map_err(|e| bad(format!("vision_config: {e}")))?;
        if vision_config.image_size != CLIP_SIZE {
            return Err(bad(format!(
                "vision_config.image_size is {}; CLIP score's preprocessing makes {CLIP_SIZE}²",
                vision_config.image_size
            )));
        }
        let file = SafetensorsFile::open(dir.join("model.safetensors"))?;
        // One file holds both towers: each takes its own keys (the text tower reads the
        // vision keys as unexpected ones, and leaves them).
        let text_options = LoadOptions {
            reject_unexpected: false,
            ..LoadOptions::default()
        };
        let text =
            ClipTextModel::new(&text_config, true, device)?.load_weights(&file, text_options)?;
        let vision = ClipVisionModel::new(&vision_config, device)?
            .load_weights(&file, LoadOptions::default())?;
        let tokenizer = ClipTokenizer::from_folder(dir, padding_of(dir))?;
        Ok(Self {
            text,
            vision,
            tokenizer,
            device: device.clone(),
        })
    }

    /// The projected image embeddings `[n, projection_dim]` of RGB images, each prepared by
    /// [`clip_crop`] and [`clip_input`].
    pub fn image_embeds(&self, images: &[image::RgbImage]) -> Result<Tensor<B, 2>> {
        let mut pixels = Vec::with_capacity(images.len() * 3 * CLIP_SIZE * CLIP_SIZE);
        for picture in images {
            let (w, h) = (picture.width() as usize, picture.height() as usize);
            pixels.extend(clip_input(&clip_crop(picture.as_raw(), w, h)));
        }
        let x = Tensor::<B, 4>::from_data(
            TensorData::new(pixels, [images.len(), 3, CLIP_SIZE, CLIP_SIZE]),
            &self.device,
        );
        Ok(self.vision.forward(x)?.image_embeds)
    }

    /// The projected text embeddings `[n, projection_dim]` of captions (77 tokens at most, the
    /// end token kept).
    pub fn text_embeds(&self, captions: &[&str]) -> Result<Tensor<B, 2>> {
        let ids = captions
            .iter()
            .map(|c| self.tokenizer.encode_padded(c))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let out = self.text.forward(&ids)?;
        out.text_embeds.ok_or_else(|| {
            MetricsError::from(CoreError::InvalidInput(
                "the CLIP text tower has no text_projection".into(),
            ))
        })
    }

    /// Each pair's score: `100 · max(cos(image, text), 0)`.
    pub fn scores(image_embeds: Tensor<B, 2>, text_embeds: Tensor<B, 2>) -> Result<Vec<f64>> {
        let normalise = |x: Tensor<B, 2>| {
            let norm = x.clone().powf_scalar(2.0).sum_dim(1).sqrt();
            x / norm
        };
        let cos = (normalise(image_embeds) * normalise(text_embeds)).sum_dim(1);
        let values: Vec<f32> = cos
            .into_data()
            .convert::<f32>()
            .to_vec()
            .map_err(|e| MetricsError::from(CoreError::InvalidInput(format!("{e:?}"))))?;
        Ok(values
            .into_iter()
            .map(|c| (100.0 * f64::from(c)).max(0.0))
            .collect())
    }
}
