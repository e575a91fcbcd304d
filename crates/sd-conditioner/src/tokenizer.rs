//! CLIP's byte-level BPE tokenizer (Radford et al. 2021), built on the `tokenizers` crate the
//! way transformers' `CLIPTokenizerFast` is: NFC, whitespace runs to one space, lower case,
//! CLIP's split pattern, byte-level BPE with `</w>` word ends, `<|startoftext|>` 49406 and
//! `<|endoftext|>` 49407.

use std::collections::HashMap;
use std::path::Path;

use sd_core::{CoreError, Result};
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as Normalizers};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizers;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// CLIP's vocabulary, the same for SD 1.x, 2.x and XL: built by `cargo xtask fixtures` from the
/// BPE file open_clip ships (MIT), so that a single-file checkpoint needs no tokenizer folder.
const VOCAB_JSON: &str = include_str!("../vocab/vocab.json");
const MERGES_TXT: &str = include_str!("../vocab/merges.txt");

/// The longest sequence the CLIP text encoders take, start and end tokens included.
pub const MAX_LENGTH: usize = 77;
const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
/// CLIP's pre-tokenizer: contractions, letter runs, single digits, other non-space runs.
const PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// What pads a sequence to [`MAX_LENGTH`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// `<|endoftext|>` (SD 1.x, SDXL's first tokenizer).
    EndOfText,
    /// `!`, id 0 (SD 2.x, SDXL's second tokenizer).
    Exclamation,
}

/// CLIP's tokenizer.
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos: u32,
    eos: u32,
    padding: Padding,
}

fn error(reason: impl std::fmt::Display) -> CoreError {
    CoreError::Config {
        path: "<clip tokenizer>".into(),
        reason: reason.to_string(),
    }
}

impl ClipTokenizer {
    /// The tokenizer with the embedded vocabulary.
    pub fn embedded(padding: Padding) -> Result<Self> {
        Self::from_vocab_and_merges(VOCAB_JSON, MERGES_TXT, padding)
    }

