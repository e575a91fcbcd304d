//! A1111-style prompts: `(word)` ×1.1, `((word))` ×1.21, `[word]` ÷1.1, `(word:1.5)`, `\(` for a
//! literal bracket, `BREAK` to start a new chunk; and the split of long prompts into 75-token
//! chunks (broken at a recent comma when there is one), each wrapped in start/end tokens and
//! padded to 77.

use std::sync::LazyLock;

use regex::Regex;
use sd_core::Result;

use crate::tokenizer::{ClipTokenizer, MAX_LENGTH};

/// Tokens per chunk between the start and end tokens.
pub const CHUNK_TOKENS: usize = MAX_LENGTH - 2;

static ATTENTION: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:")
        .expect("a valid pattern")
});
static BREAK: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\s*\bBREAK\b\s*").expect("a valid pattern"));

/// A piece of prompt text and its attention weight; `None` text marks a `BREAK`.
#[derive(Debug, Clone, PartialEq)]
pub struct Weighted {
    pub text: Option<String>,
    pub weight: f64,
}

/// Splits a prompt into runs of equal attention weight, exactly as A1111's
/// `parse_prompt_attention` reads it, unbalanced brackets included (an open bracket applies to
/// the end of the prompt; a stray closing one is text). No input makes it panic.
pub fn parse_weights(prompt: &str) -> Vec<Weighted> {
    let mut res: Vec<(Option<String>, f64)> = Vec::new();
    let (mut round, mut square): (Vec<usize>, Vec<usize>) = (Vec::new(), Vec::new());
    let multiply = |res: &mut Vec<(Option<String>, f64)>, from: usize, by: f64| {
        for piece in &mut res[from..] {
            piece.1 *= by;
        }
    };
    for m in ATTENTION.captures_iter(prompt) {
        let text = m.get(0).map_or("", |g| g.as_str());
        let weight = m.get(1).and_then(|w| w.as_str().parse::<f64>().ok());
        if let Some(escaped) = text.strip_prefix('\\') {
            res.push((Some(escaped.to_string()), 1.0));
        } else if text == "(" {
            round.push(res.len());
        } else if text == "[" {
            square.push(res.len());
        } else if let (Some(w), Some(_)) = (weight, round.last()) {
            let from = round.pop().unwrap_or(0);
            multiply(&mut res, from, w);
        } else if text == ")" && !round.is_empty() {
            let from = round.pop().unwrap_or(0);
            multiply(&mut res, from, 1.1);
        } else if text == "]" && !square.is_empty() {
            let from = square.pop().unwrap_or(0);
            multiply(&mut res, from, 1.0 / 1.1);
        } else {
            for (i, part) in BREAK.split(text).enumerate() {
                if i > 0 {
                    res.push((None, -1.0));
                }
                res.push((Some(part.to_string()), 1.0));
            }
        }
    }
    for from in round {
        multiply(&mut res, from, 1.1);
    }
    for from in square {
        multiply(&mut res, from, 1.0 / 1.1);
    }
    if res.is_empty() {
        res.push((Some(String::new()), 1.0));
    }
    // Merge neighbours of equal weight.
    let mut merged: Vec<(Option<String>, f64)> = Vec::new();
    for (text, weight) in res {
        match merged.last_mut() {
            Some((Some(last), w)) if *w == weight && text.is_some() => {
                last.push_str(text.as_deref().unwrap_or(""));
            }
            _ => merged.push((text, weight)),
        }
    }
    merged
        .into_iter()
        .map(|(text, weight)| Weighted { text, weight })
        .collect()
}

/// A prompt as the text encoder takes it: chunks of 77 ids with a weight per id.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptTokens {
    /// How many prompt tokens there are (without start, end and padding).
    pub token_count: usize,
    pub chunks: Vec<Vec<u32>>,
    pub weights: Vec<Vec<f64>>,
}

/// How far back (in tokens) a full chunk looks for a comma to break at instead (A1111's
/// `comma_padding_backtrack` default).
pub const COMMA_BACKTRACK: usize = 20;

