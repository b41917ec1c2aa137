//! Word error rate (placeholder).
