//! The WebSocket server: live transcript events for subscribers, audio-in
//! sessions for clients that send their own audio, and the captions page,
//! all on one port.
//!
//! ```text
//!  local source (run_live) ─updates─► stream engine ─events─► caller ─publish──┐
//!                                                                              ▼
//!  /v1/audio sessions ─updates─► stream engine ─events─► session ─► Hub ─► /v1/subscribe
//!   (tokio tasks: VAD, mel)      (one thread for         task        (bounded queue
//!                                 every stream, batches)             per subscriber)
//! ```
//!
//! The server runs on its own tokio runtime, so the CLI's synchronous live
//! pipeline can publish into it from its own thread. `docs/protocol.md`
//! describes what clients see.

pub mod http;
pub mod protocol;
pub mod sessions;
pub mod subscribers;

use crate::model::{LoadedModel, RecognizerOptions};
use crate::stream::engine::{self, EngineConfig, EngineHandle};
use crate::stream::events::Event;
use crate::stream::tracker::TrackerConfig;
use sessions::SessionEnv;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use subscribers::Hub;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

pub const DEFAULT_ADDR: &str = "127.0.0.1:8765";

/// A client has this long to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// On shutdown, how long open sessions get to flush their finals (the model
/// may have a queue to work through), and subscribers to take them.
const SESSION_FLUSH_TIMEOUT: Duration = Duration::from_secs(120);
const SUBSCRIBER_DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Clone, Debug)]
pub struct Limits {
    pub max_sessions: usize,
    pub max_subscribers: usize,
    /// Largest WebSocket message (and frame) a client may send, in bytes.
    pub max_message_bytes: usize,
    /// Events queued per subscriber before its partials are dropped.
    pub subscriber_queue: usize,
    /// Finals kept per stream for subscribers that reconnect with `since`.
    pub keep_finals: usize,
    /// Streams whose finals are kept after they end (the oldest ended
    /// stream is forgotten first).
    pub keep_streams: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_sessions: 8,
            max_subscribers: 100,
            max_message_bytes: 1 << 20,
            subscriber_queue: 256,
            keep_finals: 1000,
            keep_streams: 16,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// `host:port`; port 0 picks a free one (see [`Server::local_addr`]).
    pub addr: String,
    /// Required from every WebSocket client when set.
    pub token: Option<String>,
    /// Allow a non-loopback address without a token.
    pub insecure: bool,
    /// Page origins (besides this server's own) allowed to connect; `*` for any.
    pub allowed_origins: Vec<String>,
    pub limits: Limits,
    /// VAD and segmenting of audio-in sessions.
    pub tracker: TrackerConfig,
    /// How audio-in sessions' recognisers are made (a session's `start` may
    /// override the language and encoder context).
    pub recognizer: RecognizerOptions,
    /// Model name for `hello` messages and the health endpoint.
    pub model_name: String,
    /// The stream engine a server started with [`Server::start`] runs
    /// (`None`: [`EngineConfig::for_model`]).
    pub engine: Option<EngineConfig>,
}

impl ServerConfig {
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            token: None,
            insecure: false,
            allowed_origins: Vec::new(),
            limits: Limits::default(),
            tracker: TrackerConfig::default(),
            recognizer: RecognizerOptions::default(),
            model_name: String::new(),
            engine: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "refusing to listen on {addr}: it is not a loopback address, so anyone who can reach \
         it could listen in; give --token SECRET (clients then send it), or --insecure"
    )]
    InsecureBind { addr: String },
    #[error("cannot resolve listen address {addr}: {source}")]
    Resolve {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot start the server: {0}")]
    Start(std::io::Error),
}

/// Counts running connection tasks of one kind, so that shutdown can wait
/// for them (and the session limit be enforced on the same count).
struct TaskCount(watch::Sender<usize>);

/// One running task; leaving decrements the count.
struct TaskGuard(Arc<TaskCount>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0 .0.send_modify(|n| *n -= 1);
    }
}

impl TaskCount {
    fn new() -> Arc<Self> {
        Arc::new(Self(watch::channel(0).0))
    }

    /// Enters unless `max` tasks are running.
    fn try_enter(self: &Arc<Self>, max: usize) -> Option<TaskGuard> {
        self.0
            .send_if_modified(|n| {
                let room = *n < max;
                if room {
                    *n += 1;
                }
                room
            })
            .then(|| TaskGuard(self.clone()))
    }

    fn current(&self) -> usize {
        *self.0.borrow()
    }

    async fn all_done(&self) {
        let _ = self.0.subscribe().wait_for(|&n| n == 0).await;
    }
}

