//! Fan-out of transcript events to subscribers, each behind its own bounded
//! queue, so that one slow reader never holds up the publisher or the other
//! subscribers.
//!
//! Publishing serialises an event once and appends it to every queue under a
//! short lock; it never waits for a socket. When a queue is full, the oldest
//! queued partial makes room (a later partial or the final supersedes it),
//! then the oldest non-final event; a final is never dropped: a subscriber
//! whose queue holds nothing but finals is disconnected instead (close code
//! 1008). Whatever was dropped is reported to the subscriber in a `dropped`
//! message before the next event it gets.

use super::protocol::{self, close, ErrorCode, ServerMessage};
use crate::stream::events::Event;
use futures_util::{SinkExt, StreamExt};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Partial,
    Final,
    /// speech_start/end, stats, error: droppable, but after partials.
    Other,
}

impl Kind {
    fn of(event: &Event) -> Self {
        match event {
            Event::Partial { .. } => Kind::Partial,
            Event::Final { .. } => Kind::Final,
            _ => Kind::Other,
        }
    }
}

struct Queued {
    kind: Kind,
    text: Utf8Bytes,
}

#[derive(Default)]
struct QueueState {
    items: VecDeque<Queued>,
    /// Drops not yet reported to the subscriber.
    dropped_partials: u64,
    dropped_events: u64,
    /// A final could not be queued: the subscriber is cut off.
    overflowed: bool,
    /// No more events will come (server shutdown).
    closed: bool,
}

/// What a subscriber's connection task sends next.
#[derive(Debug, PartialEq)]
pub enum Next {
    Text(Utf8Bytes),
    Dropped { partials: u64, events: u64 },
    Overflowed,
    Closed,
}

pub struct SubscriberQueue {
    id: u64,
    capacity: usize,
    state: Mutex<QueueState>,
    notify: Notify,
}

