//! Real-ESRGAN's generators against a torch rendering of the same architectures (written in
//! the fixture script from the papers, with the released files' key names): each model loaded
//! from the formats it is released in (BasicSR's `params_ema` .pth in the zip and legacy
//! formats, a bare state dict, safetensors) must give the reference's raw output within 1e-4;
//! tiled runs must equal whole-image ones where the context covers the receptive field.

use crate::common;

use std::path::Path;

use burn::tensor::Tensor;
use sd_core::backend::Flex;
use sd_upscale::{TileOptions, Upscaler};

type B = Flex;

#[test]
fn generators_match_the_torch_reference() {
    let dir = common::fixtures_dir().join("upscale");
    let manifest = common::manifest(&dir);
    let tolerance = manifest["tolerance"].as_f64().unwrap() as f32;
    let reference = common::Reference::open(&dir);
    let device = Default::default();
    let input: Tensor<B, 4> = reference.tensor("input", &device);
    let mut report = common::Report::default();
    for (name, spec) in manifest["models"].as_object().unwrap() {
        for file in spec["files"].as_array().unwrap() {
            let path = dir.join(file.as_str().unwrap());
            let model = Upscaler::<B>::load(&path, &device).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(model.scale() as u64, spec["scale"].as_u64().unwrap());
            let expected: Tensor<B, 4> = reference.tensor(&format!("{name}.output"), &device);
            report.check(
                &format!(
                    "{} ({})",
                    path.file_name().unwrap().display(),
                    model.describe()
                ),
                model.forward(input.clone()),
                expected,
                tolerance,
            );
        }
    }
    report.finish();
}

/// An 8-bit test image.
fn image(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 23 % 256) as u8,
            (y * 41 % 256) as u8,
            ((x * y) % 256) as u8,
        ])
    })
}

#[test]
fn tiles_with_enough_context_equal_the_whole_image() {
    let dir = common::fixtures_dir().join("upscale");
    let device = Default::default();
    // The compact model's receptive field: 5 convolutions of 3×3, 5 pixels each side.
    let model = Upscaler::<B>::load(dir.join("compact_x4.safetensors"), &device).unwrap();
    let picture = image(21, 14);
    let whole = TileOptions {
        tile: 0,
        tile_pad: 0,
        pre_pad: 0,
    };
    let tiled = TileOptions {
        tile: 8,
        tile_pad: 5,
        pre_pad: 0,
    };
    let mut tiles = Vec::new();
    let a = model
        .upscale(&picture, &whole, &device, &mut |_, _| {})
        .unwrap();
    let b = model
        .upscale(&picture, &tiled, &device, &mut |d, t| tiles.push((d, t)))
        .unwrap();
    assert_eq!(a.dimensions(), (84, 56));
    assert_eq!(tiles.last(), Some(&(6, 6)));
    let differing = a.pixels().zip(b.pixels()).filter(|(p, q)| p != q).count();
    assert_eq!(differing, 0, "tiles changed {differing} pixels");
    // Too little context shows.
    let thin = TileOptions {
        tile: 8,
        tile_pad: 1,
        pre_pad: 0,
    };
    let c = model
        .upscale(&picture, &thin, &device, &mut |_, _| {})
        .unwrap();
    assert!(a.pixels().zip(c.pixels()).any(|(p, q)| p != q));

    // The ×2 RRDBNet works on even sides: an odd image is reflect-padded and cropped back,
    // with reflection pre-padding as Real-ESRGAN's `--pre_pad`.
    let x2 = Upscaler::<B>::load(dir.join("rrdb_x2.pth"), &device).unwrap();
    let odd = image(11, 9);
    let options = TileOptions {
        tile: 6,
        tile_pad: 4,
        pre_pad: 2,
    };
    let out = x2.upscale(&odd, &options, &device, &mut |_, _| {}).unwrap();
    assert_eq!(out.dimensions(), (22, 18));
    let odd_tile = TileOptions { tile: 5, ..options };
    let e = x2
        .upscale(&odd, &odd_tile, &device, &mut |_, _| {})
        .unwrap_err();
    assert!(e.to_string().contains("multiple of 2"), "{e}");
}

#[test]
fn other_files_are_one_clear_error() {
    let device = Default::default();
    let fixtures = common::fixtures_dir();
    let unet = fixtures.join("training/epsilon_constant/unet/diffusion_pytorch_model.safetensors");
    let e = Upscaler::<B>::load(&unet, &device).unwrap_err().to_string();
    assert!(e.contains("not a Real-ESRGAN model"), "{e}");
    assert!(e.contains("diffusion_pytorch_model.safetensors"), "{e}");
    let folder = fixtures.join("pipeline/tiny_sd1/model");
    let e = Upscaler::<B>::load(&folder, &device)
        .unwrap_err()
        .to_string();
    assert!(e.contains("sd::upscale_x4_with_noise"), "{e}");
    let missing = Upscaler::<B>::load(Path::new("/nonexistent/x.pth"), &device);
    assert!(
        missing
            .unwrap_err()
            .to_string()
            .contains("/nonexistent/x.pth")
    );
}

/// Half precision gives the f32 image within two 8-bit levels, tiled and whole, on both
/// generators.
#[test]
fn half_precision_stays_within_two_levels_of_f32() {
    let device = Default::default();
    let dir = common::fixtures_dir().join("upscale");
    let picture = image(20, 14);
    for file in ["compact_x4.safetensors", "rrdb_x4.pth"] {
        let full = Upscaler::<B>::load(dir.join(file), &device).unwrap();
        let half =
            Upscaler::<B>::load_in(dir.join(file), burn::tensor::DType::F16, &device).unwrap();
        assert_eq!(half.dtype(), burn::tensor::DType::F16);
        let mut differs = false;
        for options in [
            TileOptions::default(),
            TileOptions {
                tile: 8,
                tile_pad: 4,
                pre_pad: 0,
            },
        ] {
            let a = full
                .upscale(&picture, &options, &device, &mut |_, _| {})
                .unwrap();
            let b = half
                .upscale(&picture, &options, &device, &mut |_, _| {})
                .unwrap();
            assert_eq!(a.dimensions(), b.dimensions());
            let worst = a
                .as_raw()
                .iter()
                .zip(b.as_raw())
                .map(|(x, y)| x.abs_diff(*y))
                .max()
                .unwrap();
            assert!(worst <= 2, "{file}: f16 is {worst} levels off");
            differs |= worst > 0;
        }
        eprintln!("{file}: f16 differs from f32 somewhere: {differs}");
    }
}