    /// A `tokenizer/` folder with `vocab.json` and `merges.txt` (what SD repositories ship), or
    /// with a `tokenizer.json` alone.
    pub fn from_folder(dir: impl AsRef<Path>, padding: Padding) -> Result<Self> {
        let dir = dir.as_ref();
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|e| CoreError::Io { path, source: e })
        };
        if !dir.join("vocab.json").is_file() && dir.join("tokenizer.json").is_file() {
            return Self::from_tokenizer_json(&read("tokenizer.json")?, padding).map_err(|e| {
                CoreError::Config {
                    path: dir.join("tokenizer.json"),
                    reason: e.to_string(),
                }
            });
        }
        Self::from_vocab_and_merges(&read("vocab.json")?, &read("merges.txt")?, padding)
    }

    /// From the text of a `tokenizer.json` (a BPE model): its vocabulary and merges, with
    /// CLIP's normalisation and pre-tokenisation applied whatever the file says.
    pub fn from_tokenizer_json(text: &str, padding: Padding) -> Result<Self> {
        let json: serde_json::Value =
            serde_json::from_str(text).map_err(|e| error(format!("tokenizer.json: {e}")))?;
        let model = &json["model"];
        if model["type"].as_str().is_some_and(|t| t != "BPE") {
            return Err(error("tokenizer.json: the model is not BPE"));
        }
        let vocab = serde_json::to_string(&model["vocab"]).map_err(error)?;
        let merges = model["merges"]
            .as_array()
            .ok_or_else(|| error("tokenizer.json: no model.merges"))?
            .iter()
            .map(|m| match m {
                // Older files write "a b", newer ones ["a", "b"].
                serde_json::Value::String(s) => Ok(s.clone()),
                serde_json::Value::Array(pair) => match (pair.first(), pair.get(1)) {
                    (Some(a), Some(b)) => Ok(format!(
                        "{} {}",
                        a.as_str().unwrap_or_default(),
                        b.as_str().unwrap_or_default()
                    )),
                    _ => Err(error("tokenizer.json: a merge is not a pair")),
                },
                _ => Err(error("tokenizer.json: a merge is neither text nor a pair")),
            })
            .collect::<Result<Vec<String>>>()?
            .join("\n");
        Self::from_vocab_and_merges(&vocab, &merges, padding)
    }

    /// From the texts of `vocab.json` and `merges.txt`.
    pub fn from_vocab_and_merges(vocab: &str, merges: &str, padding: Padding) -> Result<Self> {
        let vocab: HashMap<String, u32> =
            serde_json::from_str(vocab).map_err(|e| error(format!("vocab.json: {e}")))?;
        let merges: Vec<(String, String)> = merges
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .map(|l| {
                let mut parts = l.split(' ');
                match (parts.next(), parts.next()) {
                    (Some(a), Some(b)) => Ok((a.to_string(), b.to_string())),
                    _ => Err(error(format!("merges.txt: bad line `{l}`"))),
                }
            })
            .collect::<Result<_>>()?;
        let (bos, eos) = match (vocab.get(BOS), vocab.get(EOS)) {
            (Some(&b), Some(&e)) => (b, e),
            _ => return Err(error("vocab.json lacks <|startoftext|> or <|endoftext|>")),
        };
        let model = BPE::builder()
            .vocab_and_merges(
                vocab
                    .into_iter()
                    .collect::<tokenizers::models::bpe::Vocab>(),
                merges,
            )
            .end_of_word_suffix("</w>".into())
            .unk_token(EOS.into())
            .build()
            .map_err(error)?;
        let mut tokenizer = Tokenizer::new(model);
        tokenizer.with_normalizer(Some(Normalizers::new(vec![
            NFC.into(),
            Replace::new(
                tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
                " ",
            )
            .map_err(error)?
            .into(),
            Lowercase.into(),
        ])));
        tokenizer.with_pre_tokenizer(Some(PreTokenizers::new(vec![
            Split::new(
                SplitPattern::Regex(PATTERN.into()),
                SplitDelimiterBehavior::Removed,
                true,
            )
            .map_err(error)?
            .into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        tokenizer.add_special_tokens(&[AddedToken::from(BOS, true), AddedToken::from(EOS, true)]);
        if padding == Padding::Exclamation {
            // transformers registers the pad token as a special token, so with `!` padding a
            // literal `!` in the prompt is split off on its own (id 0) rather than merged by the
            // BPE ("horse!!!" → horse, !, !, !): SD 2.x's tokenizer behaves so.
            tokenizer.add_special_tokens(&[AddedToken::from("!", true)]);
        }
        Ok(Self {
            tokenizer,
            bos,
            eos,
            padding,
        })
    }

    /// The token ids of `prompt`, without start, end or padding.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let encoding = self.tokenizer.encode(prompt, false).map_err(error)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// `<|startoftext|>`, the prompt's first 75 tokens, `<|endoftext|>`, then padding to 77:
    /// what one CLIP text encoder call takes. Truncation keeps the end token last.
    pub fn encode_padded(&self, prompt: &str) -> Result<Vec<u32>> {
        let mut tokens = self.encode(prompt)?;
        tokens.truncate(MAX_LENGTH - 2);
        Ok(self.wrap(&tokens))
    }

    /// Wraps up to 75 tokens in start and end tokens and pads them to 77.
    pub fn wrap(&self, tokens: &[u32]) -> Vec<u32> {
        let pad = match self.padding {
            Padding::EndOfText => self.eos,
            Padding::Exclamation => 0,
        };
        let mut ids = Vec::with_capacity(MAX_LENGTH);
        ids.push(self.bos);
        ids.extend(&tokens[..tokens.len().min(MAX_LENGTH - 2)]);
        ids.push(self.eos);
        ids.resize(MAX_LENGTH, pad);
        ids
    }

    pub fn bos(&self) -> u32 {
        self.bos
    }

    pub fn eos(&self) -> u32 {
        self.eos
    }
}
