//! The captions page in a real headless Chromium, driven over the DevTools
//! protocol: the page connects to the subscription, real speech goes in as
//! an audio-in session, and the page's DOM must show exactly the session's
//! finals. A screenshot is kept as a test artefact. The page must also
//! reconnect after the server restarts, and lose no final across a reload
//! or while it is away.
//!
//! Needs Chromium: `apt-get install chromium` (Debian/Ubuntu), or point
//! `STEPAUDIO_LIVE_CHROMIUM` at a Chrome/Chromium binary. Without it the
//! test fails; it never skips.

mod common;
mod ws_support;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use stepaudio_live::eval::wer::normalize;
use tokio_tungstenite::tungstenite::Message;
use ws_support::*;

fn chromium_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("STEPAUDIO_LIVE_CHROMIUM") {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ] {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "Chromium is needed for the captions page test and was not found on PATH.\n\
         Install it: `sudo apt-get install -y chromium` (Debian/Ubuntu; `chromium-browser` on \
         some releases), or set STEPAUDIO_LIVE_CHROMIUM=/path/to/chrome."
    );
}

struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    devtools_port: u16,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn launch(url: &str) -> Browser {
    let binary = chromium_binary();
    let profile = tempfile::tempdir().unwrap();
    let child = Command::new(&binary)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--no-default-browser-check",
            "--mute-audio",
            "--window-size=1280,720",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
    let mut browser = Browser {
        child,
        _profile: profile,
        devtools_port: 0,
    };
    // Chromium writes the port it chose into the profile.
    let port_file = browser._profile.path().join("DevToolsActivePort");
    let deadline = Instant::now() + PATIENCE;
    browser.devtools_port = loop {
        if let Some(port) = std::fs::read_to_string(&port_file)
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse().ok()))
        {
            break port;
        }
        if let Ok(Some(status)) = browser.child.try_wait() {
            panic!("{} exited at startup: {status}", binary.display());
        }
        assert!(
            Instant::now() < deadline,
            "Chromium opened no DevTools port"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    browser
}

/// The body of a GET to Chromium's DevTools HTTP endpoint (which keeps the
/// connection open, so the body is read by its length).
fn http_get(port: u16, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (head_end, length) = loop {
        let n = s.read(&mut chunk).expect("DevTools HTTP response");
        assert!(n > 0, "DevTools closed the connection");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .expect("DevTools responses have a Content-Length");
            break (i + 4, length);
        }
    };
    while buf.len() < head_end + length {
        let n = s.read(&mut chunk).expect("DevTools HTTP body");
        assert!(n > 0, "DevTools closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&buf[head_end..head_end + length]).into_owned()
}

/// The DevTools WebSocket URL of the tab showing `page_url`.
fn page_target(devtools_port: u16, page_url: &str) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let body = http_get(devtools_port, "/json/list");
        if let Ok(Value::Array(targets)) = serde_json::from_str::<Value>(&body) {
            if let Some(t) = targets.iter().find(|t| {
                t["type"] == "page" && t["url"].as_str().is_some_and(|u| u.starts_with(page_url))
            }) {
                return t["webSocketDebuggerUrl"].as_str().unwrap().to_string();
            }
        }
        assert!(Instant::now() < deadline, "no tab shows {page_url}: {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Cdp {
    ws: Ws,
    next_id: u64,
}

impl Cdp {
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"id": id, "method": method, "params": params});
        self.ws.send(Message::text(msg.to_string())).await.unwrap();
        loop {
            let m = tokio::time::timeout(PATIENCE, self.ws.next())
                .await
                .expect("DevTools did not answer")
                .expect("DevTools connection closed")
                .unwrap();
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(&t).unwrap();
            // Protocol events (no id) are not answers.
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method} failed: {v}");
                return v["result"].clone();
            }
        }
    }

    async fn eval(&mut self, expression: &str) -> Value {
        self.try_eval(expression)
            .await
            .unwrap_or_else(|r| panic!("{expression}: {r}"))
    }

    /// The value, or the whole answer when the expression threw.
    async fn try_eval(&mut self, expression: &str) -> Result<Value, Value> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await;
        match r.get("exceptionDetails") {
            Some(_) => Err(r),
            None => Ok(r["result"]["value"].clone()),
        }
    }

    /// Evaluates `expression` until `ok` holds for its value.
    async fn wait_for(&mut self, expression: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            // While the page is still loading (no body yet, or a navigation
            // replacing the context) the expression may throw: that is "not
            // yet", not a failure, until the deadline.
            let v = self.try_eval(expression).await.unwrap_or_else(|r| r);
            if ok(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "the page never satisfied the wait on `{expression}`; last value {v}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let clean: Vec<u8> = s.bytes().filter(|&c| c != b'=' && c != b'\n').collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &c)| acc | value(c) << (18 - 6 * i));
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..chunk.len() - 1]);
    }
    out
}

const FINALS_TEXT: &str = "Array.from(document.querySelectorAll('#finals .final'))\
                           .map(p => p.textContent).join(' ')";

