//! Audio sources that feed the ring: a microphone (cpal), a WAV file (as fast
//! as possible or paced like a live source) and raw s16le on stdin. Each
//! delivers mono f32 at its own sample rate; the audio thread resamples.

use super::ring::{audio_ring, RingReader, RingWriter};
use super::{wav, AudioError};
use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};
use cpal::{FromSample, SizedSample};
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Seconds of audio the ring holds before a live source starts dropping.
const RING_SECONDS: usize = 10;
/// Frames converted per step inside the audio callback (stack buffer size).
const CALLBACK_BLOCK: usize = 512;
/// Stream errors in a row, with no audio in between, that mark the device
/// as failed (a single one, followed by audio, is only logged).
const DEAD_STREAM_ERRORS: u32 = 8;

#[derive(Clone, Debug)]
pub enum SourceSpec {
    Mic { device: Option<String> },
    File { path: PathBuf, realtime: bool },
    Stdin { sample_rate: u32, channels: u16 },
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("no audio input device found (is a microphone connected, or PulseAudio running?)")]
    NoDefaultDevice,
    #[error("no input device named `{0}`; see --list-devices")]
    NoSuchDevice(String),
    #[error("audio device: {0}")]
    Device(String),
    #[error(transparent)]
    Audio(#[from] AudioError),
    #[error("--stdin needs a sample rate (--rate) and channel count of at least 1")]
    BadStdinFormat,
}

/// What keeps a source running; dropping it stops the source.
pub enum SourceGuard {
    /// The cpal stream must stay on the thread that built it.
    Mic(cpal::Stream),
    Thread(Option<std::thread::JoinHandle<()>>),
}

pub struct StartedSource {
    pub reader: RingReader,
    pub sample_rate: u32,
    pub description: String,
    /// Live sources (mic, paced file) drop on overflow; others apply backpressure.
    pub live: bool,
    pub guard: SourceGuard,
}

pub fn start_source(
    spec: &SourceSpec,
    stop: Arc<AtomicBool>,
) -> Result<StartedSource, SourceError> {
    match spec {
        SourceSpec::Mic { device } => start_mic(device.as_deref()),
        SourceSpec::File { path, realtime } => start_file(path.clone(), *realtime, stop),
        SourceSpec::Stdin {
            sample_rate,
            channels,
        } => start_stdin(*sample_rate, *channels, stop),
    }
}

/// Names of the input devices of the default host.
pub fn list_input_devices() -> Result<Vec<String>, SourceError> {
    let host = cpal::default_host();
    let default = host.default_input_device().and_then(|d| d.name().ok());
    let devices = host
        .input_devices()
        .map_err(|e| SourceError::Device(e.to_string()))?;
    Ok(devices
        .filter_map(|d| {
            let name = d.name().ok()?;
            let cfg = d
                .default_input_config()
                .map(|c| {
                    format!(
                        "{} Hz, {} ch, {:?}",
                        c.sample_rate().0,
                        c.channels(),
                        c.sample_format()
                    )
                })
                .unwrap_or_else(|e| format!("unusable: {e}"));
            let mark = if Some(&name) == default.as_ref() {
                " (default)"
            } else {
                ""
            };
            Some(format!("{name}{mark}: {cfg}"))
        })
        .collect())
}