/// State shared by every connection task.
struct Shared {
    config: ServerConfig,
    hub: Arc<Hub>,
    sessions: Arc<SessionEnv>,
    session_tasks: Arc<TaskCount>,
    subscriber_tasks: Arc<TaskCount>,
    next_session: AtomicU64,
    shutdown: watch::Receiver<bool>,
    ws_config: WebSocketConfig,
}

/// Publishes events of a source that is not an audio-in session (the local
/// `--mic`/`--input`/`--stdin` source) to the subscribers. Never blocks.
#[derive(Clone)]
pub struct Publisher {
    hub: Arc<Hub>,
}

impl Publisher {
    /// Sends `event` of `stream`; returns its `seq` (1, 2, 3, … per stream).
    pub fn publish(&self, stream: &str, event: &Event) -> u64 {
        self.hub.publish(stream, event)
    }

    /// `stream` publishes no more: its finals are kept until
    /// `keep_streams` other streams have ended after it.
    pub fn end(&self, stream: &str) {
        self.hub.end_stream(stream);
    }
}

/// What a shutdown found.
#[derive(Clone, Debug, Default)]
pub struct ShutdownSummary {
    /// Sessions that had not finished flushing when the wait ran out.
    pub unflushed_sessions: usize,
    pub events_published: u64,
}

/// A running server.
pub struct Server {
    runtime: tokio::runtime::Runtime,
    local_addr: SocketAddr,
    hub: Arc<Hub>,
    shared: Arc<Shared>,
    shutdown_tx: watch::Sender<bool>,
    /// The engine thread, when the server started its own.
    engine: Option<std::thread::JoinHandle<()>>,
}

fn is_loopback(addrs: &[SocketAddr]) -> bool {
    !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback())
}

impl Server {
    /// Binds `config.addr` and starts serving; sessions are streams of a
    /// new engine over `model`.
    pub fn start(config: ServerConfig, model: LoadedModel) -> Result<Self, ServerError> {
        let engine_config = config
            .engine
            .clone()
            .unwrap_or_else(|| EngineConfig::for_model(&model));
        let (engine, thread) = engine::spawn(model, engine_config).map_err(ServerError::Start)?;
        Self::start_on(config, engine, Some(thread))
    }