#[test]
fn the_captions_page_shows_live_finals_and_reconnects() {
    let daemon = Daemon::spawn(&["serve", "127.0.0.1:0"]);
    let addr = daemon.addr;
    let page_url = format!("http://{addr}/");
    let browser = launch(&page_url);
    let target = page_target(browser.devtools_port, &page_url);
    let jfk = common::read_audio(&common::speech("en_jfk_ask_not.wav"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (session_finals, screenshot, mut cdp) = rt.block_on(async {
        let (ws, _) = tokio_tungstenite::connect_async(target.as_str())
            .await
            .expect("DevTools connection");
        let mut cdp = Cdp { ws, next_id: 0 };
        // The page connects to the subscription by itself.
        cdp.wait_for("document.body.dataset.state", |v| v == "live")
            .await;

        let (events, _) = run_session(
            addr,
            start_msg(16_000, 1, "s16le", true),
            &s16le(&jfk),
            3200,
        )
        .await;
        let finals = final_text(&events);
        let spoken = normalize(&finals);
        assert!(
            spoken.contains("ask not what your country can do for you"),
            "{finals:?}"
        );
        // The page shows what the session produced, final for final.
        let want = normalize(&finals);
        cdp.wait_for(FINALS_TEXT, |v| {
            v.as_str().is_some_and(|t| normalize(t) == want)
        })
        .await;
        let shot = cdp
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let png = base64_decode(shot["data"].as_str().unwrap());
        (finals, png, cdp)
    });
    assert!(!session_finals.is_empty());
    assert_eq!(&screenshot[1..4], b"PNG", "the screenshot is a PNG");
    let artefact = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("captions_page.png");
    std::fs::write(&artefact, &screenshot).unwrap();
    println!("captions page screenshot: {}", artefact.display());

    // Restart the server on the same address: the page reconnects.
    daemon.sigterm();
    let (status, _) = daemon.wait();
    assert!(status.success());
    rt.block_on(cdp.wait_for("document.body.dataset.state", |v| v == "closed"));
    let again = Daemon::spawn(&["serve", &addr.to_string()]);
    rt.block_on(cdp.wait_for("document.body.dataset.state", |v| v == "live"));
    // What was on screen stays on screen across the reconnect.
    let shown = rt.block_on(cdp.eval(FINALS_TEXT));
    assert_eq!(
        normalize(shown.as_str().unwrap()),
        normalize(&session_finals)
    );
    again.sigterm();
    assert!(again.wait().0.success());
    drop(browser);
}

/// Marks the current document, so that [`NEW_PAGE_LIVE`] can tell a new
/// one (after a reload or navigation) from it.
async fn mark_document(cdp: &mut Cdp) {
    cdp.eval("window.__old_document = true").await;
}

/// True once a document loaded after [`mark_document`] is connected.
const NEW_PAGE_LIVE: &str =
    "window.__old_document === undefined && document.body.dataset.state === 'live'";

#[test]
fn the_captions_page_loses_no_final_across_a_reload_or_while_away() {
    let daemon = Daemon::spawn(&["serve", "127.0.0.1:0"]);
    let addr = daemon.addr;
    // Enough lines on screen for every final of the run.
    let page_url = format!("http://{addr}/?lines=100");
    let browser = launch(&page_url);
    let target = page_target(browser.devtools_port, &page_url);
    // About 38 s of speech in seven recordings, at 1.5 times real time.
    let speech = speech_playlist(
        &[
            "en_ps_librivox_0870",
            "en_ps_librivox_0880",
            "en_ps_librivox_0890",
            "en_jfk_ask_not",
            "en_ps_librivox_0920",
            "en_ps_librivox_0930",
            "en_timit_ldc93s1",
        ],
        1.0,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let shown_count = "document.querySelectorAll('#finals .final').length";
    let (session_events, shown) = rt.block_on(async {
        let (ws, _) = tokio_tungstenite::connect_async(target.as_str())
            .await
            .expect("DevTools connection");
        let mut cdp = Cdp { ws, next_id: 0 };
        cdp.wait_for("document.body.dataset.state", |v| v == "live")
            .await;
        // A plain subscriber counts the finals as they are published.
        let (count_tx, count) = tokio::sync::watch::channel(0usize);
        let mut observer = connect(addr, "/v1/subscribe").await;
        tokio::spawn(async move {
            while let Some(e) = next_json(&mut observer).await {
                if e["type"] == "final" && e["text"] != "" {
                    count_tx.send_modify(|n| *n += 1);
                }
            }
        });
        let session = tokio::spawn(run_paced_session(addr, speech, 1.5));

        // A reload once the first line is on screen: the lines shown so far
        // come back, and what was published meanwhile is replayed.
        cdp.wait_for(shown_count, |v| v.as_u64().is_some_and(|n| n >= 1))
            .await;
        mark_document(&mut cdp).await;
        cdp.call("Page.reload", json!({})).await;
        cdp.wait_for(NEW_PAGE_LIVE, |v| v == true).await;
        let after_reload = cdp.eval(shown_count).await.as_u64().unwrap();
        assert!(
            after_reload >= 1,
            "the lines shown before the reload are gone"
        );

        // Away (another page in the tab) while two more lines are published.
        let mut published = count.clone();
        let seen = *published.borrow();
        cdp.call("Page.navigate", json!({"url": "about:blank"}))
            .await;
        tokio::time::timeout(PATIENCE, published.wait_for(|&n| n >= seen + 2))
            .await
            .expect("two more finals")
            .unwrap();
        cdp.call("Page.navigate", json!({ "url": page_url })).await;
        cdp.wait_for(NEW_PAGE_LIVE, |v| v == true).await;

        let (events, close) = session.await.unwrap();
        assert!(close.is_some());
        let want = normalize(&final_text(&events));
        let lines = of_type(&events, "final")
            .iter()
            .filter(|e| e["text"] != "")
            .count() as u64;
        // Every line, once, in order.
        cdp.wait_for(FINALS_TEXT, |v| {
            v.as_str().is_some_and(|t| normalize(t) == want)
        })
        .await;
        assert_eq!(cdp.eval(shown_count).await.as_u64(), Some(lines));
        (events, cdp.eval(FINALS_TEXT).await)
    });
    assert!(of_type(&session_events, "final").len() >= 5);
    println!("page after a reload and an absence: {shown}");
    daemon.sigterm();
    assert!(daemon.wait().0.success());
    drop(browser);
}