fn start_mic(name: Option<&str>) -> Result<StartedSource, SourceError> {
    let host = cpal::default_host();
    let device = match name {
        None => host
            .default_input_device()
            .ok_or(SourceError::NoDefaultDevice)?,
        Some(wanted) => {
            let mut devices = host
                .input_devices()
                .map_err(|e| SourceError::Device(e.to_string()))?;
            devices
                .find(|d| d.name().is_ok_and(|n| n == wanted))
                .or_else(|| {
                    host.input_devices()
                        .ok()?
                        .find(|d| d.name().is_ok_and(|n| n.contains(wanted)))
                })
                .ok_or_else(|| SourceError::NoSuchDevice(wanted.to_string()))?
        }
    };
    let device_name = device.name().unwrap_or_else(|_| "unnamed device".into());
    let supported = device
        .default_input_config()
        .map_err(|e| SourceError::Device(format!("{device_name}: {e}")))?;
    let config: cpal::StreamConfig = supported.config();
    let rate = config.sample_rate.0;
    let channels = config.channels as usize;
    let (writer, reader) = audio_ring(rate as usize * RING_SECONDS);
    let shared = writer.shared.clone();
    let name = device_name.clone();
    // Errors since audio last arrived, and the written count at the last one.
    let (mut errors, mut written_then, mut failed) = (0u32, 0u64, false);
    let on_error = move |err: cpal::StreamError| {
        // Runs on cpal's thread, not the data callback: logging is fine here.
        // cpal's ALSA backend never reports `DeviceNotAvailable`: a capture
        // stream whose PulseAudio source is removed (with no other source to
        // move it to) fails every poll with EIO, and cpal calls this in a
        // tight loop, thousands of times a second, with no audio in between.
        // A run of errors without audio is therefore a dead device.
        if failed {
            return;
        }
        let written = shared.written_samples.load(Ordering::Relaxed);
        if written != written_then {
            (errors, written_then) = (0, written);
        }
        errors += 1;
        match err {
            cpal::StreamError::DeviceNotAvailable => {
                failed = true;
                shared.fail(format!("input device `{name}` disappeared"));
            }
            other if errors >= DEAD_STREAM_ERRORS => {
                failed = true;
                shared.fail(format!("input device `{name}` failed: {other}"));
            }
            other if errors == 1 => tracing::warn!("audio device `{name}` reported: {other}"),
            _ => {}
        }
    };
    use cpal::SampleFormat as F;
    let stream = match supported.sample_format() {
        F::F32 => build_mic_stream::<f32>(&device, &config, channels, writer, on_error),
        F::I16 => build_mic_stream::<i16>(&device, &config, channels, writer, on_error),
        F::U16 => build_mic_stream::<u16>(&device, &config, channels, writer, on_error),
        F::I32 => build_mic_stream::<i32>(&device, &config, channels, writer, on_error),
        F::U32 => build_mic_stream::<u32>(&device, &config, channels, writer, on_error),
        F::I8 => build_mic_stream::<i8>(&device, &config, channels, writer, on_error),
        F::U8 => build_mic_stream::<u8>(&device, &config, channels, writer, on_error),
        F::F64 => build_mic_stream::<f64>(&device, &config, channels, writer, on_error),
        other => {
            return Err(SourceError::Device(format!(
                "{device_name}: unsupported sample format {other:?}"
            )))
        }
    }
    .map_err(|e| SourceError::Device(format!("{device_name}: {e}")))?;
    stream
        .play()
        .map_err(|e| SourceError::Device(format!("{device_name}: {e}")))?;
    tracing::info!(device = %device_name, rate, channels, format = ?supported.sample_format(), "capturing");
    Ok(StartedSource {
        reader,
        sample_rate: rate,
        description: format!("microphone `{device_name}` ({rate} Hz, {channels} ch)"),
        live: true,
        guard: SourceGuard::Mic(stream),
    })
}

fn build_mic_stream<T>(
    device: &cpal::Device,
    config: &cpal::StreamConfig,
    channels: usize,
    mut writer: RingWriter,
    on_error: impl FnMut(cpal::StreamError) + Send + 'static,
) -> Result<cpal::Stream, cpal::BuildStreamError>
where
    T: SizedSample,
    f32: FromSample<T>,
{
    let channels = channels.max(1);
    let scale = 1.0 / channels as f32;
    device.build_input_stream(
        config,
        move |data: &[T], _: &cpal::InputCallbackInfo| {
            // Downmix through a stack buffer: no allocation, no lock, no wait.
            let mut block = [0f32; CALLBACK_BLOCK];
            for chunk in data.chunks(CALLBACK_BLOCK * channels) {
                let frames = chunk.len() / channels;
                for (dst, frame) in block.iter_mut().zip(chunk.chunks_exact(channels)) {
                    *dst = frame.iter().map(|&s| s.to_sample::<f32>()).sum::<f32>() * scale;
                }
                writer.write_or_drop(&block[..frames]);
            }
        },
        on_error,
        None,
    )
}

