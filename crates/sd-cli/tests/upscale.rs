//! `sd upscale` on the fixture Real-ESRGAN models: a PNG of the scaled size with the upscale
//! recorded, the same pixels whatever the tiling where the context covers the network, and one
//! clear line for what is not an upscaler.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SD: &str = env!("CARGO_BIN_EXE_sd");

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd-upscale-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn upscale(args: &[&str]) -> Output {
    Command::new(SD).arg("upscale").args(args).output().unwrap()
}

#[test]
fn upscales_to_a_png_and_tiles_agree() {
    let dir = scratch("run");
    let input = dir.join("in.png");
    image::RgbImage::from_fn(13, 9, |x, y| {
        image::Rgb([(x * 19) as u8, (y * 27) as u8, 90])
    })
    .save(&input)
    .unwrap();
    let model = fixtures().join("upscale/compact_x4.pth");
    let (m, i) = (model.to_str().unwrap(), input.to_str().unwrap());
    let out = upscale(&[i, "--model", m, "--tile", "0", "-q"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let whole = dir.join("in-x4.png");
    let picture = image::open(&whole).unwrap().to_rgb8();
    assert_eq!(picture.dimensions(), (52, 36));
    let bytes = std::fs::read(&whole).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        text.contains("Postprocess upscale by: 4") && text.contains("compact_x4"),
        "the PNG does not record the upscale"
    );
    let tiled = dir.join("tiled.png");
    let out = upscale(&[
        i,
        "--model",
        m,
        "--tile",
        "4",
        "--tile-pad",
        "5",
        "-o",
        tiled.to_str().unwrap(),
        "-q",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(image::open(&tiled).unwrap().to_rgb8() == picture);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn what_is_not_an_upscaler_is_one_line() {
    let dir = scratch("bad");
    let input = dir.join("in.png");
    image::RgbImage::new(8, 8).save(&input).unwrap();
    let not_esrgan =
        fixtures().join("training/epsilon_constant/unet/diffusion_pytorch_model.safetensors");
    for (model, needle) in [
        (not_esrgan.as_path(), "not a Real-ESRGAN model"),
        (Path::new("/nonexistent.pth"), "/nonexistent.pth"),
    ] {
        let out = upscale(&[
            input.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "-q",
        ]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(needle), "{stderr}");
    }
    let model = fixtures().join("upscale/rrdb_x2.pth");
    let out = upscale(&[
        input.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--scale",
        "3",
        "-q",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("enlarges ×2, no more"),
        "{stderr}"
    );
    let half = dir.join("x1.5.png");
    let out = upscale(&[
        input.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--scale",
        "1.5",
        "-o",
        half.to_str().unwrap(),
        "-q",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(image::image_dimensions(&half).unwrap(), (12, 12));
    let out = upscale(&["/nonexistent.png", "--model", model.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.png"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn generate_upscales_after_decoding_and_runs_the_hires_fix() {
    let dir = scratch("generate");
    let model = common::tiny_model();
    let upscaler = fixtures().join("upscale/compact_x4.safetensors");
    let (m, u) = (model.to_str().unwrap(), upscaler.to_str().unwrap());
    let plain = dir.join("plain.png");
    let base = [
        "generate",
        "a red circle",
        "--model",
        m,
        "--steps",
        "2",
        "--seed",
        "3",
        "-q",
    ];
    let run = |extra: &[&str]| {
        let mut args: Vec<&str> = base.to_vec();
        args.extend_from_slice(extra);
        common::sd(&args)
    };
    let (ok, _, err) = run(&["-o", plain.to_str().unwrap()]);
    assert!(ok, "{err}");
    let (w, h) = image::image_dimensions(&plain).unwrap();

    // Real-ESRGAN after decoding: the same image as `sd upscale` of the plain one.
    let up = dir.join("up.png");
    let (ok, _, err) = run(&["--upscale", u, "-o", up.to_str().unwrap()]);
    assert!(ok, "{err}");
    let via_upscale = dir.join("via.png");
    let out = upscale(&[
        plain.to_str().unwrap(),
        "--model",
        u,
        "-o",
        via_upscale.to_str().unwrap(),
        "-q",
    ]);
    assert!(out.status.success());
    let a = image::open(&up).unwrap().to_rgb8();
    assert_eq!(a.dimensions(), (4 * w, 4 * h));
    assert!(a == image::open(&via_upscale).unwrap().to_rgb8());
    assert!(
        common::parameters(&up)
            .contains("Postprocess upscale by: 4, Postprocess upscaler: compact_x4")
    );

    // The hires fix: twice the size, denoised again, recorded as A1111 does.
    let hires = dir.join("hires.png");
    let (ok, _, err) = run(&[
        "--hires-scale",
        "2",
        "--hires-strength",
        "0.5",
        "-o",
        hires.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(image::image_dimensions(&hires).unwrap(), (2 * w, 2 * h));
    let text = common::parameters(&hires);
    assert!(
        text.contains(
            "Denoising strength: 0.5, Hires upscale: 2, Hires steps: 2, Hires upscaler: Lanczos"
        ),
        "{text}"
    );
    let (ok, _, err) = run(&[
        "--hires-scale",
        "2",
        "--upscale",
        u,
        "-o",
        hires.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(common::parameters(&hires).contains("Hires upscaler: compact_x4"));

    for (extra, needle) in [
        (
            &["--hires-scale", "9"][..],
            "--hires-scale 9 is outside (1, 4]",
        ),
        (&["--hires-strength", "0.5"][..], "need --hires-scale"),
        (&["--upscale", "/nonexistent.pth"][..], "/nonexistent.pth"),
    ] {
        let (ok, _, err) = run(extra);
        assert!(!ok);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `sd upscale IMAGE --model DIR` with the x4 upscaler's folder: a 10×10 image is rounded down
/// to 8×8 with a note and comes out 32×32, the settings in the PNG; a noise level above the
/// model's maximum and a folder that is not an upscaler are one line each.
#[test]
fn the_x4_upscaler_folder_enlarges_an_image_guided_by_a_prompt() {
    let dir = scratch("x4");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let model = fixtures.join("x4_upscaler/model");
    let low = fixtures.join("x4_upscaler/low_b.png");
    let out = dir.join("big.png");
    let args = |model: &Path, extra: &[&str]| {
        let mut a = vec![
            low.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a photo of a cat",
            "--steps",
            "2",
            "-q",
            "-o",
            out.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |model: &Path, extra: &[&str]| {
        let a = args(model, extra);
        upscale(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let done = run(&model, &["--noise-level", "30", "--seed", "3"]);
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "{stderr}");
    assert!(stderr.contains("rounded down to 8×8"), "{stderr}");
    let image = image::open(&out).unwrap().to_rgb8();
    assert_eq!(image.dimensions(), (32, 32));
    let text = common::parameters(&out);
    assert!(text.starts_with("a photo of a cat\n"), "{text}");
    assert!(
        text.contains("Noise level: 30") && text.contains("Postprocess upscale by: 4"),
        "{text}"
    );
    std::fs::remove_file(&out).unwrap();

    // U-Net tiles: the 8×8 latent in 4-pixel-overlapping tiles of 8 is one tile; a budget
    // too small for the whole run is refused with the ways to fit it.
    let done = run(
        &model,
        &[
            "--unet-tile",
            "8",
            "--unet-tile-overlap",
            "4",
            "--vae-tiling",
        ],
    );
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    std::fs::remove_file(&out).unwrap();

    // After a generation: the tiny SD 1.x model's 32×32 image becomes 128×128.
    let generated = dir.join("generated.png");
    let base = fixtures.join("pipeline/tiny_sd1/model");
    let gen_args = |extra: &[&str]| {
        let mut a = vec![
            "generate",
            "a cat",
            "--model",
            base.to_str().unwrap(),
            "--steps",
            "2",
            "--upscale",
            model.to_str().unwrap(),
            "-q",
            "-o",
            generated.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        Command::new(SD).args(a).output().unwrap()
    };
    let done = gen_args(&[]);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert_eq!(
        image::open(&generated).unwrap().to_rgb8().dimensions(),
        (128, 128)
    );
    let text = common::parameters(&generated);
    assert!(
        text.contains("Postprocess upscale by: 4, Postprocess upscaler: model"),
        "{text}"
    );
    std::fs::remove_file(&generated).unwrap();
    let done = gen_args(&["--hires-scale", "2"]);
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(
        !done.status.success() && stderr.contains("is the x4 upscaler"),
        "{stderr}"
    );
    assert!(!generated.exists());

    let not_upscaler = fixtures.join("pipeline/tiny_sd1/model");
    for (folder, extra, expected) in [
        (&model, vec!["--noise-level", "351"], "max_noise_level 350"),
        (&not_upscaler, vec![], "not an upscaler"),
        (
            &model,
            vec!["--max-memory", "1M"],
            "try --unet-tile 64 and --vae-tiling",
        ),
        (&model, vec!["--unet-tile", "4"], "at least 8 latent pixels"),
        (
            &model,
            vec!["--unet-tile-overlap", "4"],
            "--unet-tile-overlap needs --unet-tile",
        ),
    ] {
        let done = run(folder, &extra);
        let stderr = String::from_utf8_lossy(&done.stderr);
        assert!(!done.status.success(), "{extra:?} succeeded");
        assert!(stderr.contains(expected), "{extra:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.starts_with("note:")).collect();
        assert_eq!(lines.len(), 1, "{extra:?}: {stderr}");
        assert!(!out.exists(), "{extra:?} wrote an image");
    }
}
