//! `sd generate` as a hostile user runs it: each case is a class of input that once panicked,
//! aborted, hung or wrote a wrong image (issue 19), and must now end in one clear line naming
//! what is wrong and a non-zero exit, with no output file left behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{copy_dir, tiny_model};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd-cli-rel-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `sd` with a deadline (a hang is a failure, not a stuck test): success, exit code,
/// stdout, stderr.
fn sd(args: &[&str]) -> (bool, Option<i32>, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sd"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs");
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("sd {args:?} hung for a minute");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts one `sd: …` line containing `needle`, exit 1 (not a panic's 101), no output file.
fn refused(args: &[&str], needle: &str, out: &Path) {
    let (ok, code, _, stderr) = sd(args);
    assert!(!ok, "{args:?} should fail");
    // 1 for a refused run, 2 for a flag that does not parse; never a panic's 101 or a signal.
    assert!(
        matches!(code, Some(1 | 2)),
        "{args:?}: exit code {code:?}: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "{args:?}: one line: {stderr}"
    );
    assert!(stderr.starts_with("sd: "), "{args:?}: {stderr}");
    assert!(stderr.contains(needle), "{args:?}: `{needle}` in {stderr}");
    assert!(
        std::fs::symlink_metadata(out).map_or(true, |m| !m.is_file()),
        "{args:?} left an output file"
    );
}

/// Writes a safetensors file whose one tensor `latents` is `values` as f32 `[1, 4, 4, 4]`.
fn latents_file(path: &Path, values: &[f32]) {
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1, 4, 4, 4], &data)
            .unwrap();
    std::fs::write(
        path,
        safetensors::serialize([("latents", view)], None).unwrap(),
    )
    .unwrap();
}

/// Sets elements `range` of tensor `key` in a safetensors file to NaN, in place (the whole
/// tensor when `range` is `None`).
fn poison(file: &Path, key: &str, range: Option<std::ops::Range<usize>>) {
    fill(file, key, range, f32::NAN)
}

/// Sets elements `range` of tensor `key` (all when `None`) to `value`, in place.
fn fill(file: &Path, key: &str, range: Option<std::ops::Range<usize>>, value: f32) {
    let mut bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let info = &header[key];
    let start = info["data_offsets"][0].as_u64().unwrap() as usize + 8 + n;
    let end = info["data_offsets"][1].as_u64().unwrap() as usize + 8 + n;
    let nan: Vec<u8> = match (info["dtype"].as_str().unwrap(), value.is_nan()) {
        ("F32", _) => value.to_le_bytes().to_vec(),
        ("F16", true) => 0x7e00u16.to_le_bytes().to_vec(),
        ("BF16", true) => 0x7fc0u16.to_le_bytes().to_vec(),
        // 60000 = 1.8310546875 · 2¹⁵, the only finite value the tests write.
        ("F16", false) if value == 60000.0 => 0x7b53u16.to_le_bytes().to_vec(),
        ("BF16", false) => ((value.to_bits() >> 16) as u16).to_le_bytes().to_vec(),
        other => panic!("{other:?}"),
    };
    let size = nan.len();
    let range = range.unwrap_or(0..(end - start) / size);
    for i in range {
        bytes[start + size * i..start + size * (i + 1)].copy_from_slice(&nan);
    }
    std::fs::write(file, bytes).unwrap();
}

fn mkfifo(path: &Path) {
    let ok = Command::new("mkfifo").arg(path).status().unwrap().success();
    assert!(ok, "mkfifo {}", path.display());
}

