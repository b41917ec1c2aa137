//! Live streaming: segmenting, the partial/final policy, and the threads that
//! carry audio from a source to transcript events.

pub mod decoder;
pub mod engine;
pub mod events;
pub mod pipeline;
pub mod policy;
pub mod segmenter;
pub mod sink;
pub mod tracker;
pub mod usage;
