//! CLIP token ids against transformers' CLIPTokenizer on the prompts of
//! `tests/fixtures/tokenizer/clip/` (punctuation, digits, apostrophes, accents, CJK, emoji,
//! whitespace runs, the literal special tokens, prompts over 77 tokens): the raw tokens and both
//! padding rules.

use crate::common;

use sd_conditioner::{ClipTokenizer, Padding};

#[test]
fn token_ids_match_transformers() {
    let case = common::fixtures_dir().join("tokenizer/clip");
    let manifest = common::manifest(&case);
    let prompts: Vec<String> = serde_json::from_value(manifest["prompts"].clone()).unwrap();
    let tokens: Vec<Vec<u32>> = serde_json::from_value(manifest["tokens"].clone()).unwrap();
    let eos: Vec<Vec<u32>> = serde_json::from_value(manifest["padded_eos"].clone()).unwrap();
    let bang: Vec<Vec<u32>> = serde_json::from_value(manifest["padded_bang"].clone()).unwrap();
    assert!(prompts.len() >= 200);
    let eos_tok = ClipTokenizer::embedded(Padding::EndOfText).unwrap();
    let bang_tok = ClipTokenizer::embedded(Padding::Exclamation).unwrap();
    let mut failures = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        let got = eos_tok.encode(prompt).unwrap();
        if got != tokens[i] {
            failures.push(format!(
                "{prompt:?}: tokens {got:?}, transformers {:?}",
                tokens[i]
            ));
        }
        if eos_tok.encode_padded(prompt).unwrap() != eos[i] {
            failures.push(format!("{prompt:?}: <|endoftext|>-padded ids differ"));
        }
        let got = bang_tok.encode_padded(prompt).unwrap();
        if got != bang[i] {
            failures.push(format!(
                "{prompt:?}: !-padded ids {got:?}, transformers {:?}",
                bang[i]
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} prompts differ:\n{}",
        failures.len(),
        prompts.len(),
        failures.join("\n")
    );
}

#[test]
fn a_tokenizer_folder_loads_like_the_embedded_vocabulary() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/sd-conditioner/vocab");
    let folder = ClipTokenizer::from_folder(&dir, Padding::EndOfText).unwrap();
    let embedded = ClipTokenizer::embedded(Padding::EndOfText).unwrap();
    let prompt = "a photograph of an astronaut riding a horse";
    assert_eq!(
        folder.encode(prompt).unwrap(),
        embedded.encode(prompt).unwrap()
    );
    assert_eq!(
        embedded.encode(prompt).unwrap(),
        vec![320, 8853, 539, 550, 18376, 6765, 320, 4558]
    );
    let err = ClipTokenizer::from_folder("/nonexistent/tokenizer", Padding::EndOfText)
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("/nonexistent/tokenizer/vocab.json"),
        "{err}"
    );
    assert!(ClipTokenizer::from_vocab_and_merges("{not json", "", Padding::EndOfText).is_err());
    assert!(ClipTokenizer::from_vocab_and_merges("{}", "", Padding::EndOfText).is_err());
}
