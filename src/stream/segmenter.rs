//! Cuts the stream into speech segments from per-frame VAD decisions.
//!
//! A segment opens after `min_speech` of continuous voiced frames (starting
//! `pre_roll` before the first of them, so onsets are not clipped) and closes
//! after `hangover` of silence; its audio ends `tail_pad` after the last
//! voiced frame. When the silence reaches `tail_pad` a *pause* is reported:
//! the pipeline decodes the would-be final then, so that the final is ready
//! when the hangover confirms the end. A segment reaching `max_segment` is cut
//! at the quietest frame of the last `cut_search` and continues as a new one.
//! All positions are 16 kHz sample indices since the start of the stream.

use std::collections::VecDeque;

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SegmenterConfig {
    pub frame_samples: usize,
    pub pre_roll: usize,
    pub min_speech: usize,
    pub hangover: usize,
    pub tail_pad: usize,
    pub max_segment: usize,
    pub cut_search: usize,
}

impl SegmenterConfig {
    /// Builds a configuration from milliseconds at 16 kHz.
    pub(crate) fn from_ms(
        frame_ms: u32,
        pre_roll_ms: u32,
        min_speech_ms: u32,
        hangover_ms: u32,
        tail_pad_ms: u32,
        max_segment_ms: u32,
    ) -> Self {
        let s = |ms: u32| (ms as usize) * 16;
        let max_segment = s(max_segment_ms).max(s(frame_ms) * 4);
        Self {
            frame_samples: s(frame_ms),
            pre_roll: s(pre_roll_ms),
            min_speech: s(min_speech_ms),
            hangover: s(hangover_ms).max(s(tail_pad_ms)),
            tail_pad: s(tail_pad_ms),
            max_segment,
            // Look for a cut point in the last quarter of the segment, at most 3 s.
            cut_search: (max_segment / 4).min(s(3000)),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// The hangover of silence passed.
    Silence,
    /// The segment reached its maximum length and was cut.
    MaxLength,
    /// The input ended or the pipeline is shutting down.
    Flush,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum SegmentEvent {
    Start {
        segment: u64,
        start: u64,
    },
    /// Silence reached `tail_pad`: the segment would end at `end` if it stays silent.
    Pause {
        segment: u64,
        end: u64,
    },
    /// Speech came back before the hangover ended.
    Resume {
        segment: u64,
    },
    End {
        segment: u64,
        start: u64,
        end: u64,
        reason: EndReason,
    },
}

#[derive(Debug)]
enum State {
    Idle {
        voiced_run: usize,
        run_start: u64,
    },
    Speech {
        segment: u64,
        start: u64,
        last_voiced_end: u64,
        silence: usize,
        paused: bool,
    },
}

pub(crate) struct Segmenter {
    cfg: SegmenterConfig,
    state: State,
    next_segment: u64,
    /// End of the last closed segment (a new one never starts before it).
    last_end: u64,
    /// (frame start, energy) of recent frames, for cut points.
    recent: VecDeque<(u64, f32)>,
}

impl Segmenter {
    pub fn new(cfg: SegmenterConfig) -> Self {
        Self {
            cfg,
            state: State::Idle {
                voiced_run: 0,
                run_start: 0,
            },
            next_segment: 0,
            last_end: 0,
            recent: VecDeque::new(),
        }
    }

    /// Samples of silence since the last voiced frame of the open segment.
    pub(crate) fn trailing_silence(&self) -> usize {
        match self.state {
            State::Speech { silence, .. } => silence,
            State::Idle { .. } => 0,
        }
    }

    /// Feeds the decision for the frame starting at sample `frame_start`.
    pub fn push(
        &mut self,
        frame_start: u64,
        voiced: bool,
        energy: f32,
        events: &mut Vec<SegmentEvent>,
    ) {
        let frame = self.cfg.frame_samples as u64;
        let frame_end = frame_start + frame;
        self.recent.push_back((frame_start, energy));
        while self.recent.len() * self.cfg.frame_samples
            > self.cfg.cut_search.max(self.cfg.frame_samples)
        {
            self.recent.pop_front();
        }
        match &mut self.state {
            State::Idle {
                voiced_run,
                run_start,
            } => {
                if !voiced {
                    *voiced_run = 0;
                    return;
                }
                if *voiced_run == 0 {
                    *run_start = frame_start;
                }
                *voiced_run += self.cfg.frame_samples;
                if *voiced_run >= self.cfg.min_speech.max(1) {
                    let start = run_start
                        .saturating_sub(self.cfg.pre_roll as u64)
                        .max(self.last_end);
                    let segment = self.next_segment;
                    self.next_segment += 1;
                    events.push(SegmentEvent::Start { segment, start });
                    self.state = State::Speech {
                        segment,
                        start,
                        last_voiced_end: frame_end,
                        silence: 0,
                        paused: false,
                    };
                }
            }
            State::Speech {
                segment,
                start,
                last_voiced_end,
                silence,
                paused,
            } => {
                let (segment, start) = (*segment, *start);
                if voiced {
                    *last_voiced_end = frame_end;
                    *silence = 0;
                    if *paused {
                        *paused = false;
                        events.push(SegmentEvent::Resume { segment });
                    }
                } else {
                    *silence += self.cfg.frame_samples;
                    let end = *last_voiced_end + self.cfg.tail_pad as u64;
                    if *silence >= self.cfg.hangover {
                        events.push(SegmentEvent::End {
                            segment,
                            start,
                            end,
                            reason: EndReason::Silence,
                        });
                        self.last_end = end;
                        self.state = State::Idle {
                            voiced_run: 0,
                            run_start: 0,
                        };
                        return;
                    }
                    if *silence >= self.cfg.tail_pad && !*paused {
                        *paused = true;
                        events.push(SegmentEvent::Pause { segment, end });
                    }
                }
                if !*paused && frame_end - start >= self.cfg.max_segment as u64 {
                    let cut = self.quietest_recent(start).unwrap_or(frame_end);
                    events.push(SegmentEvent::End {
                        segment,
                        start,
                        end: cut,
                        reason: EndReason::MaxLength,
                    });
                    let next = self.next_segment;
                    self.next_segment += 1;
                    events.push(SegmentEvent::Start {
                        segment: next,
                        start: cut,
                    });
                    self.last_end = cut;
                    self.state = State::Speech {
                        segment: next,
                        start: cut,
                        last_voiced_end: frame_end,
                        silence: 0,
                        paused: false,
                    };
                }
            }
        }
    }

    /// Middle of the lowest-energy recent frame after the segment's first half.
    fn quietest_recent(&self, segment_start: u64) -> Option<u64> {
        let earliest = segment_start + self.cfg.max_segment as u64 / 2;
        self.recent
            .iter()
            .filter(|(s, _)| *s >= earliest)
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|&(s, _)| s + self.cfg.frame_samples as u64 / 2)
    }

    /// Closes the open segment at the end of the stream (`stream_end` samples).
    pub(crate) fn flush(&mut self, stream_end: u64) -> Option<SegmentEvent> {
        match std::mem::replace(
            &mut self.state,
            State::Idle {
                voiced_run: 0,
                run_start: 0,
            },
        ) {
            State::Speech {
                segment,
                start,
                last_voiced_end,
                silence,
                ..
            } => {
                let end = if silence == 0 {
                    stream_end
                } else {
                    (last_voiced_end + self.cfg.tail_pad as u64).min(stream_end)
                };
                self.last_end = end;
                Some(SegmentEvent::End {
                    segment,
                    start,
                    end,
                    reason: EndReason::Flush,
                })
            }
            State::Idle { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SegmenterConfig {
        // 20 ms frames, 100 ms pre-roll, 60 ms min speech, 300 ms hangover, 100 ms tail, 2 s max.
        SegmenterConfig::from_ms(20, 100, 60, 300, 100, 2000)
    }

    /// Runs a pattern of voiced (true) / silent frames; returns all events.
    fn run(seg: &mut Segmenter, pattern: &[(bool, usize)], pos: &mut u64) -> Vec<SegmentEvent> {
        let mut events = Vec::new();
        for &(voiced, frames) in pattern {
            for _ in 0..frames {
                seg.push(*pos, voiced, if voiced { 0.1 } else { 0.001 }, &mut events);
                *pos += 320;
            }
        }
        events
    }

    #[test]
    fn speech_between_silences_gives_one_segment_with_pause_before_end() {
        let mut seg = Segmenter::new(cfg());
        let mut pos = 0;
        // 1 s silence, 1 s speech (50 frames), 1 s silence.
        let ev = run(&mut seg, &[(false, 50), (true, 50), (false, 50)], &mut pos);
        // Speech starts at frame 50 = sample 16000; pre-roll 1600 samples.
        assert_eq!(
            ev[0],
            SegmentEvent::Start {
                segment: 0,
                start: 16000 - 1600
            }
        );
        let speech_end = 32000;
        assert_eq!(
            ev[1],
            SegmentEvent::Pause {
                segment: 0,
                end: speech_end + 1600
            }
        );
        assert_eq!(
            ev[2],
            SegmentEvent::End {
                segment: 0,
                start: 14400,
                end: speech_end + 1600,
                reason: EndReason::Silence
            }
        );
        assert_eq!(ev.len(), 3);
    }

    #[test]
    fn short_pause_resumes_and_blips_do_not_start_segments() {
        let mut seg = Segmenter::new(cfg());
        let mut pos = 0;
        // A 40 ms blip (below min speech), then speech with a 200 ms gap (< hangover).
        let ev = run(
            &mut seg,
            &[
                (true, 2),
                (false, 20),
                (true, 20),
                (false, 10),
                (true, 20),
                (false, 40),
            ],
            &mut pos,
        );
        let kinds: Vec<&str> = ev
            .iter()
            .map(|e| match e {
                SegmentEvent::Start { .. } => "start",
                SegmentEvent::Pause { .. } => "pause",
                SegmentEvent::Resume { .. } => "resume",
                SegmentEvent::End { .. } => "end",
            })
            .collect();
        assert_eq!(kinds, ["start", "pause", "resume", "pause", "end"]);
    }

    #[test]
    fn long_speech_is_cut_at_the_quietest_recent_frame() {
        let mut seg = Segmenter::new(cfg());
        let mut events = Vec::new();
        let mut pos = 0u64;
        for i in 0..200 {
            // Continuous speech; frame 80 (1.6 s) is quieter than the rest.
            let energy = if i == 80 { 0.01 } else { 0.1 };
            seg.push(pos, true, energy, &mut events);
            pos += 320;
        }
        let ends: Vec<_> = events
            .iter()
            .filter(|e| matches!(e, SegmentEvent::End { .. }))
            .collect();
        let SegmentEvent::End { end, reason, .. } = ends[0] else {
            unreachable!()
        };
        assert_eq!(*reason, EndReason::MaxLength);
        assert_eq!(*end, 80 * 320 + 160, "cut in the middle of the quiet frame");
        // The next segment starts exactly at the cut: nothing is lost or repeated.
        assert!(events.contains(&SegmentEvent::Start {
            segment: 1,
            start: 80 * 320 + 160
        }));
        assert!(
            ends.len() >= 2,
            "4 s of speech with a 2 s maximum needs at least two cuts"
        );
    }

    #[test]
    fn flush_closes_an_open_segment_at_the_stream_end() {
        let mut seg = Segmenter::new(cfg());
        let mut pos = 0;
        run(&mut seg, &[(true, 30)], &mut pos);
        assert_eq!(
            seg.flush(pos),
            Some(SegmentEvent::End {
                segment: 0,
                start: 0,
                end: pos,
                reason: EndReason::Flush
            })
        );
        assert_eq!(seg.flush(pos), None);
    }
}
