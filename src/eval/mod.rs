//! Evaluation: word error rate and the `eval` command that runs it over a
//! manifest of recordings.

pub mod run;
pub mod wer;

use crate::audio::AudioError;
use crate::device::DeviceError;
use crate::model::ModelError;

#[derive(Debug, thiserror::Error)]
pub(crate) enum EvalError {
    #[error("{path}:{line}: {reason}")]
    Manifest {
        path: String,
        line: usize,
        reason: String,
    },
    #[error("{path}:{line}: {reason}")]
    Hypotheses {
        path: String,
        line: usize,
        reason: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    NoEntries(String),
    #[error("manifest entry `{id}`")]
    Audio {
        id: String,
        #[source]
        source: AudioError,
    },
    #[error("transcribing manifest entry `{id}`")]
    Transcribe {
        id: String,
        #[source]
        source: Box<ModelError>,
    },
    #[error("loading the model")]
    Model(#[source] Box<ModelError>),
    #[error("finding the model")]
    Fetch(#[source] crate::fetch::FetchError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("writing the report: {0}")]
    Output(std::io::Error),
}
