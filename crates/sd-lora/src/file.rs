//! Reading a LoRA file: its format told from the keys, its factors paired by module.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, TensorData};
use sd_core::weights::SafetensorsFile;

use crate::error::{LoraError, Result};

/// The key layout a file was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    /// kohya's sd-scripts, as A1111, ComfyUI and stable-diffusion.cpp load it:
    /// `lora_unet_<module path with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`
    /// (`lora_te_`, `lora_te1_`, `lora_te2_` for the text encoders). LoCon / LyCORIS
    /// convolution factors share it.
    Kohya,
    /// diffusers' `save_lora_weights`: `unet.` / `text_encoder.` / `text_encoder_2.` before the
    /// module path, PEFT's `lora_A` / `lora_B` (or the older `lora.down` / `lora.up`) after it.
    Diffusers,
    /// PEFT's `get_peft_model_state_dict` of one model: `<module path>.lora_A.weight`, with or
    /// without `base_model.model.` in front.
    Peft,
}

impl LoraFormat {
    /// The format's name for messages: `kohya`, `diffusers` or `peft`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Kohya => "kohya",
            Self::Diffusers => "diffusers",
            Self::Peft => "peft",
        }
    }
}

/// The model a LoRA layer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    /// The U-Net.
    Unet,
    /// The (first) text encoder: SD's only one, SDXL's CLIP ViT-L.
    TextEncoder,
    /// SDXL's second text encoder (OpenCLIP ViT-bigG).
    TextEncoder2,
}

impl Component {
    /// The model's name for messages (`the U-Net`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Unet => "the U-Net",
            Self::TextEncoder => "the text encoder",
            Self::TextEncoder2 => "the second text encoder",
        }
    }
}

/// The module a layer adapts, as the file names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleName {
    /// The checkpoint's own dotted path (`down_blocks.0.attentions.0.proj_in`).
    Dotted(String),
    /// kohya's: the dotted path with every `.` turned into `_`, resolved against the model's
    /// module paths (the mapping is not invertible by itself: module names hold `_` too).
    Underscored(String),
}

impl ModuleName {
    /// The name as the file writes it.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Dotted(s) | Self::Underscored(s) => s,
        }
    }
}

/// One adapted weight: `delta = (alpha / rank) · up · down`.
#[derive(Debug, Clone)]
pub struct LoraLayer {
    /// The model the layer adapts.
    pub component: Component,
    /// The module in that model whose weight the layer adapts.
    pub module: ModuleName,
    /// The file's key for the layer, without the factor suffix (for messages).
    pub key: String,
    /// `[rank, in]` for a linear layer, `[rank, in, kh, kw]` for a convolution; f32.
    pub down: TensorData,
    /// `[out, rank]` or `[out, rank, 1, 1]`; f32.
    pub up: TensorData,
    /// `None`: the rank (a scale of 1), as diffusers and PEFT files without an alpha mean.
    pub alpha: Option<f32>,
}

impl LoraLayer {
    /// The rank: the rows of `down`.
    pub fn rank(&self) -> usize {
        self.down.shape[0]
    }

    /// `alpha / rank`: the factor the product is multiplied by before the user's weight.
    pub fn scale(&self) -> f32 {
        let rank = self.rank() as f32;
        self.alpha.unwrap_or(rank) / rank
    }

    /// `out`, and the number of inputs a row of the weight holds (`in · kh · kw`).
    pub fn delta_shape(&self) -> (usize, usize) {
        let out = self.up.shape[0];
        let inputs = self.down.shape[1..].iter().product();
        (out, inputs)
    }
}

/// A LoRA file, read and checked: every key understood, every factor paired.
#[derive(Debug, Clone)]
pub struct LoraFile {
    /// The file read (or the name given to [`LoraFile::new`]).
    pub path: PathBuf,
    /// The key layout it was written in.
    pub format: LoraFormat,
    /// Its layers, one per adapted weight.
    pub layers: Vec<LoraLayer>,
    /// The header's `__metadata__` (kohya's `ss_network_dim`, `ss_network_alpha`, …).
    pub metadata: BTreeMap<String, String>,
    /// [`crate::addnet_hash`] of the file, computed on first use (every image of a run records it).
    hash: std::sync::OnceLock<Option<String>>,
}

/// Which factor (or alpha) a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    Alpha,
}

