//! The built-in shapes model as a person on a fresh clone meets it: `sd generate PROMPT` with
//! no `--model` installs the embedded folder and draws what the prompt says, judged by the
//! analytic checker. The pairs are a handful of fixed prompt/seed pairs at the default
//! settings (held-out and seen ones), so the test stays fast; `sd eval shapes` measures the
//! adherence over many.

use std::process::Command;

/// Prompt, seed: each passes the checker at the model's defaults (chosen from an
/// `sd eval shapes --out` report of the committed model).
const PAIRS: &[(&str, u64)] = &[
    ("a red circle above a blue square", 0),
    ("a yellow circle", 0),
    ("a green square to the left of a purple triangle", 0),
    ("a blue triangle", 0),
];

#[test]
fn the_built_in_model_draws_what_fixed_prompts_say() {
    if !sd_shapes::model::is_built_in() {
        eprintln!("skipped: the shapes model is not in crates/sd-shapes/model");
        return;
    }
    let dir = std::env::temp_dir().join(format!("sd-cli-{}-shapes-model", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut failures = Vec::new();
    for (i, (prompt, seed)) in PAIRS.iter().enumerate() {
        let image = dir.join(format!("{i}.png"));
        let out = Command::new(env!("CARGO_BIN_EXE_sd"))
            .env("SD_CACHE", dir.join("cache"))
            .args([
                "generate",
                prompt,
                "--quiet",
                "--seed",
                &seed.to_string(),
                "-o",
            ])
            .arg(&image)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{prompt}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let picture = image::open(&image).unwrap().to_rgb8();
        assert_eq!(picture.dimensions(), (64, 64), "{prompt}");
        let verdict = sd_shapes::check(&picture, prompt);
        if !verdict.pass {
            failures.push(format!("{prompt} (seed {seed}): {}", verdict.reason));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    let _ = std::fs::remove_dir_all(&dir);
}