impl SubscriberQueue {
    fn new(id: u64, capacity: usize) -> Self {
        Self {
            id,
            capacity: capacity.max(1),
            state: Mutex::new(QueueState::default()),
            notify: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        // A panic elsewhere while holding the lock leaves plain data behind.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, kind: Kind, text: &Utf8Bytes) {
        {
            let mut st = self.lock();
            if st.overflowed || st.closed {
                return;
            }
            if st.items.len() >= self.capacity {
                let victim = st
                    .items
                    .iter()
                    .position(|q| q.kind == Kind::Partial)
                    .or_else(|| {
                        (kind != Kind::Partial)
                            .then(|| st.items.iter().position(|q| q.kind == Kind::Other))
                            .flatten()
                    });
                match victim {
                    Some(i) => {
                        let old = st.items.remove(i).expect("index in range");
                        match old.kind {
                            Kind::Partial => st.dropped_partials += 1,
                            _ => st.dropped_events += 1,
                        }
                    }
                    None => match kind {
                        Kind::Partial => {
                            st.dropped_partials += 1;
                            return;
                        }
                        Kind::Other => {
                            st.dropped_events += 1;
                            return;
                        }
                        Kind::Final => {
                            st.overflowed = true;
                            st.items.clear();
                            drop(st);
                            self.notify.notify_one();
                            return;
                        }
                    },
                }
            }
            st.items.push_back(Queued {
                kind,
                text: text.clone(),
            });
        }
        self.notify.notify_one();
    }

    fn close(&self) {
        self.lock().closed = true;
        self.notify.notify_one();
    }

    /// The next thing to send. Cancel-safe: nothing is taken from the queue
    /// unless the future completes.
    pub async fn next(&self) -> Next {
        loop {
            {
                let mut st = self.lock();
                if st.overflowed {
                    return Next::Overflowed;
                }
                if st.dropped_partials > 0 || st.dropped_events > 0 {
                    let n = Next::Dropped {
                        partials: st.dropped_partials,
                        events: st.dropped_events,
                    };
                    st.dropped_partials = 0;
                    st.dropped_events = 0;
                    return n;
                }
                if let Some(q) = st.items.pop_front() {
                    return Next::Text(q.text);
                }
                if st.closed {
                    return Next::Closed;
                }
            }
            // A push between the check and this wait leaves a permit behind,
            // so the wait returns at once.
            self.notify.notified().await;
        }
    }
}

#[derive(Default)]
struct HubState {
    subscribers: Vec<Arc<SubscriberQueue>>,
    closed: bool,
}

/// The set of subscribers and the one place events are published to.
pub struct Hub {
    state: Mutex<HubState>,
    next_id: AtomicU64,
    queue_capacity: usize,
    max_subscribers: usize,
    /// Events published (for health and tests).
    published: AtomicU64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum JoinError {
    Full,
    Closed,
}

impl Hub {
    pub fn new(max_subscribers: usize, queue_capacity: usize) -> Self {
        Self {
            state: Mutex::new(HubState::default()),
            next_id: AtomicU64::new(1),
            queue_capacity,
            max_subscribers,
            published: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `event` of `stream` to every subscriber; never blocks on I/O.
    pub fn publish(&self, stream: &str, event: &Event) {
        let kind = Kind::of(event);
        // Serialise once for every subscriber; the bytes are shared.
        let text = Utf8Bytes::from(protocol::stream_event_json(event, stream));
        // Each push is a short append under the queue's own lock.
        for s in &self.lock().subscribers {
            s.push(kind, &text);
        }
        self.published.fetch_add(1, Ordering::Relaxed);
    }

    pub fn join(&self) -> Result<Arc<SubscriberQueue>, JoinError> {
        let mut st = self.lock();
        if st.closed {
            return Err(JoinError::Closed);
        }
        if st.subscribers.len() >= self.max_subscribers {
            return Err(JoinError::Full);
        }
        let q = Arc::new(SubscriberQueue::new(
            self.next_id.fetch_add(1, Ordering::Relaxed),
            self.queue_capacity,
        ));
        st.subscribers.push(q.clone());
        Ok(q)
    }

    pub fn leave(&self, queue: &SubscriberQueue) {
        self.lock().subscribers.retain(|s| s.id != queue.id);
    }

    pub fn len(&self) -> usize {
        self.lock().subscribers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    /// No more events: each subscriber gets what is queued, then a close.
    pub fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        for s in &st.subscribers {
            s.close();
        }
    }
}

/// A single send that takes longer than this means the peer stopped reading.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends `msg`, failing if the peer does not take it within [`WRITE_TIMEOUT`].
pub async fn send_with_timeout<S>(ws: &mut S, msg: Message) -> Result<(), ()>
where
    S: futures_util::Sink<Message> + Unpin,
{
    match tokio::time::timeout(WRITE_TIMEOUT, ws.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

pub fn close_message(code: CloseCode, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from(reason),
    }))
}

/// Runs one subscriber connection until it closes, the server shuts down,
/// or it falls behind.
pub async fn serve_subscriber<S>(ws: WebSocketStream<S>, hub: Arc<Hub>, hello: String)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut tx, mut rx) = ws.split();
    let queue = match hub.join() {
        Ok(q) => q,
        Err(e) => {
            let (code, msg) = match e {
                JoinError::Full => (
                    ErrorCode::TooManySubscribers,
                    "the subscriber limit is reached; try again later",
                ),
                JoinError::Closed => (ErrorCode::TooManySubscribers, "the server is shutting down"),
            };
            let _ =
                send_with_timeout(&mut tx, Message::text(protocol::error_json(code, msg))).await;
            let close = match e {
                JoinError::Full => close::TRY_AGAIN_LATER,
                JoinError::Closed => close::GOING_AWAY,
            };
            let _ = send_with_timeout(&mut tx, close_message(close, msg)).await;
            return;
        }
    };
    tracing::debug!(subscribers = hub.len(), "subscriber joined");
    if send_with_timeout(&mut tx, Message::text(hello))
        .await
        .is_err()
    {
        hub.leave(&queue);
        return;
    }
    loop {
        tokio::select! {
            next = queue.next() => {
                let msg = match next {
                    Next::Text(t) => Message::Text(t),
                    Next::Dropped { partials, events } => {
                        tracing::debug!(partials, events, "slow subscriber: events dropped");
                        Message::text(ServerMessage::Dropped { partials, events }.to_json())
                    }
                    Next::Overflowed => {
                        tracing::warn!("subscriber too slow to take finals: disconnected");
                        let _ = send_with_timeout(
                            &mut tx,
                            close_message(close::POLICY, "too slow: event queue overflowed"),
                        )
                        .await;
                        break;
                    }
                    Next::Closed => {
                        let _ = send_with_timeout(
                            &mut tx,
                            close_message(close::GOING_AWAY, "server shutting down"),
                        )
                        .await;
                        break;
                    }
                };
                if send_with_timeout(&mut tx, msg).await.is_err() {
                    tracing::info!("subscriber stopped reading: disconnected");
                    break;
                }
            }
            incoming = rx.next() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                Some(Ok(Message::Text(_) | Message::Binary(_))) => {
                    let err = protocol::error_json(
                        ErrorCode::UnknownMessage,
                        "the subscription takes no messages",
                    );
                    if send_with_timeout(&mut tx, Message::text(err)).await.is_err() {
                        break;
                    }
                }
                // Pings are answered by tungstenite itself.
                Some(Ok(_)) => {}
            },
        }
    }
    hub.leave(&queue);
    tracing::debug!(subscribers = hub.len(), "subscriber left");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partial(segment: u64, text: &str) -> Event {
        Event::Partial {
            segment,
            text: text.into(),
            committed: String::new(),
            start: 0.0,
            end: 1.0,
            latency_ms: 0.0,
        }
    }

