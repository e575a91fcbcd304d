//! Step 1 of a prompt's path: A1111's prompt syntax read into weighted pieces of text:
//! `(word)` ×1.1, `((word))` ×1.21, `[word]` ÷1.1, `(word:1.5)`, `\(` for a literal bracket,
//! `BREAK` to start a new chunk.

use std::sync::LazyLock;

use regex::Regex;

use crate::limits::{MAX_NESTING, MAX_WEIGHT, PromptError, check_length};

/// How prompt text is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PromptSyntax {
    /// A1111's: `(word:1.2)` weights and `BREAK`, any length in 75-token chunks concatenated
    /// along the sequence (what stable-diffusion-webui and stable-diffusion.cpp users expect).
    #[default]
    Weighted,
    /// diffusers': the text as is, truncated to 75 tokens.
    Plain,
}

static ATTENTION: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:")
        .expect("a valid pattern")
});
static BREAK: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\s*\bBREAK\b\s*").expect("a valid pattern"));

/// A1111's marker for `BREAK`: the text "BREAK" with weight −1. Brackets multiply it like any
/// other piece, and only a piece that is still exactly ("BREAK", −1) at the end starts a chunk.
const BREAK_MARKER: &str = "BREAK";

/// A piece of prompt text and its attention weight; `None` text marks a `BREAK`.
#[derive(Debug, Clone, PartialEq)]
pub struct Weighted {
    /// The text, or `None` for a `BREAK` that starts a new chunk.
    pub text: Option<String>,
    /// Its attention weight, the weights of all brackets around it multiplied.
    pub weight: f64,
}

/// The prompt's pieces as A1111's `re_attention` matches them: the matched text and, for a
/// `:1.5)` closing, its number (`None` when it does not parse, like `:1.2.3)`, which A1111 would
/// fail on and we read as text).
fn matches(prompt: &str) -> impl Iterator<Item = (&str, Option<f64>)> {
    ATTENTION.captures_iter(prompt).map(|m| {
        let text = m.get(0).map_or("", |g| g.as_str());
        let weight = m.get(1).and_then(|w| w.as_str().parse::<f64>().ok());
        (text, weight)
    })
}

/// What a matched piece does to the bracket stacks, given whether round or square brackets are
/// open: A1111's `if`/`elif` chain of `parse_prompt_attention`, in its order.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Action {
    Escaped,
    OpenRound,
    OpenSquare,
    CloseWeighted(f64),
    CloseRound,
    CloseSquare,
    Text,
}

fn action(text: &str, weight: Option<f64>, round_open: bool, square_open: bool) -> Action {
    if text.starts_with('\\') {
        Action::Escaped
    } else if text == "(" {
        Action::OpenRound
    } else if text == "[" {
        Action::OpenSquare
    } else if let (Some(w), true) = (weight, round_open) {
        Action::CloseWeighted(w)
    } else if text == ")" && round_open {
        Action::CloseRound
    } else if text == "]" && square_open {
        Action::CloseSquare
    } else {
        Action::Text
    }
}

/// The deepest bracket nesting of a prompt, read as [`parse_weights`] reads it.
fn nesting(prompt: &str) -> usize {
    let (mut round, mut square, mut deepest) = (0usize, 0usize, 0usize);
    for (text, weight) in matches(prompt) {
        match action(text, weight, round > 0, square > 0) {
            Action::OpenRound => round += 1,
            Action::OpenSquare => square += 1,
            Action::CloseWeighted(_) | Action::CloseRound => round -= 1,
            Action::CloseSquare => square -= 1,
            Action::Escaped | Action::Text => {}
        }
        deepest = deepest.max(round + square);
    }
    deepest
}

