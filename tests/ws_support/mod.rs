//! Helpers for the WebSocket server tests: a daemon process that reports
//! its port, WebSocket clients, and reading the eval manifest.
#![allow(dead_code)]

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A liveness guard for waits in tests (not a performance limit): long
/// enough for a loaded 2-core machine, short enough that a hang fails.
pub const PATIENCE: Duration = Duration::from_secs(180);

/// `stepaudio-live` running with a server; learns the port from stderr.
pub struct Daemon {
    child: Child,
    pub addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
    stdout: Option<std::thread::JoinHandle<String>>,
}

impl Daemon {
    /// Starts the binary with `args` (plus `--model` tiny.en) and waits for
    /// its `listening on ws://ADDR` line.
    pub fn spawn(args: &[&str]) -> Daemon {
        let model = super::common::model_dir("tiny.en");
        let mut child = Command::new(env!("CARGO_BIN_EXE_stepaudio-live"))
            .args(args)
            .arg("--model")
            .arg(&model)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run the stepaudio-live binary");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        {
            let pipe = child.stderr.take().unwrap();
            let log = stderr.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let Some(rest) = line.split("listening on ws://").nth(1) {
                        let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                        let _ = tx.send(addr);
                    }
                    log.lock().unwrap().push_str(&line);
                    log.lock().unwrap().push('\n');
                }
            });
        }
        let mut out = child.stdout.take().unwrap();
        let stdout = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let addr = match rx.recv_timeout(PATIENCE) {
            Ok(a) => a.parse().expect("a socket address"),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "the daemon did not report its address; stderr:\n{}",
                    stderr.lock().unwrap()
                );
            }
        };
        Daemon {
            child,
            addr,
            stderr,
            stdout: Some(stdout),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn sigterm(&self) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for exit; returns the status and everything printed to stdout.
    pub fn wait(mut self) -> (ExitStatus, String) {
        let deadline = std::time::Instant::now() + PATIENCE;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the daemon did not exit; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let stdout = self.stdout.take().unwrap().join().unwrap();
        (status, stdout)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub async fn connect(addr: SocketAddr, path: &str) -> Ws {
    let url = format!("ws://{addr}{path}");
    let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    ws
}

/// Connecting that is expected to fail at the upgrade: the HTTP status.
pub async fn upgrade_status(
    addr: SocketAddr,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> u16 {
    let mut req = format!("ws://{addr}{path_and_query}")
        .into_client_request()
        .unwrap();
    for (k, v) in headers {
        let name = tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes())
            .expect("a header name");
        req.headers_mut()
            .insert(name, v.parse().expect("a header value"));
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("unexpected connection error: {e}"),
    }
}

/// The next text message as JSON; `None` once the connection ends.
pub async fn next_json(ws: &mut Ws) -> Option<Value> {
    loop {
        let msg = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("no message from the server in a long time")?;
        match msg {
            Ok(Message::Text(t)) => {
                return Some(serde_json::from_str(&t).expect("server messages are JSON"))
            }
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// Every text message until the server closes, and its close frame.
pub async fn until_close(ws: &mut Ws) -> (Vec<Value>, Option<CloseFrame>) {
    let mut out = Vec::new();
    loop {
        let msg = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("no message from the server in a long time");
        match msg {
            Some(Ok(Message::Text(t))) => {
                out.push(serde_json::from_str(&t).expect("server messages are JSON"))
            }
            Some(Ok(Message::Close(f))) => return (out, f),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return (out, None),
        }
    }
}

pub fn of_type<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == kind).collect()
}

pub fn final_text(events: &[Value]) -> String {
    of_type(events, "final")
        .iter()
        .map(|e| e["text"].as_str().unwrap())
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn s16le(samples: &[f32]) -> Vec<u8> {
    samples
        .iter()
        .flat_map(|s| ((s.clamp(-1.0, 1.0) * 32767.0).round() as i16).to_le_bytes())
        .collect()
}

pub fn f32le(samples: &[f32]) -> Vec<u8> {
    samples.iter().flat_map(|s| s.to_le_bytes()).collect()
}

/// Sends a start message and waits for `started`.
pub async fn start_session(ws: &mut Ws, start: Value) {
    let hello = next_json(ws).await.expect("hello");
    assert_eq!(hello["type"], "hello");
    assert_eq!(hello["protocol"], 1);
    ws.send(Message::text(start.to_string())).await.unwrap();
    let started = next_json(ws).await.expect("a reply to start");
    assert_eq!(started["type"], "started", "{started}");
}

/// Runs a whole audio-in session as fast as the server takes it: start,
/// `chunk`-byte frames of `bytes`, end. Returns every event and the close.
pub async fn run_session(
    addr: SocketAddr,
    start: Value,
    bytes: &[u8],
    chunk: usize,
) -> (Vec<Value>, Option<CloseFrame>) {
    let mut ws = connect(addr, "/v1/audio").await;
    start_session(&mut ws, start).await;
    finish_session(ws, bytes, chunk).await
}

/// The rest of a started session: `chunk`-byte frames of `bytes`, end;
/// returns every event and the close.
pub async fn finish_session(
    ws: Ws,
    bytes: &[u8],
    chunk: usize,
) -> (Vec<Value>, Option<CloseFrame>) {
    let (mut tx, mut rx) = ws.split();
    let frames: Vec<Vec<u8>> = bytes.chunks(chunk).map(|c| c.to_vec()).collect();
    let sender = tokio::spawn(async move {
        for f in frames {
            tx.send(Message::binary(f)).await.unwrap();
        }
        tx.send(Message::text(r#"{"type":"end"}"#)).await.unwrap();
        tx
    });
    let mut out = Vec::new();
    let close = loop {
        let msg = tokio::time::timeout(PATIENCE, rx.next())
            .await
            .expect("no message from the server in a long time");
        match msg {
            Some(Ok(Message::Text(t))) => out.push(serde_json::from_str(&t).unwrap()),
            Some(Ok(Message::Close(f))) => break f,
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break None,
        }
    };
    drop(sender.await.unwrap());
    (out, close)
}

pub fn start_msg(rate: u32, channels: u16, format: &str, publish: bool) -> Value {
    json!({
        "type": "start",
        "protocol": 1,
        "sample_rate": rate,
        "channels": channels,
        "format": format,
        "publish": publish,
    })
}

/// The reference transcript of an eval recording (manifest.tsv, by id).
pub fn reference(id: &str) -> String {
    let manifest = super::common::speech("manifest.tsv");
    let text = std::fs::read_to_string(&manifest)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", manifest.display()));
    text.lines()
        .map(|l| l.split('\t').collect::<Vec<_>>())
        .find(|cols| cols[0] == id)
        .and_then(|cols| cols.last().map(|s| s.to_string()))
        .unwrap_or_else(|| panic!("{id} is not in {}", manifest.display()))
}

/// Writes `samples` (16 kHz mono) as a 16-bit WAV.
pub fn write_wav(path: &Path, samples: &[f32]) {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 16_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for s in samples {
        w.write_sample((s.clamp(-1.0, 1.0) * 32767.0).round() as i16)
            .unwrap();
    }
    w.finalize().unwrap();
}

/// Recordings from assets/ joined with `gap_s` of silence after each
/// (16 kHz mono).
pub fn speech_playlist(ids: &[&str], gap_s: f32) -> Vec<f32> {
    let mut out = Vec::new();
    for id in ids {
        out.extend(super::common::read_audio(&super::common::speech(&format!(
            "{id}.wav"
        ))));
        out.extend(std::iter::repeat_n(0.0, (gap_s * 16_000.0) as usize));
    }
    out
}

/// Streams 16 kHz `samples` as s16le in 100 ms frames, `speed` times real
/// time, then `end`; the sender half of an audio-in session.
pub async fn send_paced<S>(tx: &mut S, samples: &[f32], speed: f64)
where
    S: futures_util::Sink<Message> + Unpin,
    S::Error: std::fmt::Debug,
{
    let start = tokio::time::Instant::now();
    for (i, chunk) in samples.chunks(1600).enumerate() {
        let due = start + Duration::from_secs_f64(i as f64 * 0.1 / speed);
        tokio::time::sleep_until(due).await;
        tx.send(Message::binary(s16le(chunk))).await.unwrap();
    }
    tx.send(Message::text(r#"{"type":"end"}"#)).await.unwrap();
}

/// Runs a publishing audio-in session of `samples` paced at `speed` times
/// real time; returns its events (after `started`) and its close.
pub async fn run_paced_session(
    addr: SocketAddr,
    samples: Vec<f32>,
    speed: f64,
) -> (Vec<Value>, Option<CloseFrame>) {
    let mut ws = connect(addr, "/v1/audio").await;
    start_session(&mut ws, start_msg(16_000, 1, "s16le", true)).await;
    let (mut tx, mut rx) = ws.split();
    let sender = tokio::spawn(async move {
        send_paced(&mut tx, &samples, speed).await;
        tx
    });
    let mut out = Vec::new();
    let close = loop {
        let msg = tokio::time::timeout(PATIENCE, rx.next())
            .await
            .expect("no message from the server in a long time");
        match msg {
            Some(Ok(Message::Text(t))) => out.push(serde_json::from_str(&t).unwrap()),
            Some(Ok(Message::Close(f))) => break f,
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break None,
        }
    };
    drop(sender.await.unwrap());
    (out, close)
}

/// (seq, segment, text) of every final in `events`.
pub fn finals_by_seq(events: &[Value]) -> Vec<(u64, u64, String)> {
    of_type(events, "final")
        .iter()
        .map(|e| {
            (
                e["seq"].as_u64().expect("finals carry seq"),
                e["segment"].as_u64().unwrap(),
                e["text"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}
