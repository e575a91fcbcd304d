//! `sd generate` as a person runs it, on the tiny fixture model.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{copy_dir, parameters, sd, tiny_model};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn generates_a_png_with_its_parameters_and_repeats_it_exactly() {
    let dir = scratch("ok");
    let model = tiny_model();
    let model = model.to_str().unwrap();
    let a = dir.join("a.png");
    let b = dir.join("b.png");
    for out in [&a, &b] {
        let (ok, stdout, stderr) = sd(&[
            "generate",
            "a (red:1.2) cat",
            "--model",
            model,
            "--steps",
            "3",
            "--seed",
            "7",
            "--scheduler",
            "Euler a",
            "-n",
            "blurry",
            "-q",
            "-o",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{stderr}");
        assert!(stdout.contains("wrote"), "{stdout}");
    }
    let (x, y) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_eq!(x, y, "same seed, same backend: the same bytes");
    let image = image::open(&a).unwrap();
    assert_eq!(
        (image.width(), image.height()),
        (32, 32),
        "the model's own size"
    );
    let text = parameters(&a);
    assert!(
        text.starts_with("a (red:1.2) cat\nNegative prompt: blurry\n"),
        "{text}"
    );
    for field in [
        "Steps: 3",
        "Sampler: Euler a",
        "CFG scale: 7.5",
        "Seed: 7",
        "Size: 32x32",
        "Model hash: ",
    ] {
        assert!(text.contains(field), "{field} in {text}");
    }
}

#[test]
fn several_images_are_numbered_and_image_i_is_seed_plus_i() {
    let dir = scratch("batch");
    let model = tiny_model();
    let model = model.to_str().unwrap();
    let common = [
        "generate",
        "cat",
        "--model",
        model,
        "--steps",
        "2",
        "-q",
        "--scheduler",
        "DDIM",
    ];
    let batch = dir.join("batch.png");
    let mut args = common.to_vec();
    args.extend([
        "--seed",
        "3",
        "--num-images",
        "2",
        "-o",
        batch.to_str().unwrap(),
    ]);
    let (ok, _, stderr) = sd(&args);
    assert!(ok, "{stderr}");
    let single = dir.join("single.png");
    let mut args = common.to_vec();
    // -v: the stage times, the first step separated from the loading by the second.
    args.extend(["--seed", "4", "-v", "-o", single.to_str().unwrap()]);
    let (ok, _, stderr) = sd(&args);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("timings: first step began") && stderr.contains("2 steps of"),
        "{stderr}"
    );
    let second = image::open(dir.join("batch-1.png")).unwrap().to_rgb8();
    let alone = image::open(&single).unwrap().to_rgb8();
    let worst = second
        .as_raw()
        .iter()
        .zip(alone.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(
        worst <= 1,
        "image 1 of seed 3 is seed 4's image (off by {worst})"
    );
    assert!(parameters(&dir.join("batch-1.png")).contains("Seed: 4"));
}

#[test]
fn bad_input_is_one_line_non_zero_and_writes_nothing() {
    let dir = scratch("bad");
    let model = tiny_model();
    let model_str = model.to_str().unwrap().to_string();
    // A copy of the model with its U-Net folder removed.
    let broken = dir.join("broken");
    copy_dir(&model, &broken);
    std::fs::remove_dir_all(broken.join("unet")).unwrap();
    let latents = dir.join("latents.safetensors");
    let data: Vec<u8> = vec![0u8; 4 * 4 * 8 * 8];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1, 4, 8, 8], &data)
            .unwrap();
    std::fs::write(
        &latents,
        safetensors::serialize([("latents", view)], None).unwrap(),
    )
    .unwrap();
    let not_an_image = dir.join("not-an-image.png");
    std::fs::write(&not_an_image, b"hello").unwrap();
    let good = dir.join("good.png");
    image::RgbImage::from_pixel(32, 32, image::Rgb([90, 120, 200]))
        .save(&good)
        .unwrap();
    let small_mask = dir.join("small-mask.png");
    image::GrayImage::from_pixel(16, 16, image::Luma([255]))
        .save(&small_mask)
        .unwrap();
    let out = dir.join("out.png");
    let out_str = out.to_str().unwrap().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--model", "/no/such/model"], "/no/such/model"),
        (vec!["--model", broken.to_str().unwrap()], "unet"),
        (vec!["--model", &model_str, "--width", "33"], "33"),
        (vec!["--model", &model_str, "--steps", "0"], "steps"),
        (vec!["--model", &model_str, "--strength", "1.5"], "strength"),
        (
            vec!["--model", &model_str, "--scheduler", "Nope"],
            "unknown scheduler `Nope`",
        ),
        (
            vec!["--model", &model_str, "--backend", "tpu"],
            "backend `tpu`",
        ),
        (
            vec![
                "--model",
                &model_str,
                "--init-latents",
                latents.to_str().unwrap(),
            ],
            "[1, 4, 8, 8]",
        ),
        (
            vec![
                "--model",
                &model_str,
                "--init-image",
                not_an_image.to_str().unwrap(),
            ],
            "",
        ),
        (
            vec![
                "--model",
                &model_str,
                "--mask",
                not_an_image.to_str().unwrap(),
            ],
            "",
        ),
        (
            vec![
                "--model",
                &model_str,
                "--init-image",
                good.to_str().unwrap(),
                "--init-latents",
                latents.to_str().unwrap(),
            ],
            "exclude each other",
        ),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["generate", "cat", "-q", "-o", &out_str];
        args.extend(extra.iter().copied());
        let (ok, _, stderr) = sd(&args);
        assert!(!ok, "{extra:?} should fail");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{extra:?}: one line: {stderr}"
        );
        assert!(stderr.starts_with("sd: "), "{stderr}");
        assert!(stderr.contains(needle), "{extra:?}: `{needle}` in {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!out.exists(), "{extra:?} left an output file");
    }
}

