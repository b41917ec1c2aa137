//! Audio-in sessions: a client sends `start`, binary audio frames and `end`,
//! and gets its own transcript events back.
//!
//! Each session runs its own [`StreamTracker`] (VAD, segmenter, incremental
//! mel) in its connection task; that work is small and bounded per frame.
//! Segment updates go to the shared stream engine, and the events it returns
//! arrive on a channel the task selects on next to the socket, so the task
//! never waits for the model: a busy model delays transcripts, not I/O.
//!
//! The engine keeps at most one partial per segment queued, so a session's
//! queue is essentially its finals not yet decoded. Only when that backlog
//! passes [`MAX_PENDING_UPDATES`] (minutes of speech: a client sending far
//! faster than real time, or a model far too slow for the load) does the
//! task stop reading that client's audio until the engine catches up; TCP
//! flow control then slows the client. Its events keep flowing meanwhile,
//! and other sessions are not affected. Below that, audio is always read at
//! once, so pings and closes are answered however busy the model is.

use super::protocol::{self, close, ClientMessage, ErrorCode, ProtocolError, ServerMessage, Start};
use super::subscribers::{close_message, send_with_timeout, Hub};
use crate::audio::resample::{downmix, StreamResampler};
use crate::audio::MODEL_SAMPLE_RATE;
use crate::model::RecognizerOptions;
use crate::stream::engine::{
    EngineHandle, EngineMsg, OpenError, StreamCounters, StreamEvent, StreamId, StreamInfo,
    StreamModel,
};
use crate::stream::events::{Event, Stats};
use crate::stream::tracker::{StreamTracker, TrackerConfig, TrackerOutput};
use crate::stream::usage::ProcessUsage;
use futures_util::{Sink, StreamExt};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// Updates of one session the engine may hold before the session stops
/// reading audio. Each holds its segment's mel (≤ 15 s: 480 KB for 80
/// bins), so this bounds a session's backlog to about 30 MB.
pub const MAX_PENDING_UPDATES: usize = 64;
/// How often a paused session looks whether the engine caught up.
const BACKPRESSURE_POLL: Duration = Duration::from_millis(20);

/// What every session needs from the server.
pub struct SessionEnv {
    pub engine: EngineHandle,
    pub hub: Arc<Hub>,
    pub tracker: TrackerConfig,
    pub recognizer: RecognizerOptions,
}

/// The client side of a session: sends fail softly, and after the first
/// failure nothing more is sent (the session still finishes its work).
struct Client<T> {
    tx: T,
    open: bool,
}

impl<T: Sink<Message> + Unpin> Client<T> {
    async fn send(&mut self, msg: Message) {
        if self.open && send_with_timeout(&mut self.tx, msg).await.is_err() {
            tracing::debug!("audio client stopped reading");
            self.open = false;
        }
    }

    async fn text(&mut self, text: String) {
        self.send(Message::text(text)).await
    }

    async fn error(&mut self, e: &ProtocolError) {
        self.text(protocol::error_json(e.code, &e.message)).await
    }

    async fn close(&mut self, code: CloseCode, reason: &str) {
        self.send(close_message(code, reason)).await;
        self.open = false;
    }
}

/// Resolves once the server starts shutting down.
pub(crate) async fn shutting_down(rx: &mut watch::Receiver<bool>) {
    // An error means the server is gone, which is a shutdown too.
    let _ = rx.wait_for(|&s| s).await;
}

/// Why reading stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    /// The client sent `end`.
    End,
    /// The client closed or the connection broke: flush, but nobody to tell.
    Gone,
    Shutdown,
    TooBig,
    /// The stream engine is gone.
    Internal,
}

struct Opened {
    start: Start,
    model: StreamInfo,
    events: mpsc::UnboundedReceiver<StreamEvent>,
    counters: Arc<StreamCounters>,
}

