//! CLIP's byte-level BPE tokenizer (Radford et al. 2021), built on the `tokenizers` crate the
//! way transformers' `CLIPTokenizerFast` is: NFC, whitespace runs to one space, lower case,
//! CLIP's split pattern, byte-level BPE with `</w>` word ends, `<|startoftext|>` 49406 and
//! `<|endoftext|>` 49407.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use sd_core::{CoreError, Result};
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as Normalizers};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizers;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::limits::{MAX_LENGTH, check_length};

/// CLIP's vocabulary, the same for SD 1.x, 2.x and XL: built by `cargo xtask fixtures` from the
/// BPE file open_clip ships (MIT), so that a single-file checkpoint needs no tokenizer folder.
const VOCAB_JSON: &str = include_str!("../vocab/vocab.json");
const MERGES_TXT: &str = include_str!("../vocab/merges.txt");

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
    /// The file the vocabulary came from (`vocab.json` or `tokenizer.json`), for messages.
    vocab_path: PathBuf,
    /// The largest id in the vocabulary and its token.
    max_id: (u32, String),
    /// The id that pads: `<|endoftext|>`'s or `!`'s.
    pad: u32,
}

/// The bound on vocabulary ids (CLIP's is 49408; the text configs allow up to 10⁶ tokens).
pub const MAX_VOCAB_ID: u32 = 1_000_000;

/// Where the embedded vocabulary "lives", for messages.
const EMBEDDED: &str = "<built-in CLIP vocabulary>";

