//! IP-Adapter (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter for
//! Text-to-Image Diffusion Models"): an image prompt through decoupled cross-attention. The CLIP
//! image embedding is projected to a few context tokens (`ImageProjection`, sec. 3.2.1); each
//! cross-attention of the U-Net attends to them with its own key and value projections
//! (`to_k_ip`, `to_v_ip`) and adds the result, scaled, to its attention to the text
//! (sec. 3.2.2, eq. 5): `Attention(Q, K, V) + λ·Attention(Q, K_ip, V_ip)`, before `to_out`.

use std::path::Path;

use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use sd_core::layers::linear_forward;
use sd_core::weights::{LoadOptions, SafetensorsFile, load_safetensors};
use sd_core::{CoreError, Result};

use crate::transformer::{BasicTransformerBlock, IpAttention};
use crate::unet::UNet2DConditionModel;

/// diffusers' `ImageProjection`: the image embedding to `tokens` context tokens, each
/// LayerNormed.
#[derive(Module, Debug)]
pub struct ImageProjection<B: Backend> {
    /// `[embedding] → [tokens × context width]`.
    pub proj: Linear<B>,
    /// Over each token's width.
    pub norm: LayerNorm<B>,
}

impl<B: Backend> ImageProjection<B> {
    /// `embeds`: `[batch, embedding]`; returns `[batch, tokens, context width]`.
    pub fn forward(&self, embeds: Tensor<B, 2>) -> Tensor<B, 3> {
        let [b, _] = embeds.dims();
        let width = self.norm.gamma.dims()[0];
        let tokens = linear_forward(&self.proj, embeds).reshape([b as i32, -1, width as i32]);
        sd_core::layers::layer_norm(&self.norm, tokens)
    }

    /// How many context tokens one image becomes.
    pub fn tokens(&self) -> usize {
        self.proj.weight.dims()[1] / self.norm.gamma.dims()[0]
    }
}

/// An IP-Adapter as released (`ip-adapter_sd15.safetensors`: `image_proj.*` and
/// `ip_adapter.{1, 3, 5, …}.to_{k,v}_ip.weight`, one pair per cross-attention of the U-Net in
/// diffusers' `attn_processors` order: down blocks, up blocks, then the mid block).
#[derive(Module, Debug)]
pub struct IpAdapter<B: Backend> {
    /// The image embedding to context tokens.
    pub image_proj: ImageProjection<B>,
    /// One per cross-attention, in the file's order.
    pub layers: Vec<IpAttention<B>>,
}

impl<B: Backend> IpAdapter<B> {
    /// Reads an IP-Adapter file, its shapes from the file itself. Only the plain
    /// `ImageProjection` kind (IP-Adapter, not Plus/FaceID, whose projections are resamplers)
    /// is supported; others are refused naming what the file holds.
    pub fn load(path: impl AsRef<Path>, options: LoadOptions, device: &B::Device) -> Result<Self> {
        let file = SafetensorsFile::open_any(path.as_ref())?;
        let shape = |key: &str| {
            file.entries()
                .iter()
                .find(|e| e.key == key)
                .map(|e| e.shape.clone())
        };
        let refuse = |reason: String| CoreError::Config {
            path: file.path().into(),
            reason,
        };
        let (Some(proj), Some(norm)) = (
            shape("image_proj.proj.weight"),
            shape("image_proj.norm.weight"),
        ) else {
            let plus = file
                .entries()
                .iter()
                .any(|e| e.key.starts_with("image_proj.latents") || e.key.contains("perceiver"));
            return Err(refuse(if plus {
                "an IP-Adapter Plus/FaceID (a resampler image projection) is not supported; \
                 use a plain IP-Adapter (`image_proj.proj`, `image_proj.norm`)"
                    .into()
            } else {
                "not an IP-Adapter: no `image_proj.proj.weight` and `image_proj.norm.weight`".into()
            }));
        };
        let ([out, embedding], [width]) = (proj.as_slice(), norm.as_slice()) else {
            return Err(refuse("image_proj.proj/norm have unexpected ranks".into()));
        };
        let (out, embedding, width) = (*out, *embedding, *width);
        if width == 0 || out % width != 0 {
            return Err(refuse(format!(
                "image_proj.proj gives {out} values, not a whole number of {width}-wide tokens"
            )));
        }
        // The attention layers, in the order of their numbers.
        let mut numbers: Vec<usize> = file
            .entries()
            .iter()
            .filter_map(|e| {
                let rest = e.key.strip_prefix("ip_adapter.")?;
                let (k, name) = rest.split_once('.')?;
                (name == "to_k_ip.weight").then(|| k.parse().ok())?
            })
            .collect();
        numbers.sort_unstable();
        if numbers.is_empty() {
            return Err(refuse("no `ip_adapter.N.to_k_ip.weight` layers".into()));
        }
        let mut layers = Vec::with_capacity(numbers.len());
        for k in &numbers {
            let key = format!("ip_adapter.{k}.to_k_ip.weight");
            let Some([hidden, context]) = shape(&key).as_deref().map(|s| match s {
                [h, c] => [*h, *c],
                _ => [0, 0],
            }) else {
                return Err(refuse(format!("{key} is missing")));
            };
            if context != width {
                return Err(refuse(format!(
                    "{key} reads {context}-wide tokens; image_proj makes {width}-wide ones"
                )));
            }
            let projection = || {
                LinearConfig::new(context, hidden)
                    .with_bias(false)
                    .init(device)
            };
            layers.push(IpAttention {
                to_k_ip: projection(),
                to_v_ip: projection(),
                scale: 1.0,
                tokens: out / width,
            });
        }
        let adapter = Self {
            image_proj: ImageProjection {
                proj: LinearConfig::new(embedding, out).init(device),
                norm: LayerNormConfig::new(width).with_epsilon(1e-5).init(device),
            },
            layers,
        };
        let map = move |key: &str| -> Option<String> {
            if key.starts_with("image_proj.") {
                return Some(key.to_string());
            }
            let rest = key.strip_prefix("ip_adapter.")?;
            let (k, name) = rest.split_once('.')?;
            let k: usize = k.parse().ok()?;
            let index = numbers.binary_search(&k).ok()?;
            Some(format!("layers.{index}.{name}"))
        };
        load_safetensors(adapter, &file, &map, options)
    }