    fn fin(segment: u64) -> Event {
        Event::Final {
            segment,
            text: format!("final {segment}"),
            start: 0.0,
            end: 1.0,
            latency_ms: 1.0,
            reason: "silence",
        }
    }

    fn drain(q: &SubscriberQueue) -> Vec<Next> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut out = Vec::new();
        loop {
            let n = rt.block_on(q.next());
            let end = matches!(n, Next::Closed | Next::Overflowed);
            out.push(n);
            if end {
                return out;
            }
        }
    }

    fn text_of(n: &Next) -> Option<serde_json::Value> {
        match n {
            Next::Text(t) => Some(serde_json::from_str(t.as_str()).unwrap()),
            _ => None,
        }
    }

    #[test]
    fn a_full_queue_drops_partials_first_and_reports_it() {
        let hub = Hub::new(4, 3);
        let q = hub.join().unwrap();
        hub.publish("local", &partial(0, "a"));
        hub.publish("local", &partial(0, "a b"));
        hub.publish("local", &fin(0));
        // Full: the oldest partial makes room, twice.
        hub.publish("local", &fin(1));
        hub.publish("local", &fin(2));
        hub.close();
        let got = drain(&q);
        assert_eq!(
            got[0],
            Next::Dropped {
                partials: 2,
                events: 0
            }
        );
        let finals: Vec<u64> = got
            .iter()
            .filter_map(text_of)
            .map(|v| v["segment"].as_u64().unwrap())
            .collect();
        assert_eq!(finals, vec![0, 1, 2]);
        assert_eq!(got.last(), Some(&Next::Closed));
    }

    #[test]
    fn a_queue_of_finals_is_never_thinned_but_cut_off() {
        let hub = Hub::new(4, 2);
        let q = hub.join().unwrap();
        hub.publish("s1", &fin(0));
        hub.publish("s1", &fin(1));
        // A partial cannot displace a final: it is dropped itself.
        hub.publish("s1", &partial(2, "x"));
        let speech = Event::SpeechStart {
            segment: 2,
            start: 0.0,
        };
        hub.publish("s1", &speech);
        {
            let st = q.lock();
            assert_eq!(st.items.len(), 2);
            assert_eq!((st.dropped_partials, st.dropped_events), (1, 1));
        }
        hub.publish("s1", &fin(2));
        assert_eq!(drain(&q), vec![Next::Overflowed]);
    }

    #[test]
    fn one_slow_subscriber_does_not_affect_another() {
        let hub = Hub::new(4, 2);
        let slow = hub.join().unwrap();
        let fast = hub.join().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for i in 0..10 {
            hub.publish("local", &partial(0, &"w ".repeat(i)));
            let n = rt.block_on(fast.next());
            assert!(matches!(n, Next::Text(_)), "{n:?}");
        }
        let st = slow.lock();
        assert_eq!(st.items.len(), 2);
        assert_eq!(st.dropped_partials, 8);
    }

    #[test]
    fn the_subscriber_limit_holds_and_leaving_frees_a_place() {
        let hub = Hub::new(2, 8);
        let a = hub.join().unwrap();
        let _b = hub.join().unwrap();
        assert_eq!(hub.join().err(), Some(JoinError::Full));
        hub.leave(&a);
        assert!(hub.join().is_ok());
        hub.close();
        assert_eq!(hub.join().err(), Some(JoinError::Closed));
    }
}
