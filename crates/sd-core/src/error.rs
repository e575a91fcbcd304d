//! The error type of `sd-core`.

use std::fmt;
use std::path::PathBuf;

/// Result alias for `sd-core`.
pub type Result<T, E = CoreError> = std::result::Result<T, E>;

/// Everything that can go wrong in `sd-core`: each variant names the file, key or shape at fault.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A safetensors file is malformed (truncated, bad header, offsets out of range).
    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A weight tensor has a dtype the models cannot compute with.
    #[error(
        "{path}: tensor `{key}` has dtype {dtype}; only F64, F32, F16 and BF16 weights are supported"
    )]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The tensor's key in the file.
        key: String,
        /// The tensor's dtype as the file names it.
        dtype: String,
    },
    /// The weights in a file do not fit the module: every problem found, listed once.
    #[error("{path}: {} weight problem(s):{}", problems.len(), ProblemList(problems))]
    Weights {
        /// The weight file.
        path: PathBuf,
        /// Every problem found.
        problems: Vec<WeightProblem>,
    },
    /// A configuration file is missing a field, has a wrong value, or is not JSON.
    #[error("{path}: {reason}")]
    Config {
        /// The configuration file, or a placeholder such as `<ClipTextConfig>` for one built in
        /// code.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An image file could not be decoded or encoded.
    #[error("{path}: {reason}")]
    Image {
        /// The image file.
        path: PathBuf,
        /// Why it could not be decoded or encoded.
        reason: String,
    },
    /// A tensor handed to a model has the wrong shape or size.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A noise-schedule configuration that cannot produce a valid schedule.
    #[error("invalid noise schedule: {0}")]
    InvalidSchedule(String),
    /// A timestep outside `0..num_train_timesteps`.
    #[error("timestep {timestep} is outside 0..{num_train_timesteps}")]
    TimestepOutOfRange {
        /// The timestep asked for.
        timestep: usize,
        /// The schedule's number of training timesteps.
        num_train_timesteps: usize,
    },
    /// Tensors or timestep lists whose sizes do not fit together.
    #[error("shape mismatch: {0}")]
    Shape(String),
}

/// One way in which a weight file does not fit a module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightProblem {
    /// The module has a parameter the file lacks.
    Missing {
        /// The parameter's path in the module.
        key: String,
        /// The parameter's shape.
        expected: Vec<usize>,
    },
    /// The file has a tensor the module has no parameter for.
    Unexpected {
        /// The tensor's key in the file.
        key: String,
        /// The tensor's shape.
        found: Vec<usize>,
    },
    /// Both have the key, with different shapes.
    ShapeMismatch {
        /// The tensor's key in the file.
        key: String,
        /// The parameter's shape in the module.
        expected: Vec<usize>,
        /// The tensor's shape in the file.
        found: Vec<usize>,
    },
    /// The model needs the tensor as floats; the file stores integers or booleans.
    NotFloat {
        /// The tensor's key in the file.
        key: String,
        /// The dtype the file stores it as.
        dtype: String,
    },
    /// Anything else reported while applying the tensor (its values refused, for one).
    Other {
        /// The tensor's key or path; empty when the report names none.
        key: String,
        /// What was reported.
        message: String,
    },
}

impl fmt::Display for WeightProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing { key, expected } => {
                write!(f, "missing key `{key}` (expected shape {expected:?})")
            }
            Self::Unexpected { key, found } => {
                write!(f, "unexpected key `{key}` (shape {found:?})")
            }
            Self::ShapeMismatch {
                key,
                expected,
                found,
            } => write!(
                f,
                "shape mismatch for `{key}`: expected {expected:?}, found {found:?}"
            ),
            Self::NotFloat { key, dtype } => write!(
                f,
                "`{key}` is stored as {dtype}; the model needs a floating-point tensor there"
            ),
            Self::Other { key, message } if key.is_empty() => write!(f, "{message}"),
            Self::Other { key, message } => write!(f, "`{key}`: {message}"),
        }
    }
}

struct ProblemList<'a>(&'a [WeightProblem]);

/// How many problems a [`CoreError::Weights`] message lists before it only counts the rest: a
/// config that does not fit the file can mismatch every key.
pub const PROBLEMS_LISTED: usize = 20;

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for problem in self.0.iter().take(PROBLEMS_LISTED) {
            write!(f, "\n  - {problem}")?;
        }
        if self.0.len() > PROBLEMS_LISTED {
            write!(f, "\n  - … and {} more", self.0.len() - PROBLEMS_LISTED)?;
        }
        Ok(())
    }
}

impl CoreError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// A configuration problem in `path`.
    pub fn config(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Config {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