/// Tokenizes a weighted prompt into 75-token chunks as A1111 does: a new chunk at each `BREAK`,
/// and when a chunk fills up with a comma among its last [`COMMA_BACKTRACK`] tokens, the tokens
/// after that comma move to the next chunk (phrases stay whole). Each chunk is wrapped in
/// start/end tokens and padded to 77; start, end and padding get weight 1.
pub fn tokenize_prompt(tokenizer: &ClipTokenizer, prompt: &str) -> Result<PromptTokens> {
    let comma = tokenizer.encode(",")?.first().copied();
    let mut chunks: Vec<Vec<(u32, f64)>> = Vec::new();
    let mut chunk: Vec<(u32, f64)> = Vec::new();
    let mut last_comma: Option<usize> = None;
    let mut count = 0;
    for piece in parse_weights(prompt) {
        let Some(text) = piece.text else {
            chunks.push(std::mem::take(&mut chunk));
            last_comma = None;
            continue;
        };
        for id in tokenizer.encode(&text)? {
            count += 1;
            if Some(id) == comma {
                last_comma = Some(chunk.len());
            } else if chunk.len() == CHUNK_TOKENS
                && let Some(at) = last_comma
                && chunk.len() - at <= COMMA_BACKTRACK
            {
                let moved = chunk.split_off(at + 1);
                chunks.push(std::mem::replace(&mut chunk, moved));
                last_comma = None;
            }
            if chunk.len() == CHUNK_TOKENS {
                chunks.push(std::mem::take(&mut chunk));
                last_comma = None;
            }
            chunk.push((id, piece.weight));
        }
    }
    // A last chunk is added only when it holds tokens (or is the only one), as A1111 does.
    if !chunk.is_empty() || chunks.is_empty() {
        chunks.push(chunk);
    }
    let (mut ids, mut weights) = (Vec::new(), Vec::new());
    for chunk in chunks {
        let tokens: Vec<u32> = chunk.iter().map(|(t, _)| *t).collect();
        ids.push(tokenizer.wrap(&tokens));
        let mut w = vec![1.0];
        w.extend(chunk.iter().map(|(_, w)| *w));
        w.resize(MAX_LENGTH, 1.0);
        weights.push(w);
    }
    Ok(PromptTokens {
        token_count: count,
        chunks: ids,
        weights,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(prompt: &str) -> Vec<(String, f64)> {
        parse_weights(prompt)
            .into_iter()
            .map(|w| (w.text.unwrap_or_else(|| "BREAK".into()), w.weight))
            .collect()
    }

    fn close(a: &[(String, f64)], b: &[(&str, f64)]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|((t, w), (u, v))| t == u && (w - v).abs() < 1e-9)
    }

    /// The examples of A1111's `parse_prompt_attention` docstring.
    #[test]
    fn reads_prompts_as_a1111_does() {
        let cases: &[(&str, &[(&str, f64)])] = &[
            ("normal text", &[("normal text", 1.0)]),
            (
                "an (important) word",
                &[("an ", 1.0), ("important", 1.1), (" word", 1.0)],
            ),
            ("(unbalanced", &[("unbalanced", 1.1)]),
            ("\\(literal\\]", &[("(literal]", 1.0)]),
            ("(unnecessary)(parens)", &[("unnecessaryparens", 1.1)]),
            (
                "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
                &[
                    ("a ", 1.0),
                    ("house", 1.573),
                    (" ", 1.1),
                    ("on", 1.0),
                    (" a ", 1.1),
                    ("hill", 0.55),
                    (", sun, ", 1.1),
                    ("sky", 1.4641),
                    (".", 1.1),
                ],
            ),
            ("a BREAK b", &[("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
            ("", &[("", 1.0)]),
            ("))]] ((:", &[("))]] ", 1.0), (":", 1.21)]),
        ];
        for (prompt, expected) in cases {
            let got = parsed(prompt);
            assert!(close(&got, expected), "{prompt:?}: {got:?}");
        }
    }

    #[test]
    fn no_input_panics() {
        for prompt in [
            "(((",
            ")))",
            "[[[(",
            ":1.5)",
            "(a:)",
            "(a:1.2.3)",
            "\\",
            "(:-)",
            "BREAK",
            "\u{0}(",
        ] {
            let _ = parse_weights(prompt);
        }
    }

    #[test]
    fn long_prompts_split_into_chunks() {
        let tokenizer = ClipTokenizer::embedded(crate::Padding::EndOfText).unwrap();
        let long = vec!["cat"; 100].join(" ");
        let t = tokenize_prompt(&tokenizer, &long).unwrap();
        assert_eq!(t.token_count, 100);
        assert_eq!(t.chunks.len(), 2);
        assert!(
            t.chunks
                .iter()
                .all(|c| c.len() == MAX_LENGTH && c[0] == 49406)
        );
        assert_eq!(t.chunks[1][26], 49407, "25 tokens then the end token");
        let t = tokenize_prompt(&tokenizer, "a (cat:1.5) BREAK dog").unwrap();
        assert_eq!(t.chunks.len(), 2);
        assert_eq!(t.weights[0][2], 1.5);
        assert_eq!(&t.chunks[1][..3], &[49406, 1929, 49407]);
    }

    /// A1111 moves the words after a comma among a full chunk's last 20 tokens to the next
    /// chunk, and adds no empty chunk after a trailing `BREAK`.
    #[test]
    fn full_chunks_break_at_a_recent_comma() {
        let tokenizer = ClipTokenizer::embedded(crate::Padding::EndOfText).unwrap();
        let mut words: Vec<&str> = vec!["cat"; 70];
        words.push(",");
        words.extend(vec!["dog"; 10]);
        let t = tokenize_prompt(&tokenizer, &words.join(" ")).unwrap();
        assert_eq!(t.token_count, 81);
        assert_eq!(t.chunks.len(), 2);
        let (cat, comma, dog, eos) = (2368, 267, 1929, 49407);
        assert_eq!(t.chunks[0][70], cat);
        assert_eq!(t.chunks[0][71], comma, "the comma ends the first chunk");
        assert_eq!(t.chunks[0][72], eos);
        assert!(
            t.chunks[1][1..11].iter().all(|&id| id == dog),
            "{:?}",
            t.chunks[1]
        );
        assert_eq!(t.chunks[1][11], eos);
        // A comma further back than 20 tokens does not move anything.
        let mut words: Vec<&str> = vec!["cat"; 10];
        words.push(",");
        words.extend(vec!["dog"; 70]);
        let t = tokenize_prompt(&tokenizer, &words.join(" ")).unwrap();
        assert_eq!(t.chunks[0][76], eos);
        assert_eq!(t.chunks[0][75], dog, "75 tokens in the first chunk");
        // `a BREAK` is one chunk.
        assert_eq!(
            tokenize_prompt(&tokenizer, "a BREAK").unwrap().chunks.len(),
            1
        );
        assert_eq!(
            tokenize_prompt(&tokenizer, "BREAK a").unwrap().chunks.len(),
            2
        );
    }
}