/// Runs one audio-in connection to its end.
/// `slot` (the session's place under the session limit) is released once
/// the session's last event is sent, before the close handshake, so a client
/// that has seen the close may open its next session at once.
pub async fn serve_session<S, Slot>(
    ws: WebSocketStream<S>,
    env: Arc<SessionEnv>,
    id: StreamId,
    hello: String,
    mut shutdown: watch::Receiver<bool>,
    slot: Slot,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (tx, mut rx) = ws.split();
    let mut client = Client { tx, open: true };
    client.text(hello).await;
    let Some(opened) = await_start(&mut client, &mut rx, &env, id, &mut shutdown).await else {
        return;
    };
    let Opened {
        start,
        model,
        mut events,
        counters,
    } = opened;
    let stream_name = format!("s{id}");
    let tracker_cfg = TrackerConfig {
        vad_mode: start.vad_mode.unwrap_or(env.tracker.vad_mode),
        ..env.tracker.clone()
    };
    let mut tracker =
        match StreamTracker::new(&tracker_cfg, model.frontend, model.max_segment_seconds) {
            Ok(t) => t,
            Err(e) => {
                let e = ProtocolError::new(ErrorCode::BadStart, e.to_string());
                client.error(&e).await;
                client.close(close::INTERNAL, "cannot set up the VAD").await;
                env.engine.send(EngineMsg::Close { id });
                return;
            }
        };
    let mut resampler = if start.sample_rate == MODEL_SAMPLE_RATE {
        None
    } else {
        match StreamResampler::new(start.sample_rate, MODEL_SAMPLE_RATE) {
            Ok(r) => Some(r),
            Err(e) => {
                let e = ProtocolError::new(ErrorCode::BadStart, e.to_string());
                client.error(&e).await;
                client
                    .close(close::INTERNAL, "cannot set up the resampler")
                    .await;
                env.engine.send(EngineMsg::Close { id });
                return;
            }
        }
    };
    tracing::info!(session = id, rate = start.sample_rate, channels = start.channels, publish = start.publish, model = %model.name, "audio session started");
    client
        .text(
            ServerMessage::Started {
                protocol: protocol::PROTOCOL_VERSION,
                session: &stream_name,
                sample_rate: start.sample_rate,
                channels: start.channels,
                format: start.format,
                publish: start.publish,
            }
            .to_json(),
        )
        .await;

    let mut out = Output {
        client,
        hub: start.publish.then(|| env.hub.clone()),
        stream: stream_name,
        seq: 0,
        segments: 0,
        finals: 0,
    };
    let started = Instant::now();
    let cpu_at_start = ProcessUsage::read().cpu_seconds;
    let mut samples_16k: u64 = 0;
    let mut interleaved = Vec::new();
    let mut outputs = Vec::new();
    let forward = |outputs: &mut Vec<TrackerOutput>, updates: &mut Vec<EngineMsg>| {
        let mut evs = Vec::new();
        for o in outputs.drain(..) {
            match o {
                TrackerOutput::Event(ev) => evs.push(ev),
                TrackerOutput::Update(update) => {
                    counters.pending.fetch_add(1, Ordering::Relaxed);
                    updates.push(EngineMsg::Update { id, update });
                }
                TrackerOutput::Resume { segment } => {
                    updates.push(EngineMsg::Resume { id, segment })
                }
            }
        }
        evs
    };
    let mut updates = Vec::new();

    let ending = loop {
        let reading = counters.pending.load(Ordering::Relaxed) < MAX_PENDING_UPDATES;
        tokio::select! {
            msg = rx.next(), if reading => {
                let msg = match msg {
                    None | Some(Ok(Message::Close(_))) => break Ending::Gone,
                    Some(Err(WsError::Capacity(e))) => {
                        let e = ProtocolError::new(ErrorCode::MessageTooBig, e.to_string());
                        out.client.error(&e).await;
                        break Ending::TooBig;
                    }
                    Some(Err(e)) => {
                        tracing::debug!(session = id, "audio connection failed: {e}");
                        break Ending::Gone;
                    }
                    Some(Ok(m)) => m,
                };
                match msg {
                    Message::Binary(bytes) => {
                        if let Err(e) = protocol::decode_audio(&bytes, start.format, start.channels, &mut interleaved) {
                            out.client.error(&e).await;
                            continue;
                        }
                        let mono = downmix(&interleaved, start.channels as usize);
                        let samples = match &mut resampler {
                            Some(r) => match r.push(&mono) {
                                Ok(s) => s,
                                Err(e) => {
                                    tracing::error!(session = id, "resampler failed: {e}");
                                    break Ending::Internal;
                                }
                            },
                            None => mono,
                        };
                        samples_16k += samples.len() as u64;
                        tracker.push(&samples, Instant::now(), &mut outputs);
                        let evs = forward(&mut outputs, &mut updates);
                        if !send_all(&env.engine, &mut updates) {
                            break Ending::Internal;
                        }
                        for ev in evs {
                            out.deliver(ev).await;
                        }
                    }
                    Message::Text(text) => match protocol::parse_client_message(&text) {
                        Ok(ClientMessage::End) => break Ending::End,
                        Ok(ClientMessage::Start(_)) => {
                            let e = ProtocolError::new(ErrorCode::AlreadyStarted, "this session is already started");
                            out.client.error(&e).await;
                        }
                        Err(e) => out.client.error(&e).await,
                    },
                    // Pings are answered by tungstenite itself.
                    _ => {}
                }
            }
            ev = events.recv() => match ev {
                Some(ev) => {
                    if out.engine_event(ev).await {
                        tracing::error!(session = id, "the engine closed the session early");
                        break Ending::Internal;
                    }
                }
                None => break Ending::Internal,
            },
            _ = shutting_down(&mut shutdown) => break Ending::Shutdown,
            _ = tokio::time::sleep(BACKPRESSURE_POLL), if !reading => {}
        }
    };

    // Finish the stream whatever ended it: the open segment becomes final
    // and reaches the client (if still there) and subscribers.
    if ending != Ending::Internal {
        if let Some(r) = &mut resampler {
            if let Ok(rest) = r.flush() {
                samples_16k += rest.len() as u64;
                tracker.push(&rest, Instant::now(), &mut outputs);
            }
        }
        tracker.finish(&mut outputs);
    }
    let evs = forward(&mut outputs, &mut updates);
    updates.push(EngineMsg::Close { id });
    let engine_alive = ending != Ending::Internal && send_all(&env.engine, &mut updates);
    for ev in evs {
        out.deliver(ev).await;
    }
    if engine_alive {
        while let Some(ev) = events.recv().await {
            if out.engine_event(ev).await {
                break;
            }
        }
    }
    let audio_seconds = samples_16k as f64 / MODEL_SAMPLE_RATE as f64;
    let wall = started.elapsed().as_secs_f64();
    let usage = ProcessUsage::read();
    let stats = Stats {
        audio_seconds,
        wall_seconds: wall,
        dropped_samples: 0,
        overflow_events: 0,
        skipped_partials: counters.skipped_partials.load(Ordering::Relaxed),
        segments: out.segments,
        finals: out.finals,
        model_rtf: if audio_seconds > 0.0 {
            counters.model_time().as_secs_f64() / audio_seconds
        } else {
            0.0
        },
        cpu_percent: if wall > 0.0 {
            (usage.cpu_seconds - cpu_at_start) / wall * 100.0
        } else {
            0.0
        },
        rss_mb: usage.rss_mb,
        peak_rss_mb: usage.peak_rss_mb,
    };
    out.deliver(Event::Stats(stats)).await;
    tracing::info!(
        session = id,
        ?ending,
        audio_s = audio_seconds,
        finals = out.finals,
        "audio session ended"
    );
    drop(slot);
    match ending {
        Ending::End => out.client.close(close::NORMAL, "session ended").await,
        Ending::Shutdown => {
            out.client
                .close(close::GOING_AWAY, "server shutting down")
                .await
        }
        Ending::TooBig => out.client.close(close::TOO_BIG, "message too big").await,
        Ending::Internal => {
            out.client
                .close(close::INTERNAL, "stream engine failed")
                .await
        }
        Ending::Gone => {}
    }
}