fn start_file(
    path: PathBuf,
    realtime: bool,
    stop: Arc<AtomicBool>,
) -> Result<StartedSource, SourceError> {
    let (mono, rate) = wav::read_wav_mono(&path)?;
    let (mut writer, reader) = audio_ring(rate as usize * RING_SECONDS);
    let chunk = (rate as usize / 100).max(1); // 10 ms, like a sound card period
    let handle = std::thread::Builder::new()
        .name("file-source".into())
        .spawn(move || {
            let start = Instant::now();
            for (i, block) in mono.chunks(chunk).enumerate() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if realtime {
                    // Absolute schedule: no drift from sleep overshoot.
                    let due = start + Duration::from_secs_f64((i * chunk) as f64 / rate as f64);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    writer.write_or_drop(block);
                } else if !writer.write_blocking(block, &stop) {
                    break;
                }
            }
            writer.finish();
        })
        .map_err(|e| SourceError::Device(format!("cannot start file reader: {e}")))?;
    Ok(StartedSource {
        reader,
        sample_rate: rate,
        description: format!(
            "file {} ({} Hz{})",
            path.display(),
            rate,
            if realtime { ", real time" } else { "" }
        ),
        live: realtime,
        guard: SourceGuard::Thread(Some(handle)),
    })
}

fn start_stdin(
    rate: u32,
    channels: u16,
    stop: Arc<AtomicBool>,
) -> Result<StartedSource, SourceError> {
    if rate == 0 || channels == 0 {
        return Err(SourceError::BadStdinFormat);
    }
    // Also checked when the arguments are parsed; this guards other callers.
    let checked =
        super::check_sample_rate(rate as u64).and_then(|()| super::check_channels(channels as u64));
    if let Err(reason) = checked {
        return Err(AudioError::Parameters {
            source_name: "--stdin".into(),
            reason,
        }
        .into());
    }
    let channels = channels as usize;
    let (mut writer, reader) = audio_ring(rate as usize * RING_SECONDS);
    let frame_bytes = 2 * channels;
    let block_bytes = (rate as usize / 50).max(1) * frame_bytes; // 20 ms
                                                                 // The stdin reader may sit in read() at shutdown; it is not joined.
    std::thread::Builder::new()
        .name("stdin-source".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut bytes = vec![0u8; block_bytes];
            let mut filled = 0;
            let mut mono = Vec::with_capacity(block_bytes / frame_bytes);
            loop {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match stdin.read(&mut bytes[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        writer.shared.fail(format!("reading stdin: {e}"));
                        return;
                    }
                }
                let whole = filled / frame_bytes * frame_bytes;
                mono.clear();
                mono.extend(bytes[..whole].chunks_exact(frame_bytes).map(|frame| {
                    frame
                        .chunks_exact(2)
                        .map(|b| i16::from_le_bytes([b[0], b[1]]) as f32 / 32768.0)
                        .sum::<f32>()
                        / channels as f32
                }));
                bytes.copy_within(whole..filled, 0);
                filled -= whole;
                if !writer.write_blocking(&mono, &stop) {
                    break;
                }
            }
            if filled > 0 {
                tracing::warn!(
                    "stdin ended with {filled} bytes of an incomplete sample frame; ignored"
                );
            }
            writer.finish();
        })
        .map_err(|e| SourceError::Device(format!("cannot start stdin reader: {e}")))?;
    Ok(StartedSource {
        reader,
        sample_rate: rate,
        description: format!("stdin (s16le, {rate} Hz, {channels} ch)"),
        live: false,
        guard: SourceGuard::Thread(None),
    })
}