#[test]
fn numeric_flags_at_their_extremes_are_refused_before_any_work() {
    let dir = scratch("flags");
    let model = tiny_model();
    let model = model.to_str().unwrap();
    let out = dir.join("out.png");
    let out_str = out.to_str().unwrap();
    let max = "18446744073709551615";
    let cases: &[(&[&str], &str)] = &[
        (&["--width", "18446744073709551614"], "--width"),
        (&["--width", "9223372036854775808"], "--width"),
        (&["--height", max], "--height"),
        (&["--width", "0"], "--width"),
        (&["--num-images", max], "--num-images"),
        (&["--num-images", "0"], "--num-images"),
        (&["--steps", max], "--steps"),
        (&["--steps", "0"], "--steps"),
        (&["--clip-skip", max], "--clip-skip"),
        (&["--guidance", "1e308"], "--guidance"),
        (&["--guidance", "inf"], "--guidance"),
        (&["--guidance", "NaN"], "--guidance"),
        (&["--guidance-rescale", "2"], "--guidance-rescale"),
        (&["--guidance-rescale", "-1"], "--guidance-rescale"),
        (&["--strength", "-1"], "--strength"),
    ];
    // Every numeric flag at 0, −1 and 2⁶⁴−1: a clear line or a run, never a panic. (The cases
    // that succeed are the ones whose meaning allows the value: a seed of 0, guidance 0.)
    let numeric = [
        "--steps",
        "--guidance",
        "--guidance-rescale",
        "--seed",
        "--width",
        "--height",
        "--num-images",
        "--strength",
        "--clip-skip",
        "--max-memory",
    ];
    for flag in numeric {
        for value in ["0", "-1", max] {
            let mut args = vec![
                "generate", "cat", "-q", "--steps", "1", "--model", model, "-o", out_str,
            ];
            args.extend([flag, value]);
            let (ok, code, _, stderr) = sd(&args);
            if ok {
                let _ = std::fs::remove_file(&out);
                continue;
            }
            assert!(matches!(code, Some(1 | 2)), "{args:?}: {code:?} {stderr}");
            assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
            assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
            assert!(
                stderr.contains(flag) || stderr.contains("strength"),
                "{args:?}: {stderr}"
            );
        }
    }
    for (extra, needle) in cases {
        let mut args = vec!["generate", "cat", "-q", "--model", model, "-o", out_str];
        args.extend(extra.iter().copied());
        refused(&args, needle, &out);
    }
}

#[test]
fn runs_that_cannot_fit_in_memory_are_refused_with_the_estimate() {
    let dir = scratch("memory");
    let model = tiny_model();
    let model = model.to_str().unwrap();
    let out = dir.join("out.png");
    let out_str = out.to_str().unwrap();
    let base = ["generate", "cat", "-q", "--model", model, "-o", out_str];
    // 16384² needs hundreds of GiB for the full-size decode.
    let mut args = base.to_vec();
    args.extend(["--width", "16384", "--height", "16384"]);
    refused(&args, "would need about", &out);
    // A budget of 1 MiB refuses even the tiny model, and names the override.
    let mut args = base.to_vec();
    args.extend(["--max-memory", "1M"]);
    refused(&args, "--max-memory", &out);
    let mut args = base.to_vec();
    args.extend(["--max-memory", "lots"]);
    refused(&args, "--max-memory lots", &out);
}

#[test]
fn non_regular_files_are_refused_not_waited_on() {
    let dir = scratch("fifo");
    let model = tiny_model();
    let model_str = model.to_str().unwrap();
    let fifo = dir.join("fifo.png");
    mkfifo(&fifo);
    let fifo_str = fifo.to_str().unwrap();
    let out = dir.join("out.png");
    let out_str = out.to_str().unwrap();
    for flag in ["--init-image", "--mask", "--init-latents"] {
        let mut args = vec!["generate", "cat", "-q", "--model", model_str, "-o", out_str];
        args.extend([flag, fifo_str]);
        if flag == "--mask" {
            args.extend(["--init-image", fifo_str]);
        }
        refused(&args, "is a FIFO, not a regular file", &out);
    }
    // A FIFO where a weight file goes names the file, not "no such file in this folder".
    let copy = dir.join("model");
    copy_dir(&model, &copy);
    let weights = copy.join("unet/diffusion_pytorch_model.safetensors");
    std::fs::remove_file(&weights).unwrap();
    mkfifo(&weights);
    let args = [
        "generate",
        "cat",
        "-q",
        "--model",
        copy.to_str().unwrap(),
        "-o",
        out_str,
    ];
    refused(
        &args,
        "diffusion_pytorch_model.safetensors: is a FIFO",
        &out,
    );
}