    /// As [`Self::start`], with sessions as streams of a running `engine`
    /// (shared with the local source); `thread` is joined at shutdown.
    pub fn start_on(
        config: ServerConfig,
        engine: EngineHandle,
        thread: Option<std::thread::JoinHandle<()>>,
    ) -> Result<Self, ServerError> {
        use std::net::ToSocketAddrs;
        let addrs: Vec<SocketAddr> = config
            .addr
            .to_socket_addrs()
            .map_err(|source| ServerError::Resolve {
                addr: config.addr.clone(),
                source,
            })?
            .collect();
        if !is_loopback(&addrs) && config.token.is_none() && !config.insecure {
            return Err(ServerError::InsecureBind {
                addr: config.addr.clone(),
            });
        }
        if !is_loopback(&addrs) && config.token.is_none() {
            tracing::warn!(addr = %config.addr, "listening beyond loopback without a token (--insecure)");
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ws-server")
            .enable_all()
            .build()
            .map_err(ServerError::Start)?;
        // Bound with std so that `start` may be called from any thread,
        // inside an async context or not.
        let bind_err = |source| ServerError::Bind {
            addr: config.addr.clone(),
            source,
        };
        let std_listener = std::net::TcpListener::bind(&addrs[..]).map_err(bind_err)?;
        std_listener.set_nonblocking(true).map_err(bind_err)?;
        let listener = {
            let _context = runtime.enter();
            TcpListener::from_std(std_listener).map_err(bind_err)?
        };
        let local_addr = listener.local_addr().map_err(ServerError::Start)?;
        let hub = Arc::new(
            Hub::new(
                config.limits.max_subscribers,
                config.limits.subscriber_queue,
            )
            .retaining(config.limits.keep_finals, config.limits.keep_streams),
        );
        let (shutdown_tx, shutdown) = watch::channel(false);
        let ws_config = WebSocketConfig::default()
            .max_message_size(Some(config.limits.max_message_bytes))
            .max_frame_size(Some(config.limits.max_message_bytes));
        let shared = Arc::new(Shared {
            sessions: Arc::new(SessionEnv {
                engine,
                hub: hub.clone(),
                tracker: config.tracker.clone(),
                recognizer: config.recognizer.clone(),
            }),
            config,
            hub: hub.clone(),
            session_tasks: TaskCount::new(),
            subscriber_tasks: TaskCount::new(),
            next_session: AtomicU64::new(1),
            shutdown,
            ws_config,
        });
        runtime.spawn(accept_loop(listener, shared.clone()));
        tracing::info!(addr = %local_addr, "WebSocket server listening");
        Ok(Self {
            runtime,
            local_addr,
            hub,
            shared,
            shutdown_tx,
            engine: thread,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn publisher(&self) -> Publisher {
        Publisher {
            hub: self.hub.clone(),
        }
    }

    pub fn subscribers(&self) -> usize {
        self.hub.len()
    }

    pub fn active_sessions(&self) -> usize {
        self.shared.session_tasks.current()
    }

    /// Stops accepting, lets every open session flush its final, delivers
    /// what subscribers have queued, closes every connection with 1001 and
    /// stops its own stream engine. Call after the local source (if any) has
    /// delivered its last event, and not from within an async context (it
    /// blocks until the server is down).
    pub fn shutdown(self) -> ShutdownSummary {
        let Server {
            runtime,
            hub,
            shared,
            shutdown_tx,
            engine,
            ..
        } = self;
        let _ = shutdown_tx.send(true);
        let mut summary = ShutdownSummary::default();
        runtime.block_on(async {
            let open = shared.session_tasks.current();
            if open > 0 {
                tracing::info!(sessions = open, "flushing open sessions");
            }
            if tokio::time::timeout(SESSION_FLUSH_TIMEOUT, shared.session_tasks.all_done())
                .await
                .is_err()
            {
                summary.unflushed_sessions = shared.session_tasks.current();
                tracing::warn!(
                    sessions = summary.unflushed_sessions,
                    "open sessions did not finish flushing in time"
                );
            }
            hub.close();
            if tokio::time::timeout(SUBSCRIBER_DRAIN_TIMEOUT, shared.subscriber_tasks.all_done())
                .await
                .is_err()
            {
                tracing::warn!("subscribers did not take their last events in time");
            }
        });
        summary.events_published = hub.published();
        // Connections still in their first request are dropped with the runtime.
        runtime.shutdown_timeout(Duration::from_secs(1));
        // An engine of our own ends once the last handle (in the session
        // env, which only `shared` and finished tasks held) is gone.
        drop(shared);
        if engine.is_some_and(|t| t.join().is_err()) {
            tracing::error!("the stream engine panicked");
        }
        summary
    }
}

/// Runs `stepaudio-live serve`: serves until `stop` is raised, then shuts
/// down cleanly. `on_listening` learns the bound address first.
pub fn run_serve(
    config: ServerConfig,
    model: LoadedModel,
    stop: Arc<AtomicBool>,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<ShutdownSummary, ServerError> {
    let server = Server::start(config, model)?;
    on_listening(server.local_addr());
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
    }
    tracing::info!("stopping the server");
    Ok(server.shutdown())
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(handle_connection(stream, peer, shared.clone()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = sessions::shutting_down(&mut shutdown) => break,
        }
    }
}

fn hello(shared: &Shared, path: &str, streams: Option<&BTreeMap<String, u64>>) -> String {
    protocol::ServerMessage::Hello {
        protocol: protocol::PROTOCOL_VERSION,
        server: concat!("stepaudio-live/", env!("CARGO_PKG_VERSION")),
        model: &shared.config.model_name,
        path,
        instance: shared.hub.instance(),
        streams,
    }
    .to_json()
}

/// The finals a subscriber asks to have replayed: `since` (see
/// [`subscribers::Since`]) and `instance`, the server run its numbers come
/// from. Numbers from another run mean nothing here, so the subscriber gets
/// every kept final instead.
fn subscription_since(
    head: &http::RequestHead,
    shared: &Shared,
) -> Result<Option<subscribers::Since>, String> {
    let Some(text) = head.query_param("since") else {
        return Ok(None);
    };
    let since = subscribers::Since::parse(&text)?;
    match head.query_param("instance") {
        Some(i) if i != shared.hub.instance() => Ok(Some(subscribers::Since::everything())),
        _ => Ok(Some(since)),
    }
}

async fn handle_connection(mut stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let head = match tokio::time::timeout(HEAD_TIMEOUT, http::read_head(&mut stream)).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            tracing::debug!(%peer, "bad request: {e}");
            let status = match e {
                http::HeadError::TooLarge => 431,
                _ => 400,
            };
            let _ = http::respond_text(&mut stream, status, &format!("{e}\n")).await;
            return;
        }
        Err(_) => return,
    };
    if !head.is_websocket_upgrade() {
        serve_http(stream, &head, &shared).await;
        return;
    }
    let path = head.path.as_str();
    if path != protocol::SUBSCRIBE_PATH && path != protocol::AUDIO_PATH {
        let _ = http::respond_text(&mut stream, 404, "no WebSocket endpoint at this path\n").await;
        return;
    }
    if !http::origin_allowed(&head, &shared.config.allowed_origins) {
        tracing::info!(%peer, origin = head.header("origin"), "WebSocket from a foreign origin refused");
        let _ = http::respond_text(&mut stream, 403, "origin not allowed\n").await;
        return;
    }
    if !http::authorized(&head, shared.config.token.as_deref()) {
        tracing::info!(%peer, "WebSocket without a valid token refused");
        let _ = http::respond(
            &mut stream,
            401,
            "text/plain; charset=utf-8",
            "WWW-Authenticate: Bearer\r\n",
            "a valid token is required (Authorization: Bearer TOKEN or ?token=TOKEN)\n",
        )
        .await;
        return;
    }
    let since = if path == protocol::SUBSCRIBE_PATH {
        match subscription_since(&head, &shared) {
            Ok(s) => s,
            Err(why) => {
                let _ = http::respond_text(&mut stream, 400, &format!("{why}\n")).await;
                return;
            }
        }
    } else {
        None
    };
    let response = match http::upgrade_response(&head) {
        Ok(r) => r,
        Err(why) => {
            let _ = http::respond_text(&mut stream, 400, &format!("{why}\n")).await;
            return;
        }
    };
    use tokio::io::AsyncWriteExt;
    if stream.write_all(response.as_bytes()).await.is_err() {
        return;
    }
    let ws = WebSocketStream::from_partially_read(
        stream,
        head.rest.clone(),
        Role::Server,
        Some(shared.ws_config),
    )
    .await;
    if path == protocol::SUBSCRIBE_PATH {
        // The hub enforces the subscriber limit; this count is for shutdown.
        let _guard = shared.subscriber_tasks.try_enter(usize::MAX);
        subscribers::serve_subscriber(ws, shared.hub.clone(), since, |streams| {
            hello(&shared, path, Some(streams))
        })
        .await;
    } else {
        serve_audio(ws, peer, &shared).await;
    }
}

async fn serve_audio(mut ws: WebSocketStream<TcpStream>, peer: SocketAddr, shared: &Arc<Shared>) {
    use futures_util::SinkExt;
    let max = shared.config.limits.max_sessions;
    let Some(slot) = shared.session_tasks.try_enter(max) else {
        tracing::info!(%peer, "audio session refused: {max} sessions open");
        let msg = format!("{max} sessions are open, the limit; try again later");
        let _ = ws
            .send(tokio_tungstenite::tungstenite::Message::text(
                protocol::error_json(protocol::ErrorCode::TooManySessions, &msg),
            ))
            .await;
        let _ = ws
            .send(subscribers::close_message(
                protocol::close::TRY_AGAIN_LATER,
                "too many sessions",
            ))
            .await;
        return;
    };
    let id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    sessions::serve_session(
        ws,
        shared.sessions.clone(),
        id,
        hello(shared, protocol::AUDIO_PATH, None),
        shared.shutdown.clone(),
        slot,
    )
    .await;
}

async fn serve_http(mut stream: TcpStream, head: &http::RequestHead, shared: &Shared) {
    if head.method != "GET" {
        let _ = http::respond(
            &mut stream,
            405,
            "text/plain; charset=utf-8",
            "Allow: GET\r\n",
            "only GET\n",
        )
        .await;
        return;
    }
    let _ = match head.path.as_str() {
        "/" | "/index.html" => {
            http::respond(&mut stream, 200, "text/html; charset=utf-8", "", http::PAGE).await
        }
        protocol::HEALTH_PATH => {
            let body = serde_json::json!({
                "status": "ok",
                "protocol": protocol::PROTOCOL_VERSION,
                "model": shared.config.model_name,
                "sessions": shared.session_tasks.current(),
                "engine": shared.sessions.engine.stats(),
                "subscribers": shared.hub.len(),
            })
            .to_string();
            http::respond(&mut stream, 200, "application/json", "", &body).await
        }
        protocol::SUBSCRIBE_PATH | protocol::AUDIO_PATH => {
            http::respond_text(&mut stream, 426, "this path takes WebSocket connections\n").await
        }
        _ => http::respond_text(&mut stream, 404, "not found\n").await,
    };
}
