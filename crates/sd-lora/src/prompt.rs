//! Naming LoRAs: `--lora FILE[:WEIGHT]` and A1111's `<lora:name:weight>` in the prompt.

use crate::error::{LoraError, Result};

/// A LoRA asked for: a file (or, from a prompt, a name to find under a LoRA folder) and the
/// weight its product is multiplied by.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// The file as given: a path, or a name to find under a LoRA folder.
    pub file: String,
    /// The multiplier on the LoRA's product, within ±100; 1 when not given.
    pub weight: f32,
}

/// The largest |weight| accepted: A1111's UI slider stops at 2; past this only overflow lies.
const MAX_WEIGHT: f32 = 100.0;

fn weight(text: &str, what: &str) -> Result<f32> {
    let w: f32 = text
        .trim()
        .parse()
        .map_err(|_| LoraError::Spec(format!("{what}: `{text}` is not a number")))?;
    if !w.is_finite() || w.abs() > MAX_WEIGHT {
        return Err(LoraError::Spec(format!(
            "{what}: weight {w} is outside [-{MAX_WEIGHT}, {MAX_WEIGHT}]"
        )));
    }
    Ok(w)
}

/// `FILE` or `FILE:WEIGHT` (weight 1 when absent). The weight is what follows the last `:`
/// when that reads as a number, so that a path holding `:` still works.
pub fn parse_lora_arg(arg: &str) -> Result<LoraSpec> {
    if let Some((file, w)) = arg.rsplit_once(':')
        && !file.is_empty()
        && w.trim().parse::<f32>().is_ok()
    {
        return Ok(LoraSpec {
            file: file.to_string(),
            weight: weight(w, &format!("--lora {arg}"))?,
        });
    }
    if arg.is_empty() {
        return Err(LoraError::Spec("--lora needs a file".into()));
    }
    Ok(LoraSpec {
        file: arg.to_string(),
        weight: 1.0,
    })
}

/// Takes A1111's `<lora:name>` / `<lora:name:weight>` tags (and LyCORIS' `<lyco:…>`, which
/// A1111 reads the same way) out of a prompt: the prompt without them, and the LoRAs in
/// order. A1111's third field (a separate U-Net weight) is refused rather than misread.
pub fn extract_prompt_loras(prompt: &str) -> Result<(String, Vec<LoraSpec>)> {
    let mut rest = String::with_capacity(prompt.len());
    let mut specs = Vec::new();
    let mut text = prompt;
    while let Some(start) = text.find('<') {
        let tail = &text[start + 1..];
        let Some(body) = ["lora:", "lyco:"].iter().find_map(|p| tail.strip_prefix(p)) else {
            rest.push_str(&text[..=start]);
            text = tail;
            continue;
        };
        let Some(end) = body.find('>') else {
            // The first 40 characters (not bytes: a cut inside a character would panic).
            let shown: String = tail.chars().take(40).collect();
            return Err(LoraError::Spec(format!(
                "the prompt's `<{shown}` has no closing `>`"
            )));
        };
        let tag = &body[..end];
        let fields: Vec<&str> = tag.split(':').collect();
        let what = format!("<lora:{tag}>");
        let spec = match fields.as_slice() {
            [name] if !name.trim().is_empty() => LoraSpec {
                file: name.trim().to_string(),
                weight: 1.0,
            },
            [name, w] if !name.trim().is_empty() => LoraSpec {
                file: name.trim().to_string(),
                weight: weight(w, &what)?,
            },
            _ => {
                return Err(LoraError::Spec(format!(
                    "{what}: expected <lora:NAME> or <lora:NAME:WEIGHT>"
                )));
            }
        };
        specs.push(spec);
        rest.push_str(&text[..start]);
        text = &body[end + 1..];
    }
    rest.push_str(text);
    Ok((rest, specs))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the fuzzer: an unclosed tag cut for the message inside a multi-byte character.
    #[test]
    fn an_unclosed_tag_is_cut_at_a_character_boundary() {
        let prompt = format!("<lora:x{}", "猫".repeat(50));
        let err = extract_prompt_loras(&prompt).unwrap_err().to_string();
        assert!(err.contains("no closing `>`"), "{err}");
        // 40 characters: `lora:x` and 34 of the 50.
        assert!(
            err.contains(&format!("<lora:x{}`", "猫".repeat(34))),
            "{err}"
        );
    }

    #[test]
    fn arguments() {
        assert_eq!(
            parse_lora_arg("a/b.safetensors:0.5").unwrap(),
            LoraSpec {
                file: "a/b.safetensors".into(),
                weight: 0.5
            }
        );
        assert_eq!(parse_lora_arg("c:/x.safetensors").unwrap().weight, 1.0);
        assert_eq!(parse_lora_arg("x.safetensors:-1").unwrap().weight, -1.0);
        assert!(parse_lora_arg("x:inf").is_err());
        assert!(parse_lora_arg("").is_err());
    }

    #[test]
    fn prompt_tags() {
        let (p, s) = extract_prompt_loras("a cat <lora:style:0.8>, <lyco:ink> sitting").unwrap();
        assert_eq!(p, "a cat ,  sitting");
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].file.as_str(), s[0].weight), ("style", 0.8));
        assert_eq!((s[1].file.as_str(), s[1].weight), ("ink", 1.0));
        let (p, s) = extract_prompt_loras("a <b> c").unwrap();
        assert_eq!((p.as_str(), s.len()), ("a <b> c", 0));
        assert!(extract_prompt_loras("x <lora:a:1:2>").is_err());
        assert!(extract_prompt_loras("x <lora:a:zz>").is_err());
        assert!(extract_prompt_loras("x <lora:a").is_err());
    }
}
