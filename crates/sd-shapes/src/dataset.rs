//! Writing the dataset to disk in kohya's caption-file layout.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::ImageFormat;
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::error::{Result, ShapesError};
use crate::scene::{HeldOut, random_extra_colour_scene, random_scene};

/// Mixed into the seed of the extra-colour scenes' generator, so that their stream is not the
/// palette scenes' one.
const EXTRA_COLOUR_STREAM: u64 = 0x0e78_a5c0_104e_5eed;

/// How [`write_dataset`] captions a two-object scene.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Captions {
    /// As the scene was drawn: `a red circle below a blue square` (the dataset `sd eval
    /// shapes` prompts are like).
    #[default]
    AsDrawn,
    /// The same scene with the top or left object named first ([`crate::Prompt::canonical`]).
    Canonical,
}

/// Writes `count` training images to the folder `out`: `00000.png` beside `00000.txt` (its
/// caption on the first line), and so on; names are zero-padded to 5 digits, or more when
/// `count` needs them, so that they sort in order.
///
/// The scenes are [`random_scene`]s without held-out combinations (about 40% of one object,
/// 60% of two), drawn from one generator seeded by `seed`: the same seed writes byte-identical
/// files.
///
/// `captions` says how two-object scenes are captioned: [`Captions::AsDrawn`] as their scenes
/// were drawn (`a red circle below a blue square`), [`Captions::Canonical`] with `above` and
/// `to the left of` only ([`crate::Prompt::canonical`]); the images are the same either way.
///
/// `out` is created if missing; an existing folder must be empty, so that two datasets are
/// never mixed. A count of 0 is refused. On a failure the files written so far are removed
/// again (and the folder, when this call created it).
pub fn write_dataset(out: &Path, count: usize, seed: u64, captions: Captions) -> Result<()> {
    write_dataset_with_extra_colours(out, count, 0, seed, captions)
}

/// [`write_dataset`], then `extra` more images after the `count` palette ones (numbered on
/// from `count`), each holding at least one colour outside the palette
/// ([`crate::random_extra_colour_scene`]: `a teal triangle above a green circle`), held-out
/// combinations still excluded. Their generator is seeded from `seed` apart from the palette
/// scenes' one, so the first `count` files are those [`write_dataset`] writes, byte for byte.
pub fn write_dataset_with_extra_colours(
    out: &Path,
    count: usize,
    extra: usize,
    seed: u64,
    captions: Captions,
) -> Result<()> {
    if count + extra == 0 {
        return Err(ShapesError::NoImages {
            path: out.to_owned(),
        });
    }
    let created = prepare_folder(out)?;
    let mut written = Vec::with_capacity(2 * (count + extra));
    let result = write_files(out, count, extra, seed, captions, &mut written);
    if result.is_err() {
        // Best effort: a partial dataset would look complete to a training run.
        for path in &written {
            let _ = std::fs::remove_file(path);
        }
        if created {
            let _ = std::fs::remove_dir(out);
        }
    }
    result
}

