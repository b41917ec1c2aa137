//! Transcript output formats for `transcribe`: plain text, JSON lines, SRT, WebVTT.

use crate::transcribe::Segment;
use std::io::{self, Write};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) enum OutputFormat {
    #[default]
    Text,
    Jsonl,
    Srt,
    Vtt,
}

fn timestamp(seconds: f64, decimal: char) -> String {
    let ms = (seconds.max(0.0) * 1000.0).round() as u64;
    let (h, m, s, ms) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    format!("{h:02}:{m:02}:{s:02}{decimal}{ms:03}")
}

/// Writes one file's transcript. `text` prints the whole text on one line;
/// `jsonl` one object per segment; `srt`/`vtt` one cue per segment.
pub(crate) fn write_transcript(
    out: &mut impl Write,
    format: OutputFormat,
    file: &str,
    segments: &[Segment],
) -> io::Result<()> {
    match format {
        OutputFormat::Text => {
            let text: Vec<&str> = segments
                .iter()
                .map(|s| s.text.trim())
                .filter(|t| !t.is_empty())
                .collect();
            writeln!(out, "{}", text.join(" "))?;
        }
        OutputFormat::Jsonl => {
            for s in segments {
                let obj = serde_json::json!({
                    "file": file,
                    "start": (s.start * 1000.0).round() / 1000.0,
                    "end": (s.end * 1000.0).round() / 1000.0,
                    "text": s.text.trim(),
                });
                writeln!(out, "{obj}")?;
            }
        }
        OutputFormat::Srt => {
            for (i, s) in segments.iter().enumerate() {
                writeln!(
                    out,
                    "{}\n{} --> {}\n{}\n",
                    i + 1,
                    timestamp(s.start, ','),
                    timestamp(s.end, ','),
                    s.text.trim()
                )?;
            }
        }
        OutputFormat::Vtt => {
            writeln!(out, "WEBVTT\n")?;
            for s in segments {
                writeln!(
                    out,
                    "{} --> {}\n{}\n",
                    timestamp(s.start, '.'),
                    timestamp(s.end, '.'),
                    s.text.trim()
                )?;
            }
        }
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_format() {
        assert_eq!(timestamp(3723.456, ','), "01:02:03,456");
        assert_eq!(timestamp(0.0, '.'), "00:00:00.000");
    }
}
