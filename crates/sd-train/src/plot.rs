//! `loss.png`: the loss curve of a run, drawn with plotters (the raw loss per step, faint,
//! and its exponential moving average), from `train_log.jsonl`.

use std::path::Path;

use plotters::prelude::*;

use crate::error::{Result, TrainError};
use crate::train_log::StepLog;

const WIDTH: u32 = 800;
const HEIGHT: u32 = 480;

/// Registers the font plotters draws "sans-serif" text in, embedded (DejaVu Sans) so that no
/// system font is needed; the other pictures the project draws call it too.
pub fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

/// Draws the loss of `log` against the step into a PNG at `path` (written atomically).
pub fn plot_loss(log: &[StepLog], title: &str, path: &Path) -> Result<()> {
    register_font();
    let fail = |e: String| TrainError::Io(format!("{}: {e}", path.display()));
    let points: Vec<(f64, f64)> = log
        .iter()
        .filter(|e| e.loss.is_finite())
        .map(|e| (e.step as f64, e.loss))
        .collect();
    if points.is_empty() {
        return Err(fail("no finite loss to plot".into()));
    }
    // A smoothing that reads the same at any run length: a window of about 1/20 of the run,
    // and some smoothing even on short ones.
    let alpha = (20.0 / points.len() as f64).min(0.5);
    let mut smoothed = Vec::with_capacity(points.len());
    let mut ema = points[0].1;
    for &(x, y) in &points {
        ema += alpha * (y - ema);
        smoothed.push((x, ema));
    }
    let (x_max, y_max) = points
        .iter()
        .fold((1.0f64, 0.0f64), |(a, b), &(x, y)| (a.max(x), b.max(y)));
    let y_min = points
        .iter()
        .map(|p| p.1)
        .fold(f64::INFINITY, f64::min)
        .min(0.0);
    let mut buffer = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, y_min..y_max * 1.05 + 1e-12)
            .map_err(|e| fail(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| fail(e.to_string()))?;
        chart
            .draw_series(LineSeries::new(points.iter().copied(), BLUE.mix(0.25)))
            .map_err(|e| fail(e.to_string()))?
            .label("loss")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.mix(0.25)));
        chart
            .draw_series(LineSeries::new(smoothed, BLUE.stroke_width(2)))
            .map_err(|e| fail(e.to_string()))?
            .label("moving average")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|e| fail(e.to_string()))?;
        root.present().map_err(|e| fail(e.to_string()))?;
    }
    let image = image::RgbImage::from_raw(WIDTH, HEIGHT, buffer)
        .ok_or_else(|| fail("plot buffer of the wrong size".into()))?;
    sd_core::files::write_atomic(path, |out| {
        image
            .write_to(out, image::ImageFormat::Png)
            .map_err(|e| e.to_string())
    })?;
    Ok(())
}
