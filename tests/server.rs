//! The WebSocket server over loopback with real clients and real speech
//! (tiny.en): subscribers of a local source, concurrent audio-in sessions,
//! protocol errors and limits, the token and origin checks, the
//! slow-subscriber policy, and the flush on SIGTERM.

mod common;
mod ws_support;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;
use stepaudio_live::eval::wer::{normalize, score, Unit};
use stepaudio_live::model::LoadedModel;
use stepaudio_live::server::{Limits, Server, ServerConfig, ServerError};
use stepaudio_live::stream::events::Event;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use ws_support::*;

fn model() -> LoadedModel {
    common::tiny_en()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn config(limits: Limits) -> ServerConfig {
    ServerConfig {
        limits,
        model_name: "tiny.en".into(),
        ..ServerConfig::new("127.0.0.1:0")
    }
}

fn wer(reference: &str, hypothesis: &str) -> f64 {
    score(reference, hypothesis, Unit::Word).rate()
}

/// Finals are numbered 0, 1, 2, … with one final per speech_start.
fn assert_contiguous_finals(events: &[Value], what: &str) {
    let finals: Vec<u64> = of_type(events, "final")
        .iter()
        .map(|e| e["segment"].as_u64().unwrap())
        .collect();
    let starts = of_type(events, "speech_start").len();
    assert_eq!(
        finals,
        (0..starts as u64).collect::<Vec<_>>(),
        "{what}: finals out of order, lost or repeated"
    );
    assert!(!finals.is_empty(), "{what}: no final at all");
}

#[test]
fn subscribers_get_every_event_of_the_local_source() {
    let dir = tempfile::tempdir().unwrap();
    let speech = common::read_audio(&common::speech("en_ps_librivox_0930.wav"));
    // Leading silence leaves the subscribers time to join before the first word.
    let mut padded = vec![0.0f32; 24_000];
    padded.extend_from_slice(&speech);
    padded.extend(std::iter::repeat_n(0.0, 8_000));
    let wav = dir.path().join("speech.wav");
    write_wav(&wav, &padded);
    let daemon = Daemon::spawn(&[
        "--input",
        wav.to_str().unwrap(),
        "--realtime",
        "--format",
        "jsonl",
        "--ws",
        "127.0.0.1:0",
    ]);
    let addr = daemon.addr;
    let rt = runtime();
    let (a, b) = rt.block_on(async {
        let subscribe = || async move {
            let mut ws = connect(addr, "/v1/subscribe").await;
            let hello = next_json(&mut ws).await.unwrap();
            assert_eq!(hello["type"], "hello");
            assert_eq!(hello["protocol"], 1);
            assert_eq!(hello["path"], "/v1/subscribe");
            until_close(&mut ws).await
        };
        tokio::join!(subscribe(), subscribe())
    });
    let (status, stdout) = daemon.wait();
    assert!(status.success(), "exit {status:?}");
    let jsonl: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("jsonl on stdout"))
        .collect();
    for (events, close) in [a, b] {
        assert_eq!(close.map(|c| c.code), Some(CloseCode::Away));
        // Each event is the stdout line plus its stream and its number
        // (1, 2, 3, …), in the same order.
        let stripped: Vec<Value> = events
            .iter()
            .enumerate()
            .map(|(i, e)| {
                assert_eq!(e["stream"], "local", "{e}");
                assert_eq!(e["seq"], i as u64 + 1, "{e}");
                let mut e = e.clone();
                e.as_object_mut().unwrap().remove("stream");
                e.as_object_mut().unwrap().remove("seq");
                e
            })
            .collect();
        assert_eq!(stripped, jsonl, "subscriber events differ from stdout");
    }
    assert_contiguous_finals(&jsonl, "local source");
    let text = final_text(&jsonl);
    let w = wer(&reference("en_ps_librivox_0930"), &text);
    assert!(w <= 0.25, "WER {w:.2} for {text:?}");
}

