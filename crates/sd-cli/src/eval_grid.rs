//! The picture of an `sd eval shapes` run (`--grid`): one row per prompt with its images side
//! by side, each framed green where the checker passed it and red where it did not, the
//! prompt written above the row and held-out prompts marked. Text is drawn with plotters in the
//! font `sd_train::register_font` embeds.

use std::path::Path;

use image::{Rgb, RgbImage, imageops};
use plotters::prelude::*;

/// One row of the grid.
pub struct Row {
    pub prompt: String,
    pub held_out: bool,
    /// Each image with the checker's verdict.
    pub images: Vec<(RgbImage, bool)>,
}

/// Each 64×64 image is drawn at this many times its size, nearest-neighbour, so the pixels
/// the checker reads stay visible.
const SCALE: u32 = 2;
const FRAME: u32 = 3;
const GAP: u32 = 6;
const CAPTION: u32 = 22;
const PASS: Rgb<u8> = Rgb([40, 170, 60]);
const FAIL: Rgb<u8> = Rgb([220, 40, 40]);

/// Draws `rows` into a PNG at `path`, written atomically.
pub fn write_grid(rows: &[Row], path: &Path) -> Result<(), String> {
    sd_train::register_font();
    let fail = |e: String| format!("{}: {e}", path.display());
    let (tile_w, tile_h) = rows
        .iter()
        .flat_map(|r| r.images.iter())
        .map(|(i, _)| i.dimensions())
        .fold((1, 1), |(w, h), (a, b)| (w.max(a), h.max(b)));
    let cell_w = tile_w * SCALE + 2 * FRAME;
    let cell_h = tile_h * SCALE + 2 * FRAME;
    let columns = rows
        .iter()
        .map(|r| r.images.len())
        .max()
        .unwrap_or(1)
        .max(1) as u32;
    let width = (GAP + columns * (cell_w + GAP)).max(420);
    let row_h = CAPTION + cell_h + GAP;
    let height = GAP + rows.len().max(1) as u32 * row_h;
    let mut buffer = vec![255u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (width, height)).into_drawing_area();
        for (r, row) in rows.iter().enumerate() {
            let mark = if row.held_out { "held out: " } else { "" };
            let passed = row.images.iter().filter(|(_, p)| *p).count();
            let text = format!("{mark}{} ({passed}/{} pass)", row.prompt, row.images.len());
            let colour = if row.held_out { &BLUE } else { &BLACK };
            let y = (GAP + r as u32 * row_h) as i32;
            root.draw_text(
                &text,
                &("sans-serif", 15).into_font().color(colour),
                (GAP as i32, y + 2),
            )
            .map_err(|e| fail(e.to_string()))?;
        }
        root.present().map_err(|e| fail(e.to_string()))?;
    }
    let mut grid = RgbImage::from_raw(width, height, buffer)
        .ok_or_else(|| fail("grid buffer of the wrong size".into()))?;
    for (r, row) in rows.iter().enumerate() {
        let y = GAP + r as u32 * row_h + CAPTION;
        for (c, (image, passed)) in row.images.iter().enumerate() {
            let x = GAP + c as u32 * (cell_w + GAP);
            let frame = RgbImage::from_pixel(cell_w, cell_h, if *passed { PASS } else { FAIL });
            imageops::replace(&mut grid, &frame, x.into(), y.into());
            let big = imageops::resize(
                image,
                image.width() * SCALE,
                image.height() * SCALE,
                imageops::FilterType::Nearest,
            );
            imageops::replace(&mut grid, &big, (x + FRAME).into(), (y + FRAME).into());
        }
    }
    sd::core::files::write_atomic(path, |out| {
        grid.write_to(out, image::ImageFormat::Png)
            .map_err(|e| e.to_string())
    })
    .map_err(|e| e.to_string())
}
