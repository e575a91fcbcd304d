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
    },
}

pub fn run(args: DatasetArgs) -> Result<String, String> {
    match args.kind {
        DatasetKind::Shapes { out, count, seed } => {
            // The library's errors name the folder or file they are about.
            sd_shapes::write_dataset(&out, count, seed).map_err(|e| e.to_string())?;
            Ok(format!(
                "wrote {count} captioned images to {}",
                out.display()
            ))
        }
    }
}