/// Hands queued messages to the engine; false if it is gone.
fn send_all(engine: &EngineHandle, updates: &mut Vec<EngineMsg>) -> bool {
    updates.drain(..).all(|m| engine.send(m))
}

/// Waits for a valid `start` and a recogniser for it; `None` when the
/// connection ends first.
async fn await_start<T, R>(
    client: &mut Client<T>,
    rx: &mut R,
    env: &SessionEnv,
    id: StreamId,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Opened>
where
    T: Sink<Message> + Unpin,
    R: futures_util::Stream<Item = Result<Message, WsError>> + Unpin,
{
    loop {
        let msg = tokio::select! {
            m = rx.next() => m,
            _ = shutting_down(shutdown) => {
                client.close(close::GOING_AWAY, "server shutting down").await;
                return None;
            }
        };
        let text = match msg {
            None | Some(Ok(Message::Close(_))) => return None,
            Some(Err(WsError::Capacity(e))) => {
                let e = ProtocolError::new(ErrorCode::MessageTooBig, e.to_string());
                client.error(&e).await;
                client.close(close::TOO_BIG, "message too big").await;
                return None;
            }
            Some(Err(_)) => return None,
            Some(Ok(Message::Binary(_))) => {
                let e = ProtocolError::new(
                    ErrorCode::NotStarted,
                    "audio before `start`; frame dropped",
                );
                client.error(&e).await;
                continue;
            }
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(_)) => continue,
        };
        let start = match protocol::parse_client_message(&text) {
            Ok(ClientMessage::Start(s)) => s,
            Ok(ClientMessage::End) => {
                client.close(close::NORMAL, "ended before start").await;
                return None;
            }
            Err(e) => {
                client.error(&e).await;
                continue;
            }
        };
        let mut options = env.recognizer.clone();
        if let Some(lang) = &start.language {
            options.language = Some(lang.clone());
        }
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let counters = Arc::new(StreamCounters::default());
        let open = EngineMsg::Open {
            id,
            model: StreamModel::Options(options),
            events: Box::new(move |ev| {
                let _ = events_tx.send(ev);
            }),
            counters: counters.clone(),
        };
        if !env.engine.send(open) {
            client
                .close(close::INTERNAL, "the stream engine failed")
                .await;
            return None;
        }
        match events.recv().await {
            Some(StreamEvent::Opened(Ok(model))) => {
                return Some(Opened {
                    start,
                    model,
                    events,
                    counters,
                })
            }
            Some(StreamEvent::Opened(Err(e @ OpenError::AtCapacity { .. }))) => {
                let e = ProtocolError::new(ErrorCode::TooManySessions, e.to_string());
                client.error(&e).await;
                client
                    .close(close::TRY_AGAIN_LATER, "the engine is at capacity")
                    .await;
                return None;
            }
            Some(StreamEvent::Opened(Err(e))) => {
                let e = ProtocolError::new(ErrorCode::BadStart, e.to_string());
                client.error(&e).await;
            }
            _ => {
                client
                    .close(close::INTERNAL, "the stream engine failed")
                    .await;
                return None;
            }
        }
    }
}

