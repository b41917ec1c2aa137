//! The model worker: one thread that owns the model's compute for every
//! audio-in session. Sessions hand it segment updates; it keeps each
//! session's recogniser (own committed context over the shared weights) and
//! [`SegmentDecoder`], takes one job per session in turn (round-robin, so a
//! session that floods the queue cannot starve the others), drops queued
//! partials as soon as newer audio of the same segment arrives, and never
//! drops a final. Results go back on each session's own channel; nothing here ever
//! waits for a socket.

use crate::model::recognizer::{FrontendSpec, Recognizer};
use crate::model::{LoadedModel, RecognizerOptions};
use crate::stream::decoder::SegmentDecoder;
use crate::stream::events::Event;
use crate::stream::tracker::{SegmentUpdate, UpdateKind};
use crossbeam_channel::{Receiver, Sender};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;

pub type SessionId = u64;

pub enum WorkerMsg {
    /// Make a recogniser for a new session; answered with [`WorkerEvent::Opened`].
    Open {
        id: SessionId,
        options: RecognizerOptions,
        events: UnboundedSender<WorkerEvent>,
        /// Updates queued for this session and not yet taken; the session
        /// increments it, the worker decrements it.
        pending: Arc<AtomicUsize>,
    },
    Update {
        id: SessionId,
        update: SegmentUpdate,
    },
    Resume {
        id: SessionId,
        segment: u64,
    },
    /// The session has sent its last update: answered with
    /// [`WorkerEvent::Closed`] once everything before it is decoded.
    Close {
        id: SessionId,
    },
}

/// What a new session needs to know to build its stream tracker.
#[derive(Clone, Debug)]
pub struct SessionModel {
    pub name: String,
    pub frontend: FrontendSpec,
    pub max_segment_seconds: f64,
}

#[derive(Clone, Debug, Default)]
pub struct SessionModelStats {
    pub model_time: Duration,
    pub skipped_partials: u64,
    pub finals: u64,
}

#[derive(Debug)]
pub enum WorkerEvent {
    Opened(Result<SessionModel, String>),
    Event(Event),
    /// Decoding a segment failed; the session goes on.
    ModelError(String),
    Closed(SessionModelStats),
}

enum Job {
    Update(SegmentUpdate),
    Resume(u64),
    Close,
}

struct Session {
    recognizer: Box<dyn Recognizer>,
    decoder: SegmentDecoder,
    jobs: VecDeque<Job>,
    events: UnboundedSender<WorkerEvent>,
    pending: Arc<AtomicUsize>,
    skipped_partials: u64,
}

pub struct Worker {
    model: LoadedModel,
    sessions: HashMap<SessionId, Session>,
    /// Round-robin order of the sessions.
    order: VecDeque<SessionId>,
}

/// Starts the worker thread; it ends when every sender is gone and all
/// queued work is done.
pub fn spawn(
    model: LoadedModel,
) -> std::io::Result<(Sender<WorkerMsg>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let handle = std::thread::Builder::new()
        .name("model-worker".into())
        .spawn(move || Worker::new(model).run(rx))?;
    Ok((tx, handle))
}

