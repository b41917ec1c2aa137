//! The WebSocket protocol, version 1 (`docs/protocol.md` is its reference):
//! paths, the client's control messages, the server's own messages, error
//! codes, close codes and the decoding of binary audio frames.
//!
//! Transcript events are the [`Event`]s of `--format jsonl` plus `seq`, their
//! number in their stream; the subscription adds a `stream` field so one
//! connection can follow several sources, and `replay` on finals sent again
//! to a subscriber that reconnected with `since`.

use crate::stream::events::Event;
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Bumped on any change a client could notice (new required field, changed
/// meaning); additions of optional fields and new message types are not.
pub const PROTOCOL_VERSION: u32 = 1;

pub const SUBSCRIBE_PATH: &str = "/v1/subscribe";
pub const AUDIO_PATH: &str = "/v1/audio";
pub const HEALTH_PATH: &str = "/healthz";

/// The stream name of the daemon's own source (`--mic`, `--input`, `--stdin`).
pub const LOCAL_STREAM: &str = "local";

/// Close codes (RFC 6455 §7.4.1) and when the server uses them.
pub mod close {
    use super::CloseCode;
    /// The session ended after the client's `end` (or the local source ended).
    pub const NORMAL: CloseCode = CloseCode::Normal;
    /// The server is shutting down; open sessions were flushed first.
    pub const GOING_AWAY: CloseCode = CloseCode::Away;
    /// A subscriber fell so far behind that a final would have been dropped.
    pub const POLICY: CloseCode = CloseCode::Policy;
    /// A message over the size limit.
    pub const TOO_BIG: CloseCode = CloseCode::Size;
    /// The model failed in a way the session cannot recover from.
    pub const INTERNAL: CloseCode = CloseCode::Error;
    /// Too many sessions or subscribers: try again later.
    pub const TRY_AGAIN_LATER: CloseCode = CloseCode::Again;
}

/// What went wrong, in error events (`{"type":"error","code":…}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A text message that is not JSON.
    BadJson,
    /// JSON that is not an object with a string `type`.
    BadMessage,
    /// A `type` this path does not accept.
    UnknownMessage,
    /// `start` with a `protocol` other than [`PROTOCOL_VERSION`].
    UnsupportedProtocol,
    /// `start` with missing, unknown or out-of-range fields.
    BadStart,
    /// A second `start` on one session.
    AlreadyStarted,
    /// Audio before `start`.
    NotStarted,
    /// A binary frame that is not whole sample frames, or holds NaN/inf.
    BadAudio,
    TooManySessions,
    TooManySubscribers,
    /// The model failed on a segment (the session goes on).
    ModelError,
    /// A message over the size limit (the connection is closed).
    MessageTooBig,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SampleFormat {
    S16le,
    F32le,
}

impl SampleFormat {
    pub fn bytes(self) -> usize {
        match self {
            SampleFormat::S16le => 2,
            SampleFormat::F32le => 4,
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "s16le" => Some(Self::S16le),
            "f32le" => Some(Self::F32le),
            _ => None,
        }
    }
}

/// A validated `start` message.
#[derive(Clone, Debug, PartialEq)]
pub struct Start {
    pub sample_rate: u32,
    pub channels: u16,
    pub format: SampleFormat,
    pub language: Option<String>,
    /// Also send this session's events to subscribers.
    pub publish: bool,
    pub vad_mode: Option<u8>,
}

/// A message a client sent, or why it could not be understood.
#[derive(Clone, Debug, PartialEq)]
pub enum ClientMessage {
    Start(Start),
    End,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: String,
}

impl ProtocolError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// The limits every audio source shares (WAV files, `--stdin`, sessions).
pub use crate::audio::{MAX_CHANNELS, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE};

/// Parses a text message of the audio-in path.
pub fn parse_client_message(text: &str) -> Result<ClientMessage, ProtocolError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| ProtocolError::new(ErrorCode::BadJson, format!("not JSON: {e}")))?;
    let Value::Object(mut map) = value else {
        return Err(ProtocolError::new(
            ErrorCode::BadMessage,
            "a message must be a JSON object",
        ));
    };
    let kind = match map.remove("type") {
        Some(Value::String(s)) => s,
        _ => {
            return Err(ProtocolError::new(
                ErrorCode::BadMessage,
                "a message needs a string field `type`",
            ))
        }
    };
    match kind.as_str() {
        "start" => parse_start(map).map(ClientMessage::Start),
        "end" => Ok(ClientMessage::End),
        other => Err(ProtocolError::new(
            ErrorCode::UnknownMessage,
            format!("unknown message type `{other}` (expected `start` or `end`)"),
        )),
    }
}

