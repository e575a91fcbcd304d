//! Reading component configs (`config.json`, `scheduler_config.json`) and checking their values:
//! shared by the U-Net, VAE, text encoder and scheduler configs so that every error reads alike,
//! e.g. ``field `block_out_channels[1]` is 0; it must be at least 1``.
//!
//! The upper bounds are far above every published Stable Diffusion 1.x, 2.x, XL, Turbo and
//! upscaler config (the largest: 1280 U-Net channels, 5120 MLP width, 32 text layers, 10
//! transformer layers per block, 49408 tokens, 77 positions) and low enough that no size,
//! product or shift of them overflows. A model within them may still be too large to load;
//! that is a question of memory, not of a valid config.

use serde::de::DeserializeOwned;
use serde_json::Value;

/// The most channels of a feature map or width of a hidden state (U-Net and VAE channels,
/// text and vision hidden sizes, cross-attention and projection widths).
pub const MAX_CHANNELS: usize = 16_384;
/// The most features of an MLP's inner layer or of a concatenated embedding input
/// (`intermediate_size`, `projection_class_embeddings_input_dim`).
pub const MAX_WIDTH: usize = 65_536;
/// The most layers of a stack (ResNets per block, transformer layers, text encoder layers).
pub const MAX_LAYERS: usize = 256;
/// The most resolution levels of a U-Net or VAE: each halves the latent, so 8 levels already
/// need sides divisible by 128.
pub const MAX_BLOCKS: usize = 8;
/// The largest vocabulary.
pub const MAX_VOCAB: usize = 1_000_000;
/// The most token or patch positions.
pub const MAX_POSITIONS: usize = 65_536;
/// The largest `sample_size` (latent cells for the U-Net, pixels for the VAE).
pub const MAX_SAMPLE_SIZE: usize = 16_384;
/// The largest convolution kernel side.
pub const MAX_KERNEL: usize = 31;
/// The largest multiplicative factor (`scaling_factor`, `mid_block_scale_factor`, ...).
pub const MAX_FACTOR: f64 = 100.0;

/// Parses a config's JSON text into `T` (a struct with `#[serde(default)]`), first checking
/// that it is a JSON object holding every field of `required`: each entry lists
/// alternatives, one of which must be present and not `null`. A value of the wrong type is
/// reported with the field's name.
pub fn parse<T: DeserializeOwned>(text: &str, required: &[&[&str]]) -> Result<T, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    from_value(value, required)
}

/// Reads a component's `config.json` as every config type does: a regular file (a FIFO would
/// block the read forever), [`parse`]d with its required fields, then `validate`d; every error
/// names the file, and `what` names the config in parse errors ("UNet2DConditionModel config").
pub fn read_config<T: DeserializeOwned>(
    path: &std::path::Path,
    required: &[&[&str]],
    what: &str,
    validate: impl FnOnce(&T) -> Result<(), String>,
) -> crate::Result<T> {
    let text = crate::files::read_regular_to_string(path)?;
    let config: T = parse(&text, required)
        .map_err(|e| crate::CoreError::config(path, format!("invalid {what}: {e}")))?;
    validate(&config).map_err(|reason| crate::CoreError::config(path, reason))?;
    Ok(config)
}

