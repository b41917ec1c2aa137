//! Evaluation: word error rate.

pub mod wer;
