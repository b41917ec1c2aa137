//! Faults the live stream must survive, through the real binary and
//! tiny.en: a microphone that disappears mid-utterance (a private PulseAudio
//! whose virtual microphone is unloaded and loaded again), and a model that
//! fails on one segment (fault injection with `STEPAUDIO_LIVE_INJECT_FAULT`,
//! see `src/stream/decoder.rs`), in a live stream and in one of two server
//! sessions. Every wait is bounded; none of these tests times anything.

mod common;
mod ws_support;

use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use stepaudio_live::eval::wer::{score, Unit};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use ws_support::*;

const INJECT: &str = "STEPAUDIO_LIVE_INJECT_FAULT";
/// Bound for waits on the model or the audio server (a hang guard, not a
/// performance limit).
const WAIT: Duration = Duration::from_secs(90);

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_stepaudio-live"));
    c.env("STEPAUDIO_LIVE_TEST", "1");
    c.env_remove(INJECT);
    c.args(["--model", model_dir("tiny.en").to_str().unwrap()]);
    c
}

fn words_hit(reference: &str, text: &str) -> usize {
    score(reference, text, Unit::Word).hits()
}

fn finals(events: &[Value]) -> Vec<&Value> {
    events.iter().filter(|e| e["type"] == "final").collect()
}

fn final_of(events: &[Value], segment: u64) -> &Value {
    finals(events)
        .into_iter()
        .find(|e| e["segment"] == segment)
        .unwrap_or_else(|| panic!("no final for segment {segment}: {events:#?}"))
}

/// Segments are numbered 0, 1, 2, … in order and each has exactly one final.
fn check_segments(events: &[Value]) {
    let starts: Vec<u64> = events
        .iter()
        .filter(|e| e["type"] == "speech_start")
        .map(|e| e["segment"].as_u64().unwrap())
        .collect();
    assert_eq!(
        starts,
        (0..starts.len() as u64).collect::<Vec<_>>(),
        "segments numbered in order"
    );
    let mut done: Vec<u64> = finals(events)
        .iter()
        .map(|e| e["segment"].as_u64().unwrap())
        .collect();
    done.sort();
    assert_eq!(done, starts, "one final per segment");
}

/// A WAV of `files` (from assets/) with `gap` seconds of silence after each.
fn joined_wav(dir: &Path, files: &[&str], gap: f64) -> std::path::PathBuf {
    let mut samples = Vec::new();
    for f in files {
        samples.extend(read_audio(&speech(f)));
        samples.extend(std::iter::repeat_n(0.0f32, (gap * 16_000.0) as usize));
    }
    let path = dir.join("joined.wav");
    write_wav(&path, &samples);
    path
}

/// Three utterances, one segment each: "ten of clubs", "go forward ten
/// meters", "i have a thousand thoughts about that thing".
const THREE: [&str; 3] = [
    "en_ps_cards_001.wav",
    "en_ps_goforward.wav",
    "en_mfa_thoughts.wav",
];

// ---------------------------------------------------------------------------
// A failed decode costs one segment.