#[test]
fn concurrent_sessions_each_get_their_own_transcript() {
    let server = Server::start(config(Limits::default()), model()).unwrap();
    let addr = server.local_addr();
    let rt = runtime();
    // A subscriber sees the session that publishes, and only that one.
    let mut sub = rt.block_on(connect(addr, "/v1/subscribe"));
    let subscriber = rt.spawn(async move { until_close(&mut sub).await });

    let jfk = common::read_audio(&common::speech("en_jfk_ask_not.wav"));
    let librivox = common::read_audio(&common::speech("en_ps_librivox_0870.wav"));
    // JFK goes in as 44.1 kHz stereo f32le: the server resamples and downmixes.
    let jfk_44k = stepaudio_live::audio::resample::resample(&jfk, 16_000, 44_100).unwrap();
    let jfk_stereo: Vec<f32> = jfk_44k.iter().flat_map(|&s| [s, s]).collect();
    let (jfk_bytes, librivox_bytes) = (f32le(&jfk_stereo), s16le(&librivox));
    let (a, b) = rt.block_on(async {
        tokio::join!(
            run_session(
                addr,
                start_msg(44_100, 2, "f32le", false),
                &jfk_bytes,
                4410 * 2 * 4,
            ),
            run_session(
                addr,
                start_msg(16_000, 1, "s16le", true),
                &librivox_bytes,
                3200,
            ),
        )
    });
    let summary = server.shutdown();
    assert_eq!(summary.unflushed_sessions, 0);
    let (sub_events, sub_close) = rt.block_on(subscriber).unwrap();

    for ((events, close), id, other_word) in [
        (&a, "en_jfk_ask_not", "dashwood"),
        (&b, "en_ps_librivox_0870", "americans"),
    ] {
        assert_eq!(
            close.as_ref().map(|c| c.code),
            Some(CloseCode::Normal),
            "{id}"
        );
        assert_contiguous_finals(events, id);
        let text = final_text(events);
        let w = wer(&reference(id), &text);
        assert!(w <= 0.15, "{id}: WER {w:.2} for {text:?}");
        assert!(
            !normalize(&text).contains(other_word),
            "{id}: the other session's words leaked in: {text:?}"
        );
        let stats = events.last().unwrap();
        assert_eq!(
            stats["type"], "stats",
            "{id}: the last event is the session's stats"
        );
        assert_eq!(stats["finals"], of_type(events, "final").len());
        assert!(stats.get("stream").is_none());
    }
    // The subscriber got exactly the publishing session's events.
    assert_eq!(sub_close.map(|c| c.code), Some(CloseCode::Away));
    assert_eq!(sub_events[0]["type"], "hello");
    let published = &sub_events[1..];
    assert!(published
        .iter()
        .all(|e| e["stream"] == "s2" || e["stream"] == "s1"));
    let streams: std::collections::HashSet<_> =
        published.iter().map(|e| e["stream"].clone()).collect();
    assert_eq!(streams.len(), 1, "only one session publishes");
    let strip = |evs: &[Value]| -> Vec<Value> {
        evs.iter()
            .map(|e| {
                let mut e = e.clone();
                e.as_object_mut().unwrap().remove("stream");
                e
            })
            .collect()
    };
    // `b` starts with hello and started, which are not published. Its own
    // events carry the same seq as the published ones.
    assert_eq!(strip(published), b.0[..].to_vec());
    for (i, e) in published.iter().enumerate() {
        assert_eq!(e["seq"], i as u64 + 1, "{e}");
    }
}