fn parse_start(mut map: Map<String, Value>) -> Result<Start, ProtocolError> {
    let bad = |m: String| ProtocolError::new(ErrorCode::BadStart, m);
    match map.remove("protocol") {
        Some(Value::Number(n)) if n.as_u64() == Some(PROTOCOL_VERSION as u64) => {}
        Some(v) => {
            return Err(ProtocolError::new(
                ErrorCode::UnsupportedProtocol,
                format!("protocol {v} is not supported; this server speaks {PROTOCOL_VERSION}"),
            ))
        }
        None => return Err(bad("`protocol` is required".into())),
    }
    let uint = |map: &mut Map<String, Value>, key: &str| -> Result<Option<u64>, ProtocolError> {
        match map.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| bad(format!("`{key}` must be a non-negative integer"))),
        }
    };
    let string =
        |map: &mut Map<String, Value>, key: &str| -> Result<Option<String>, ProtocolError> {
            match map.remove(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s)),
                Some(_) => Err(bad(format!("`{key}` must be a string"))),
            }
        };
    let sample_rate =
        uint(&mut map, "sample_rate")?.ok_or_else(|| bad("`sample_rate` is required".into()))?;
    crate::audio::check_sample_rate(sample_rate)
        .map_err(|reason| bad(format!("`sample_rate`: {reason}")))?;
    let channels = uint(&mut map, "channels")?.unwrap_or(1);
    crate::audio::check_channels(channels)
        .map_err(|reason| bad(format!("`channels`: {reason}")))?;
    let format = string(&mut map, "format")?
        .ok_or_else(|| bad("`format` is required (`s16le` or `f32le`)".into()))?;
    let format = SampleFormat::parse(&format)
        .ok_or_else(|| bad(format!("`format` `{format}` is not `s16le` or `f32le`")))?;
    let language = string(&mut map, "language")?;
    let publish = match map.remove("publish") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(_) => return Err(bad("`publish` must be true or false".into())),
    };
    let vad_mode = match uint(&mut map, "vad_mode")? {
        None => None,
        Some(m @ 0..=3) => Some(m as u8),
        Some(m) => return Err(bad(format!("`vad_mode` {m} is outside 0..=3"))),
    };
    // Unknown fields are refused rather than ignored: an option the server
    // does not know would otherwise silently not apply.
    if let Some(key) = map.keys().next() {
        return Err(bad(format!("unknown field `{key}` in start")));
    }
    Ok(Start {
        sample_rate: sample_rate as u32,
        channels: channels as u16,
        format,
        language,
        publish,
        vad_mode,
    })
}