/// What a key says: the format, the component, the module and the part.
struct Parsed {
    format: LoraFormat,
    component: Component,
    module: ModuleName,
    stem: String,
    part: Part,
}

const KOHYA_PREFIXES: [(&str, Component); 4] = [
    ("lora_unet_", Component::Unet),
    ("lora_te1_", Component::TextEncoder),
    ("lora_te2_", Component::TextEncoder2),
    ("lora_te_", Component::TextEncoder),
];

/// Suffixes of the LoRA variants this crate does not compute (LoHa, LoKr, Tucker-decomposed
/// LoCon, DoRA, full-weight diffs, PEFT's bias), refused by name rather than ignored.
const UNSUPPORTED: [(&str, &str); 10] = [
    (
        "lora_mid.weight",
        "LyCORIS' Tucker-decomposed LoCon (lora_mid)",
    ),
    ("hada_w1_a", "LyCORIS' LoHa"),
    ("hada_w1_b", "LyCORIS' LoHa"),
    ("lokr_w1", "LyCORIS' LoKr"),
    ("lokr_w1_a", "LyCORIS' LoKr"),
    ("dora_scale", "DoRA"),
    ("lora_magnitude_vector", "DoRA"),
    ("diff", "a full-weight diff"),
    ("diff_b", "a full-weight diff"),
    ("lora_B.bias", "a LoRA bias (PEFT's lora_bias)"),
];

fn parse_key(key: &str) -> std::result::Result<Parsed, String> {
    for (suffix, what) in UNSUPPORTED {
        if key.ends_with(&format!(".{suffix}")) {
            return Err(format!("`{key}` is {what}, which is not supported"));
        }
    }
    for (prefix, component) in KOHYA_PREFIXES {
        let Some(rest) = key.strip_prefix(prefix) else {
            continue;
        };
        let (module, part) = if let Some(m) = rest.strip_suffix(".lora_down.weight") {
            (m, Part::Down)
        } else if let Some(m) = rest.strip_suffix(".lora_up.weight") {
            (m, Part::Up)
        } else if let Some(m) = rest.strip_suffix(".alpha") {
            (m, Part::Alpha)
        } else {
            return Err(format!(
                "`{key}`: a kohya key must end in .lora_down.weight, .lora_up.weight or .alpha"
            ));
        };
        return Ok(Parsed {
            format: LoraFormat::Kohya,
            component,
            module: ModuleName::Underscored(module.to_string()),
            stem: key[..prefix.len() + module.len()].to_string(),
            part,
        });
    }

    // diffusers and PEFT: a dotted module path between an optional component prefix and the
    // factor's suffix.
    let (format, component, rest) = if let Some(r) = key.strip_prefix("unet.") {
        (LoraFormat::Diffusers, Some(Component::Unet), r)
    } else if let Some(r) = key.strip_prefix("text_encoder_2.") {
        (LoraFormat::Diffusers, Some(Component::TextEncoder2), r)
    } else if let Some(r) = key.strip_prefix("text_encoder.") {
        (LoraFormat::Diffusers, Some(Component::TextEncoder), r)
    } else if let Some(r) = key.strip_prefix("base_model.model.") {
        (LoraFormat::Peft, None, r)
    } else {
        (LoraFormat::Peft, None, key)
    };
    const SUFFIXES: [(&str, Part); 7] = [
        (".lora_A.weight", Part::Down),
        (".lora_B.weight", Part::Up),
        (".lora.down.weight", Part::Down),
        (".lora.up.weight", Part::Up),
        (".lora_linear_layer.down.weight", Part::Down),
        (".lora_linear_layer.up.weight", Part::Up),
        (".alpha", Part::Alpha),
    ];
    // The attention processors' layout of diffusers before 0.19 ends in `_lora.down.weight`.
    let processor = rest.contains(".processor.");
    let found = if processor {
        [(".down.weight", Part::Down), (".up.weight", Part::Up)]
            .iter()
            .find_map(|(s, p)| rest.strip_suffix(s).map(|m| (m.to_string(), *p, *s)))
    } else {
        SUFFIXES
            .iter()
            .find_map(|(s, p)| rest.strip_suffix(s).map(|m| (m.to_string(), *p, *s)))
    };
    let Some((mut module, part, suffix)) = found else {
        return Err(format!(
            "`{key}` is not a LoRA key (kohya's lora_unet_/lora_te_…, diffusers' or PEFT's \
             …lora_A/lora_B.weight, …lora.down/up.weight)"
        ));
    };
    // The attention processors' layout of diffusers before 0.19:
    // `attn1.processor.to_q_lora` adapts `attn1.to_q` (`to_out_lora`: `attn1.to_out.0`).
    if let Some(at) = module.find(".processor.") {
        let (head, tail) = module.split_at(at);
        let tail = &tail[".processor.".len()..];
        let target = match tail {
            "to_q_lora" => "to_q",
            "to_k_lora" => "to_k",
            "to_v_lora" => "to_v",
            "to_out_lora" => "to_out.0",
            _ => {
                return Err(format!(
                    "`{key}`: unknown attention processor LoRA `{tail}`"
                ));
            }
        };
        module = format!("{head}.{target}");
    }
    let component = component.unwrap_or(
        if module.starts_with("text_model.") || module.starts_with("encoder.layers.") {
            Component::TextEncoder
        } else {
            Component::Unet
        },
    );
    let stem = key[..key.len() - suffix.len()].to_string();
    Ok(Parsed {
        format,
        component,
        module: ModuleName::Dotted(module),
        stem,
        part,
    })
}