fn error(path: &Path, reason: impl std::fmt::Display) -> CoreError {
    CoreError::Config {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

impl ClipTokenizer {
    /// The tokenizer with the embedded vocabulary.
    pub fn embedded(padding: Padding) -> Result<Self> {
        let dir = Path::new(EMBEDDED);
        Self::build(
            VOCAB_JSON,
            &dir.join("vocab.json"),
            MERGES_TXT,
            &dir.join("merges.txt"),
            padding,
        )
    }

    /// The embedded vocabulary as the files transformers' `CLIPTokenizer` reads:
    /// `("vocab.json", text)` and `("merges.txt", text)`. A model folder written from a
    /// single-file checkpoint ships them as its `tokenizer/`, so that it tokenizes as the
    /// checkpoint did here.
    pub fn embedded_files() -> [(&'static str, &'static str); 2] {
        [("vocab.json", VOCAB_JSON), ("merges.txt", MERGES_TXT)]
    }

    /// A `tokenizer/` folder with `vocab.json` and `merges.txt` (what SD repositories ship), or
    /// with a `tokenizer.json` alone. Every error names the file (and the line of
    /// `merges.txt`).
    pub fn from_folder(dir: impl AsRef<Path>, padding: Padding) -> Result<Self> {
        let dir = dir.as_ref();
        // Regular files only: a FIFO would block the read forever.
        let read = |path: &Path| sd_core::files::read_regular_to_string(path);
        let (vocab, merges, json) = (
            dir.join("vocab.json"),
            dir.join("merges.txt"),
            dir.join("tokenizer.json"),
        );
        if !vocab.is_file() && json.is_file() {
            return Self::from_tokenizer_json_at(&read(&json)?, &json, padding);
        }
        Self::build(&read(&vocab)?, &vocab, &read(&merges)?, &merges, padding)
    }

    /// From the text of a `tokenizer.json` (a BPE model): its vocabulary and merges, with
    /// CLIP's normalisation and pre-tokenisation applied whatever the file says.
    pub fn from_tokenizer_json(text: &str, padding: Padding) -> Result<Self> {
        Self::from_tokenizer_json_at(text, Path::new("tokenizer.json"), padding)
    }

    fn from_tokenizer_json_at(text: &str, path: &Path, padding: Padding) -> Result<Self> {
        let json: serde_json::Value = serde_json::from_str(text).map_err(|e| error(path, e))?;
        let model = &json["model"];
        if model["type"].as_str().is_some_and(|t| t != "BPE") {
            return Err(error(path, "the model is not BPE"));
        }
        let vocab = parse_vocab(model["vocab"].clone(), path, "model.vocab")?;
        let merges = model["merges"]
            .as_array()
            .ok_or_else(|| error(path, "no model.merges"))?
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let bad = |what: &str| error(path, format!("model.merges[{i}] {what}"));
                match m {
                    // Older files write "a b", newer ones ["a", "b"].
                    serde_json::Value::String(s) => {
                        split_merge(s).ok_or_else(|| bad(&format!("`{s}` is not two tokens")))
                    }
                    serde_json::Value::Array(pair) => match pair.as_slice() {
                        [serde_json::Value::String(a), serde_json::Value::String(b)] => {
                            Ok((a.clone(), b.clone()))
                        }
                        _ => Err(bad("is not a pair of tokens")),
                    },
                    _ => Err(bad("is neither text nor a pair")),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let merges = merges
            .into_iter()
            .enumerate()
            .map(|(i, m)| (format!("model.merges[{i}]"), m))
            .collect();
        Self::from_parts(vocab, path, merges, path, padding)
    }

    /// From the texts of `vocab.json` and `merges.txt`.
    pub fn from_vocab_and_merges(vocab: &str, merges: &str, padding: Padding) -> Result<Self> {
        Self::build(
            vocab,
            Path::new("vocab.json"),
            merges,
            Path::new("merges.txt"),
            padding,
        )
    }

    /// From the texts of `vocab.json` and `merges.txt`, read from these paths (for messages).
    fn build(
        vocab: &str,
        vocab_path: &Path,
        merges: &str,
        merges_path: &Path,
        padding: Padding,
    ) -> Result<Self> {
        // Parsed straight from the text, so that a bad id comes with its line and column.
        let vocab: HashMap<String, u32> =
            serde_json::from_str(vocab).map_err(|e| error(vocab_path, e))?;
        let merges = merges
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.starts_with("#version") && !l.trim().is_empty())
            .map(|(i, l)| {
                let at = format!("line {}", i + 1);
                match split_merge(l) {
                    Some(pair) => Ok((at, pair)),
                    None => Err(error(
                        merges_path,
                        format!("{at}: `{l}` is not two tokens separated by a space"),
                    )),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Self::from_parts(vocab, vocab_path, merges, merges_path, padding)
    }

    /// The tokenizer from a parsed vocabulary and merges (each with where it was read, e.g.
    /// `line 7`), checked first so that every problem names its file.
    fn from_parts(
        vocab: HashMap<String, u32>,
        vocab_path: &Path,
        merges: Vec<(String, (String, String))>,
        merges_path: &Path,
        padding: Padding,
    ) -> Result<Self> {
        // Ids index the text encoder's embedding table: one past the largest real vocabulary's
        // bound is already wrong, and u32::MAX overflows inside `tokenizers`.
        if let Some((token, id)) = vocab.iter().find(|(_, id)| **id >= MAX_VOCAB_ID) {
            return Err(error(
                vocab_path,
                format!("token `{token}` has id {id}; ids must be below {MAX_VOCAB_ID}"),
            ));
        }
        let (bos, eos) = match (vocab.get(BOS), vocab.get(EOS)) {
            (Some(&b), Some(&e)) => (b, e),
            _ => return Err(error(vocab_path, "lacks <|startoftext|> or <|endoftext|>")),
        };
        let pad = match padding {
            Padding::EndOfText => eos,
            Padding::Exclamation => *vocab
                .get("!")
                .ok_or_else(|| error(vocab_path, "lacks `!`, the padding token asked for"))?,
        };
        // The BPE builder refuses a merge of unknown tokens without saying which line: check
        // them here, as it would (both halves and their concatenation must be tokens).
        for (at, (a, b)) in &merges {
            for token in [a.clone(), b.clone(), format!("{a}{b}")] {
                if !vocab.contains_key(&token) {
                    return Err(error(
                        merges_path,
                        format!(
                            "{at}: the merge `{a} {b}` uses `{token}`, which {} does not have",
                            file_name(vocab_path)
                        ),
                    ));
                }
            }
        }
        let max_id = vocab
            .iter()
            .max_by_key(|(_, id)| **id)
            .map(|(token, id)| (*id, token.clone()))
            .unwrap_or_default();
        let merges: Vec<(String, String)> = merges.into_iter().map(|(_, m)| m).collect();
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
            .map_err(|e| error(vocab_path, e))?;
        let internal = |e| error(vocab_path, e);
        let mut tokenizer = Tokenizer::new(model);
        tokenizer.with_normalizer(Some(Normalizers::new(vec![
            NFC.into(),
            Replace::new(
                tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
                " ",
            )
            .map_err(internal)?
            .into(),
            Lowercase.into(),
        ])));
        tokenizer.with_pre_tokenizer(Some(PreTokenizers::new(vec![
            Split::new(
                SplitPattern::Regex(PATTERN.into()),
                SplitDelimiterBehavior::Removed,
                true,
            )
            .map_err(internal)?
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
            vocab_path: vocab_path.to_path_buf(),
            max_id,
            pad,
        })
    }

    /// The token ids of `prompt`, without start, end or padding. A prompt longer than
    /// [`MAX_PROMPT_CHARS`](crate::MAX_PROMPT_CHARS) is refused.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        check_length(prompt)?;
        let encoding = self
            .tokenizer
            .encode(prompt, false)
            .map_err(|e| error(&self.vocab_path, e))?;
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
        let mut ids = Vec::with_capacity(MAX_LENGTH);
        ids.push(self.bos);
        ids.extend(&tokens[..tokens.len().min(MAX_LENGTH - 2)]);
        ids.push(self.eos);
        ids.resize(MAX_LENGTH, self.pad);
        ids
    }

    /// The id of `<|startoftext|>`.
    pub fn bos(&self) -> u32 {
        self.bos
    }

    /// The id of `<|endoftext|>`.
    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// The id that pads a sequence to [`MAX_LENGTH`].
    pub fn pad(&self) -> u32 {
        self.pad
    }

    /// What pads a sequence to [`MAX_LENGTH`].
    pub fn padding(&self) -> Padding {
        self.padding
    }

    /// The file the vocabulary was read from (`vocab.json` or `tokenizer.json`; a name under
    /// `<built-in CLIP vocabulary>` for the embedded one).
    pub fn vocab_path(&self) -> &Path {
        &self.vocab_path
    }

    /// Refuses a vocabulary with an id that a text encoder of `vocab_size` token embeddings
    /// has no row for, naming the vocabulary's file; otherwise the mismatch would surface only
    /// when a prompt happens to use such a token, as an error about an id.
    pub fn check_fits(&self, vocab_size: usize) -> Result<()> {
        let (id, token) = &self.max_id;
        if *id as usize >= vocab_size {
            return Err(error(
                &self.vocab_path,
                format!(
                    "token `{token}` has id {id}, outside the text encoder's vocabulary of \
                     {vocab_size} ids"
                ),
            ));
        }
        Ok(())
    }
}

/// A vocabulary: a JSON object of token → id, every id a `u32`.
fn parse_vocab(json: serde_json::Value, path: &Path, what: &str) -> Result<HashMap<String, u32>> {
    serde_json::from_value(json).map_err(|e| error(path, format!("{what}: {e}")))
}

/// A merge line: two tokens separated by one space, as transformers' and tokenizers' readers
/// require.
fn split_merge(line: &str) -> Option<(String, String)> {
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
            Some((a.to_string(), b.to_string()))
        }
        _ => None,
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// tokenizers' BPE merges a word through a priority queue of adjacent pairs over a linked
    /// list of symbols (`Word::merge_all`), n·log n in the word's length: a word at the prompt
    /// length bound takes milliseconds, not the minutes a rescanning BPE would.
    #[test]
    fn a_word_at_the_length_bound_tokenizes_quickly() {
        let tokenizer = ClipTokenizer::embedded(Padding::EndOfText).unwrap();
        let n = crate::MAX_PROMPT_CHARS;
        for word in [
            "a".repeat(n),
            (0..n)
                .map(|i| char::from(b'a' + (i * 7 % 26) as u8))
                .collect::<String>(),
        ] {
            let start = std::time::Instant::now();
            let ids = tokenizer.encode(&word).unwrap();
            assert!(ids.len() > n / 10, "{} tokens", ids.len());
            let took = start.elapsed();
            assert!(took.as_secs() < 10, "{n} letters took {took:?}");
        }
    }

    /// Every problem with a vocabulary or its merges names the file, and merges the line.
    #[test]
    fn file_errors_name_the_file_and_line() {
        let vocab = r#"{"<|startoftext|>": 3, "<|endoftext|>": 4, "a": 0, "b": 1, "ab": 2}"#;
        let ok =
            ClipTokenizer::from_vocab_and_merges(vocab, "#version: 0.2\na b\n", Padding::EndOfText);
        assert!(ok.is_ok());
        let err = |vocab: &str, merges: &str| {
            ClipTokenizer::from_vocab_and_merges(vocab, merges, Padding::EndOfText)
                .err()
                .unwrap()
                .to_string()
        };
        let e = err("{not json", "");
        assert!(e.starts_with("vocab.json: ") && e.contains("line 1"), "{e}");
        let e = err(r#"{"a": -1}"#, "");
        assert!(e.starts_with("vocab.json: ") && e.contains("-1"), "{e}");
        let e = err(r#"{"a": 4294967296}"#, "");
        assert!(e.starts_with("vocab.json: "), "{e}");
        let e = err("{}", "");
        assert!(
            e.starts_with("vocab.json: ") && e.contains("<|startoftext|>"),
            "{e}"
        );
        let e = err(vocab, "#version: 0.2\na b\nab\n");
        assert!(e.starts_with("merges.txt: line 3: `ab`"), "{e}");
        let e = err(vocab, "a b c\n");
        assert!(e.starts_with("merges.txt: line 1: "), "{e}");
        let e = err(vocab, "a b\n\nb a\n");
        assert!(
            e.starts_with("merges.txt: line 3: the merge `b a` uses `ba`"),
            "{e}"
        );
        let e = err(vocab, "a c\n");
        assert!(
            e.starts_with("merges.txt: line 1: ") && e.contains("`c`"),
            "{e}"
        );
        let no_bang = ClipTokenizer::from_vocab_and_merges(vocab, "", Padding::Exclamation);
        assert!(no_bang.err().unwrap().to_string().contains("`!`"));
        // tokenizer.json: the file and the merge's index.
        let json = |merges: &str| {
            format!(r#"{{"model": {{"type": "BPE", "vocab": {vocab}, "merges": {merges}}}}}"#)
        };
        assert!(
            ClipTokenizer::from_tokenizer_json(&json(r#"[["a", "b"]]"#), Padding::EndOfText)
                .is_ok()
        );
        assert!(
            ClipTokenizer::from_tokenizer_json(&json(r#"["a b"]"#), Padding::EndOfText).is_ok()
        );
        for (merges, says) in [
            (r#"[["a", "b"], ["a"]]"#, "model.merges[1] is not a pair"),
            (r#"[["a", 1]]"#, "model.merges[0] is not a pair"),
            (r#"["a b", "b"]"#, "model.merges[1] `b` is not two tokens"),
            (
                r#"[["b", "a"]]"#,
                "model.merges[0]: the merge `b a` uses `ba`",
            ),
        ] {
            let e = ClipTokenizer::from_tokenizer_json(&json(merges), Padding::EndOfText)
                .err()
                .unwrap()
                .to_string();
            assert!(e.starts_with(&format!("tokenizer.json: {says}")), "{e}");
        }
        let e = ClipTokenizer::from_tokenizer_json("[", Padding::EndOfText)
            .err()
            .unwrap()
            .to_string();
        assert!(e.starts_with("tokenizer.json: "), "{e}");
    }

    /// A vocabulary with more ids than the text encoder has embeddings is refused by name.
    #[test]
    fn ids_past_the_encoders_vocabulary_are_named() {
        let tokenizer = ClipTokenizer::embedded(Padding::EndOfText).unwrap();
        assert!(tokenizer.check_fits(49408).is_ok());
        let e = tokenizer.check_fits(1000).unwrap_err().to_string();
        assert!(
            e.starts_with(
                "<built-in CLIP vocabulary>/vocab.json: token `<|endoftext|>` has id 49407"
            ),
            "{e}"
        );
        assert!(e.contains("1000 ids"), "{e}");
    }

    #[test]
    fn padding_uses_the_vocabularys_ids() {
        let eos = ClipTokenizer::embedded(Padding::EndOfText).unwrap();
        let bang = ClipTokenizer::embedded(Padding::Exclamation).unwrap();
        assert_eq!((eos.pad(), bang.pad()), (49407, 0));
        assert_eq!(bang.wrap(&[320])[76], 0);
        assert_eq!(eos.wrap(&[320])[76], 49407);
    }
}