/// Splits a prompt into runs of equal attention weight, exactly as A1111's
/// `parse_prompt_attention` reads it, unbalanced brackets included (an open bracket applies to
/// the end of the prompt; a stray closing one is text). `BREAK` inside brackets is text, as in
/// A1111: its marker's weight −1 is multiplied by the bracket's and no longer reads as a break.
///
/// Refuses, before any other work, a prompt past [`MAX_PROMPT_CHARS`](crate::MAX_PROMPT_CHARS)
/// or nesting brackets past [`MAX_NESTING`], then any weight that is not finite or past
/// [`MAX_WEIGHT`]. No input makes it panic.
pub fn parse_weights(prompt: &str) -> std::result::Result<Vec<Weighted>, PromptError> {
    check_length(prompt)?;
    let depth = nesting(prompt);
    if depth > MAX_NESTING {
        return Err(PromptError::TooDeep { depth });
    }
    // A1111's `res`: [text, weight] pairs, BREAK as ["BREAK", -1].
    let mut res: Vec<(String, f64)> = Vec::new();
    let (mut round, mut square): (Vec<usize>, Vec<usize>) = (Vec::new(), Vec::new());
    // The nesting bound keeps this at most MAX_NESTING passes over any piece.
    let multiply = |res: &mut Vec<(String, f64)>, from: usize, by: f64| {
        for piece in &mut res[from..] {
            piece.1 *= by;
        }
    };
    for (text, weight) in matches(prompt) {
        match action(text, weight, !round.is_empty(), !square.is_empty()) {
            Action::Escaped => res.push((text[1..].to_string(), 1.0)),
            Action::OpenRound => round.push(res.len()),
            Action::OpenSquare => square.push(res.len()),
            Action::CloseWeighted(w) => {
                let from = round.pop().unwrap_or(0);
                multiply(&mut res, from, w);
            }
            Action::CloseRound => {
                let from = round.pop().unwrap_or(0);
                multiply(&mut res, from, 1.1);
            }
            Action::CloseSquare => {
                let from = square.pop().unwrap_or(0);
                multiply(&mut res, from, 1.0 / 1.1);
            }
            Action::Text => {
                for (i, part) in BREAK.split(text).enumerate() {
                    if i > 0 {
                        res.push((BREAK_MARKER.to_string(), -1.0));
                    }
                    res.push((part.to_string(), 1.0));
                }
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
        res.push((String::new(), 1.0));
    }
    // Merge neighbours of equal weight, markers included, as A1111 does (so that, like there,
    // `(a BREAK b:0)` is the one text "aBREAKb": 0 and −0 are equal).
    let mut merged: Vec<(String, f64)> = Vec::with_capacity(res.len());
    for (text, weight) in res {
        match merged.last_mut() {
            Some((last, w)) if *w == weight => last.push_str(&text),
            _ => merged.push((text, weight)),
        }
    }
    let pieces: Vec<Weighted> = merged
        .into_iter()
        .map(|(text, weight)| Weighted {
            // A1111's tokenizer starts a chunk only at `text == 'BREAK' and weight == -1`.
            text: (text != BREAK_MARKER || weight != -1.0).then_some(text),
            weight,
        })
        .collect();
    for piece in &pieces {
        // Empty text has no tokens, so its weight reaches nothing.
        if let Some(text) = piece.text.as_deref().filter(|t| !t.is_empty())
            && !(piece.weight.is_finite() && piece.weight.abs() <= MAX_WEIGHT)
        {
            let mut shown: String = text.chars().take(40).collect();
            if shown.len() < text.len() {
                shown.push('…');
            }
            return Err(PromptError::Weight {
                text: shown,
                weight: piece.weight,
            });
        }
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunks::tokenize_prompt;
    use crate::limits::MAX_PROMPT_CHARS;
    use crate::tokenizer::ClipTokenizer;

    /// The pieces of a prompt, a chunk-starting `BREAK` written `<break>` (the text "BREAK"
    /// stays "BREAK").
    fn parsed(prompt: &str) -> Vec<(String, f64)> {
        parse_weights(prompt)
            .unwrap()
            .into_iter()
            .map(|w| (w.text.unwrap_or_else(|| "<break>".into()), w.weight))
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
            ("a BREAK b", &[("a", 1.0), ("<break>", -1.0), ("b", 1.0)]),
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

    /// A1111 appends BREAK as ["BREAK", -1], lets `multiply_range` multiply it with the rest of
    /// a bracket, and starts a chunk only at weight exactly −1: inside brackets BREAK is the
    /// word "BREAK", weighted by the bracket times −1.
    #[test]
    fn break_inside_brackets_is_text_as_in_a1111() {
        let cases: &[(&str, &[(&str, f64)])] = &[
            (
                "(8k BREAK realistic)",
                &[("8k", 1.1), ("BREAK", -1.1), ("realistic", 1.1)],
            ),
            (
                "[8k BREAK realistic]",
                &[
                    ("8k", 1.0 / 1.1),
                    ("BREAK", -1.0 / 1.1),
                    ("realistic", 1.0 / 1.1),
                ],
            ),
            (
                "a ((b BREAK c))",
                &[("a ", 1.0), ("b", 1.21), ("BREAK", -1.21), ("c", 1.21)],
            ),
            // An open bracket reaches the end of the prompt, BREAK included.
            (
                "x (y BREAK z",
                &[("x ", 1.0), ("y", 1.1), ("BREAK", -1.1), ("z", 1.1)],
            ),
            // A weight of 1 leaves the marker at −1: still a break.
            (
                "(a BREAK b:1)",
                &[("a", 1.0), ("<break>", -1.0), ("b", 1.0)],
            ),
            // A weight of −1 turns it to +1, and the text to −1.
            (
                "(a BREAK b:-1)",
                &[("a", -1.0), ("BREAK", 1.0), ("b", -1.0)],
            ),
            // Weight 0: 0 and −0 are equal, so A1111's merge joins the three into one text.
            ("(a BREAK b:0)", &[("aBREAKb", 0.0)]),
            // Outside brackets, and after they close, BREAK breaks (A1111's `re_break` takes
            // the spaces around it).
            (
                "(a) BREAK b",
                &[("a", 1.1), ("", 1.0), ("<break>", -1.0), ("b", 1.0)],
            ),
        ];
        for (prompt, expected) in cases {
            let got = parsed(prompt);
            assert!(close(&got, expected), "{prompt:?}: {got:?}");
        }
        let tokenizer = ClipTokenizer::embedded(crate::Padding::EndOfText).unwrap();
        let t = tokenize_prompt(&tokenizer, "(8k BREAK realistic)").unwrap();
        assert_eq!(t.chunks.len(), 1, "one chunk, as in A1111");
        let mut expected = vec![49406];
        for word in ["8k", "BREAK", "realistic"] {
            expected.extend(tokenizer.encode(word).unwrap());
        }
        expected.push(49407);
        assert_eq!(&t.chunks[0][..expected.len()], &expected[..]);
        let word = tokenizer.encode("BREAK").unwrap();
        assert_eq!(word.len(), 1);
        let at = t.chunks[0].iter().position(|&id| id == word[0]).unwrap();
        assert!((t.weights[0][at] + 1.1).abs() < 1e-9, "{:?}", t.weights[0]);
        assert_eq!(
            tokenize_prompt(&tokenizer, "8k BREAK realistic")
                .unwrap()
                .chunks
                .len(),
            2
        );
    }

    #[test]
    fn weights_that_overflow_are_refused() {
        // 1e39 in digits: finite as f64, infinite as the f32 the encoder computes in.
        let huge = format!("(cat:1{})", "0".repeat(39));
        let err = parse_weights(&huge).unwrap_err();
        let named = matches!(&err, PromptError::Weight { text, weight }
            if text == "cat" && *weight == 1e39);
        assert!(named, "{err:?}");
        let message = err.to_string();
        assert!(
            message.contains("1e39") && message.contains("100"),
            "{message}"
        );
        // A1111's number pattern has no exponent: `(cat:1e39)` is the text "cat:1e39" × 1.1.
        assert_eq!(parsed("(cat:1e39)"), vec![("cat:1e39".to_string(), 1.1)]);
        // Too large for f64: infinite; infinite times 0: NaN.
        let inf = format!("(cat:9{})", "9".repeat(400));
        let weight = |prompt: &str| match parse_weights(prompt) {
            Err(PromptError::Weight { weight, .. }) => weight,
            other => panic!("{prompt}: {other:?}"),
        };
        assert!(weight(&inf).is_infinite());
        let nan = format!("((cat:9{}):0)", "9".repeat(400));
        assert!(weight(&nan).is_nan());
        assert!(parse_weights(&nan).unwrap_err().to_string().contains("NaN"));
        // The bound itself is allowed, past it not, negative or positive.
        assert_eq!(parsed("(cat:100)"), vec![("cat".to_string(), 100.0)]);
        assert_eq!(parsed("(cat:0)"), vec![("cat".to_string(), 0.0)]);
        for prompt in ["(cat:100.5)", "(cat:-101)", "((cat:91))"] {
            assert!(
                matches!(parse_weights(prompt), Err(PromptError::Weight { .. })),
                "{prompt}"
            );
        }
        // 49 parentheses multiply to 1.1^49 ≈ 106.7.
        let deep = format!("{}cat{}", "(".repeat(49), ")".repeat(49));
        assert!(matches!(
            parse_weights(&deep),
            Err(PromptError::Weight { .. })
        ));
        // An empty bracket weights nothing, whatever its number.
        assert!(parse_weights(&format!("a (:1{})", "0".repeat(400))).is_ok());
    }

    #[test]
    fn deep_nesting_is_refused_before_any_work() {
        let nested = format!("{}cat{}", "(".repeat(1000), ")".repeat(1000));
        let err = parse_weights(&nested).unwrap_err();
        assert_eq!(err, PromptError::TooDeep { depth: 1000 });
        assert!(err.to_string().contains("1000 deep"), "{err}");
        assert!(err.to_string().contains("100 levels"), "{err}");
        // Unbalanced: every open bracket counts until the prompt ends.
        let open = format!("{}cat", "[".repeat(10_000));
        assert_eq!(
            parse_weights(&open),
            Err(PromptError::TooDeep { depth: 10_000 })
        );
        // 50,000 brackets are past the length bound first.
        assert_eq!(
            parse_weights(&"(".repeat(50_000)),
            Err(PromptError::TooLong { chars: 50_000 })
        );
        // 100 levels are read; round and square ones that cancel leave a sane weight.
        let mixed = format!("{}cat{}", "([".repeat(50), "])".repeat(50));
        let got = parsed(&mixed);
        assert_eq!(got.len(), 1);
        assert!((got[0].1 - 1.0).abs() < 1e-9, "{got:?}");
        let deeper = format!("([{mixed}])");
        assert_eq!(
            parse_weights(&deeper),
            Err(PromptError::TooDeep { depth: 102 })
        );
        // Stray closing brackets are text and nest nothing.
        assert!(parse_weights(&")".repeat(MAX_PROMPT_CHARS)).is_ok());
        // Escaped brackets are text.
        assert!(parse_weights(&"\\(".repeat(1000)).is_ok());
    }
}
