//! Live streaming: segmenting, the partial/final policy, and the threads that
//! carry audio from a source to transcript events.

pub mod policy;
pub mod segmenter;