/// Makes sure `out` is an empty folder; whether it had to be created.
fn prepare_folder(out: &Path) -> Result<bool> {
    let io = |source| ShapesError::Io {
        path: out.to_owned(),
        source,
    };
    match std::fs::metadata(out) {
        Ok(meta) if !meta.is_dir() => Err(ShapesError::NotAFolder {
            path: out.to_owned(),
        }),
        Ok(_) => {
            if std::fs::read_dir(out).map_err(io)?.next().is_some() {
                return Err(ShapesError::NotEmpty {
                    path: out.to_owned(),
                });
            }
            Ok(false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(out).map_err(io)?;
            Ok(true)
        }
        Err(e) => Err(io(e)),
    }
}

fn write_files(
    out: &Path,
    count: usize,
    extra: usize,
    seed: u64,
    captions: Captions,
    written: &mut Vec<PathBuf>,
) -> Result<()> {
    let width = (count + extra - 1).to_string().len().max(5);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut extra_rng = StdRng::seed_from_u64(seed ^ EXTRA_COLOUR_STREAM);
    for index in 0..count + extra {
        let scene = if index < count {
            random_scene(&mut rng, HeldOut::Exclude)
        } else {
            random_extra_colour_scene(&mut extra_rng)
        };
        let stem = format!("{index:0width$}");

        let png_path = out.join(format!("{stem}.png"));
        let mut png = Vec::new();
        scene
            .render()
            .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .map_err(|source| ShapesError::Encode {
                path: png_path.clone(),
                source,
            })?;
        write(&png_path, &png, written)?;

        let caption = match captions {
            Captions::AsDrawn => scene.prompt(),
            Captions::Canonical => scene.prompt().canonical(),
        };
        let caption_path = out.join(format!("{stem}.txt"));
        write(&caption_path, format!("{caption}\n").as_bytes(), written)?;
    }
    Ok(())
}

fn write(path: &Path, bytes: &[u8], written: &mut Vec<PathBuf>) -> Result<()> {
    std::fs::write(path, bytes).map_err(|source| ShapesError::Io {
        path: path.to_owned(),
        source,
    })?;
    written.push(path.to_owned());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Colour;
    use crate::check::check;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sd-shapes-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let name = e.file_name().to_string_lossy().into_owned();
                (name, std::fs::read(e.path()).unwrap())
            })
            .collect();
        files.sort();
        files
    }

    /// The checker passes every written image with its own caption (read back from disk).
    #[test]
    fn written_dataset_passes_its_own_checker() {
        let dir = scratch("check");
        write_dataset(&dir, 500, 11, Captions::AsDrawn).unwrap();
        let files = files(&dir);
        assert_eq!(files.len(), 1000);
        let mut ones = 0;
        for pair in files.chunks(2) {
            let [(png_name, png), (txt_name, txt)] = pair else {
                unreachable!()
            };
            assert_eq!(png_name.strip_suffix(".png"), txt_name.strip_suffix(".txt"));
            let caption = std::str::from_utf8(txt).unwrap();
            assert!(caption.ends_with('\n') && caption.lines().count() == 1);
            let caption = caption.trim_end();
            let prompt: crate::Prompt = caption.parse().unwrap();
            assert!(!prompt.is_held_out(), "{caption}");
            ones += usize::from(prompt.relation().is_none());
            let image = image::load_from_memory(png).unwrap().to_rgb8();
            let verdict = check(&image, caption);
            assert!(verdict.pass, "{png_name} {caption}: {}", verdict.reason);
        }
        // About 40% single objects (binomial, sd ≈ 11 of 500).
        assert!(
            (160..240).contains(&ones),
            "{ones} one-object scenes of 500"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn same_seed_same_bytes() {
        let (a, b, c) = (scratch("seed-a"), scratch("seed-b"), scratch("seed-c"));
        write_dataset(&a, 30, 5, Captions::AsDrawn).unwrap();
        write_dataset(&b, 30, 5, Captions::AsDrawn).unwrap();
        write_dataset(&c, 30, 6, Captions::AsDrawn).unwrap();
        assert_eq!(files(&a), files(&b));
        assert_ne!(files(&a), files(&c));
        assert_eq!(files(&a)[0].0, "00000.png");
        for dir in [a, b, c] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    /// Canonical captions: the same images, every two-object caption with `above` or `to the
    /// left of`, and the checker still passes each image with its caption.
    #[test]
    fn canonical_captions_describe_the_same_images() {
        let (drawn, canonical) = (scratch("drawn"), scratch("canonical"));
        write_dataset(&drawn, 200, 3, Captions::AsDrawn).unwrap();
        write_dataset(&canonical, 200, 3, Captions::Canonical).unwrap();
        let (drawn_files, canonical_files) = (files(&drawn), files(&canonical));
        let mut rewritten = 0;
        for (a, b) in drawn_files.chunks(2).zip(canonical_files.chunks(2)) {
            assert_eq!(a[0], b[0], "the images differ");
            let said = std::str::from_utf8(&a[1].1).unwrap().trim_end();
            let caption = std::str::from_utf8(&b[1].1).unwrap().trim_end();
            let prompt: crate::Prompt = caption.parse().unwrap();
            assert_eq!(said.parse::<crate::Prompt>().unwrap().canonical(), prompt);
            assert!(!matches!(
                prompt.relation(),
                Some(crate::Relation::Below | crate::Relation::RightOf)
            ));
            rewritten += usize::from(said != caption);
            let image = image::load_from_memory(&b[0].1).unwrap().to_rgb8();
            let verdict = check(&image, caption);
            assert!(verdict.pass, "{} {caption}: {}", b[0].0, verdict.reason);
        }
        // About 60% of scenes have two objects, half of them below or to the right of.
        assert!(
            (30..90).contains(&rewritten),
            "{rewritten} of 200 rewritten"
        );
        for dir in [drawn, canonical] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    /// Extra colours: the palette images first, byte for byte those without them; then scenes
    /// each holding a colour outside the palette, drawn in their exact fills, none held out,
    /// and each palette object in them still passing the checker's colour test.
    #[test]
    fn extra_colour_scenes_follow_the_palette_ones() {
        let (plain, mixed) = (scratch("plain"), scratch("mixed"));
        write_dataset(&plain, 40, 9, Captions::AsDrawn).unwrap();
        write_dataset_with_extra_colours(&mixed, 40, 160, 9, Captions::Canonical).unwrap();
        let (plain_files, mixed_files) = (files(&plain), files(&mixed));
        assert_eq!(mixed_files.len(), 400);
        for (a, b) in plain_files.chunks(2).zip(mixed_files.chunks(2)) {
            assert_eq!(a[0], b[0], "a palette image differs");
        }
        let mut seen = std::collections::HashSet::new();
        for pair in mixed_files[80..].chunks(2) {
            let caption = std::str::from_utf8(&pair[1].1).unwrap().trim_end();
            // Prompts name only palette colours, so the caption is read here word by word.
            let named: Vec<Colour> = caption
                .split(' ')
                .filter_map(|w| {
                    Colour::ALL
                        .into_iter()
                        .chain(Colour::EXTRA)
                        .find(|c| c.name() == w)
                })
                .collect();
            assert!(named.iter().any(|c| c.is_extra()), "{caption}");
            assert!(
                !caption.contains(" below ") && !caption.contains(" right of "),
                "{caption}"
            );
            assert!(!caption.contains("yellow circle") && !caption.contains("green triangle"));
            assert!(!(named.contains(&Colour::Red) && named.contains(&Colour::Blue)));
            let image = image::load_from_memory(&pair[0].1).unwrap().to_rgb8();
            for colour in &named {
                assert!(image.pixels().any(|p| p.0 == colour.rgb()), "{caption}");
                seen.insert(*colour);
            }
            // The checker reads an extra colour as no palette colour at all.
            for (pixel, label) in image.pixels().zip(crate::segment(&image)) {
                let expected = match named.iter().find(|c| c.rgb() == pixel.0) {
                    Some(c) if c.is_extra() => crate::Label::Other,
                    Some(&c) => crate::Label::Colour(c),
                    None => crate::Label::Background,
                };
                assert_eq!(label, expected, "{caption}: {:?}", pixel.0);
            }
        }
        for colour in Colour::EXTRA {
            assert!(seen.contains(&colour), "{colour} never drawn");
        }
        for dir in [plain, mixed] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn refuses_what_it_must() {
        let dir = scratch("refuse");
        let e = write_dataset(&dir, 0, 1, Captions::AsDrawn).unwrap_err();
        assert!(matches!(e, ShapesError::NoImages { .. }), "{e}");
        assert!(!dir.exists());
        // An existing empty folder is fine; once written it is not empty any more.
        std::fs::create_dir_all(&dir).unwrap();
        write_dataset(&dir, 2, 1, Captions::AsDrawn).unwrap();
        let e = write_dataset(&dir, 2, 1, Captions::AsDrawn).unwrap_err();
        assert!(matches!(e, ShapesError::NotEmpty { .. }), "{e}");
        assert!(e.to_string().starts_with(&dir.display().to_string()), "{e}");
        let file = dir.join("00000.txt");
        let e = write_dataset(&file, 2, 1, Captions::AsDrawn).unwrap_err();
        assert!(matches!(e, ShapesError::NotAFolder { .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