/// [`parse`] for JSON already read (e.g. a section of a larger file).
pub fn from_value<T: DeserializeOwned>(value: Value, required: &[&[&str]]) -> Result<T, String> {
    let Value::Object(map) = &value else {
        return Err(format!("expected a JSON object, found {}", kind(&value)));
    };
    for alternatives in required {
        let present = alternatives
            .iter()
            .any(|f| map.get(*f).is_some_and(|v| !v.is_null()));
        if !present {
            let (first, rest) = alternatives.split_first().unwrap_or((&"", &[]));
            let or: String = rest.iter().map(|f| format!(" or `{f}`")).collect();
            return Err(format!(
                "missing required field `{first}`{or}: it sets the model's shape"
            ));
        }
    }
    serde_json::from_value::<T>(value.clone()).map_err(|e| {
        // Name the field: the first one that fails on its own (every other field defaults),
        // and in a list the first entry whose prefix fails.
        let alone = |k: &str, v: Value| {
            serde_json::from_value::<T>(Value::Object([(k.to_string(), v)].into_iter().collect()))
                .err()
        };
        map.iter()
            .find_map(|(k, v)| {
                let e = alone(k, v.clone())?;
                // Whether a prefix fails is monotone in its length (an entry that does not
                // parse fails every longer prefix too): a binary search finds the first bad
                // entry in n·log n, where trying each prefix was quadratic (a 50,000-entry
                // `trained_betas` took seconds).
                let entry = v.as_array().and_then(|items| {
                    let fails = |n: usize| alone(k, Value::Array(items[..n].to_vec()));
                    // The empty list passes and the whole one fails, or no entry is at fault.
                    if fails(0).is_some() || fails(items.len()).is_none() {
                        return None;
                    }
                    let (mut good, mut bad) = (0, items.len());
                    while bad - good > 1 {
                        let mid = good + (bad - good) / 2;
                        if fails(mid).is_some() {
                            bad = mid;
                        } else {
                            good = mid;
                        }
                    }
                    fails(bad).map(|e| format!("field `{k}[{}]`: {e}", bad - 1))
                });
                Some(entry.unwrap_or_else(|| format!("field `{k}`: {e}")))
            })
            .unwrap_or_else(|| e.to_string())
    })
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A size: at least 1 and at most `max`.
pub fn size(field: &str, value: usize, max: usize) -> Result<(), String> {
    if value == 0 {
        Err(format!("field `{field}` is 0; it must be at least 1"))
    } else if value > max {
        Err(format!(
            "field `{field}` is {value}; it must be at most {max}"
        ))
    } else {
        Ok(())
    }
}

/// An optional size: absent, or a [`size`].
pub fn optional_size(field: &str, value: Option<usize>, max: usize) -> Result<(), String> {
    value.map_or(Ok(()), |v| size(field, v, max))
}

/// A list of sizes, each named `field[i]`; the list must have 1 to `max_len` entries.
pub fn sizes(field: &str, values: &[usize], max: usize, max_len: usize) -> Result<(), String> {
    if values.is_empty() {
        return Err(format!(
            "field `{field}` is empty; it needs at least one entry"
        ));
    }
    if values.len() > max_len {
        return Err(format!(
            "field `{field}` has {} entries; it may have at most {max_len}",
            values.len()
        ));
    }
    values
        .iter()
        .enumerate()
        .try_for_each(|(i, &v)| size(&format!("{field}[{i}]"), v, max))
}

/// A whole number at most `max` (0 allowed).
pub fn at_most(field: &str, value: usize, max: usize) -> Result<(), String> {
    if value > max {
        Err(format!(
            "field `{field}` is {value}; it must be at most {max}"
        ))
    } else {
        Ok(())
    }
}

/// A number in an interval; `open_low`/`open_high` exclude the ends.
pub fn number(
    field: &str,
    value: f64,
    (low, open_low): (f64, bool),
    (high, open_high): (f64, bool),
) -> Result<(), String> {
    let above = if open_low { value > low } else { value >= low };
    let below = if open_high {
        value < high
    } else {
        value <= high
    };
    if value.is_finite() && above && below {
        return Ok(());
    }
    let low_word = if open_low { "above" } else { "at least" };
    let high_word = if open_high { "below" } else { "at most" };
    Err(format!(
        "field `{field}` is {value}; it must be {low_word} {low} and {high_word} {high}"
    ))
}

/// An epsilon or a probability of a change: above 0 and below 1.
pub fn open_unit(field: &str, value: f64) -> Result<(), String> {
    number(field, value, (0.0, true), (1.0, true))
}

/// A probability (dropout): 0 to 1.
pub fn probability(field: &str, value: f64) -> Result<(), String> {
    number(field, value, (0.0, false), (1.0, false))
}

/// A multiplicative factor: above 0 and at most [`MAX_FACTOR`].
pub fn factor(field: &str, value: f64) -> Result<(), String> {
    number(field, value, (0.0, true), (MAX_FACTOR, false))
}