#[test]
fn img2img_and_inpainting_run_from_the_command_line() {
    let dir = scratch("img2img");
    let model = tiny_model();
    let model = model.to_str().unwrap();
    let init = dir.join("init.png");
    image::RgbImage::from_fn(32, 32, |x, y| {
        image::Rgb([(x * 8) as u8, (y * 8) as u8, 128])
    })
    .save(&init)
    .unwrap();
    let mask = dir.join("mask.png");
    image::GrayImage::from_fn(32, 32, |x, _| image::Luma([if x < 16 { 0 } else { 255 }]))
        .save(&mask)
        .unwrap();
    let out = dir.join("img2img.png");
    let (ok, _, stderr) = sd(&[
        "generate",
        "cat",
        "--model",
        model,
        "--steps",
        "4",
        "--init-image",
        init.to_str().unwrap(),
        "--strength",
        "0.5",
        "-q",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(parameters(&out).contains("Denoising strength: 0.5"));
    let out = dir.join("inpaint.png");
    let (ok, _, stderr) = sd(&[
        "generate",
        "cat",
        "--model",
        model,
        "--steps",
        "3",
        "--init-image",
        init.to_str().unwrap(),
        "--mask",
        mask.to_str().unwrap(),
        "-q",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(out.is_file());
}

/// Half precision gives the f32 image up to rounding, on the SD 1.x- and SDXL-shaped tiny
/// models. On the CPU it holds the weights and computes in f32: the fixtures' weights are f16,
/// so f16 gives f32's image exactly; bf16 (8 mantissa bits) rounds them, within 8/255.
#[test]
fn half_precision_stays_close_to_f32() {
    let dir = scratch("dtype");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/pipeline");
    for (case, dtype, bound) in [
        ("tiny_sd1", "f16", 0u8),
        ("tiny_sd1", "bf16", 8),
        ("tiny_sdxl", "f16", 0),
    ] {
        let model = fixtures.join(case).join("model");
        let mut images = Vec::new();
        for d in ["f32", dtype] {
            let out = dir.join(format!("{case}-{d}.png"));
            let (ok, _, stderr) = sd(&[
                "generate",
                "a cat",
                "--model",
                model.to_str().unwrap(),
                "--steps",
                "4",
                "--seed",
                "3",
                "--scheduler",
                "DPM++ 2M Karras",
                "--dtype",
                d,
                "-q",
                "-o",
                out.to_str().unwrap(),
            ]);
            assert!(ok, "{case} {d}: {stderr}");
            images.push(image::open(&out).unwrap().to_rgb8());
        }
        let worst = images[0]
            .as_raw()
            .iter()
            .zip(images[1].as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert!(worst <= bound, "{case} {dtype}: off by {worst}/255");
    }
}

/// A repo id is found in the local Hugging Face cache (`models--org--name/refs/main` naming a
/// snapshot), and `--variant fp16` takes a folder's `*.fp16.safetensors` weights.
#[test]
fn repo_ids_resolve_from_the_hub_cache_and_variants_load() {
    let dir = scratch("hub");
    let hub = dir.join("hub");
    let snapshot = hub.join("models--test-org--tiny-sd/snapshots/0123abc");
    copy_dir(&tiny_model(), &snapshot);
    std::fs::create_dir_all(hub.join("models--test-org--tiny-sd/refs")).unwrap();
    std::fs::write(hub.join("models--test-org--tiny-sd/refs/main"), "0123abc").unwrap();
    let run = |model: &str, extra: &[&str], out: &Path| {
        let mut args = vec![
            "generate", "cat", "--model", model, "--steps", "2", "-q", "-o",
        ];
        args.push(out.to_str().unwrap());
        args.extend(extra);
        Command::new(env!("CARGO_BIN_EXE_sd"))
            .args(&args)
            .env("HF_HUB_CACHE", &hub)
            .output()
            .unwrap()
    };
    let from_hub = dir.join("hub.png");
    let out = run("test-org/tiny-sd", &[], &from_hub);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let from_folder = dir.join("folder.png");
    let out = run(tiny_model().to_str().unwrap(), &[], &from_folder);
    assert!(out.status.success());
    assert_eq!(
        image::open(&from_hub).unwrap().to_rgb8(),
        image::open(&from_folder).unwrap().to_rgb8()
    );
    let missing = run("test-org/absent", &[], &dir.join("absent.png"));
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("Hugging Face cache"));

    // The fp16 variant: rename the U-Net and VAE weights, ask for `--variant fp16`.
    for component in ["unet", "vae"] {
        let folder = snapshot.join(component);
        std::fs::rename(
            folder.join("diffusion_pytorch_model.safetensors"),
            folder.join("diffusion_pytorch_model.fp16.safetensors"),
        )
        .unwrap();
    }
    let variant = dir.join("variant.png");
    let out = run(snapshot.to_str().unwrap(), &["--variant", "fp16"], &variant);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        image::open(&variant).unwrap().to_rgb8(),
        image::open(&from_folder).unwrap().to_rgb8()
    );
    let out = run(snapshot.to_str().unwrap(), &[], &dir.join("no-variant.png"));
    assert!(
        !out.status.success(),
        "without --variant the plain files are missing"
    );
}

#[test]
fn a_prompt_file_is_rendered_one_png_a_line_split_by_shards_and_resumed() {
    let dir = scratch("prompts");
    let model = tiny_model();
    let model = model.to_str().unwrap();
    let file = dir.join("prompts.txt");
    std::fs::write(
        &file,
        "a red cat\n{\"prompt\": \"a blue dog\", \"seed\": 42, \"negative_prompt\": \"blurry\"}\n\na green bird\n",
    )
    .unwrap();
    let out = dir.join("out");
    let run = |shard: &str| {
        sd(&[
            "generate",
            "--prompts",
            file.to_str().unwrap(),
            "--model",
            model,
            "--steps",
            "2",
            "--seed",
            "10",
            "--shard",
            shard,
            "-q",
            "-o",
            out.to_str().unwrap(),
        ])
    };
    // Shard 0/2 takes lines 0 and 2; shard 1/2 line 1.
    let (ok, stdout, stderr) = run("0/2");
    assert!(ok, "{stderr}");
    assert!(stdout.contains("wrote 2 image(s)"), "{stdout}");
    assert!(out.join("00000.png").is_file() && out.join("00002.png").is_file());
    assert!(!out.join("00001.png").exists());
    let (ok, _, stderr) = run("1/2");
    assert!(ok, "{stderr}");
    let text = parameters(&out.join("00001.png"));
    assert!(
        text.starts_with("a blue dog\nNegative prompt: blurry\n"),
        "{text}"
    );
    assert!(text.contains("Seed: 42"), "{text}");
    assert!(
        parameters(&out.join("00002.png")).contains("Seed: 12"),
        "--seed + index"
    );
    // A restarted run finds everything written and does nothing.
    let before = std::fs::read(out.join("00000.png")).unwrap();
    let (ok, stdout, _) = run("0/2");
    assert!(ok && stdout.contains("nothing to do"), "{stdout}");
    assert_eq!(std::fs::read(out.join("00000.png")).unwrap(), before);
    // Bad shards and bad lines: one line each.
    let (ok, _, stderr) = run("2/2");
    assert!(!ok && stderr.contains("--shard 2/2"), "{stderr}");
    std::fs::write(&file, "fine\n{\"seed\": 1}\n").unwrap();
    let (ok, _, stderr) = run("0/1");
    assert!(
        !ok && stderr.contains("prompts.txt:2: has no \"prompt\""),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--controlnet` with `--control`: the conditioning image sets the size, the ControlNet
/// changes the image, two ControlNets (one on Canny edges) are recorded as A1111 records them,
/// and mismatched input is one line.
#[test]
fn controlnets_steer_generation_from_the_command_line() {
    let dir = scratch("controlnet");
    let model = tiny_model();
    let model = model.to_str().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/controlnet");
    let net_a = fixtures.join("sd1_a");
    let net_b = fixtures.join("sd1_b");
    let control = dir.join("control.png");
    image::RgbImage::from_fn(48, 33, |x, y| {
        image::Rgb(if (8..30).contains(&x) && (6..20).contains(&y) {
            [255, 255, 255]
        } else {
            [0, 0, 0]
        })
    })
    .save(&control)
    .unwrap();
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "generate", "a cat", "--model", model, "--steps", "3", "--seed", "5", "-q", "-o",
        ];
        args.push(out.to_str().unwrap());
        args.extend_from_slice(extra);
        sd(&args)
    };
    // Without --width/--height the 48×33 image gives a 48×32 output (the VAE's step is 2).
    let with = dir.join("with.png");
    let (ok, _, stderr) = run(
        &with,
        &[
            "--controlnet",
            net_a.to_str().unwrap(),
            "--control",
            control.to_str().unwrap(),
        ],
    );
    assert!(ok, "{stderr}");
    assert!(stderr.contains("resized to 48×32"), "{stderr}");
    let with_image = image::open(&with).unwrap().to_rgb8();
    assert_eq!(with_image.dimensions(), (48, 32));
    let without = dir.join("without.png");
    let (ok, _, stderr) = run(&without, &["--width", "48", "--height", "32"]);
    assert!(ok, "{stderr}");
    let without_image = image::open(&without).unwrap().to_rgb8();
    let differ = with_image
        .as_raw()
        .iter()
        .zip(without_image.as_raw())
        .filter(|(a, b)| a != b)
        .count();
    assert!(differ > 1000, "the ControlNet changed only {differ} values");

    let two = dir.join("two.png");
    let (ok, _, stderr) = run(
        &two,
        &[
            "--width",
            "32",
            "--height",
            "32",
            "--controlnet",
            net_a.to_str().unwrap(),
            "--control",
            control.to_str().unwrap(),
            "--controlnet",
            net_b.to_str().unwrap(),
            "--control",
            control.to_str().unwrap(),
            "--control-preprocess",
            "none",
            "--control-preprocess",
            "canny",
            "--control-scale",
            "0.7",
            "--control-end",
            "0.5",
            "--guess-mode",
        ],
    );
    assert!(ok, "{stderr}");
    let text = parameters(&two);
    assert!(
        text.contains(r#"ControlNet 0: "Module: none, Model: sd1_a, Weight: 0.7, Guidance Start: 0, Guidance End: 0.5""#),
        "{text}"
    );
    assert!(
        text.contains(r#"ControlNet 1: "Module: canny, Model: sd1_b"#),
        "{text}"
    );
    assert!(text.contains("ControlNet guess mode: True"), "{text}");

    // The hires fix keeps the ControlNet, its image resized to the larger pass.
    let hires = dir.join("hires.png");
    let (ok, _, stderr) = run(
        &hires,
        &[
            "--width",
            "32",
            "--height",
            "32",
            "--controlnet",
            net_a.to_str().unwrap(),
            "--control",
            control.to_str().unwrap(),
            "--hires-scale",
            "2",
            "--hires-strength",
            "0.5",
        ],
    );
    assert!(ok, "{stderr}");
    assert_eq!(
        image::open(&hires).unwrap().to_rgb8().dimensions(),
        (64, 64)
    );

    let sdxl_net = fixtures.join("sdxl");
    // At the output size: no resize note beside the error.
    let control = fixtures.join("control_a.png");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--controlnet", net_a.to_str().unwrap()],
            "1 --controlnet and 0 --control images",
        ),
        (
            vec![
                "--controlnet",
                sdxl_net.to_str().unwrap(),
                "--control",
                control.to_str().unwrap(),
            ],
            "made for another model family",
        ),
        (
            vec![
                "--controlnet",
                net_a.to_str().unwrap(),
                "--control",
                control.to_str().unwrap(),
                "--control-scale",
                "1",
                "--control-scale",
                "2",
                "--control-scale",
                "3",
            ],
            "--control-scale is given 3 times for 1 --controlnet",
        ),
        (vec!["--guess-mode"], "--guess-mode needs --controlnet"),
        (
            vec![
                "--controlnet",
                net_a.to_str().unwrap(),
                "--control",
                control.to_str().unwrap(),
                "--control-start",
                "0.6",
                "--control-end",
                "0.4",
            ],
            "start 0.6 is not before end 0.4",
        ),
    ];
    for (extra, expected) in cases {
        let out = dir.join("bad.png");
        let (ok, _, stderr) = run(&out, &extra);
        assert!(!ok, "{extra:?} succeeded");
        assert!(stderr.contains(expected), "{extra:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{extra:?}: {stderr}");
        assert!(!out.exists(), "{extra:?} wrote an image");
    }
}

/// `--ip-adapter` with `--image-prompt`: the image encoder is found beside the adapter, the
/// image prompt changes the image (with and without a text prompt), the PNG records it, and
/// an adapter for another model, or a file that is none, is one line.
#[test]
fn an_ip_adapter_image_prompt_steers_generation_from_the_command_line() {
    let dir = scratch("ip_adapter");
    let model = tiny_model();
    let model = model.to_str().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let adapter = fixtures.join("ip_adapter/ip_adapter.safetensors");
    let picture = fixtures.join("ip_adapter/image_prompt.png");
    let run = |model: &str, prompt: &str, out: &Path, extra: &[&str]| {
        let mut args = vec![
            "generate", prompt, "--model", model, "--steps", "3", "--seed", "5", "-q", "-o",
        ];
        args.push(out.to_str().unwrap());
        args.extend_from_slice(extra);
        sd(&args)
    };
    let ip = [
        "--ip-adapter",
        adapter.to_str().unwrap(),
        "--image-prompt",
        picture.to_str().unwrap(),
    ];
    let with = dir.join("with.png");
    let (ok, _, stderr) = run(
        model,
        "a cat",
        &with,
        &[&ip[..], &["--image-prompt-scale", "0.7"]].concat(),
    );
    assert!(ok, "{stderr}");
    let text = parameters(&with);
    assert!(
        text.contains(r#"IP-Adapter: "Model: ip_adapter, Weight: 0.7""#),
        "{text}"
    );
    let without = dir.join("without.png");
    let (ok, _, stderr) = run(model, "a cat", &without, &[]);
    assert!(ok, "{stderr}");
    let (a, b) = (
        image::open(&with).unwrap().to_rgb8(),
        image::open(&without).unwrap().to_rgb8(),
    );
    let differ = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .filter(|(x, y)| x != y)
        .count();
    assert!(
        differ > 1000,
        "the image prompt changed only {differ} values"
    );
    // An image prompt alone.
    let alone = dir.join("alone.png");
    let (ok, _, stderr) = run(model, "", &alone, &ip);
    assert!(ok, "{stderr}");

    let sdxl = fixtures.join("pipeline/tiny_sdxl/model");
    let not_adapter = fixtures.join("controlnet/sd1_a/diffusion_pytorch_model.safetensors");
    let encoder = fixtures.join("ip_adapter/image_encoder");
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            model,
            vec!["--ip-adapter", adapter.to_str().unwrap()],
            "--ip-adapter needs --image-prompt",
        ),
        (
            model,
            vec!["--image-prompt-scale", "0.5"],
            "--image-prompt-scale needs --ip-adapter",
        ),
        (
            sdxl.to_str().unwrap(),
            ip.to_vec(),
            "made for another model",
        ),
        (
            model,
            vec![
                "--ip-adapter",
                not_adapter.to_str().unwrap(),
                "--image-prompt",
                picture.to_str().unwrap(),
                "--image-encoder",
                encoder.to_str().unwrap(),
            ],
            "not an IP-Adapter",
        ),
    ];
    for (model, extra, expected) in cases {
        let out = dir.join("bad.png");
        let (ok, _, stderr) = run(model, "a cat", &out, &extra);
        assert!(!ok, "{extra:?} succeeded");
        assert!(stderr.contains(expected), "{extra:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{extra:?}: {stderr}");
        assert!(!out.exists(), "{extra:?} wrote an image");
    }
}

/// `--unet-tile`: a tile covering the latent gives the untiled image exactly; smaller
/// overlapping tiles give an image of the same size; a bad tile is one line.
#[test]
fn unet_tiles_from_the_command_line() {
    let dir = scratch("unet_tile");
    let model = tiny_model();
    let model = model.to_str().unwrap();
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "generate", "a cat", "--model", model, "--steps", "2", "-q", "-o",
        ];
        args.push(out.to_str().unwrap());
        args.extend_from_slice(extra);
        sd(&args)
    };
    let (plain, covering, tiled) = (dir.join("a.png"), dir.join("b.png"), dir.join("c.png"));
    for (out, extra) in [
        (&plain, vec![]),
        (&covering, vec!["--unet-tile", "16"]),
        (&tiled, vec!["--unet-tile", "8", "--unet-tile-overlap", "4"]),
    ] {
        let (ok, _, stderr) = run(out, &extra);
        assert!(ok, "{extra:?}: {stderr}");
    }
    let read = |p: &Path| image::open(p).unwrap().to_rgb8();
    assert_eq!(read(&plain), read(&covering));
    assert_eq!(read(&tiled).dimensions(), read(&plain).dimensions());
    let (ok, _, stderr) = run(
        &dir.join("bad.png"),
        &["--unet-tile", "8", "--unet-tile-overlap", "8"],
    );
    assert!(!ok && stderr.contains("more than its overlap"), "{stderr}");
}
