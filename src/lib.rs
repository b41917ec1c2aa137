//! stepaudio-live: real-time streaming speech-to-text.
//!
//! Layers, from the bottom up: `audio` (decoding, resampling, capture, VAD),
//! `ops` (CPU, int8 and CUDA kernels and the fast-path switchboard),
//! `frontend` (log-mel), `device`, `model` (weights, Whisper, Step-Audio 2), `fetch`
//! (model names, pinned sources, cache and verification), `transcribe`
//! (offline decoding of whole files), `stream` (live segmenting and partial/final
//! policy), `server` (WebSocket and captions page). The binary in `main.rs` only
//! parses the command line and calls into `cli`.

pub mod audio;
pub mod cli;
pub mod device;
pub mod eval;
pub mod fetch;
pub mod frontend;
pub mod model;
pub mod ops;
pub mod output;
pub mod server;
pub mod stream;
pub mod transcribe;
