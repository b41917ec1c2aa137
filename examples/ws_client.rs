//! A WebSocket client for `stepaudio-live --ws` / `stepaudio-live serve`.
//!
//! Follow the live captions (one line per final, or every event as JSON):
//!
//!     cargo run --example ws_client -- subscribe [--url ws://127.0.0.1:8765] [--events]
//!
//! Stream a WAV file as an audio-in session and print its events (sent as
//! the file's own rate and channels, so the server resamples and downmixes):
//!
//!     cargo run --example ws_client -- stream FILE.wav [--realtime] [--chunk-ms 100]
//!         [--format s16le|f32le] [--publish] [--lang en] [--events]
//!
//! `--token SECRET` for servers started with `--token`.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
struct Cli {
    /// Server address.
    #[arg(long, global = true, default_value = "ws://127.0.0.1:8765")]
    url: String,
    /// Token for servers started with --token.
    #[arg(long, global = true)]
    token: Option<String>,
    /// Print every event as a JSON line instead of only final texts.
    #[arg(long, global = true)]
    events: bool,
    #[command(subcommand)]
    command: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Follow the server's subscription.
    Subscribe,
    /// Send a WAV file as an audio-in session.
    Stream {
        file: PathBuf,
        /// Pace the audio like a live source (default: as fast as the server takes it).
        #[arg(long)]
        realtime: bool,
        /// Audio per binary frame.
        #[arg(long, default_value_t = 100)]
        chunk_ms: u32,
        /// Sample format on the wire.
        #[arg(long, default_value = "s16le", value_parser = ["s16le", "f32le"])]
        format: String,
        /// Let subscribers see this session's events too.
        #[arg(long)]
        publish: bool,
        /// Spoken language (multilingual models).
        #[arg(long)]
        lang: Option<String>,
    },
}

async fn connect(
    cli: &Cli,
    path: &str,
) -> anyhow::Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
> {
    let url = format!("{}{path}", cli.url.trim_end_matches('/'));
    let mut request = url.as_str().into_client_request()?;
    if let Some(t) = &cli.token {
        request.headers_mut().insert(
            "Authorization",
            HeaderValue::from_str(&format!("Bearer {t}"))?,
        );
    }
    let (ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    Ok(ws)
}

/// Prints one server message; returns it parsed.
fn show(cli: &Cli, text: &str) -> Option<Value> {
    let v: Value = serde_json::from_str(text).ok()?;
    if cli.events {
        println!("{text}");
    } else {
        match v["type"].as_str() {
            Some("final") => {
                let t = v["text"].as_str().unwrap_or("");
                if !t.is_empty() {
                    match v["stream"].as_str() {
                        Some(s) => println!("[{s}] {t}"),
                        None => println!("{t}"),
                    }
                }
            }
            Some("error") => eprintln!("server error ({}): {}", v["code"], v["message"]),
            Some("dropped") => eprintln!("too slow: {} partial(s) dropped", v["partials"]),
            _ => {}
        }
    }
    Some(v)
}

async fn subscribe(cli: &Cli) -> anyhow::Result<()> {
    let mut ws = connect(cli, "/v1/subscribe").await?;
    print_until_close(cli, &mut ws).await
}

/// Shows every event until the server closes the connection.
async fn print_until_close<S>(cli: &Cli, incoming: &mut S) -> anyhow::Result<()>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    while let Some(msg) = incoming.next().await {
        match msg? {
            Message::Text(t) => {
                show(cli, &t);
            }
            Message::Close(frame) => {
                eprintln!("closed: {frame:?}");
                break;
            }
            _ => {}
        }
    }
    Ok(())
}

async fn stream(
    cli: &Cli,
    file: &Path,
    realtime: bool,
    chunk_ms: u32,
    format: &str,
    publish: bool,
    lang: Option<String>,
) -> anyhow::Result<()> {
    let audio = stepaudio_live::audio::wav::decode_wav(file)?;
    let ws = connect(cli, "/v1/audio").await?;
    let (mut tx, mut rx) = ws.split();
    let mut start = json!({
        "type": "start",
        "protocol": 1,
        "sample_rate": audio.sample_rate,
        "channels": audio.channels,
        "format": format,
        "publish": publish,
    });
    if let Some(l) = lang {
        start["language"] = json!(l);
    }
    tx.send(Message::text(start.to_string())).await?;
    // Wait for `started` (or the reason it was refused).
    loop {
        match rx.next().await {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t)?;
                match v["type"].as_str() {
                    Some("started") => break,
                    Some("error") => bail!("server refused the session: {}", v["message"]),
                    _ => {}
                }
            }
            Some(Ok(Message::Close(f))) => bail!("closed before start: {f:?}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => bail!("connection ended before start"),
        }
    }
    let frames_per_chunk =
        (audio.sample_rate as usize * chunk_ms as usize / 1000).max(1) * audio.channels as usize;
    let chunks: Vec<Vec<u8>> = audio
        .samples
        .chunks(frames_per_chunk)
        .map(|c| match format {
            "f32le" => c.iter().flat_map(|s| s.to_le_bytes()).collect(),
            _ => c
                .iter()
                .flat_map(|s| ((s.clamp(-1.0, 1.0) * 32767.0).round() as i16).to_le_bytes())
                .collect(),
        })
        .collect();
    let sender = tokio::spawn(async move {
        let t0 = Instant::now();
        for (i, chunk) in chunks.into_iter().enumerate() {
            if realtime {
                let due = t0 + Duration::from_millis(i as u64 * chunk_ms as u64);
                tokio::time::sleep_until(due.into()).await;
            }
            tx.send(Message::binary(chunk)).await?;
        }
        tx.send(Message::text(r#"{"type":"end"}"#)).await?;
        anyhow::Ok(tx)
    });
    print_until_close(cli, &mut rx).await?;
    drop(sender.await??);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Mode::Subscribe => subscribe(&cli).await,
        Mode::Stream {
            file,
            realtime,
            chunk_ms,
            format,
            publish,
            lang,
        } => {
            stream(
                &cli,
                file,
                *realtime,
                *chunk_ms,
                format,
                *publish,
                lang.clone(),
            )
            .await
        }
    }
}
