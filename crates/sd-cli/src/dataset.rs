//! `sd dataset`: write synthetic training data ([`sd_shapes::write_dataset`]).

use std::path::PathBuf;

use clap::{Args, Subcommand};

#[derive(Args)]
pub struct DatasetArgs {
    #[command(subcommand)]
    kind: DatasetKind,
}

#[derive(Subcommand)]
enum DatasetKind {
    /// Coloured circles, squares and triangles on white (64×64), captioned.
    ///
    /// Captions are `a red square` or `a red square above a green circle` (also below, to the
    /// left of, to the right of), written as `NNNNN.png` beside `NNNNN.txt`, a folder `sd
    /// train` reads. Held-out combinations (one red and one blue object, a yellow circle, a
    /// green triangle) never appear. The same seed writes byte-identical files.
    Shapes {
        /// The folder to write: must not exist yet (or be empty).
        #[arg(long)]
        out: PathBuf,
        /// How many images to write (about 40% of one object, 60% of two).
        #[arg(long)]
        count: usize,
        /// The seed every scene is drawn from.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Caption two objects with `above` or `to the left of` only, the top or left one
        /// named first (`a blue square above a red circle` for a red circle below a blue
        /// square); the same seed draws the same images. The shapes recipe's first U-Net stages
        /// train on these.
        #[arg(long)]
        canonical: bool,
        /// Write this many more images after the `--count` ones, each holding at least one
        /// colour outside the palette (teal, pink, brown, black, grey: `a teal triangle above
        /// a green circle`), so that every shape is seen in more colours; held-out
        /// combinations are still left out, and the first `--count` images are unchanged.
        #[arg(long, default_value_t = 0)]
        extra_colours: usize,
    },
}

pub fn run(args: DatasetArgs) -> Result<String, String> {
    match args.kind {
        DatasetKind::Shapes {
            out,
            count,
            seed,
            canonical,
            extra_colours,
        } => {
            let captions = if canonical {
                sd_shapes::Captions::Canonical
            } else {
                sd_shapes::Captions::AsDrawn
            };
            // The library's errors name the folder or file they are about.
            sd_shapes::write_dataset_with_extra_colours(&out, count, extra_colours, seed, captions)
                .map_err(|e| e.to_string())?;
            Ok(format!(
                "wrote {} captioned images to {}",
                count + extra_colours,
                out.display()
            ))
        }
    }
}
