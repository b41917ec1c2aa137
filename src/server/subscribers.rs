//! Fan-out of transcript events to subscribers, each behind its own bounded
//! queue, so that one slow reader never holds up the publisher or the other
//! subscribers; and the recent finals of every stream, so that a subscriber
//! that reconnects gets what it missed.
//!
//! Publishing numbers an event (`seq`, per stream), serialises it once and
//! appends it to every queue under a short lock; it never waits for a
//! socket. When a queue is full, the oldest queued partial makes room (a
//! later partial or the final supersedes it), then the oldest non-final
//! event; a final is never dropped: a subscriber whose queue holds nothing
//! but finals is disconnected instead (close code 1008). Whatever was
//! dropped is reported to the subscriber in a `dropped` message before the
//! next event it gets.
//!
//! The hub keeps the last `keep_finals` finals of each stream, and remembers
//! `keep_streams` streams after they end. A subscriber that joins with
//! `since` gets the kept finals after those numbers first (`"replay":true`),
//! and a `gap` message for asked-for finals no longer kept. Joining, taking
//! that snapshot and every publish hold the same lock, so each event is
//! either in the snapshot or in the new queue, never both and never neither.

use super::protocol::{self, close, ErrorCode, ServerMessage};
use crate::stream::events::Event;
use futures_util::{SinkExt, StreamExt};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

/// Streams forgotten (ended, beyond `keep_streams`) of which the hub still
/// knows the last numbers, to tell a late subscriber what it lost.
const FORGOTTEN_STREAMS: usize = 1024;
/// Entries a `since` list may have.
pub const MAX_SINCE_STREAMS: usize = 256;

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

/// Which finals a subscriber wants replayed: `?since=` on `/v1/subscribe`.
///
/// `since=SEQ` applies to every stream; `since=NAME:SEQ,NAME:SEQ,*:SEQ`
/// names streams, `*` standing for every stream not named (without `*`,
/// streams not named are not replayed). Kept finals with a seq above the
/// stream's number are replayed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Since {
    pub streams: BTreeMap<String, u64>,
    /// Every stream not named.
    pub others: Option<u64>,
}

impl Since {
    /// Every kept final of every stream.
    pub fn everything() -> Self {
        Self {
            streams: BTreeMap::new(),
            others: Some(0),
        }
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let mut since = Since::default();
        let number = |s: &str| {
            s.parse::<u64>()
                .map_err(|_| format!("`{s}` in since is not a sequence number"))
        };
        for (i, item) in text.split(',').enumerate() {
            if i >= MAX_SINCE_STREAMS {
                return Err(format!("since names more than {MAX_SINCE_STREAMS} streams"));
            }
            let (name, seq) = match item.split_once(':') {
                Some((name, seq)) => (name, number(seq)?),
                None => ("*", number(item)?),
            };
            let fresh = if name == "*" {
                since.others.replace(seq).is_none()
            } else if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
            {
                return Err(format!("`{name}` in since is not a stream name"));
            } else {
                since.streams.insert(name.to_string(), seq).is_none()
            };
            if !fresh {
                return Err(format!("stream `{name}` appears twice in since"));
            }
        }
        Ok(since)
    }

    fn of(&self, stream: &str) -> Option<u64> {
        self.streams.get(stream).copied().or(self.others)
    }
}

/// A final kept for replay.
struct Kept {
    seq: u64,
    /// Publication order across streams, so that a replay of several
    /// streams interleaves as the live events did.
    order: u64,
    text: Utf8Bytes,
}

/// What asked-for finals were no longer kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gap {
    pub stream: String,
    pub from_seq: u64,
    pub to_seq: u64,
    pub finals: u64,
    /// False when `finals` is a lower bound.
    pub exact: bool,
}

impl Gap {
    fn to_json(&self) -> String {
        ServerMessage::Gap {
            stream: &self.stream,
            from_seq: self.from_seq,
            to_seq: self.to_seq,
            finals: self.finals,
            exact: self.exact,
        }
        .to_json()
    }
}

