//! Training data as users keep it on disk, read into what a training step needs: an image
//! tensor's values in `[-1, 1]` and a caption.
//!
//! Three layouts are recognised, the ones diffusers' and kohya's scripts read:
//! - diffusers' imagefolder: `metadata.jsonl` with `file_name` and a caption column (`text`
//!   by default; a list of captions picks one at random per use);
//! - kohya's caption files: `image.png` beside `image.txt` or `image.caption` (first line);
//! - kohya's repeat folders: `N_name/` subfolders whose images count N times each, captioned by
//!   their caption files or else by `name`.
//!
//! Every random choice (the epoch's order, crop, flip, caption pick, dropout, shuffle) comes
//! from a generator seeded by the run's seed and the sample's position in the run, so a run
//! that resumes at step k sees exactly the data an uninterrupted run would have.

mod buckets;
mod dataset;
mod error;
mod order;
mod transform;

pub use buckets::{BucketBatches, BucketConfig};
pub use dataset::{Dataset, Example, IMAGE_EXTENSIONS};
pub use error::{DataError, Result};
pub use order::{Order, sample_rng};
pub use transform::{
    CaptionOptions, CropInfo, Transform, load_bucketed_image, load_bucketed_image_cropped,
    load_example_image, load_example_image_cropped,
};