/// PEFT's `save_pretrained` keeps the alpha out of the weights, in `adapter_config.json`
/// beside `adapter_model.safetensors`: read it when it is there.
fn peft_adapter_config(path: &Path) -> Result<Option<serde_json::Value>> {
    let config = path.with_file_name("adapter_config.json");
    if !config.is_file() {
        return Ok(None);
    }
    let text = sd_core::files::read_regular_to_string(&config)?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| LoraError::Format {
        path: config.clone(),
        reason: format!("not JSON: {e}"),
    })?;
    if json.get("peft_type").and_then(|t| t.as_str()) != Some("LORA") {
        return Err(LoraError::Format {
            path: config,
            reason: "only PEFT's LORA adapters (peft_type \"LORA\") are supported".into(),
        });
    }
    Ok(Some(json))
}

/// The alpha a LoraConfig (as JSON) gives `module`: its `alpha_pattern` entry, else
/// `lora_alpha`.
fn config_alpha(config: &serde_json::Value, module: &str) -> Option<f32> {
    if let Some(patterns) = config.get("alpha_pattern").and_then(|p| p.as_object()) {
        // PEFT matches a pattern against the end of the module's name.
        for (pattern, alpha) in patterns {
            if module == pattern || module.ends_with(&format!(".{pattern}")) {
                return alpha.as_f64().map(|a| a as f32);
            }
        }
    }
    config.get("lora_alpha")?.as_f64().map(|a| a as f32)
}

/// The alpha diffusers records for PEFT-layout files in the header's `lora_adapter_metadata`
/// (a LoraConfig as JSON per component: `lora_alpha`, `r`, `alpha_pattern`).
fn metadata_alpha(
    metadata: &BTreeMap<String, String>,
    component: Component,
    module: &str,
) -> Option<f32> {
    let text = metadata.get("lora_adapter_metadata")?;
    let json: serde_json::Value = serde_json::from_str(text).ok()?;
    let prefix = match component {
        Component::Unet => "unet",
        Component::TextEncoder => "text_encoder",
        Component::TextEncoder2 => "text_encoder_2",
    };
    // Either `{"unet": {…config…}}` or flat `{"unet.lora_alpha": …}`.
    let config = json.get(prefix).cloned().or_else(|| {
        let flat: serde_json::Map<String, serde_json::Value> = json
            .as_object()?
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix(&format!("{prefix}."))
                    .map(|k| (k.to_string(), v.clone()))
            })
            .collect();
        (!flat.is_empty()).then_some(serde_json::Value::Object(flat))
    })?;
    config_alpha(&config, module)
}