#[test]
fn protocol_errors_are_reported_and_the_session_goes_on() {
    let limits = Limits {
        max_sessions: 1,
        max_subscribers: 1,
        max_message_bytes: 64 * 1024,
        ..Limits::default()
    };
    let server = Server::start(config(limits), model()).unwrap();
    let addr = server.local_addr();
    let cards = common::read_audio(&common::speech("en_ps_cards_001.wav"));
    let rt = runtime();
    rt.block_on(async {
        let mut ws = connect(addr, "/v1/audio").await;
        assert_eq!(next_json(&mut ws).await.unwrap()["type"], "hello");
        async fn expect_error(ws: &mut Ws, msg: Message, code: &str) {
            ws.send(msg).await.unwrap();
            let e = next_json(ws).await.expect("an error event");
            assert_eq!(e["type"], "error", "{e}");
            assert_eq!(e["code"], code, "{e}");
            assert!(!e["message"].as_str().unwrap().is_empty());
        }
        expect_error(&mut ws, Message::text("{not json"), "bad_json").await;
        expect_error(&mut ws, Message::text("[1, 2]"), "bad_message").await;
        expect_error(
            &mut ws,
            Message::text(r#"{"type":"pause"}"#),
            "unknown_message",
        )
        .await;
        expect_error(&mut ws, Message::binary(vec![0u8; 320]), "not_started").await;
        let mut v2 = start_msg(16_000, 1, "s16le", false);
        v2["protocol"] = json!(2);
        expect_error(
            &mut ws,
            Message::text(v2.to_string()),
            "unsupported_protocol",
        )
        .await;
        let mut odd = start_msg(16_000, 1, "s16le", false);
        odd["colour"] = json!("red");
        expect_error(&mut ws, Message::text(odd.to_string()), "bad_start").await;
        let mut bad_lang = start_msg(16_000, 1, "s16le", false);
        bad_lang["language"] = json!("xx-not-a-language");
        expect_error(&mut ws, Message::text(bad_lang.to_string()), "bad_start").await;

        ws.send(Message::text(
            start_msg(16_000, 1, "s16le", false).to_string(),
        ))
        .await
        .unwrap();
        assert_eq!(next_json(&mut ws).await.unwrap()["type"], "started");
        let again = start_msg(16_000, 1, "s16le", false).to_string();
        expect_error(&mut ws, Message::text(again), "already_started").await;
        expect_error(&mut ws, Message::binary(vec![0u8; 321]), "bad_audio").await;

        // The limits: one session, one subscriber.
        let mut second = connect(addr, "/v1/audio").await;
        let (evs, close) = until_close(&mut second).await;
        assert_eq!(evs[0]["code"], "too_many_sessions", "{evs:?}");
        assert_eq!(close.map(|c| c.code), Some(CloseCode::Again));
        let mut sub = connect(addr, "/v1/subscribe").await;
        assert_eq!(next_json(&mut sub).await.unwrap()["type"], "hello");
        sub.send(Message::text("hello?")).await.unwrap();
        assert_eq!(
            next_json(&mut sub).await.unwrap()["code"],
            "unknown_message"
        );
        let mut sub2 = connect(addr, "/v1/subscribe").await;
        let (evs, close) = until_close(&mut sub2).await;
        assert_eq!(evs[0]["code"], "too_many_subscribers", "{evs:?}");
        assert_eq!(close.map(|c| c.code), Some(CloseCode::Again));

        // After all that, the session still transcribes.
        for chunk in s16le(&cards).chunks(3200) {
            ws.send(Message::binary(chunk.to_vec())).await.unwrap();
        }
        ws.send(Message::text(r#"{"type":"end"}"#)).await.unwrap();
        let (events, close) = until_close(&mut ws).await;
        assert_eq!(close.map(|c| c.code), Some(CloseCode::Normal));
        assert_contiguous_finals(&events, "cards");
        let text = normalize(&final_text(&events));
        assert!(text.contains("clubs"), "{text:?}");

        // A message over the limit ends the connection with 1009.
        let mut big = connect(addr, "/v1/audio").await;
        start_session(&mut big, start_msg(16_000, 1, "s16le", false)).await;
        big.send(Message::binary(vec![0u8; 100 * 1024]))
            .await
            .unwrap();
        let (evs, close) = until_close(&mut big).await;
        assert!(
            evs.iter().any(|e| e["code"] == "message_too_big"),
            "{evs:?}"
        );
        assert_eq!(close.map(|c| c.code), Some(CloseCode::Size));
    });

    // Plain HTTP on the same port.
    let get = |path: &str| -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let page = get("/");
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("<title>stepaudio-live captions</title>"));
    let health = get("/healthz");
    let body: Value = serde_json::from_str(health.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["protocol"], 1);
    assert!(get("/nothing-here").starts_with("HTTP/1.1 404"));
    assert!(get("/v1/audio").starts_with("HTTP/1.1 426"));
    server.shutdown();
}

#[test]
fn tokens_and_origins_are_checked_at_the_upgrade() {
    let open = |addr: &str, token: Option<&str>, insecure: bool| {
        Server::start(
            ServerConfig {
                addr: addr.into(),
                token: token.map(String::from),
                insecure,
                ..config(Limits::default())
            },
            model(),
        )
    };
    assert!(matches!(
        open("0.0.0.0:0", None, false),
        Err(ServerError::InsecureBind { .. })
    ));
    open("0.0.0.0:0", None, true).unwrap().shutdown();
    open("0.0.0.0:0", Some("s3cret"), false).unwrap().shutdown();

    let server = open("127.0.0.1:0", Some("s3cret"), false).unwrap();
    let addr = server.local_addr();
    let rt = runtime();
    rt.block_on(async {
        let origin_ok = format!("http://{addr}");
        // (path, query, extra headers, expected HTTP status)
        type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], u16);
        let cases: [Case; 8] = [
            ("/v1/subscribe", "", &[], 401),
            ("/v1/subscribe", "?token=wrong", &[], 401),
            ("/v1/audio", "", &[("Authorization", "Bearer nope")], 401),
            ("/v1/subscribe", "?token=s3cret", &[], 101),
            ("/v1/audio", "", &[("Authorization", "Bearer s3cret")], 101),
            (
                "/v1/subscribe",
                "?token=s3cret",
                &[("Origin", "https://evil.example")],
                403,
            ),
            (
                "/v1/subscribe",
                "?token=s3cret",
                &[("Origin", &origin_ok)],
                101,
            ),
            ("/v1/elsewhere", "?token=s3cret", &[], 404),
        ];
        for (path, query, headers, want) in cases {
            let got = upgrade_status(addr, &format!("{path}{query}"), headers).await;
            assert_eq!(got, want, "{path}{query} {headers:?}");
        }
    });
    server.shutdown();

    // The binary refuses a public address without --token, before serving.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stepaudio-live"))
        .args(["serve", "0.0.0.0:0", "--model"])
        .arg(common::model_dir("tiny.en"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--token"), "{stderr}");
}

/// A subscriber whose socket buffers are tiny and which does not read.
async fn stalled_subscriber(addr: SocketAddr) -> Ws {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    // A small receive buffer (set before connecting) stops window autotuning.
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/v1/subscribe"), stream)
        .await
        .unwrap();
    ws
}

#[test]
fn a_slow_subscriber_loses_partials_then_is_cut_off_but_never_slows_others() {
    let limits = Limits {
        subscriber_queue: 8,
        ..Limits::default()
    };
    let server = Server::start(config(limits), model()).unwrap();
    let addr = server.local_addr();
    let publisher = server.publisher();
    let rt = runtime();
    // The reading subscriber counts its finals, so that phase 2 can wait
    // for it on a loaded machine (it only keeps up when it gets the CPU).
    let (fast_count, fast_seen) = tokio::sync::watch::channel(0u64);
    let (mut slow, mut stuck, fast) = rt.block_on(async {
        let slow = stalled_subscriber(addr).await;
        let stuck = stalled_subscriber(addr).await;
        let mut fast = connect(addr, "/v1/subscribe").await;
        let fast = tokio::spawn(async move {
            let mut events = Vec::new();
            loop {
                let msg = tokio::time::timeout(PATIENCE, fast.next())
                    .await
                    .expect("no message from the server in a long time");
                match msg {
                    Some(Ok(Message::Text(t))) => {
                        let e: Value = serde_json::from_str(&t).unwrap();
                        if e["type"] == "final" {
                            fast_count.send_modify(|n| *n += 1);
                        }
                        events.push(e);
                    }
                    Some(Ok(Message::Close(f))) => return (events, f),
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return (events, None),
                }
            }
        });
        (slow, stuck, fast)
    });
    while server.subscribers() < 3 {
        std::thread::sleep(Duration::from_millis(10));
    }
    // 64 KB texts: a few MB fill the kernel buffers of the stalled sockets.
    let big = "w".repeat(64 * 1024);
    let partial = |segment: u64| Event::Partial {
        segment,
        text: big.clone(),
        committed: String::new(),
        start: 0.0,
        end: 1.0,
        latency_ms: 0.0,
    };
    let fin = |segment: u64| Event::Final {
        segment,
        text: format!("{segment} {big}"),
        start: 0.0,
        end: 1.0,
        latency_ms: 0.0,
        reason: "silence",
    };
    // Paced so that a reading subscriber keeps up; publishing itself never waits.
    let pace = || std::thread::sleep(Duration::from_millis(2));
    // Phase 1: mostly partials, a final every 50 events (fewer finals than
    // the queue holds, so nobody is cut off).
    let mut segment = 0;
    for i in 0..300 {
        if i % 50 == 49 {
            publisher.publish("test", &fin(segment));
            segment += 1;
        } else {
            publisher.publish("test", &partial(segment));
        }
        pace();
    }
    let phase1_finals = segment;
    // `slow` reads now: it has lost partials, and been told, but no final.
    let slow_events = rt.block_on(async {
        let mut got: Vec<Value> = Vec::new();
        while of_type(&got, "final").len() < phase1_finals as usize {
            got.push(
                next_json(&mut slow)
                    .await
                    .expect("slow subscriber still connected"),
            );
        }
        got
    });
    drop(slow);
    assert_eq!(slow_events[0]["type"], "hello");
    let dropped: u64 = of_type(&slow_events, "dropped")
        .iter()
        .map(|d| d["partials"].as_u64().unwrap())
        .sum();
    assert!(dropped > 0, "the stalled subscriber lost no partial?");
    let slow_finals: Vec<u64> = of_type(&slow_events, "final")
        .iter()
        .map(|e| e["segment"].as_u64().unwrap())
        .collect();
    assert_eq!(slow_finals, (0..phase1_finals).collect::<Vec<_>>());

    // Phase 2: only finals. `stuck` never reads, so its queue fills with
    // finals, which are never dropped: it is disconnected with 1008.
    // The reading one is never more than 4 finals behind (its queue holds 8).
    for _ in 0..200 {
        publisher.publish("test", &fin(segment));
        segment += 1;
        pace();
        let mut seen = fast_seen.clone();
        rt.block_on(async {
            tokio::time::timeout(PATIENCE, seen.wait_for(|&n| n + 4 >= segment))
                .await
                .expect("the reading subscriber stopped")
                .unwrap();
        });
    }
    let (stuck_events, stuck_close) = rt.block_on(until_close(&mut stuck));
    assert_eq!(stuck_close.map(|c| c.code), Some(CloseCode::Policy));
    let stuck_finals: Vec<u64> = of_type(&stuck_events, "final")
        .iter()
        .map(|e| e["segment"].as_u64().unwrap())
        .collect();
    // What it got before being cut off has no gaps.
    assert_eq!(
        stuck_finals,
        (0..stuck_finals.len() as u64).collect::<Vec<_>>()
    );
    assert!((stuck_finals.len() as u64) < segment);

    server.shutdown();
    let (fast_events, fast_close) = rt.block_on(fast).unwrap();
    assert_eq!(fast_close.map(|c| c.code), Some(CloseCode::Away));
    let fast_finals: Vec<u64> = of_type(&fast_events, "final")
        .iter()
        .map(|e| e["segment"].as_u64().unwrap())
        .collect();
    assert_eq!(
        fast_finals,
        (0..segment).collect::<Vec<_>>(),
        "the reading subscriber lost finals"
    );
}

/// Every event of a subscription until the server closes it; counts the
/// finals in `finals` as they come.
async fn follow(mut ws: Ws, finals: tokio::sync::watch::Sender<usize>) -> Vec<Value> {
    let mut events = Vec::new();
    while let Some(e) = next_json(&mut ws).await {
        if e["type"] == "final" {
            finals.send_modify(|n| *n += 1);
        }
        events.push(e);
    }
    events
}

#[test]
fn a_subscriber_that_reconnects_with_since_misses_and_repeats_no_final() {
    let server = Server::start(config(Limits::default()), model()).unwrap();
    let addr = server.local_addr();
    let rt = runtime();
    // About 34 s of speech in six recordings, sent at twice real time.
    let speech = speech_playlist(
        &[
            "en_ps_librivox_0870",
            "en_ps_librivox_0880",
            "en_ps_librivox_0890",
            "en_ps_librivox_0920",
            "en_ps_librivox_0930",
            "en_timit_ldc93s1",
        ],
        1.0,
    );
    let (count_tx, count_rx) = tokio::sync::watch::channel(0usize);
    let (steady, session, before, after) = rt.block_on(async {
        // One subscriber stays connected throughout.
        let steady = tokio::spawn(follow(connect(addr, "/v1/subscribe").await, count_tx));
        let mut ws = connect(addr, "/v1/subscribe").await;
        let hello = next_json(&mut ws).await.unwrap();
        let instance = hello["instance"].as_str().unwrap().to_string();
        assert_eq!(hello["streams"], json!({}), "nothing was published yet");
        let session = tokio::spawn(run_paced_session(addr, speech, 2.0));
        // The other leaves in the middle of the stream, right after its
        // first final: its `since` is that final's seq, the sharpest seam.
        let mut before = Vec::new();
        while before.last().is_none_or(|e: &Value| e["type"] != "final") {
            before.push(next_json(&mut ws).await.expect("live events"));
        }
        drop(ws); // no close handshake: a lost connection
        let last_seq = before.last().unwrap()["seq"].as_u64().unwrap();
        let seen = of_type(&before, "final").len();
        // Away while two more finals are published.
        let mut count = count_rx.clone();
        tokio::time::timeout(PATIENCE, count.wait_for(|&n| n >= seen + 2))
            .await
            .expect("two more finals")
            .unwrap();
        let ws = connect(
            addr,
            &format!("/v1/subscribe?since={last_seq}&instance={instance}"),
        )
        .await;
        let after = tokio::spawn(follow(ws, tokio::sync::watch::channel(0).0));
        let (session, close) = session.await.unwrap();
        assert_eq!(close.map(|c| c.code), Some(CloseCode::Normal));
        (steady, session, before, after)
    });
    server.shutdown();
    let steady = rt.block_on(steady).unwrap();
    let after = rt.block_on(after).unwrap();

    assert_eq!(steady[0]["type"], "hello");
    let steady = &steady[1..];
    for (i, e) in steady.iter().enumerate() {
        assert_eq!(e["seq"], i as u64 + 1, "{e}");
        assert_eq!(e["stream"], "s1", "{e}");
    }
    let want = finals_by_seq(steady);
    assert!(want.len() >= 5, "{want:?}");
    assert_eq!(of_type(steady, "speech_start").len(), want.len());
    assert_eq!(finals_by_seq(&session), want, "the session's own numbers");

    // Back: hello, the missed finals (no gap: all are kept), then live.
    assert_eq!(after[0]["type"], "hello");
    assert!(after[0]["streams"]["s1"].as_u64().unwrap() > 0);
    let after = &after[1..];
    assert!(of_type(after, "gap").is_empty(), "{after:?}");
    let replayed = after.iter().take_while(|e| e["replay"] == true).count();
    assert!(
        replayed >= 2,
        "the finals published while away are replayed"
    );
    assert!(after[replayed..].iter().all(|e| e.get("replay").is_none()));
    assert!(of_type(&after[..replayed], "final").len() == replayed);
    let last_seq = before.last().unwrap()["seq"].as_u64().unwrap();
    let seqs: Vec<u64> = after.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs[0] > last_seq, "{seqs:?}");
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "in order, no repeat at the seam: {seqs:?}"
    );
    let mut got = finals_by_seq(&before);
    got.extend(finals_by_seq(after));
    assert_eq!(got, want, "the reconnected subscriber's finals");
}