/// One stream's numbering and kept finals.
#[derive(Default)]
struct StreamLog {
    last_seq: u64,
    finals: VecDeque<Kept>,
    /// Finals evicted so far, the seq of the first one, and the seqs of the
    /// most recent ones (bounded), for exact gap counts.
    evicted: u64,
    first_evicted_seq: u64,
    evicted_seqs: VecDeque<u64>,
}

impl StreamLog {
    fn keep(&mut self, kept: Kept, keep_finals: usize) {
        self.finals.push_back(kept);
        while self.finals.len() > keep_finals {
            let old = self.finals.pop_front().expect("not empty");
            if self.evicted == 0 {
                self.first_evicted_seq = old.seq;
            }
            self.evicted += 1;
            self.evicted_seqs.push_back(old.seq);
            if self.evicted_seqs.len() > keep_finals.max(64) {
                self.evicted_seqs.pop_front();
            }
        }
    }

    fn total_finals(&self) -> u64 {
        self.evicted + self.finals.len() as u64
    }

    /// The finals after `since` that are no longer kept.
    fn gap(&self, stream: &str, since: u64) -> Option<Gap> {
        let last = *self.evicted_seqs.back()?;
        if since >= last {
            return None;
        }
        let ring = &self.evicted_seqs;
        let known = (ring.len() - ring.partition_point(|&s| s <= since)) as u64;
        let forgotten = self.evicted - ring.len() as u64;
        let (finals, exact) = if forgotten == 0 || since >= ring[0] {
            (known, true)
        } else if since < self.first_evicted_seq {
            (self.evicted, true)
        } else {
            (known, false)
        };
        Some(Gap {
            stream: stream.to_string(),
            from_seq: since + 1,
            to_seq: last,
            finals,
            exact,
        })
    }
}

/// A stream no longer remembered: enough to tell what a subscriber lost.
struct Forgotten {
    name: String,
    first_final_seq: u64,
    last_final_seq: u64,
    finals: u64,
}

impl Forgotten {
    fn gap(&self, since: u64) -> Option<Gap> {
        (self.finals > 0 && since < self.last_final_seq).then(|| {
            let all = since < self.first_final_seq;
            Gap {
                stream: self.name.clone(),
                from_seq: since + 1,
                to_seq: self.last_final_seq,
                finals: if all { self.finals } else { 1 },
                exact: all || self.finals == 1,
            }
        })
    }
}

#[derive(Default)]
struct HubState {
    subscribers: Vec<Arc<SubscriberQueue>>,
    closed: bool,
    streams: BTreeMap<String, StreamLog>,
    /// Remembered streams that have ended, oldest first.
    ended: VecDeque<String>,
    forgotten: VecDeque<Forgotten>,
    /// Events published, across streams.
    order: u64,
}

/// The set of subscribers, the recent finals of each stream, and the one
/// place events are published to.
pub struct Hub {
    state: Mutex<HubState>,
    next_id: AtomicU64,
    queue_capacity: usize,
    max_subscribers: usize,
    keep_finals: usize,
    keep_streams: usize,
    /// This run of the server (see `hello`).
    instance: String,
    /// Events published (for health and tests).
    published: AtomicU64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum JoinError {
    Full,
    Closed,
}

/// A new subscriber: its live queue, and what to send before it.
pub struct Joined {
    pub queue: Arc<SubscriberQueue>,
    /// The last seq of every remembered stream when the subscriber joined.
    pub streams: BTreeMap<String, u64>,
    /// Asked-for finals no longer kept, one per stream.
    pub gaps: Vec<Gap>,
    /// The kept finals asked for, in publication order, as they were sent.
    pub replay: Vec<Utf8Bytes>,
}

impl Hub {
    pub fn new(max_subscribers: usize, queue_capacity: usize) -> Self {
        Self {
            state: Mutex::new(HubState::default()),
            next_id: AtomicU64::new(1),
            queue_capacity,
            max_subscribers,
            keep_finals: 1000,
            keep_streams: 16,
            instance: format!("{:016x}", rand::random::<u64>()),
            published: AtomicU64::new(0),
        }
    }