    /// The width of the image embedding it takes (the image encoder's `projection_dim`).
    pub fn embedding_width(&self) -> usize {
        self.image_proj.proj.weight.dims()[0]
    }

    /// The image prompt's context tokens for `embeds` `[batch, embedding]`.
    pub fn image_tokens(&self, embeds: Tensor<B, 2>) -> Result<Tensor<B, 3>> {
        let [_, e] = embeds.dims();
        if e != self.embedding_width() {
            return Err(CoreError::InvalidInput(format!(
                "the image embedding is {e} wide; this IP-Adapter takes {} (the image encoder's \
                 projection_dim)",
                self.embedding_width()
            )));
        }
        Ok(self.image_proj.forward(embeds))
    }
}

impl<B: Backend> UNet2DConditionModel<B> {
    /// Gives every cross-attention its IP-Adapter layer, at scale `scale`: from now on the
    /// context's last `tokens` tokens are the image prompt's (see
    /// [`crate::UNetConditioning::image_prompt`]). The layers must match the U-Net's
    /// cross-attentions in number and width, in diffusers' order.
    pub fn with_ip_adapter(mut self, adapter: &IpAdapter<B>, scale: f64) -> Result<Self> {
        let mut blocks: Vec<&mut BasicTransformerBlock<B>> = Vec::new();
        let transformers = self
            .down_blocks
            .iter_mut()
            .flat_map(|b| b.attentions.iter_mut())
            .chain(
                self.up_blocks
                    .iter_mut()
                    .flat_map(|b| b.attentions.iter_mut()),
            )
            .chain(
                self.mid_block
                    .iter_mut()
                    .flat_map(|b| b.attentions.iter_mut()),
            );
        for t in transformers {
            blocks.extend(t.transformer_blocks.iter_mut());
        }
        if blocks.len() != adapter.layers.len() {
            return Err(CoreError::InvalidInput(format!(
                "the IP-Adapter has {} attention layers, the U-Net {} cross-attentions: it was \
                 made for another model",
                adapter.layers.len(),
                blocks.len()
            )));
        }
        for (i, (block, layer)) in blocks.into_iter().zip(&adapter.layers).enumerate() {
            let width = block.attn2.to_q.weight.dims()[1];
            let context = block.attn2.to_k.weight.dims()[0];
            let [lc, lw] = layer.to_k_ip.weight.dims();
            if (lc, lw) != (context, width) {
                return Err(CoreError::InvalidInput(format!(
                    "IP-Adapter layer {i} maps {lc}-wide tokens to {lw}; the U-Net's \
                     cross-attention {i} takes {context}-wide context into {width} channels"
                )));
            }
            block.ip = Some(IpAttention {
                scale,
                ..layer.clone()
            });
        }
        self.image_tokens = adapter.layers.first().map_or(0, |l| l.tokens);
        Ok(self)
    }
}
