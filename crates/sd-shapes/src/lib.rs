//! A synthetic text-to-image dataset whose every caption can be checked exactly, for training
//! a small model from scratch and measuring what it learned.
//!
//! Real captioned photos cannot tell whether a generated image *is* what its prompt says; a
//! world of five colours, three shapes and four spatial relations can. This crate holds both
//! halves of that world:
//!
//! - the **dataset**: [`Scene`]s of one object (`a red square`) or two objects of different
//!   colours in a relation (`a blue circle above a purple triangle`), rendered as 64×64 RGB
//!   images with exact palette fills and hard edges, and written by [`write_dataset`] as
//!   `NNNNN.png` beside `NNNNN.txt` (kohya's caption-file layout, which `sd-data` reads);
//! - the **checker**: [`check`] segments an image by the palette, finds the objects, classifies
//!   their shapes from their masks and tests the relation of their centres, and returns a
//!   [`Verdict`] saying pass or fail and why.
//!
//! Some combinations never appear in training ([`Prompt::is_held_out`]): two-object scenes of
//! one red and one blue object, and any scene holding a yellow circle or a green triangle.
//! [`held_out_prompts`] and [`seen_prompts`] list prompts of both kinds, so that an evaluation
//! can compare how often the model draws combinations it saw against ones it must compose.
//!
//! The third part is the [`model`] trained on the dataset by the project's own `sd train`,
//! embedded so that `sd generate` works with nothing downloaded.
//!
//! Everything is deterministic: the same seed gives the same scenes and byte-identical files.

mod check;
mod dataset;
mod error;
pub mod model;
mod prompt;
mod scene;

pub use check::{COLOUR_TOLERANCE, Detection, Failure, Label, Verdict, check, detect, segment};
pub use dataset::{Captions, write_dataset, write_dataset_with_extra_colours};
pub use error::{Result, ShapesError};
pub use prompt::{
    Colour, EVAL_PROMPT_COUNT, ObjectSpec, Prompt, Relation, Shape, held_out_prompts, seen_prompts,
};
pub use scene::{
    BACKGROUND, HeldOut, IMAGE_SIZE, MAX_ACROSS, MIN_ALONG, MIN_GAP, ONE_OBJECT_FRACTION,
    ONE_OBJECT_SIZES, Object, Scene, TWO_OBJECT_SIZES, is_held_out, random_extra_colour_scene,
    random_prompt, random_scene, random_scene_for,
};