#[test]
fn outputs_never_replace_what_is_not_ours() {
    let dir = scratch("outputs");
    let model = tiny_model();
    let model = model.to_str().unwrap();
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "generate",
            "cat",
            "-q",
            "--steps",
            "1",
            "--model",
            model,
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend(extra.iter().copied());
        sd(&args)
    };
    // A folder, a FIFO and a symlink as the output are left as they are.
    let folder = dir.join("folder.png");
    std::fs::create_dir(&folder).unwrap();
    let fifo = dir.join("fifo.png");
    mkfifo(&fifo);
    let outside = dir.join("outside.txt");
    std::fs::write(&outside, "keep").unwrap();
    let link = dir.join("link.png");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    for (path, what) in [
        (&folder, "a folder"),
        (&fifo, "a FIFO"),
        (&link, "a symbolic link"),
    ] {
        let (ok, code, _, stderr) = run(path, &[]);
        assert!(!ok && code == Some(1), "{stderr}");
        assert!(stderr.contains(what), "{stderr}");
    }
    assert!(std::fs::metadata(&folder).unwrap().is_dir());
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "keep");
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    // Numbered outputs: one of them a symlink out of the folder refuses the whole run first.
    let numbered = dir.join("n.png");
    std::os::unix::fs::symlink(&outside, dir.join("n-1.png")).unwrap();
    let (ok, _, _, stderr) = run(&numbered, &["--num-images", "2"]);
    assert!(!ok && stderr.contains("n-1.png"), "{stderr}");
    assert!(!dir.join("n-0.png").exists());
    // A file as the output folder.
    let (ok, _, _, stderr) = run(Path::new("/proc/version/out.png"), &[]);
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("/proc/version: is "), "{stderr}");
    assert!(stderr.contains("cannot hold the output"), "{stderr}");
    // No temporary file is left anywhere.
    let stray: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
}

#[test]
fn non_finite_numbers_are_named_never_a_black_image() {
    let dir = scratch("nan");
    let model = tiny_model();
    let out = dir.join("out.png");
    let out_str = out.to_str().unwrap();
    // A NaN in the U-Net's first convolution is refused by name as the weights load.
    let copy = dir.join("model");
    copy_dir(&model, &copy);
    poison(
        &copy.join("unet/diffusion_pytorch_model.safetensors"),
        "conv_in.weight",
        Some(3..4),
    );
    let copy_str = copy.to_str().unwrap();
    let base = [
        "generate", "cat", "-q", "--steps", "2", "-o", out_str, "--model", copy_str,
    ];
    let (ok, code, _, stderr) = sd(&base);
    assert!(!ok && code == Some(1), "{stderr}");
    assert!(
        stderr.contains("tensor `conv_in.weight` holds 1 NaN or infinite value(s)"),
        "{stderr}"
    );
    assert!(!out.exists());
    // Loaded anyway, the run stops at the stage that went non-finite.
    let mut args = base.to_vec();
    args.push("--skip-weight-check");
    refused(
        &args,
        "U-Net step 1 of 3 produced NaN or infinite values",
        &out,
    );
    // The same in the VAE decoder and the text encoder.
    for (file, key, stage) in [
        (
            "vae/diffusion_pytorch_model.safetensors",
            "decoder.conv_in.weight",
            "the VAE decoder",
        ),
        (
            "text_encoder/model.safetensors",
            "embeddings.token_embedding.weight",
            "the text encoder",
        ),
    ] {
        let copy = dir.join(format!("model-{}", stage.len()));
        copy_dir(&model, &copy);
        // Poison every element a prompt can touch: the whole tensor.
        poison(&copy.join(file), key, None);
        let copy_str = copy.to_str().unwrap();
        let args = [
            "generate", "cat", "-q", "--steps", "1", "-o", out_str, "--model", copy_str,
        ];
        let (_, _, _, stderr) = sd(&args);
        assert!(
            stderr.contains(&format!("tensor `{key}` holds ")),
            "{stderr}"
        );
        let mut args = args.to_vec();
        args.push("--skip-weight-check");
        refused(&args, &format!("{stage} produced NaN"), &out);
    }
    // NaN initial latents are refused before any work.
    let latents = dir.join("latents.safetensors");
    let mut values = vec![0.5f32; 64];
    values[10] = f32::NAN;
    latents_file(&latents, &values);
    let model_str = model.to_str().unwrap();
    refused(
        &[
            "generate",
            "cat",
            "-q",
            "--model",
            model_str,
            "-o",
            out_str,
            "--init-latents",
            latents.to_str().unwrap(),
        ],
        "NaN or infinite",
        &out,
    );
}

