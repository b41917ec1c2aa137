//! Writes live events to stdout: one line per final (pipe-friendly), or
//! every event as a JSON line. On a terminal the current partial is shown in
//! place and replaced by the final.

use super::events::Event;
use std::io::{self, IsTerminal, Write};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) enum LiveFormat {
    /// One line of text per final.
    #[default]
    Text,
    /// Every event as a JSON object per line.
    Jsonl,
}

pub(crate) struct StdoutSink<W: Write> {
    out: W,
    format: LiveFormat,
    /// Show partials in place (only on a terminal).
    show_partials: bool,
    partial_on_screen: bool,
}

impl StdoutSink<io::Stdout> {
    pub(crate) fn stdout(format: LiveFormat) -> Self {
        let tty = io::stdout().is_terminal();
        Self::new(io::stdout(), format, tty)
    }
}

/// Partials longer than this show only their end, so they fit one line.
const PARTIAL_MAX_CHARS: usize = 100;

impl<W: Write> StdoutSink<W> {
    pub fn new(out: W, format: LiveFormat, show_partials: bool) -> Self {
        Self {
            out,
            format,
            show_partials,
            partial_on_screen: false,
        }
    }

    #[cfg(test)]
    pub(crate) fn into_inner(self) -> W {
        self.out
    }

    /// Writes one event; an error means stdout is gone (e.g. a closed pipe).
    pub(crate) fn handle(&mut self, ev: &Event) -> io::Result<()> {
        match self.format {
            LiveFormat::Jsonl => {
                writeln!(self.out, "{}", ev.to_json())?;
                self.out.flush()
            }
            LiveFormat::Text => match ev {
                Event::Final { text, .. } => {
                    if self.partial_on_screen {
                        write!(self.out, "\r\x1b[2K")?;
                        self.partial_on_screen = false;
                    }
                    if !text.is_empty() {
                        writeln!(self.out, "{text}")?;
                    }
                    self.out.flush()
                }
                Event::Partial {
                    text, committed, ..
                } if self.show_partials => {
                    let shown: String = if text.chars().count() > PARTIAL_MAX_CHARS {
                        let skip = text.chars().count() - PARTIAL_MAX_CHARS;
                        format!("…{}", text.chars().skip(skip).collect::<String>())
                    } else {
                        text.clone()
                    };
                    // Committed words in normal weight, the revisable rest dimmed.
                    let split = if shown.len() == text.len() && text.starts_with(committed.as_str())
                    {
                        committed.len()
                    } else {
                        0
                    };
                    write!(
                        self.out,
                        "\r\x1b[2K{}\x1b[2m{}\x1b[0m",
                        &shown[..split],
                        &shown[split..]
                    )?;
                    self.partial_on_screen = true;
                    self.out.flush()
                }
                _ => Ok(()),
            },
        }
    }

    /// Leaves the terminal on a clean line.
    pub fn finish(&mut self) -> io::Result<()> {
        if self.partial_on_screen {
            write!(self.out, "\r\x1b[2K")?;
            self.partial_on_screen = false;
        }
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fin(text: &str) -> Event {
        Event::Final {
            segment: 0,
            text: text.into(),
            start: 0.0,
            end: 1.0,
            latency_ms: 5.0,
            reason: "silence",
        }
    }

    #[test]
    fn text_mode_prints_only_nonempty_finals_for_pipes() {
        let mut sink = StdoutSink::new(Vec::new(), LiveFormat::Text, false);
        let partial = Event::Partial {
            segment: 0,
            text: "hel".into(),
            committed: "".into(),
            start: 0.0,
            end: 0.5,
            latency_ms: 1.0,
        };
        for ev in [partial, fin("hello world"), fin(""), fin("again")] {
            sink.handle(&ev).unwrap();
        }
        assert_eq!(
            String::from_utf8(sink.into_inner()).unwrap(),
            "hello world\nagain\n"
        );
    }

    #[test]
    fn jsonl_mode_prints_every_event_with_its_type() {
        let mut sink = StdoutSink::new(Vec::new(), LiveFormat::Jsonl, false);
        sink.handle(&Event::SpeechStart {
            segment: 3,
            start: 1.5,
        })
        .unwrap();
        sink.handle(&fin("x")).unwrap();
        let out = String::from_utf8(sink.into_inner()).unwrap();
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["type"], "speech_start");
        assert_eq!(lines[0]["segment"], 3);
        assert_eq!(lines[1]["type"], "final");
        assert_eq!(lines[1]["latency_ms"], 5.0);
    }

    #[test]
    fn terminal_partials_are_replaced_by_the_final() {
        let mut sink = StdoutSink::new(Vec::new(), LiveFormat::Text, true);
        let partial = Event::Partial {
            segment: 0,
            text: "hello wor".into(),
            committed: "hello".into(),
            start: 0.0,
            end: 0.5,
            latency_ms: 1.0,
        };
        sink.handle(&partial).unwrap();
        sink.handle(&fin("hello world")).unwrap();
        let out = String::from_utf8(sink.into_inner()).unwrap();
        assert!(
            out.starts_with("\r\x1b[2Khello\x1b[2m wor\x1b[0m"),
            "{out:?}"
        );
        assert!(out.ends_with("\r\x1b[2Khello world\n"), "{out:?}");
    }
}
