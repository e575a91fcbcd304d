//! Step 3 of a prompt's path: token ids into 77-token chunks with a weight per id. A long
//! prompt is split into 75-token chunks (broken at a recent comma when there is one, and at
//! each `BREAK`), each wrapped in start/end tokens and padded to 77; the prompts of one batch
//! are padded to the same number of chunks.

use sd_core::Result;

use crate::limits::{CHUNK_TOKENS, MAX_CHUNKS, MAX_LENGTH, PromptError};
use crate::syntax::{PromptSyntax, parse_weights};
use crate::tokenizer::ClipTokenizer;

/// A prompt as the text encoder takes it: chunks of 77 ids with a weight per id.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptTokens {
    /// How many prompt tokens there are (without start, end and padding).
    pub token_count: usize,
    /// The chunks of 77 ids: start, up to 75 prompt tokens, end, padding.
    pub chunks: Vec<Vec<u32>>,
    /// The attention weight of each id of each chunk (1 for start, end and padding).
    pub weights: Vec<Vec<f64>>,
}

/// How far back (in tokens) a full chunk looks for a comma to break at instead (A1111's
/// `comma_padding_backtrack` default).
pub const COMMA_BACKTRACK: usize = 20;

/// Tokenizes a weighted prompt into 75-token chunks as A1111 does: a new chunk at each `BREAK`,
/// and when a chunk fills up with a comma among its last [`COMMA_BACKTRACK`] tokens, the tokens
/// after that comma move to the next chunk (phrases stay whole). Each chunk is wrapped in
/// start/end tokens and padded to 77; start, end and padding get weight 1.
///
/// Refuses a prompt that [`parse_weights`] refuses, or that makes more than [`MAX_CHUNKS`]
/// chunks.
pub fn tokenize_prompt(tokenizer: &ClipTokenizer, prompt: &str) -> Result<PromptTokens> {
    let pieces = parse_weights(prompt)?;
    let comma = tokenizer.encode(",")?.first().copied();
    let mut chunks: Vec<Vec<(u32, f64)>> = Vec::new();
    let mut chunk: Vec<(u32, f64)> = Vec::new();
    let mut last_comma: Option<usize> = None;
    let mut count = 0;
    for piece in pieces {
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
    if chunks.len() > MAX_CHUNKS {
        return Err(PromptError::TooManyChunks {
            chunks: chunks.len(),
            tokens: count,
        }
        .into());
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

/// Each prompt's chunks and weights through one tokenizer, read with `syntax` (plain prompts
/// are one chunk, truncated), all padded with empty chunks to the same number of chunks.
pub(crate) fn chunk_prompts(
    tokenizer: &ClipTokenizer,
    syntax: PromptSyntax,
    prompts: &[&str],
) -> Result<Vec<PromptTokens>> {
    let mut out = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        out.push(match syntax {
            PromptSyntax::Plain => {
                let ids = tokenizer.encode(prompt)?;
                PromptTokens {
                    token_count: ids.len(),
                    // `wrap` keeps the first 75 tokens, as diffusers truncates.
                    chunks: vec![tokenizer.wrap(&ids)],
                    weights: vec![vec![1.0; MAX_LENGTH]],
                }
            }
            PromptSyntax::Weighted => tokenize_prompt(tokenizer, prompt)?,
        });
    }
    let chunks = out.iter().map(|t| t.chunks.len()).max().unwrap_or(1);
    for t in &mut out {
        while t.chunks.len() < chunks {
            t.chunks.push(tokenizer.wrap(&[]));
            t.weights.push(vec![1.0; MAX_LENGTH]);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{MAX_PROMPT_CHARS, check_length};

    #[test]
    fn long_prompts_are_refused_with_their_size() {
        let tokenizer = ClipTokenizer::embedded(crate::Padding::EndOfText).unwrap();
        let start = std::time::Instant::now();
        let word = "a".repeat(100_000);
        let err = tokenize_prompt(&tokenizer, &word).unwrap_err().to_string();
        assert!(
            err.contains("100000 characters") && err.contains("20000"),
            "{err}"
        );
        assert!(tokenizer.encode(&word).is_err(), "plain prompts too");
        assert!(tokenizer.encode_padded(&word).is_err());
        // Characters, not bytes: 20,000 accented letters (40,000 bytes) are read.
        assert!(check_length(&"é".repeat(MAX_PROMPT_CHARS)).is_ok());
        assert_eq!(
            check_length(&"é".repeat(MAX_PROMPT_CHARS + 1)),
            Err(PromptError::TooLong {
                chars: MAX_PROMPT_CHARS + 1
            })
        );
        // 32 chunks of 75 are encoded, 33 are not.
        let at_bound = vec!["cat"; MAX_CHUNKS * CHUNK_TOKENS].join(" ");
        assert_eq!(
            tokenize_prompt(&tokenizer, &at_bound).unwrap().chunks.len(),
            MAX_CHUNKS
        );
        let past = vec!["cat"; MAX_CHUNKS * CHUNK_TOKENS + 1].join(" ");
        let err = tokenize_prompt(&tokenizer, &past).unwrap_err().to_string();
        assert!(
            err.contains("33 chunks") && err.contains("2401 tokens") && err.contains("at most 32"),
            "{err}"
        );
        // BREAK makes chunks as well.
        let breaks = vec!["cat"; 40].join(" BREAK ");
        let err = tokenize_prompt(&tokenizer, &breaks)
            .unwrap_err()
            .to_string();
        assert!(err.contains("40 chunks"), "{err}");
        assert!(start.elapsed().as_secs() < 60, "took {:?}", start.elapsed());
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
