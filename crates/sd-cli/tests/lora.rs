//! `sd generate --lora` and A1111's `<lora:name:weight>` on the tiny fixture model, with the
//! LoRA files the fixture script wrote (their images are checked against diffusers in
//! tests/lora_parity.rs; here: the command's flags, its PNG record and its errors).

use std::path::{Path, PathBuf};

mod common;
use common::{parameters, sd, tiny_model};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd-cli-lora-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn loras() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/lora/tiny_sd1")
}

fn generate(prompt: &str, extra: &[&str], out: &Path) -> (bool, String) {
    let model = tiny_model();
    let mut args = vec![
        "generate",
        prompt,
        "--model",
        model.to_str().unwrap(),
        "--steps",
        "2",
        "--seed",
        "3",
        "-q",
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (ok, _, stderr) = sd(&args);
    (ok, stderr)
}

#[test]
fn a_lora_by_flag_and_by_prompt_tag_gives_the_same_image_and_is_recorded() {
    let dir = scratch("ok");
    let kohya = loras().join("kohya.safetensors");
    let flag = format!("{}:0.7", kohya.display());
    let (base, by_flag, by_tag) = (
        dir.join("base.png"),
        dir.join("flag.png"),
        dir.join("tag.png"),
    );
    let (ok, err) = generate("a red cat", &[], &base);
    assert!(ok, "{err}");
    let (ok, err) = generate("a red cat", &["--lora", &flag], &by_flag);
    assert!(ok, "{err}");
    let lora_dir = loras();
    let (ok, err) = generate(
        "a red cat <lora:kohya:0.7>",
        &["--lora-dir", lora_dir.to_str().unwrap()],
        &by_tag,
    );
    assert!(ok, "{err}");
    let pixels = |p: &Path| image::open(p).unwrap().to_rgb8().into_raw();
    assert_ne!(
        pixels(&base),
        pixels(&by_flag),
        "the LoRA changes the image"
    );
    // The tag leaves the text the encoder reads as "a red cat ", which tokenizes as the flag
    // run's prompt does.
    assert_eq!(pixels(&by_flag), pixels(&by_tag));
    let text = parameters(&by_tag);
    assert!(text.starts_with("a red cat <lora:kohya:0.7>\n"), "{text}");
    let hash = sd_lora_hash(&kohya);
    assert!(
        text.contains(&format!("Lora hashes: \"kohya: {}\"", &hash[..12])),
        "{text}"
    );
    // Two LoRAs at once.
    let second = format!("{}:-0.4", loras().join("second.safetensors").display());
    let (ok, err) = generate(
        "a red cat",
        &["--lora", &flag, "--lora", &second],
        &dir.join("two.png"),
    );
    assert!(ok, "{err}");
    assert!(parameters(&dir.join("two.png")).contains("kohya: "));
    // Applied on the fly instead of merged: the same image, up to one 8-bit level.
    let on_the_fly = dir.join("on_the_fly.png");
    let (ok, err) = generate(
        "a red cat",
        &["--lora", &flag, "--lora-apply", "on-the-fly"],
        &on_the_fly,
    );
    assert!(ok, "{err}");
    let (merged, fly) = (pixels(&by_flag), pixels(&on_the_fly));
    let worst = merged
        .iter()
        .zip(&fly)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(
        worst <= 1,
        "merged and on-the-fly images differ by {worst} levels"
    );
}

/// SHA-256 of the file after its header, as A1111's addnet hash.
fn sd_lora_hash(path: &Path) -> String {
    use sha2::Digest;
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    sha2::Sha256::digest(&bytes[8 + n..])
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn bad_loras_are_one_line_and_write_nothing() {
    let dir = scratch("bad");
    let out = dir.join("out.png");
    let not_lora = dir.join("weights.safetensors");
    std::fs::copy(
        tiny_model().join("unet/diffusion_pytorch_model.safetensors"),
        &not_lora,
    )
    .unwrap();
    let xl = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/lora/tiny_sdxl/kohya.safetensors");
    let lora_dir = loras();
    let cases: Vec<(Vec<String>, &str, &str)> = vec![
        (
            vec!["--lora".into(), "/no/such.safetensors".into()],
            "a cat",
            "/no/such.safetensors",
        ),
        (
            vec!["--lora".into(), not_lora.display().to_string()],
            "a cat",
            "not a LoRA key",
        ),
        (
            vec!["--lora".into(), xl.display().to_string()],
            "a cat",
            "second text encoder",
        ),
        (
            vec![
                "--lora".into(),
                format!("{}:inf", lora_dir.join("kohya.safetensors").display()),
            ],
            "a cat",
            "weight",
        ),
        (vec![], "a cat <lora:kohya:0.5>", "--lora-dir"),
        (
            vec!["--lora-dir".into(), lora_dir.display().to_string()],
            "a cat <lora:nothing:0.5>",
            "nothing.safetensors",
        ),
        (
            vec!["--lora-dir".into(), lora_dir.display().to_string()],
            "a cat <lora:kohya:x>",
            "not a number",
        ),
    ];
    for (extra, prompt, needle) in cases {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let (ok, stderr) = generate(prompt, &extra, &out);
        assert!(!ok, "{extra:?} {prompt}: should fail");
        assert!(
            stderr.contains(needle),
            "{extra:?}: `{needle}` not in {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(!out.exists(), "{extra:?}: wrote an image");
    }
}