impl Worker {
    pub fn new(model: LoadedModel) -> Self {
        Self {
            model,
            sessions: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    pub fn run(mut self, rx: Receiver<WorkerMsg>) {
        loop {
            if !self.has_work() {
                match rx.recv() {
                    Ok(m) => self.accept(m),
                    Err(_) => break,
                }
            }
            // Take in everything queued, so that staleness is judged against
            // the newest audio and a new session joins the rotation at once.
            while let Ok(m) = rx.try_recv() {
                self.accept(m);
            }
            self.step();
        }
        tracing::debug!("model worker stopped");
    }

    fn has_work(&self) -> bool {
        self.sessions.values().any(|s| !s.jobs.is_empty())
    }

    fn accept(&mut self, msg: WorkerMsg) {
        match msg {
            WorkerMsg::Open {
                id,
                options,
                events,
                pending,
            } => {
                // Opening is done at once, ahead of queued decodes: it is cheap
                // for Whisper, and a Step-Audio 2 prefill is needed before the
                // session can produce anything.
                match self.model.recognizer(&options) {
                    Ok(recognizer) => {
                        let info = SessionModel {
                            name: recognizer.name(),
                            frontend: recognizer.frontend(),
                            max_segment_seconds: recognizer.max_segment_seconds(),
                        };
                        let _ = events.send(WorkerEvent::Opened(Ok(info)));
                        self.sessions.insert(
                            id,
                            Session {
                                recognizer,
                                decoder: SegmentDecoder::new(),
                                jobs: VecDeque::new(),
                                events,
                                pending,
                                skipped_partials: 0,
                            },
                        );
                        self.order.push_back(id);
                    }
                    Err(e) => {
                        let _ = events.send(WorkerEvent::Opened(Err(e.to_string())));
                    }
                }
            }
            WorkerMsg::Update { id, update } => self.enqueue(id, Job::Update(update)),
            WorkerMsg::Resume { id, segment } => self.enqueue(id, Job::Resume(segment)),
            WorkerMsg::Close { id } => self.enqueue(id, Job::Close),
        }
    }

    fn enqueue(&mut self, id: SessionId, job: Job) {
        let Some(s) = self.sessions.get_mut(&id) else {
            tracing::warn!(session = id, "job for an unknown session dropped");
            return;
        };
        // A queued partial or pause decode is stale once newer audio of its
        // segment arrives: drop it now, so that a session's queue holds at
        // most one of them per segment (plus finals, never dropped) and its
        // pending count measures real work.
        if let Job::Update(new) = &job {
            let before = s.jobs.len();
            s.jobs.retain(|j| {
                !matches!(j, Job::Update(u) if u.segment == new.segment
                    && matches!(u.kind, UpdateKind::Partial | UpdateKind::Pause))
            });
            let stale = before - s.jobs.len();
            s.skipped_partials += stale as u64;
            s.pending.fetch_sub(stale, Ordering::Relaxed);
        }
        s.jobs.push_back(job);
    }

    /// Does one job of the next session (in rotation) that has any.
    fn step(&mut self) {
        for _ in 0..self.order.len() {
            let id = self.order.pop_front().expect("order is not empty");
            self.order.push_back(id);
            let Some(session) = self.sessions.get_mut(&id) else {
                continue;
            };
            let Some(job) = session.jobs.pop_front() else {
                continue;
            };
            match job {
                Job::Resume(segment) => session.decoder.resume(segment),
                Job::Update(update) => {
                    session.pending.fetch_sub(1, Ordering::Relaxed);
                    Self::decode(id, session, update);
                }
                Job::Close => {
                    let s = self.sessions.remove(&id).expect("session present");
                    self.order.retain(|&o| o != id);
                    let _ = s.events.send(WorkerEvent::Closed(SessionModelStats {
                        model_time: s.decoder.model_time,
                        skipped_partials: s.skipped_partials,
                        finals: s.decoder.finals,
                    }));
                }
            }
            return;
        }
    }

    fn decode(id: SessionId, session: &mut Session, update: SegmentUpdate) {
        let events = &session.events;
        // A failed decode (an error or a panic in the model, caught by the
        // decoder) comes as an error event, which goes to the client as a
        // `model_error`, and, for a final, a final with reason `error`; the
        // session and every other one go on.
        let emit = |ev| {
            let _ = events.send(match ev {
                Event::Error { message, .. } => WorkerEvent::ModelError(message),
                ev => WorkerEvent::Event(ev),
            });
        };
        if let Err(failure) =
            session
                .decoder
                .handle_and_emit(&update, session.recognizer.as_mut(), emit)
        {
            tracing::error!(session = id, "decoding failed: {failure}");
        }
    }
}