#[test]
fn kept_finals_and_ended_streams_are_bounded_and_losses_reported() {
    let limits = Limits {
        keep_finals: 2,
        keep_streams: 1,
        ..Limits::default()
    };
    let server = Server::start(config(limits), model()).unwrap();
    let addr = server.local_addr();
    let rt = runtime();
    let four = speech_playlist(
        &[
            "en_ps_librivox_0880",
            "en_timit_ldc93s1",
            "en_ps_librivox_0930",
            "en_ps_cards_005",
        ],
        1.0,
    );
    let jfk = common::read_audio(&common::speech("en_jfk_ask_not.wav"));
    rt.block_on(async {
        let (s1, close) = run_session(
            addr,
            start_msg(16_000, 1, "s16le", true),
            &s16le(&four),
            3200,
        )
        .await;
        assert_eq!(close.map(|c| c.code), Some(CloseCode::Normal));
        let s1 = finals_by_seq(&s1);
        let n = s1.len();
        assert!(n >= 3, "{s1:?}");

        // A subscriber asking for all of it gets the last two, and is told
        // of the others.
        let mut ws = connect(addr, "/v1/subscribe?since=0").await;
        let hello = next_json(&mut ws).await.unwrap();
        assert!(hello["streams"]["s1"].as_u64().unwrap() > s1[n - 1].0);
        let gap = next_json(&mut ws).await.unwrap();
        assert_eq!(
            gap,
            json!({"type": "gap", "stream": "s1", "from_seq": 1, "to_seq": s1[n - 3].0,
                   "finals": n - 2, "exact": true})
        );
        let mut replayed = Vec::new();
        for _ in 0..2 {
            let e = next_json(&mut ws).await.unwrap();
            assert_eq!(e["replay"], true, "{e}");
            replayed.push(e);
        }
        assert_eq!(finals_by_seq(&replayed), s1[n - 2..].to_vec());
        // Then nothing: no more is kept.
        assert!(
            tokio::time::timeout(Duration::from_millis(500), next_json(&mut ws))
                .await
                .is_err()
        );
        drop(ws);

        // A second stream ends: the first is forgotten (one ended stream is
        // remembered), but what a subscriber lost of it is still reported.
        let (s2, _) = run_session(
            addr,
            start_msg(16_000, 1, "s16le", true),
            &s16le(&jfk),
            3200,
        )
        .await;
        let s2 = finals_by_seq(&s2);
        assert!((1..=2).contains(&s2.len()), "{s2:?}");
        let deadline = std::time::Instant::now() + PATIENCE;
        let (mut ws, hello) = loop {
            let mut ws = connect(addr, "/v1/subscribe?since=s1:0,s2:0").await;
            let hello = next_json(&mut ws).await.unwrap();
            if hello["streams"].get("s1").is_none() {
                break (ws, hello);
            }
            assert!(std::time::Instant::now() < deadline, "s1 never forgotten");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(hello["streams"].as_object().unwrap().len(), 1, "{hello}");
        let gap = next_json(&mut ws).await.unwrap();
        assert_eq!(
            gap,
            json!({"type": "gap", "stream": "s1", "from_seq": 1, "to_seq": s1[n - 1].0,
                   "finals": n, "exact": true})
        );
        let mut replayed = Vec::new();
        for _ in 0..s2.len() {
            replayed.push(next_json(&mut ws).await.unwrap());
        }
        assert_eq!(finals_by_seq(&replayed), s2);

        // Numbers from another run of the server: everything kept instead.
        let mut ws = connect(addr, "/v1/subscribe?since=s2:999&instance=0000").await;
        let hello = next_json(&mut ws).await.unwrap();
        assert_ne!(hello["instance"], "0000");
        let mut replayed = Vec::new();
        for _ in 0..s2.len() {
            replayed.push(next_json(&mut ws).await.unwrap());
        }
        assert_eq!(finals_by_seq(&replayed), s2);
        assert_eq!(
            upgrade_status(addr, "/v1/subscribe?since=s1:x", &[]).await,
            400
        );
    });
    server.shutdown();
}

#[test]
fn sigterm_flushes_open_sessions_before_closing() {
    let daemon = Daemon::spawn(&["serve", "127.0.0.1:0"]);
    let addr = daemon.addr;
    let jfk = common::read_audio(&common::speech("en_jfk_ask_not.wav"));
    // 4.4 s: the speech is still going on, so the segment is open.
    let head = &jfk[..16_000 * 44 / 10];
    let rt = runtime();
    let (session, subscriber) = rt.block_on(async {
        let mut sub = connect(addr, "/v1/subscribe").await;
        assert_eq!(next_json(&mut sub).await.unwrap()["type"], "hello");
        let mut ws = connect(addr, "/v1/audio").await;
        start_session(&mut ws, start_msg(16_000, 1, "s16le", true)).await;
        for chunk in s16le(head).chunks(3200) {
            ws.send(Message::binary(chunk.to_vec())).await.unwrap();
        }
        loop {
            let e = next_json(&mut ws).await.expect("events");
            if e["type"] == "speech_start" {
                break;
            }
        }
        // The rest of the audio is a few ms of work behind speech_start.
        tokio::time::sleep(Duration::from_millis(500)).await;
        daemon.sigterm();
        tokio::join!(until_close(&mut ws), until_close(&mut sub))
    });
    let (status, _) = daemon.wait();
    assert!(status.success(), "exit {status:?}");
    for (what, (events, close)) in [("session", session), ("subscriber", subscriber)] {
        assert_eq!(close.map(|c| c.code), Some(CloseCode::Away), "{what}");
        let finals = of_type(&events, "final");
        assert_eq!(finals.len(), 1, "{what}: {events:?}");
        assert_eq!(finals[0]["reason"], "flush", "{what}");
        let text = normalize(finals[0]["text"].as_str().unwrap());
        assert!(text.contains("fellow americans"), "{what}: {text:?}");
    }
}

/// A session that starts when the stream engine is at capacity gets
/// `too_many_sessions` and close 1013 (the server's own session limit is
/// higher); the session already running is unaffected, and once it ends a
/// new one is taken. The health endpoint shows the engine's numbers.
#[test]
fn sessions_past_the_engines_capacity_are_refused() {
    let config = ServerConfig {
        engine: Some(stepaudio_live::stream::engine::EngineConfig {
            max_streams: 1,
            ..Default::default()
        }),
        ..config(Limits::default())
    };
    let server = Server::start(config, model()).unwrap();
    let addr = server.local_addr();
    let cards = s16le(&common::read_audio(&common::speech("en_ps_cards_001.wav")));
    runtime().block_on(async {
        let mut first = connect(addr, "/v1/audio").await;
        start_session(&mut first, start_msg(16_000, 1, "s16le", false)).await;
        let mut second = connect(addr, "/v1/audio").await;
        assert_eq!(next_json(&mut second).await.unwrap()["type"], "hello");
        second
            .send(Message::text(
                start_msg(16_000, 1, "s16le", false).to_string(),
            ))
            .await
            .unwrap();
        let (evs, close) = until_close(&mut second).await;
        assert_eq!(evs[0]["code"], "too_many_sessions", "{evs:?}");
        assert!(
            evs[0]["message"].as_str().unwrap().contains("capacity"),
            "{evs:?}"
        );
        assert_eq!(close.map(|c| c.code), Some(CloseCode::Again));
        let (events, close) = finish_session(first, &cards, 3200).await;
        assert_eq!(close.map(|c| c.code), Some(CloseCode::Normal));
        assert!(normalize(&final_text(&events)).contains("clubs"));
        let (events, _) =
            run_session(addr, start_msg(16_000, 1, "s16le", false), &cards, 3200).await;
        assert!(normalize(&final_text(&events)).contains("clubs"));
    });
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let body: Value = serde_json::from_str(out.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["engine"]["capacity"], 1, "{body}");
    assert_eq!(body["engine"]["refused"], 1, "{body}");
    server.shutdown();
}