#[test]
fn strength_zero_is_refused_as_diffusers_refuses_it() {
    let dir = scratch("strength");
    let model = tiny_model();
    let init = dir.join("init.png");
    image::RgbImage::from_pixel(32, 32, image::Rgb([90, 120, 200]))
        .save(&init)
        .unwrap();
    let out = dir.join("out.png");
    refused(
        &[
            "generate",
            "cat",
            "-q",
            "--model",
            model.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--init-image",
            init.to_str().unwrap(),
            "--strength",
            "0",
        ],
        "strength 0",
        &out,
    );
}

#[test]
fn a_huge_starting_image_is_refused_from_its_header() {
    let dir = scratch("huge");
    let model = tiny_model();
    // 20000×8 pixels: small on disk, over the side limit.
    let wide = dir.join("wide.png");
    image::RgbImage::from_pixel(20000, 8, image::Rgb([1, 2, 3]))
        .save(&wide)
        .unwrap();
    let out = dir.join("out.png");
    refused(
        &[
            "generate",
            "cat",
            "-q",
            "--model",
            model.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--init-image",
            wide.to_str().unwrap(),
        ],
        "20000",
        &out,
    );
}

#[test]
fn prompts_past_their_bounds_are_refused_before_loading() {
    let dir = scratch("prompts");
    let model = tiny_model();
    let model = model.to_str().unwrap();
    let out = dir.join("out.png");
    let out_str = out.to_str().unwrap();
    let word = "a".repeat(100_000);
    let nested = format!("{}cat{}", "(".repeat(1000), ")".repeat(1000));
    let unbalanced = format!("{}cat", "[".repeat(50_000));
    let huge_weight = format!("(cat:1{})", "0".repeat(39));
    for (prompt, needle) in [
        (word.as_str(), "100000 characters"),
        (nested.as_str(), "1000 deep"),
        (unbalanced.as_str(), "characters"),
        (huge_weight.as_str(), "weights `cat`"),
    ] {
        let started = Instant::now();
        refused(
            &["generate", prompt, "-q", "--model", model, "-o", out_str],
            needle,
            &out,
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{needle}: slow"
        );
        refused(
            &[
                "generate", "cat", "-n", prompt, "-q", "--model", model, "-o", out_str,
            ],
            "--negative-prompt",
            &out,
        );
    }
}

/// On the CPU `--dtype f16` holds the weights in f16 and computes in f32, so the VAE decodes
/// the first time; on a GPU, where it computes in f16, the decode overflows and runs again in
/// f32 (`sd::pipeline`'s retry, which this CPU-only suite no longer reaches).
#[test]
fn an_f16_vae_that_overflows_decodes_again_in_f32() {
    let dir = scratch("upcast");
    let copy = dir.join("model");
    copy_dir(&tiny_model(), &copy);
    // A VAE that may run in f16, whose first convolution's outputs overflow f16 (36 taps of
    // 60000) but not f32, where the GroupNorm after it brings them back.
    let config = copy.join("vae/config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("\"force_upcast\": true", "\"force_upcast\": false"),
    )
    .unwrap();
    fill(
        &copy.join("vae/diffusion_pytorch_model.safetensors"),
        "decoder.conv_in.weight",
        None,
        60000.0,
    );
    let out = dir.join("out.png");
    let (ok, _, _, stderr) = sd(&[
        "generate",
        "cat",
        "-q",
        "--steps",
        "2",
        "--dtype",
        "f16",
        "--model",
        copy.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(out.is_file());
}