/// Where a session's events go: its client and, if it publishes, the subscribers.
/// Its stream ends (for the subscribers' replay) when it is dropped.
struct Output<T> {
    client: Client<T>,
    hub: Option<Arc<Hub>>,
    stream: String,
    /// The last event's number (the same on the subscription).
    seq: u64,
    segments: u64,
    finals: u64,
}

impl<T> Drop for Output<T> {
    fn drop(&mut self) {
        if let Some(hub) = &self.hub {
            hub.end_stream(&self.stream);
        }
    }
}

impl<T: Sink<Message> + Unpin> Output<T> {
    async fn deliver(&mut self, ev: Event) {
        match ev {
            Event::SpeechStart { .. } => self.segments += 1,
            Event::Final { .. } => self.finals += 1,
            _ => {}
        }
        self.seq = match &self.hub {
            Some(hub) => hub.publish(&self.stream, &ev),
            None => self.seq + 1,
        };
        self.client
            .text(protocol::session_event_json(&ev, self.seq))
            .await;
    }

    /// Delivers an engine event (a failed decode goes to the client as a
    /// `model_error`); true once the engine has closed the stream.
    async fn engine_event(&mut self, ev: StreamEvent) -> bool {
        match ev {
            StreamEvent::Event(Event::Error { message }) => {
                self.client
                    .error(&ProtocolError::new(ErrorCode::ModelError, message))
                    .await
            }
            StreamEvent::Event(ev) => self.deliver(ev).await,
            StreamEvent::Closed(_) => return true,
            StreamEvent::Opened(_) => {}
        }
        false
    }
}