impl LoraFile {
    /// Reads a `.safetensors` LoRA file and pairs its factors; every key must be understood.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = SafetensorsFile::open(path)?;
        let bad = |reason: String| LoraError::Format {
            path: path.to_path_buf(),
            reason,
        };
        if file.entries().is_empty() {
            return Err(bad("holds no tensors".into()));
        }
        let adapter_config = peft_adapter_config(path)?;
        let mut problems = Vec::new();
        let mut format = None;
        // stem → (component, module, down, up, alpha)
        type Slot = (
            Component,
            ModuleName,
            Option<TensorData>,
            Option<TensorData>,
            Option<f32>,
        );
        let mut slots: BTreeMap<String, Slot> = BTreeMap::new();
        for entry in file.entries() {
            let parsed = match parse_key(&entry.key) {
                Ok(p) => p,
                Err(e) => {
                    problems.push(e);
                    continue;
                }
            };
            match format {
                None => format = Some(parsed.format),
                Some(f) if f == parsed.format => {}
                // A diffusers file may hold some un-prefixed keys PEFT-style; any mix with
                // kohya's is a damaged or concatenated file.
                Some(LoraFormat::Diffusers) if parsed.format == LoraFormat::Peft => {}
                Some(LoraFormat::Peft) if parsed.format == LoraFormat::Diffusers => {
                    format = Some(LoraFormat::Diffusers)
                }
                Some(f) => {
                    problems.push(format!(
                        "`{}` is in {}'s layout but the file's other keys are in {}'s",
                        entry.key,
                        parsed.format.name(),
                        f.name()
                    ));
                    continue;
                }
            }
            if !entry.is_float() {
                problems.push(format!(
                    "`{}` holds {:?}, not floats",
                    entry.key, entry.dtype
                ));
                continue;
            }
            let data = file.tensor_data(&entry.key, DType::F32)?;
            let slot = slots.entry(parsed.stem.clone()).or_insert((
                parsed.component,
                parsed.module.clone(),
                None,
                None,
                None,
            ));
            match parsed.part {
                Part::Down => slot.2 = Some(data),
                Part::Up => slot.3 = Some(data),
                Part::Alpha => {
                    if data.shape.iter().product::<usize>() != 1 {
                        problems.push(format!(
                            "`{}` has shape {:?}; an alpha is one number",
                            entry.key, entry.shape
                        ));
                        continue;
                    }
                    let value = data.to_vec::<f32>().map_err(|e| bad(format!("{e:?}")))?[0];
                    if !value.is_finite() {
                        problems.push(format!("`{}` is {value}", entry.key));
                        continue;
                    }
                    slot.4 = Some(value);
                }
            }
        }
        let format = format.unwrap_or(LoraFormat::Kohya);
        let mut layers = Vec::new();
        for (stem, (component, module, down, up, alpha)) in slots {
            let (down, up) = match (down, up) {
                (Some(d), Some(u)) => (d, u),
                (None, Some(_)) => {
                    problems.push(format!("`{stem}` has an up factor but no down factor"));
                    continue;
                }
                (Some(_), None) => {
                    problems.push(format!("`{stem}` has a down factor but no up factor"));
                    continue;
                }
                (None, None) => {
                    problems.push(format!("`{stem}` has an alpha but no factors"));
                    continue;
                }
            };
            let (ds, us) = (&down.shape, &up.shape);
            let down_ok = ds.len() == 2 || ds.len() == 4;
            let up_ok = us.len() == 2 || (us.len() == 4 && us[2] == 1 && us[3] == 1);
            if !down_ok || !up_ok || ds[0] != us[1] || ds[0] == 0 {
                problems.push(format!(
                    "`{stem}`: down {ds:?} and up {us:?} are not LoRA factors ([rank, in(, kh, \
                     kw)] and [out, rank(, 1, 1)] with one rank)"
                ));
                continue;
            }
            let alpha = alpha
                .or_else(|| metadata_alpha(file.metadata(), component, module.as_str()))
                .or_else(|| {
                    adapter_config
                        .as_ref()
                        .and_then(|c| config_alpha(c, module.as_str()))
                });
            layers.push(LoraLayer {
                component,
                module,
                key: stem,
                down,
                up,
                alpha,
            });
        }
        if !problems.is_empty() {
            return Err(bad(crate::error::summary(&problems)));
        }
        Ok(Self::new(path, format, layers, file.metadata().clone()))
    }

    /// A LoRA from layers already in memory (to write with [`Self::save_kohya`], or to merge).
    pub fn new(
        path: impl AsRef<Path>,
        format: LoraFormat,
        layers: Vec<LoraLayer>,
        metadata: BTreeMap<String, String>,
    ) -> Self {
        Self {
            path: path.as_ref().to_path_buf(),
            format,
            layers,
            metadata,
            hash: std::sync::OnceLock::new(),
        }
    }

    /// The file's addnet hash ([`crate::addnet_hash`]), read once; `None` when the file cannot
    /// be read.
    pub fn addnet_hash(&self) -> Option<&str> {
        self.hash
            .get_or_init(|| crate::addnet_hash(&self.path).ok())
            .as_deref()
    }

    /// The components the file adapts.
    pub fn components(&self) -> Vec<Component> {
        let mut c: Vec<Component> = self.layers.iter().map(|l| l.component).collect();
        c.sort();
        c.dedup();
        c
    }

    /// The layers for one component.
    pub fn layers_of(&self, component: Component) -> impl Iterator<Item = &LoraLayer> {
        self.layers.iter().filter(move |l| l.component == component)
    }

    /// The file's name without `.safetensors` (what `<lora:name:w>` and A1111's infotext call
    /// it).
    pub fn name(&self) -> String {
        self.path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(key: &str) -> Parsed {
        parse_key(key).unwrap()
    }

    #[test]
    fn keys_of_each_format() {
        let p = parse("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight");
        assert_eq!(p.format, LoraFormat::Kohya);
        assert_eq!(p.component, Component::Unet);
        assert_eq!(p.part, Part::Down);
        assert_eq!(p.stem, "lora_unet_down_blocks_0_attentions_0_proj_in");
        assert_eq!(
            p.module,
            ModuleName::Underscored("down_blocks_0_attentions_0_proj_in".into())
        );
        let p = parse("lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha");
        assert_eq!(
            (p.component, p.part),
            (Component::TextEncoder2, Part::Alpha)
        );
        let p = parse("lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight");
        assert_eq!((p.component, p.part), (Component::TextEncoder, Part::Up));

        let p = parse("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight");
        assert_eq!(p.format, LoraFormat::Diffusers);
        assert_eq!(
            p.module,
            ModuleName::Dotted("mid_block.attentions.0.transformer_blocks.0.attn1.to_q".into())
        );
        assert_eq!(
            p.stem,
            "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
        );
        let p = parse("text_encoder.text_model.encoder.layers.1.self_attn.k_proj.lora.up.weight");
        assert_eq!((p.component, p.part), (Component::TextEncoder, Part::Up));
        let p = parse("base_model.model.up_blocks.1.attentions.0.proj_out.lora_B.weight");
        assert_eq!((p.format, p.component), (LoraFormat::Peft, Component::Unet));
        let p = parse("text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight");
        assert_eq!(p.component, Component::TextEncoder);
        let p = parse(
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.down.weight",
        );
        assert_eq!(
            p.module,
            ModuleName::Dotted(
                "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0".into()
            )
        );
    }

    #[test]
    fn unknown_and_unsupported_keys_are_named() {
        let e = parse_key("lora_unet_x.hada_w1_a").err().unwrap();
        assert!(
            e.contains("LoHa") && e.contains("lora_unet_x.hada_w1_a"),
            "{e}"
        );
        let e = parse_key("model.diffusion_model.input_blocks.0.0.weight")
            .err()
            .unwrap();
        assert!(e.contains("not a LoRA key"), "{e}");
        let e = parse_key("lora_unet_x.weight").err().unwrap();
        assert!(e.contains("lora_down.weight"), "{e}");
    }

    #[test]
    fn alpha_from_diffusers_metadata() {
        let m = BTreeMap::from([(
            "lora_adapter_metadata".to_string(),
            r#"{"unet": {"r": 4, "lora_alpha": 8, "alpha_pattern": {"to_k": 2}}}"#.to_string(),
        )]);
        assert_eq!(
            metadata_alpha(&m, Component::Unet, "a.attn1.to_q"),
            Some(8.0)
        );
        assert_eq!(
            metadata_alpha(&m, Component::Unet, "a.attn1.to_k"),
            Some(2.0)
        );
        assert_eq!(metadata_alpha(&m, Component::TextEncoder, "x"), None);
        let flat = BTreeMap::from([(
            "lora_adapter_metadata".to_string(),
            r#"{"text_encoder.lora_alpha": 3, "text_encoder.r": 2}"#.to_string(),
        )]);
        assert_eq!(
            metadata_alpha(&flat, Component::TextEncoder, "x"),
            Some(3.0)
        );
    }
}
