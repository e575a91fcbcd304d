use std::path::PathBuf;

/// Result alias for `sd-shapes`.
pub type Result<T, E = ShapesError> = std::result::Result<T, E>;

/// What can go wrong building scenes, reading prompts or writing the dataset; the file-system
/// ones name their path, so that the message alone is enough for a command to print.
#[derive(Debug, thiserror::Error)]
pub enum ShapesError {
    /// The output folder already holds files: writing into it would mix two datasets.
    #[error("{}: the output folder is not empty; give a new or an empty folder", path.display())]
    NotEmpty {
        /// The output folder.
        path: PathBuf,
    },
    /// The output path exists and is not a folder.
    #[error("{}: not a folder", path.display())]
    NotAFolder {
        /// The output path.
        path: PathBuf,
    },
    /// A dataset of no images: nothing a training run could read.
    #[error("{}: the image count is 0; a dataset needs at least one image", path.display())]
    NoImages {
        /// The output folder.
        path: PathBuf,
    },
    /// Reading or writing a file or folder failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// Encoding an image as PNG failed.
    #[error("{}: {source}", path.display())]
    Encode {
        /// The image file.
        path: PathBuf,
        /// The encoder's error.
        source: image::ImageError,
    },
    /// A prompt outside the dataset's caption grammar.
    #[error("cannot read the prompt {prompt:?}: {reason}")]
    Prompt {
        /// The prompt as given.
        prompt: String,
        /// Where it leaves the grammar.
        reason: String,
    },
    /// This build was made before the shapes model was trained.
    #[error(
        "this build has no built-in model (it was built before `cargo xtask train-shapes` \
         wrote crates/sd-shapes/model/); pass --model"
    )]
    NoModel,
    /// Objects that break the dataset's conventions (sizes, placement, colours, relation).
    #[error("not a dataset scene: {0}")]
    Scene(&'static str),
}