    /// Keeps the last `keep_finals` finals of each stream for replay, and
    /// remembers `keep_streams` streams after they end.
    pub fn retaining(mut self, keep_finals: usize, keep_streams: usize) -> Self {
        self.keep_finals = keep_finals;
        self.keep_streams = keep_streams;
        self
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Numbers `event` in `stream`, keeps it if it is a final, and sends it
    /// to every subscriber; never blocks on I/O. Returns its seq.
    pub fn publish(&self, stream: &str, event: &Event) -> u64 {
        let kind = Kind::of(event);
        let mut guard = self.lock();
        let st = &mut *guard;
        st.order += 1;
        let order = st.order;
        if !st.streams.contains_key(stream) {
            st.streams.insert(stream.to_string(), StreamLog::default());
        }
        let log = st.streams.get_mut(stream).expect("inserted");
        log.last_seq += 1;
        let seq = log.last_seq;
        // Serialised once for every subscriber; the bytes are shared.
        let text = Utf8Bytes::from(protocol::stream_event_json(event, stream, seq));
        if kind == Kind::Final {
            let kept = Kept {
                seq,
                order,
                text: text.clone(),
            };
            log.keep(kept, self.keep_finals);
        }
        // Each push is a short append under the queue's own lock.
        for s in &st.subscribers {
            s.push(kind, &text);
        }
        self.published.fetch_add(1, Ordering::Relaxed);
        seq
    }

    /// `stream` will publish no more. It is remembered (its finals kept)
    /// until `keep_streams` streams have ended after it.
    pub fn end_stream(&self, stream: &str) {
        let mut guard = self.lock();
        let st = &mut *guard;
        if !st.streams.contains_key(stream) || st.ended.iter().any(|s| s == stream) {
            return;
        }
        st.ended.push_back(stream.to_string());
        while st.ended.len() > self.keep_streams {
            let name = st.ended.pop_front().expect("not empty");
            let Some(log) = st.streams.remove(&name) else {
                continue;
            };
            let first_final_seq = if log.evicted > 0 {
                log.first_evicted_seq
            } else {
                log.finals.front().map_or(0, |k| k.seq)
            };
            let last_final_seq = log
                .finals
                .back()
                .map(|k| k.seq)
                .or(log.evicted_seqs.back().copied())
                .unwrap_or(0);
            st.forgotten.push_back(Forgotten {
                name,
                first_final_seq,
                last_final_seq,
                finals: log.total_finals(),
            });
            if st.forgotten.len() > FORGOTTEN_STREAMS {
                st.forgotten.pop_front();
            }
        }
    }

    /// Adds a subscriber. With `since`, also takes the finals it asked for
    /// (and what of them is gone), in the same instant as it starts to get
    /// live events.
    pub fn join(&self, since: Option<&Since>) -> Result<Joined, JoinError> {
        let mut st = self.lock();
        if st.closed {
            return Err(JoinError::Closed);
        }
        if st.subscribers.len() >= self.max_subscribers {
            return Err(JoinError::Full);
        }
        let queue = Arc::new(SubscriberQueue::new(
            self.next_id.fetch_add(1, Ordering::Relaxed),
            self.queue_capacity,
        ));
        st.subscribers.push(queue.clone());
        let streams = st
            .streams
            .iter()
            .map(|(name, log)| (name.clone(), log.last_seq))
            .collect();
        let mut gaps = Vec::new();
        let mut kept: Vec<(u64, Utf8Bytes)> = Vec::new();
        if let Some(since) = since {
            for (name, log) in &st.streams {
                let Some(after) = since.of(name) else {
                    continue;
                };
                gaps.extend(log.gap(name, after));
                let from = log.finals.partition_point(|k| k.seq <= after);
                kept.extend(log.finals.range(from..).map(|k| (k.order, k.text.clone())));
            }
            for (name, &after) in &since.streams {
                if st.streams.contains_key(name) {
                    continue;
                }
                if let Some(f) = st.forgotten.iter().rev().find(|f| &f.name == name) {
                    gaps.extend(f.gap(after));
                }
            }
        }
        drop(st);
        kept.sort_unstable_by_key(|(order, _)| *order);
        let replay = kept
            .into_iter()
            .map(|(_, text)| Utf8Bytes::from(protocol::replayed_json(text.as_str())))
            .collect();
        Ok(Joined {
            queue,
            streams,
            gaps,
            replay,
        })
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

    /// Streams remembered now (live or ended), for health and tests.
    pub fn streams(&self) -> usize {
        self.lock().streams.len()
    }

    /// Finals kept now, over all streams.
    pub fn kept_finals(&self) -> usize {
        self.lock().streams.values().map(|l| l.finals.len()).sum()
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
/// or it falls behind. `hello` is made from the streams' last numbers at
/// the moment of joining; with `since`, the finals asked for follow it.
pub async fn serve_subscriber<S>(
    ws: WebSocketStream<S>,
    hub: Arc<Hub>,
    since: Option<Since>,
    hello: impl FnOnce(&BTreeMap<String, u64>) -> String,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut tx, mut rx) = ws.split();
    let joined = match hub.join(since.as_ref()) {
        Ok(j) => j,
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
    let queue = joined.queue;
    tracing::debug!(
        subscribers = hub.len(),
        replay = joined.replay.len(),
        gaps = joined.gaps.len(),
        "subscriber joined"
    );
    // Live events queue up meanwhile (and are thinned as usual if this
    // takes long); none of them is older than the replayed ones.
    let first = std::iter::once(Message::text(hello(&joined.streams)))
        .chain(joined.gaps.iter().map(|g| Message::text(g.to_json())))
        .chain(joined.replay.into_iter().map(Message::Text));
    for msg in first {
        if send_with_timeout(&mut tx, msg).await.is_err() {
            hub.leave(&queue);
            return;
        }
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

    fn join(hub: &Hub) -> Arc<SubscriberQueue> {
        hub.join(None).unwrap().queue
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
        let q = join(&hub);
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
        let q = join(&hub);
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
        let slow = join(&hub);
        let fast = join(&hub);
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
        let a = join(&hub);
        let _b = join(&hub);
        assert_eq!(hub.join(None).err(), Some(JoinError::Full));
        hub.leave(&a);
        assert!(hub.join(None).is_ok());
        hub.close();
        assert_eq!(hub.join(None).err(), Some(JoinError::Closed));
    }

    fn json(t: &Utf8Bytes) -> serde_json::Value {
        serde_json::from_str(t.as_str()).unwrap()
    }

    /// (stream, seq) of the finals in `texts`.
    fn finals_of(texts: &[Utf8Bytes]) -> Vec<(String, u64)> {
        texts
            .iter()
            .map(json)
            .filter(|v| v["type"] == "final")
            .map(|v| {
                assert_eq!(v["replay"], true, "{v}");
                (
                    v["stream"].as_str().unwrap().to_string(),
                    v["seq"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn since_is_parsed_as_documented() {
        assert_eq!(
            Since::parse("12").unwrap(),
            Since {
                streams: BTreeMap::new(),
                others: Some(12)
            }
        );
        let s = Since::parse("local:4,s3:0,*:9").unwrap();
        assert_eq!(s.of("local"), Some(4));
        assert_eq!(s.of("s3"), Some(0));
        assert_eq!(s.of("s7"), Some(9));
        let s = Since::parse("s1:5").unwrap();
        assert_eq!(s.of("s2"), None);
        for bad in [
            "",
            "x",
            "s1:",
            "s1:-1",
            ":3",
            "s1:1,s1:2",
            "3,*:4",
            "s1:1;s2:2",
        ] {
            assert!(Since::parse(bad).is_err(), "{bad}");
        }
        let many = (0..=MAX_SINCE_STREAMS)
            .map(|i| format!("s{i}:1"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(Since::parse(&many).is_err());
    }

    #[test]
    fn every_stream_is_numbered_from_one() {
        let hub = Hub::new(4, 64);
        let q = join(&hub);
        assert_eq!(hub.publish("a", &partial(0, "x")), 1);
        assert_eq!(hub.publish("b", &fin(0)), 1);
        assert_eq!(hub.publish("a", &fin(0)), 2);
        hub.close();
        let got: Vec<(String, u64)> = drain(&q)
            .iter()
            .filter_map(text_of)
            .map(|v| {
                (
                    v["stream"].as_str().unwrap().into(),
                    v["seq"].as_u64().unwrap(),
                )
            })
            .collect();
        let want = [("a", 1), ("b", 1), ("a", 2)].map(|(s, n)| (s.to_string(), n));
        assert_eq!(got, want);
    }

    #[test]
    fn since_replays_the_kept_finals_after_it_in_publication_order() {
        let hub = Hub::new(4, 64);
        hub.publish("a", &partial(0, "x")); // a1
        hub.publish("a", &fin(0)); // a2
        hub.publish("b", &fin(0)); // b1
        hub.publish("a", &fin(1)); // a3
        hub.publish("b", &partial(1, "y")); // b2
        hub.publish("b", &fin(1)); // b3

        let j = hub.join(Some(&Since::parse("a:2").unwrap())).unwrap();
        assert_eq!(finals_of(&j.replay), vec![("a".into(), 3)]);
        assert!(j.gaps.is_empty());
        assert_eq!(
            j.streams,
            BTreeMap::from([("a".into(), 3), ("b".into(), 3)])
        );

        let j = hub.join(Some(&Since::parse("a:2,*:0").unwrap())).unwrap();
        let want = [("b", 1), ("a", 3), ("b", 3)].map(|(s, n)| (s.to_string(), n));
        assert_eq!(finals_of(&j.replay), want);
        // The replayed final is the live message plus `replay`.
        let v = json(&j.replay[1]);
        assert_eq!(v["text"], "final 1");
        assert_eq!(v["segment"], 1);

        let j = hub.join(None).unwrap();
        assert!(j.replay.is_empty());
        // Live events come after, numbered on.
        hub.publish("a", &fin(2));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let v = text_of(&rt.block_on(j.queue.next())).unwrap();
        assert_eq!((v["seq"].as_u64(), v.get("replay")), (Some(4), None));
    }

    #[test]
    fn evicted_finals_are_reported_as_a_gap() {
        let hub = Hub::new(4, 64).retaining(3, 16);
        for i in 0..10 {
            hub.publish("s1", &partial(i, "x")); // odd seqs
            hub.publish("s1", &fin(i)); // even seqs 2, 4, … 20
        }
        assert_eq!(hub.kept_finals(), 3);
        let j = hub.join(Some(&Since::parse("0").unwrap())).unwrap();
        assert_eq!(
            j.gaps,
            vec![Gap {
                stream: "s1".into(),
                from_seq: 1,
                to_seq: 14,
                finals: 7,
                exact: true
            }]
        );
        let gap = serde_json::from_str::<serde_json::Value>(&j.gaps[0].to_json()).unwrap();
        assert_eq!(gap["type"], "gap");
        assert_eq!(gap["finals"], 7);
        let seqs: Vec<u64> = finals_of(&j.replay).into_iter().map(|(_, n)| n).collect();
        assert_eq!(seqs, vec![16, 18, 20]);
        // Asking from the middle of the evicted ones: only those after.
        let j = hub.join(Some(&Since::parse("s1:9").unwrap())).unwrap();
        assert_eq!((j.gaps[0].from_seq, j.gaps[0].finals), (10, 3));
        // Asking from the first kept one: no gap.
        let j = hub.join(Some(&Since::parse("s1:14").unwrap())).unwrap();
        assert!(j.gaps.is_empty());
        assert_eq!(j.replay.len(), 3);
    }

    #[test]
    fn gap_counts_stay_bounded_and_say_when_they_are_a_lower_bound() {
        let hub = Hub::new(16, 64).retaining(2, 16);
        for i in 0..100 {
            hub.publish("s1", &fin(i)); // seq = i + 1
        }
        let gap = |since: &str| hub.join(Some(&Since::parse(since).unwrap())).unwrap().gaps;
        // 98 evicted; the seqs of the last 64 (35..=98) are remembered.
        assert_eq!((gap("0")[0].finals, gap("0")[0].exact), (98, true));
        assert_eq!((gap("50")[0].finals, gap("50")[0].exact), (48, true));
        assert_eq!((gap("10")[0].finals, gap("10")[0].exact), (64, false));
        assert!(gap("98").is_empty());
        let st = hub.lock();
        assert_eq!(st.streams["s1"].evicted_seqs.len(), 64);
    }

    #[test]
    fn ended_streams_are_remembered_up_to_the_bound() {
        let hub = Hub::new(8, 64).retaining(10, 1);
        hub.publish("s1", &fin(0));
        hub.publish("s1", &fin(1));
        hub.publish("s2", &fin(0));
        hub.end_stream("s1");
        assert_eq!(hub.streams(), 2);
        hub.end_stream("s2");
        // s1 is forgotten; what a subscriber lost of it is still known.
        assert_eq!(hub.streams(), 1);
        let j = hub.join(Some(&Since::parse("s1:0,s2:0").unwrap())).unwrap();
        assert_eq!(j.streams.keys().collect::<Vec<_>>(), vec!["s2"]);
        assert_eq!(finals_of(&j.replay), vec![("s2".into(), 1)]);
        assert_eq!(
            j.gaps,
            vec![Gap {
                stream: "s1".into(),
                from_seq: 1,
                to_seq: 2,
                finals: 2,
                exact: true
            }]
        );
        let j = hub.join(Some(&Since::parse("s1:1").unwrap())).unwrap();
        assert_eq!((j.gaps[0].finals, j.gaps[0].exact), (1, false));
        assert!(hub
            .join(Some(&Since::parse("s1:2").unwrap()))
            .unwrap()
            .gaps
            .is_empty());
    }

    #[test]
    fn joining_while_publishing_loses_and_repeats_nothing() {
        let hub = Arc::new(Hub::new(64, 100_000).retaining(100_000, 16));
        const EVENTS: u64 = 20_000;
        let publisher = {
            let hub = hub.clone();
            std::thread::spawn(move || {
                for i in 0..EVENTS {
                    if i % 100 == 0 {
                        // Let the joins land all along the way.
                        std::thread::sleep(Duration::from_micros(100));
                    }
                    if i % 3 == 2 {
                        hub.publish("x", &fin(i));
                    } else {
                        hub.publish("x", &partial(i, "p"));
                    }
                }
            })
        };
        let mut joined = Vec::new();
        while !publisher.is_finished() && joined.len() < 40 {
            joined.push(hub.join(Some(&Since::parse("x:0").unwrap())).unwrap());
            std::thread::sleep(Duration::from_micros(200));
        }
        publisher.join().unwrap();
        hub.close();
        let all: Vec<u64> = (1..=EVENTS).filter(|s| s % 3 == 0).collect();
        assert!(joined.len() > 2);
        let mut seams = 0;
        for j in joined {
            let mut seqs: Vec<u64> = finals_of(&j.replay).into_iter().map(|(_, n)| n).collect();
            let live: Vec<u64> = drain(&j.queue)
                .iter()
                .filter_map(text_of)
                .filter(|v| v["type"] == "final")
                .map(|v| v["seq"].as_u64().unwrap())
                .collect();
            if !seqs.is_empty() && !live.is_empty() {
                seams += 1;
            }
            seqs.extend(live);
            assert_eq!(seqs, all);
        }
        assert!(seams > 0, "no join landed in the middle of the stream");
    }
}