/// The exit status after a failed segment is 1 (the transcript is
/// incomplete), but only after the whole input was transcribed.
#[test]
fn a_model_failure_on_one_segment_costs_only_that_segment() {
    let dir = tempfile::tempdir().unwrap();
    let wav = joined_wav(dir.path(), &THREE, 1.0);
    for kind in ["panic", "error"] {
        let out = bin()
            .env(INJECT, format!("{kind}:1"))
            .args(["--input", wav.to_str().unwrap(), "--format", "jsonl"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8(out.stdout).unwrap();
        let events: Vec<Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(out.status.code(), Some(1), "{kind}: {stderr}");
        assert!(
            stderr.contains("1 segment(s) could not be decoded"),
            "{kind}: {stderr}"
        );
        check_segments(&events);
        assert_eq!(finals(&events).len(), 3, "{kind}: {events:#?}");
        let failed = final_of(&events, 1);
        assert_eq!(failed["reason"], "error", "{kind}");
        assert_eq!(failed["text"], "", "{kind}");
        let error_at = events
            .iter()
            .position(|e| {
                e["type"] == "error" && e["message"].as_str().unwrap().contains("segment 1")
            })
            .unwrap_or_else(|| panic!("{kind}: no error event for segment 1"));
        let final_at = events.iter().position(|e| e == failed).unwrap();
        assert!(error_at < final_at, "{kind}: the error comes first");
        // The segments before and after are transcribed as usual.
        let first = final_of(&events, 0)["text"].as_str().unwrap();
        assert!(words_hit("ten of clubs", first) >= 2, "{kind}: {first:?}");
        let third = final_of(&events, 2);
        assert_ne!(third["reason"], "error");
        let text = third["text"].as_str().unwrap();
        assert!(
            words_hit("i have a thousand thoughts about that thing", text) >= 6,
            "{kind}: {text:?}"
        );
    }
}

#[test]
fn a_model_failure_in_one_session_leaves_the_others_alone() {
    let three = {
        let mut v = Vec::new();
        for f in THREE {
            v.extend(read_audio(&speech(f)));
            v.extend(std::iter::repeat_n(0.0f32, 16_000));
        }
        v
    };
    let other = {
        let mut v = read_audio(&speech("en_ps_librivox_0870.wav"));
        v.extend(std::iter::repeat_n(0.0f32, 16_000));
        v.extend(read_audio(&speech("en_ps_librivox_0880.wav")));
        v.extend(std::iter::repeat_n(0.0f32, 16_000));
        v
    };
    // The daemon is the only process that gets the variable: the first
    // session it starts (stream 0) fails on its segment 1. Every other
    // child of these tests has it removed.
    std::env::set_var(INJECT, "panic:1@0");
    let daemon = Daemon::spawn(&["serve", "127.0.0.1:0"]);
    std::env::remove_var(INJECT);
    let addr = daemon.addr;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (three_bytes, other_bytes) = (s16le(&three), s16le(&other));
    let ((faulty, faulty_close), (fine, fine_close)) = rt.block_on(async {
        // Started one after the other, so the faulty one is stream 0.
        let mut a = connect(addr, "/v1/audio").await;
        start_session(&mut a, start_msg(16_000, 1, "s16le", false)).await;
        let mut b = connect(addr, "/v1/audio").await;
        start_session(&mut b, start_msg(16_000, 1, "s16le", false)).await;
        tokio::join!(
            finish_session(a, &three_bytes, 3200),
            finish_session(b, &other_bytes, 3200)
        )
    });
    daemon.sigterm();
    let stderr = daemon.stderr();
    let (status, _) = daemon.wait();
    assert!(status.success(), "serve exited with {status:?}:\n{stderr}");

    // The faulty session: an error, an empty `error` final for segment 1,
    // and the segments around it as usual; it ends normally.
    assert_eq!(faulty_close.map(|f| f.code), Some(CloseCode::Normal));
    check_segments(&faulty);
    let failed = final_of(&faulty, 1);
    assert_eq!(failed["reason"], "error");
    assert_eq!(failed["text"], "");
    assert!(
        faulty
            .iter()
            .any(|e| e["type"] == "error" && e["message"].as_str().unwrap().contains("segment 1")),
        "no error for segment 1: {faulty:#?}"
    );
    let first = final_of(&faulty, 0)["text"].as_str().unwrap();
    assert!(words_hit("ten of clubs", first) >= 2, "{first:?}");
    let third = final_of(&faulty, 2)["text"].as_str().unwrap();
    assert!(
        words_hit("i have a thousand thoughts about that thing", third) >= 6,
        "{third:?}"
    );

    // The other session saw nothing of it.
    assert_eq!(fine_close.map(|f| f.code), Some(CloseCode::Normal));
    check_segments(&fine);
    assert!(!fine.iter().any(|e| e["type"] == "error"), "{fine:#?}");
    assert!(finals(&fine).iter().all(|e| e["reason"] != "error"));
    let reference = format!(
        "{} {}",
        reference("en_ps_librivox_0870"),
        reference("en_ps_librivox_0880")
    );
    let text = final_text(&fine);
    let wer = score(&reference, &text, Unit::Word).rate();
    assert!(wer <= 0.25, "WER {wer:.2} for {text:?}");
}

// ---------------------------------------------------------------------------
// The microphone goes away.

/// A PulseAudio of this test's own (`scripts/virtual-mic.sh` with a private
/// runtime directory), so that unloading its microphone disturbs nobody.
struct PrivatePulse {
    dir: tempfile::TempDir,
}

impl PrivatePulse {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pulse = Self { dir };
        let out = pulse.virtual_mic();
        assert!(
            out.contains("Default Source: virtmic.monitor"),
            "scripts/virtual-mic.sh did not set up the virtual microphone: {out}"
        );
        pulse
    }

    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        c.env("PULSE_RUNTIME_PATH", self.dir.path())
            .env("PULSE_STATE_PATH", self.dir.path().join("state"));
        c
    }

    /// Runs scripts/virtual-mic.sh (starts the daemon if needed, loads the
    /// virtual microphone); returns its output.
    fn virtual_mic(&self) -> String {
        let out = self
            .command(repo().join("scripts/virtual-mic.sh"))
            .output()
            .expect("scripts/virtual-mic.sh (needs pulseaudio and pulseaudio-utils)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "virtual-mic.sh failed: {text}");
        text
    }

    /// Removes the microphone: unloads the null sink whose monitor it is.
    fn unplug(&self) {
        let out = self
            .command("pactl")
            .args(["unload-module", "module-null-sink"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }

    fn play(&self, file: &str) -> Child {
        self.command("paplay")
            .arg("--device=virtmic")
            .arg(speech(file))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("paplay")
    }
}

impl Drop for PrivatePulse {
    fn drop(&mut self) {
        let _ = self
            .command("pulseaudio")
            .arg("--kill")
            .stderr(Stdio::null())
            .status();
    }
}

/// `stepaudio-live --mic` on a private PulseAudio, its events and stderr
/// collected as they come.
struct LiveMic {
    child: Child,
    events: mpsc::Receiver<Value>,
    seen: Vec<Value>,
    stderr: Arc<Mutex<String>>,
}

impl LiveMic {
    fn start(pulse: &PrivatePulse, extra: &[&str]) -> Self {
        let mut cmd = pulse.command(env!("CARGO_BIN_EXE_stepaudio-live"));
        cmd.env("STEPAUDIO_LIVE_TEST", "1")
            .env_remove(INJECT)
            .args(["--model", model_dir("tiny.en").to_str().unwrap()])
            .args(["--mic", "--format", "jsonl", "-v"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let (tx, events) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let v: Value =
                    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line}: {e}"));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let log = stderr.clone();
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut log = log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut mic = Self {
            child,
            events,
            seen: Vec::new(),
            stderr,
        };
        mic.wait_log("live transcription started");
        mic
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits (bounded) for an event that satisfies `pred`; returns it.
    fn wait_event(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(e) = self.seen.iter().find(|e| pred(e)) {
            return e.clone();
        }
        let deadline = Instant::now() + WAIT;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.events.recv_timeout(left) {
                Ok(e) => {
                    self.seen.push(e.clone());
                    if pred(&e) {
                        return e;
                    }
                }
                Err(_) => break,
            }
        }
        panic!(
            "no {what}; events: {:#?}\nstderr:\n{}",
            self.seen,
            self.stderr()
        );
    }

    /// Waits (bounded) for a line of stderr containing `needle`.
    fn wait_log(&mut self, needle: &str) {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if self.stderr().contains(needle) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("exited ({status:?}) before `{needle}`:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no `{needle}` on stderr:\n{}", self.stderr());
    }

    /// Waits (bounded) for the process to exit; returns its status and
    /// every event it printed.
    fn wait_exit(mut self) -> (ExitStatus, Vec<Value>, String) {
        let status = wait_child(&mut self.child, "stepaudio-live");
        // The reader thread ends with the pipe; take what is left.
        while let Ok(e) = self.events.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(e);
        }
        let stderr = self.stderr();
        (status, std::mem::take(&mut self.seen), stderr)
    }
}

impl Drop for LiveMic {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn wait_child(child: &mut Child, what: &str) -> ExitStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not exit");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

const JFK_START: &str = "and so my fellow americans";

/// Plays JFK into the microphone and removes the microphone 2.5 s into
/// the first segment ("And so my fellow Americans" is said by then).
fn unplug_mid_utterance(pulse: &PrivatePulse, mic: &mut LiveMic) {
    std::thread::sleep(Duration::from_millis(500));
    let mut player = pulse.play("en_jfk_ask_not.wav");
    mic.wait_event("speech_start", |e| e["type"] == "speech_start");
    std::thread::sleep(Duration::from_millis(2500));
    pulse.unplug();
    // paplay fails once its sink is gone.
    wait_child(&mut player, "paplay");
}

/// The loss is reported, and the words before it come out as the flushed
/// final of the segment that was open.
fn check_flushed_before_loss(events: &[Value]) -> f64 {
    let error_at = events
        .iter()
        .position(|e| {
            e["type"] == "error"
                && e["message"]
                    .as_str()
                    .unwrap()
                    .contains("audio source failed")
        })
        .expect("an error event for the lost microphone");
    let flushed = final_of(events, 0);
    assert_eq!(flushed["reason"], "flush", "{flushed}");
    let text = flushed["text"].as_str().unwrap();
    assert!(words_hit(JFK_START, text) >= 3, "flushed final {text:?}");
    let final_at = events.iter().position(|e| e == flushed).unwrap();
    assert!(error_at < final_at, "the error event comes first");
    flushed["end"].as_f64().unwrap()
}

#[test]
fn a_lost_microphone_is_reopened_and_the_stream_goes_on() {
    let pulse = PrivatePulse::start();
    let mut mic = LiveMic::start(&pulse, &[]);
    unplug_mid_utterance(&pulse, &mut mic);
    mic.wait_event("the flushed final", |e| {
        e["type"] == "final" && e["segment"] == 0
    });
    mic.wait_log("opening it again");
    pulse.virtual_mic();
    mic.wait_log("capture resumed");
    std::thread::sleep(Duration::from_millis(500));
    let mut player = pulse.play("en_mfa_thoughts.wav");
    wait_child(&mut player, "paplay");
    let thoughts = "i have a thousand thoughts about that thing";
    mic.wait_event("a final of the second utterance", |e| {
        e["type"] == "final"
            && e["segment"].as_u64() > Some(0)
            && words_hit(thoughts, e["text"].as_str().unwrap()) >= 5
    });
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(mic.child.id() as libc::pid_t, libc::SIGINT) };
    let (status, events, stderr) = mic.wait_exit();
    assert!(status.success(), "{status:?}:\n{stderr}");
    check_segments(&events);
    let lost_at = check_flushed_before_loss(&events);
    // Stream time and segment numbers go on from where the audio stopped.
    let after: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "speech_start" && e["segment"].as_u64() > Some(0))
        .collect();
    assert!(!after.is_empty());
    assert!(after
        .iter()
        .all(|e| e["start"].as_f64().unwrap() >= lost_at));
    assert!(
        stderr.contains("attempt"),
        "each attempt is logged:\n{stderr}"
    );
}

#[test]
fn with_no_reconnect_a_lost_microphone_ends_the_process() {
    let pulse = PrivatePulse::start();
    let mut mic = LiveMic::start(&pulse, &["--no-reconnect"]);
    unplug_mid_utterance(&pulse, &mut mic);
    let (status, events, stderr) = mic.wait_exit();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: the microphone failed (--no-reconnect"),
        "{stderr}"
    );
    check_segments(&events);
    check_flushed_before_loss(&events);
}