/// Decodes one binary frame into interleaved f32 samples.
pub fn decode_audio(
    bytes: &[u8],
    format: SampleFormat,
    channels: u16,
    out: &mut Vec<f32>,
) -> Result<(), ProtocolError> {
    if !(1..=MAX_CHANNELS).contains(&channels) {
        return Err(ProtocolError::new(
            ErrorCode::BadAudio,
            format!("{channels} channels is outside 1..={MAX_CHANNELS}; frame dropped"),
        ));
    }
    let frame = format.bytes() * channels as usize;
    if !bytes.len().is_multiple_of(frame) {
        return Err(ProtocolError::new(
            ErrorCode::BadAudio,
            format!(
                "binary frame of {} bytes is not a whole number of {frame}-byte sample frames \
                 ({channels} channel(s) of {format:?}); frame dropped",
                bytes.len()
            ),
        ));
    }
    out.clear();
    match format {
        SampleFormat::S16le => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| i16::from_le_bytes([b[0], b[1]]) as f32 / 32768.0),
        ),
        SampleFormat::F32le => {
            out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
            // NaN or inf would poison the mel of the whole segment, and so
            // would a power that overflows f32.
            let limit = crate::audio::MAX_FLOAT_SAMPLE;
            if out.iter().any(|s| s.is_nan() || s.abs() > limit) {
                out.clear();
                return Err(ProtocolError::new(
                    ErrorCode::BadAudio,
                    format!(
                        "f32le frame holds NaN, infinite or samples beyond ±{limit:e} \
                         (full scale is ±1); frame dropped"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Messages of the server's own (not transcript events).
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage<'a> {
    /// First message on every WebSocket connection.
    Hello {
        protocol: u32,
        server: &'a str,
        model: &'a str,
        path: &'a str,
        /// Differs between runs of the server, so that a subscriber can tell
        /// whether its `since` numbers still mean anything.
        instance: &'a str,
        /// Subscriptions only: the last `seq` of every stream the server
        /// remembers, as of the moment this subscriber joined.
        #[serde(skip_serializing_if = "Option::is_none")]
        streams: Option<&'a BTreeMap<String, u64>>,
    },
    /// Reply to an accepted `start`.
    Started {
        protocol: u32,
        session: &'a str,
        sample_rate: u32,
        channels: u16,
        format: SampleFormat,
        publish: bool,
    },
    /// Events this subscriber did not get because it read too slowly.
    Dropped {
        partials: u64,
        events: u64,
    },
    /// Finals of `stream` a subscriber asked for (`since`) that the server
    /// no longer keeps: `finals` of them had seqs in `from_seq..=to_seq`
    /// (at least that many when `exact` is false).
    Gap {
        stream: &'a str,
        from_seq: u64,
        to_seq: u64,
        finals: u64,
        exact: bool,
    },
    Error {
        code: ErrorCode,
        message: &'a str,
    },
}

impl ServerMessage<'_> {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server messages serialise")
    }
}

pub fn error_json(code: ErrorCode, message: &str) -> String {
    ServerMessage::Error { code, message }.to_json()
}

/// An event as subscribers get it: the jsonl object plus `seq` (its
/// number in its stream: 1, 2, 3, …) and `stream`.
pub fn stream_event_json(event: &Event, stream: &str, seq: u64) -> String {
    append_fields(
        event.to_json(),
        &[
            ("seq", seq.to_string()),
            (
                "stream",
                serde_json::to_string(stream).expect("a string serialises"),
            ),
        ],
    )
}

/// An event as an audio-in session's own client gets it: the jsonl object
/// plus `seq` (the same number subscribers see when the session publishes).
pub fn session_event_json(event: &Event, seq: u64) -> String {
    append_fields(event.to_json(), &[("seq", seq.to_string())])
}

/// A kept final sent again to a subscriber that asked for it with `since`:
/// the message it was, plus `"replay":true`.
pub fn replayed_json(text: &str) -> String {
    append_fields(text.to_string(), &[("replay", "true".to_string())])
}

/// Appends already-serialised fields to a JSON object. Every message is an
/// object; appending keeps its field order (`type` first), which a map
/// round trip would sort away.
fn append_fields(json: String, fields: &[(&str, String)]) -> String {
    let Some(body) = json.strip_suffix('}') else {
        return json;
    };
    let mut out = String::with_capacity(json.len() + 32);
    out.push_str(body);
    for (i, (key, value)) in fields.iter().enumerate() {
        if i > 0 || body.len() > 1 {
            out.push(',');
        }
        out.push('"');
        out.push_str(key);
        out.push_str("\":");
        out.push_str(value);
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> ErrorCode {
        parse_client_message(text).unwrap_err().code
    }

    #[test]
    fn start_is_parsed_with_defaults() {
        let m = parse_client_message(
            r#"{"type":"start","protocol":1,"sample_rate":48000,"format":"s16le"}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            ClientMessage::Start(Start {
                sample_rate: 48000,
                channels: 1,
                format: SampleFormat::S16le,
                language: None,
                publish: false,
                vad_mode: None,
            })
        );
        let m = parse_client_message(
            r#"{"type":"start","protocol":1,"sample_rate":16000,"channels":2,"format":"f32le",
                "language":"en","publish":true,"vad_mode":3}"#,
        )
        .unwrap();
        let ClientMessage::Start(s) = m else { panic!() };
        assert_eq!(s.channels, 2);
        assert_eq!(s.format, SampleFormat::F32le);
        assert!(s.publish);
        assert_eq!(s.vad_mode, Some(3));
        assert_eq!(
            parse_client_message(r#"{"type":"end"}"#).unwrap(),
            ClientMessage::End
        );
    }

    #[test]
    fn bad_messages_get_specific_codes() {
        assert_eq!(err("{not json"), ErrorCode::BadJson);
        assert_eq!(err("[1,2]"), ErrorCode::BadMessage);
        assert_eq!(err(r#"{"kind":"start"}"#), ErrorCode::BadMessage);
        assert_eq!(err(r#"{"type":"pause"}"#), ErrorCode::UnknownMessage);
        assert_eq!(
            err(r#"{"type":"start","protocol":2,"sample_rate":16000,"format":"s16le"}"#),
            ErrorCode::UnsupportedProtocol
        );
        for bad in [
            r#"{"type":"start","sample_rate":16000,"format":"s16le"}"#,
            r#"{"type":"start","protocol":1,"format":"s16le"}"#,
            r#"{"type":"start","protocol":1,"sample_rate":100,"format":"s16le"}"#,
            r#"{"type":"start","protocol":1,"sample_rate":16000,"format":"mp3"}"#,
            r#"{"type":"start","protocol":1,"sample_rate":16000,"format":"s16le","channels":0}"#,
            r#"{"type":"start","protocol":1,"sample_rate":16000,"format":"s16le","vad_mode":7}"#,
            r#"{"type":"start","protocol":1,"sample_rate":16000,"format":"s16le","colour":"red"}"#,
            r#"{"type":"start","protocol":1,"sample_rate":"fast","format":"s16le"}"#,
        ] {
            assert_eq!(err(bad), ErrorCode::BadStart, "{bad}");
        }
    }

    #[test]
    fn start_limits_are_the_shared_audio_limits_and_name_the_field() {
        let start = |rate: &str, channels: &str| {
            parse_client_message(&format!(
                r#"{{"type":"start","protocol":1,"sample_rate":{rate},"channels":{channels},"format":"s16le"}}"#
            ))
        };
        for (rate, channels) in [("1000", "1"), ("384000", "32"), ("16000", "2")] {
            assert!(start(rate, channels).is_ok(), "{rate} Hz, {channels} ch");
        }
        for (rate, channels, field) in [
            ("999", "1", "sample_rate"),
            ("1", "1", "sample_rate"),
            ("384001", "1", "sample_rate"),
            ("2147483647", "1", "sample_rate"),
            ("18446744073709551615", "1", "sample_rate"),
            ("1e9", "1", "sample_rate"),
            ("-16000", "1", "sample_rate"),
            ("16000.5", "1", "sample_rate"),
            ("16000", "0", "channels"),
            ("16000", "33", "channels"),
            ("16000", "65537", "channels"),
            ("16000", "-1", "channels"),
        ] {
            let e = start(rate, channels).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadStart, "{rate} Hz, {channels} ch");
            assert!(
                e.message.contains(&format!("`{field}`")),
                "{rate} Hz, {channels} ch: {}",
                e.message
            );
        }
    }

    #[test]
    fn audio_frames_must_be_whole_sample_frames() {
        let mut out = Vec::new();
        decode_audio(&[0, 0x40, 0, 0xc0], SampleFormat::S16le, 1, &mut out).unwrap();
        assert_eq!(out, vec![0.5, -0.5]);
        let e = decode_audio(&[0, 0, 0], SampleFormat::S16le, 1, &mut out).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadAudio);
        // Stereo s16le: 4-byte frames.
        assert!(decode_audio(&[0; 6], SampleFormat::S16le, 2, &mut out).is_err());
        for bad in [f32::NAN, f32::INFINITY, -1.0e30] {
            let e = decode_audio(&bad.to_le_bytes(), SampleFormat::F32le, 1, &mut out);
            assert_eq!(e.unwrap_err().code, ErrorCode::BadAudio, "{bad}");
        }
        // Channel counts a validated start cannot have are errors, not panics.
        for channels in [0, MAX_CHANNELS + 1, u16::MAX] {
            let e = decode_audio(&[0; 4], SampleFormat::S16le, channels, &mut out);
            assert_eq!(e.unwrap_err().code, ErrorCode::BadAudio, "{channels}");
        }
        decode_audio(&0.25f32.to_le_bytes(), SampleFormat::F32le, 1, &mut out).unwrap();
        assert_eq!(out, vec![0.25]);
    }

    #[test]
    fn subscriber_events_are_the_jsonl_event_plus_stream() {
        let ev = Event::SpeechStart {
            segment: 4,
            start: 1.25,
        };
        let text = stream_event_json(&ev, "s3", 17);
        assert!(text.starts_with(r#"{"type":"speech_start""#), "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["type"], "speech_start");
        assert_eq!(v["segment"], 4);
        assert_eq!(v["stream"], "s3");
        assert_eq!(v["seq"], 17);
        let jsonl: Value = serde_json::from_str(&ev.to_json()).unwrap();
        let mut without = v.as_object().unwrap().clone();
        without.remove("stream");
        without.remove("seq");
        assert_eq!(Value::Object(without), jsonl);

        let own: Value = serde_json::from_str(&session_event_json(&ev, 17)).unwrap();
        let mut with_stream = own.as_object().unwrap().clone();
        with_stream.insert("stream".into(), "s3".into());
        assert_eq!(Value::Object(with_stream), v);

        let again: Value = serde_json::from_str(&replayed_json(&text)).unwrap();
        assert_eq!(again["replay"], true);
        assert_eq!(again["seq"], 17);
        assert_eq!(
            append_fields("{}".into(), &[("a", "1".into())]),
            r#"{"a":1}"#
        );
    }
}
