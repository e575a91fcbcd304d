//! `sd generate --prompts FILE`: a list of prompts rendered one PNG per line, the standard way
//! to make an evaluation set (COCO-30k style). Lines are plain prompts or JSON objects with
//! `prompt` and optionally `seed` and `negative_prompt` (`negative` accepted too); `--shard i/n`
//! takes every n-th line from the i-th, so n machines split one list with no coordination; an
//! image already written is skipped, so a restarted run resumes (PNGs are written atomically,
//! so one that exists is complete).

use std::path::{Path, PathBuf};

/// One line of the file.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// Its index among the file's non-empty lines (0-based): the PNG's name.
    pub index: usize,
    /// What to draw.
    pub prompt: String,
    /// The line's own seed, if it gives one.
    pub seed: Option<u64>,
    /// The line's own negative prompt, if it gives one.
    pub negative_prompt: Option<String>,
}

/// Reads the prompt file; blank lines are skipped (and not counted).
pub fn read(path: &Path) -> Result<Vec<Line>, String> {
    let text = sd::core::files::read_regular_to_string(path).map_err(|e| e.to_string())?;
    let mut lines = Vec::new();
    for (number, raw) in text.lines().enumerate() {
        let raw = raw.trim();
        if raw.is_empty() {
            continue;
        }
        let at = |reason: String| format!("{}:{}: {reason}", path.display(), number + 1);
        let index = lines.len();
        let line = if raw.starts_with('{') {
            let value: serde_json::Value =
                serde_json::from_str(raw).map_err(|e| at(format!("not a JSON object ({e})")))?;
            let prompt = value["prompt"]
                .as_str()
                .ok_or_else(|| at("has no \"prompt\" string".into()))?
                .to_string();
            let seed = match &value["seed"] {
                serde_json::Value::Null => None,
                v => Some(
                    v.as_u64()
                        .ok_or_else(|| at(format!("\"seed\" {v} is not a whole number ≥ 0")))?,
                ),
            };
            let negative = value
                .get("negative_prompt")
                .or_else(|| value.get("negative"));
            let negative_prompt = match negative {
                None | Some(serde_json::Value::Null) => None,
                Some(v) => Some(
                    v.as_str()
                        .ok_or_else(|| at("the negative prompt is not a string".into()))?
                        .to_string(),
                ),
            };
            Line {
                index,
                prompt,
                seed,
                negative_prompt,
            }
        } else {
            Line {
                index,
                prompt: raw.to_string(),
                seed: None,
                negative_prompt: None,
            }
        };
        if line.prompt.contains("<lora:") {
            return Err(at(
                "<lora:…> tags are not read from a prompt file; give the LoRAs with --lora".into(),
            ));
        }
        lines.push(line);
    }
    if lines.is_empty() {
        return Err(format!("{}: holds no prompt", path.display()));
    }
    Ok(lines)
}

/// `--shard i/n` as `(i, n)`, `0 ≤ i < n`.
pub fn parse_shard(text: &str) -> Result<(usize, usize), String> {
    let bad = || format!("--shard {text}: expected I/N with 0 <= I < N, e.g. 0/4");
    let (i, n) = text.split_once('/').ok_or_else(bad)?;
    let (i, n): (usize, usize) = (
        i.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    );
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

/// The PNG a line is written to.
pub fn output_path(dir: &Path, line: &Line) -> PathBuf {
    dir.join(format!("{:05}.png", line.index))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_json_lines_are_read_and_bad_ones_named() {
        let dir = std::env::temp_dir().join(format!("sd-prompts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("p.txt");
        std::fs::write(
            &file,
            "a red circle\n\n{\"prompt\": \"a blue square\", \"seed\": 7, \"negative\": \"blur\"}\n",
        )
        .unwrap();
        let lines = read(&file).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1].index, 1);
        assert_eq!(lines[1].seed, Some(7));
        assert_eq!(lines[1].negative_prompt.as_deref(), Some("blur"));
        assert_eq!(output_path(&dir, &lines[1]), dir.join("00001.png"));
        std::fs::write(&file, "ok\n{\"seed\": 1}\n").unwrap();
        let err = read(&file).unwrap_err();
        assert!(err.ends_with("p.txt:2: has no \"prompt\" string"), "{err}");
        std::fs::write(&file, "\n\n").unwrap();
        assert!(read(&file).unwrap_err().contains("holds no prompt"));
        assert_eq!(parse_shard("1/4"), Ok((1, 4)));
        assert!(parse_shard("4/4").is_err() && parse_shard("x").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
