//! WAV decoding: PCM integers of 8 (unsigned), 16, 24 and 32 bits (or any
//! width padded into 1–4 byte containers), IEEE float of 32 and 64 bits,
//! plain or WAVE_FORMAT_EXTENSIBLE headers, 1 to 32 channels, 1 to 384 kHz.
//!
//! The RIFF parser is our own rather than `hound`'s so that a file cut short
//! is reported as such (declared vs. present bytes) instead of as a generic
//! I/O error halfway through decoding, and so that 64-bit float works.
//!
//! Every header field is checked before anything is sized from it, and the
//! data is read in blocks of at most [`READ_BLOCK_BYTES`]: the only buffer
//! that grows with the file is the result (interleaved samples for
//! [`decode_wav`], mono for [`read_wav_mono`], 16 kHz mono for
//! [`read_wav_16k_mono`], which downmixes and resamples block by block).

use super::{
    check_channels, check_sample_rate, resample, AudioError, MAX_FLOAT_SAMPLE, MODEL_SAMPLE_RATE,
};
use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::Path;

/// How samples are stored in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleFormat {
    /// Two's complement integers in containers of `container_bytes` (1 byte is
    /// unsigned with offset 128, as WAV defines it); `valid_bits` ≤ 8 × that.
    Int {
        container_bytes: u8,
        valid_bits: u16,
    },
    /// IEEE float of 4 or 8 bytes.
    Float { bytes: u8 },
}

/// Decoded interleaved samples scaled to [-1, 1].
#[derive(Debug, Clone)]
pub struct DecodedAudio {
    pub samples: Vec<f32>,
    pub channels: u16,
    pub sample_rate: u32,
    pub format: SampleFormat,
}

impl DecodedAudio {
    pub fn frames(&self) -> usize {
        self.samples.len() / self.channels.max(1) as usize
    }

    pub fn duration_seconds(&self) -> f64 {
        self.frames() as f64 / self.sample_rate as f64
    }
}

/// What a WAV header says, checked against the limits and the input's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WavInfo {
    pub channels: u16,
    pub sample_rate: u32,
    pub format: SampleFormat,
    /// Bytes per sample frame (all channels).
    pub block_align: u16,
    /// Bytes of whole sample frames in the data chunk; all of them are present.
    pub data_bytes: u64,
}

impl WavInfo {
    pub fn frames(&self) -> u64 {
        self.data_bytes / self.block_align as u64
    }
}

const WAVE_FORMAT_PCM: u16 = 0x0001;
const WAVE_FORMAT_IEEE_FLOAT: u16 = 0x0003;
const WAVE_FORMAT_EXTENSIBLE: u16 = 0xFFFE;
/// The 14 bytes that follow the format code in every standard
/// WAVE_FORMAT_EXTENSIBLE sub-format GUID (KSDATAFORMAT_SUBTYPE_*).
const EXTENSIBLE_GUID_TAIL: [u8; 14] = [
    0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x80, 0x00, 0x00, 0xAA, 0x00, 0x38, 0x9B, 0x71,
];
/// Writers that stream to a pipe cannot know the length; they put this
/// placeholder in the data chunk's size and the data runs to end of file.
const UNKNOWN_DATA_SIZE: u32 = u32::MAX;
/// The part of a fmt chunk that is read (WAVE_FORMAT_EXTENSIBLE's 40 bytes);
/// anything a writer appends is skipped.
const FMT_READ_BYTES: u32 = 40;
/// Chunks looked at before the data chunk; real files have a handful.
const MAX_CHUNKS_BEFORE_DATA: usize = 1024;
/// Bytes of sample data read and converted per step (rounded down to whole frames).
pub const READ_BLOCK_BYTES: usize = 64 * 1024;

/// Names of the format codes people actually meet, for error messages.
fn format_code_name(code: u16) -> &'static str {
    match code {
        0x0002 => "Microsoft ADPCM",
        0x0006 => "A-law",
        0x0007 => "µ-law",
        0x0011 => "IMA ADPCM",
        0x0031 => "GSM 6.10",
        0x0050 => "MPEG audio",
        0x0055 => "MP3",
        0x00FF => "AAC",
        0x1610 => "AAC (ADTS)",
        0x674F..=0x6751 => "Ogg Vorbis",
        0xF1AC => "FLAC",
        _ => "an unknown codec",
    }
}

struct FmtChunk {
    channels: u16,
    sample_rate: u32,
    block_align: u16,
    format: SampleFormat,
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses the first [`FMT_READ_BYTES`] (or fewer) bytes of a fmt chunk of
/// `declared` bytes.
fn parse_fmt(body: &[u8], declared: u32, path: &str) -> Result<FmtChunk, AudioError> {
    let not_wav = |reason: String| AudioError::NotWav {
        path: path.to_string(),
        reason,
    };
    let unsupported = |reason: String| AudioError::Unsupported {
        path: path.to_string(),
        reason,
    };
    if body.len() < 16 {
        return Err(not_wav(format!(
            "fmt chunk is {declared} bytes, at least 16 expected"
        )));
    }
    let mut code = le_u16(body, 0);
    let channels = le_u16(body, 2);
    let sample_rate = le_u32(body, 4);
    let block_align = le_u16(body, 12);
    let bits = le_u16(body, 14);
    let mut valid_bits = bits;
    if code == WAVE_FORMAT_EXTENSIBLE {
        if body.len() < 40 {
            return Err(not_wav(format!(
                "WAVE_FORMAT_EXTENSIBLE fmt chunk is {declared} bytes, 40 expected"
            )));
        }
        let declared_valid = le_u16(body, 18);
        if declared_valid != 0 {
            valid_bits = declared_valid;
        }
        let guid = &body[24..40];
        if guid[2..] != EXTENSIBLE_GUID_TAIL {
            return Err(unsupported(
                "WAVE_FORMAT_EXTENSIBLE with a non-standard sub-format GUID".into(),
            ));
        }
        code = le_u16(guid, 0);
    }
    if channels == 0 {
        return Err(not_wav("fmt chunk declares 0 channels".into()));
    }
    if sample_rate == 0 {
        return Err(not_wav("fmt chunk declares a sample rate of 0 Hz".into()));
    }
    check_channels(channels as u64).map_err(unsupported)?;
    check_sample_rate(sample_rate as u64).map_err(unsupported)?;
    let container_bytes = block_align / channels;
    if container_bytes == 0 || !block_align.is_multiple_of(channels) {
        return Err(not_wav(format!(
            "block align {block_align} does not fit {channels} channels"
        )));
    }
    let format = match code {
        WAVE_FORMAT_PCM => {
            if !(1..=4).contains(&container_bytes) || valid_bits == 0 {
                return Err(unsupported(format!(
                    "{bits}-bit PCM in {container_bytes}-byte containers (1 to 4 bytes supported)"
                )));
            }
            if valid_bits > container_bytes * 8 {
                return Err(not_wav(format!(
                    "{valid_bits} bits per sample do not fit {container_bytes}-byte containers"
                )));
            }
            SampleFormat::Int {
                container_bytes: container_bytes as u8,
                valid_bits,
            }
        }
        WAVE_FORMAT_IEEE_FLOAT => match container_bytes {
            4 | 8 => SampleFormat::Float {
                bytes: container_bytes as u8,
            },
            _ => {
                return Err(unsupported(format!(
                    "{}-bit IEEE float (32 and 64 supported)",
                    container_bytes as u32 * 8
                )))
            }
        },
        other => {
            return Err(unsupported(format!(
                "format code 0x{other:04X} ({}); only PCM integer and IEEE float are decoded",
                format_code_name(other)
            )))
        }
    };
    Ok(FmtChunk {
        channels,
        sample_rate,
        block_align,
        format,
    })
}

/// Turns the raw bytes of whole frames into f32 samples in [-1, 1], replacing
/// what `out` held.
fn convert_into(data: &[u8], format: SampleFormat, out: &mut Vec<f32>) {
    out.clear();
    match format {
        SampleFormat::Int {
            container_bytes: 1, ..
        } => out.extend(data.iter().map(|&b| (b as f32 - 128.0) / 128.0)),
        SampleFormat::Int {
            container_bytes: 2, ..
        } => out.extend(
            data.chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]) as f32 / 32_768.0),
        ),
        SampleFormat::Int {
            container_bytes: 3, ..
        } => out.extend(
            data
                // Put the 3 bytes in the top of an i32 so the sign extends.
                .chunks_exact(3)
                .map(|c| (i32::from_le_bytes([0, c[0], c[1], c[2]]) >> 8) as f32 / 8_388_608.0),
        ),
        SampleFormat::Int { .. } => out.extend(data.chunks_exact(4).map(|c| {
            (i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64 / 2_147_483_648.0) as f32
        })),
        SampleFormat::Float { bytes: 4 } => out.extend(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        SampleFormat::Float { .. } => out.extend(
            data.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32),
        ),
    }
}

/// Like `read_exact`, but returns how many bytes were read when the input ends first.
fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// A WAV input whose header has been read and checked; its samples come
/// out block by block ([`next_block`](Self::next_block)).
pub struct WavBlocks<R> {
    reader: R,
    info: WavInfo,
    name: String,
    /// Data bytes not read yet.
    remaining: u64,
    /// Bytes read per block (whole frames).
    block_bytes: usize,
    bytes: Vec<u8>,
    samples: Vec<f32>,
    frames_done: u64,
}

impl<R: Read + Seek> WavBlocks<R> {
    /// Reads and checks the header of the WAV in `reader` (from its start to
    /// its end, found by seeking); `name` is used in error messages.
    pub fn open(mut reader: R, name: &str) -> Result<Self, AudioError> {
        let info = read_header(&mut reader, name)?;
        let block = info.block_align as usize;
        let block_bytes = (READ_BLOCK_BYTES / block).max(1) * block;
        Ok(Self {
            reader,
            info,
            name: name.to_string(),
            remaining: info.data_bytes,
            block_bytes,
            bytes: Vec::new(),
            samples: Vec::new(),
            frames_done: 0,
        })
    }
}

impl<R: Read> WavBlocks<R> {
    pub fn info(&self) -> &WavInfo {
        &self.info
    }

    /// The next block of interleaved samples (whole frames, at most
    /// [`READ_BLOCK_BYTES`] of input), or `None` after the last.
    pub fn next_block(&mut self) -> Result<Option<&[f32]>, AudioError> {
        if self.remaining == 0 {
            return Ok(None);
        }
        let n = (self.block_bytes as u64).min(self.remaining) as usize;
        if self.bytes.len() < n {
            self.bytes.resize(n, 0);
        }
        self.reader
            .read_exact(&mut self.bytes[..n])
            .map_err(|source| AudioError::Read {
                path: self.name.clone(),
                source,
            })?;
        convert_into(&self.bytes[..n], self.info.format, &mut self.samples);
        if let SampleFormat::Float { .. } = self.info.format {
            check_floats(&self.samples, &self.info, self.frames_done, &self.name)?;
        }
        self.remaining -= n as u64;
        self.frames_done += (n / self.info.block_align as usize) as u64;
        Ok(Some(&self.samples))
    }
}

/// Refuses NaN, infinite and absurdly large float samples: one of them
/// turns the log-mel of a whole window into NaN.
fn check_floats(
    samples: &[f32],
    info: &WavInfo,
    first_frame: u64,
    name: &str,
) -> Result<(), AudioError> {
    let Some(i) = samples
        .iter()
        .position(|s| s.is_nan() || s.abs() > MAX_FLOAT_SAMPLE)
    else {
        return Ok(());
    };
    let channels = info.channels as usize;
    let frame = first_frame + (i / channels) as u64;
    Err(AudioError::BadSamples {
        path: name.to_string(),
        reason: format!(
            "sample {frame} of channel {} ({:.3} s) is {}; float samples must be finite and within ±{MAX_FLOAT_SAMPLE:e} (full scale is ±1)",
            i % channels,
            frame as f64 / info.sample_rate as f64,
            samples[i]
        ),
    })
}

/// Reads the RIFF header and the chunks up to the data chunk; leaves the
/// reader at the first data byte.
fn read_header<R: Read + Seek>(reader: &mut R, p: &str) -> Result<WavInfo, AudioError> {
    let read_err = |source: std::io::Error| AudioError::Read {
        path: p.to_string(),
        source,
    };
    let not_wav = |reason: String| AudioError::NotWav {
        path: p.to_string(),
        reason,
    };
    let truncated = |reason: String| AudioError::Truncated {
        path: p.to_string(),
        reason,
    };
    let input_len = reader.seek(SeekFrom::End(0)).map_err(read_err)?;
    reader.seek(SeekFrom::Start(0)).map_err(read_err)?;
    if input_len == 0 {
        return Err(AudioError::Empty {
            path: p.to_string(),
            reason: "the file is empty (0 bytes)".into(),
        });
    }
    let mut header = [0u8; 12];
    let got = read_up_to(reader, &mut header).map_err(read_err)?;
    match &header[..4.min(got)] {
        b"RIFF" if got == 12 && &header[8..12] == b"WAVE" => {}
        b"RIFX" => {
            return Err(AudioError::Unsupported {
                path: p.to_string(),
                reason: "big-endian RIFX container".into(),
            })
        }
        b"RF64" | b"BW64" => {
            return Err(AudioError::Unsupported {
                path: p.to_string(),
                reason: "RF64/BW64 (64-bit WAV) container".into(),
            })
        }
        _ => {
            return Err(not_wav(format!(
                "does not start with a RIFF/WAVE header (first bytes: {:?})",
                String::from_utf8_lossy(&header[..got.min(12)])
            )))
        }
    }

    let mut fmt: Option<FmtChunk> = None;
    let mut pos: u64 = 12;
    for _ in 0..MAX_CHUNKS_BEFORE_DATA {
        let mut chunk_header = [0u8; 8];
        let got = read_up_to(reader, &mut chunk_header).map_err(read_err)?;
        if got < 8 {
            let before = if fmt.is_none() { "fmt" } else { "data" };
            return Err(truncated(format!(
                "the file ends after {input_len} bytes, before a {before} chunk"
            )));
        }
        pos += 8;
        let id = [
            chunk_header[0],
            chunk_header[1],
            chunk_header[2],
            chunk_header[3],
        ];
        let size = le_u32(&chunk_header, 4);
        let available = input_len.saturating_sub(pos);
        match &id {
            b"fmt " => {
                if size as u64 > available {
                    return Err(truncated(format!(
                        "fmt chunk declares {size} bytes but only {available} follow"
                    )));
                }
                let mut body = [0u8; FMT_READ_BYTES as usize];
                let body = &mut body[..size.min(FMT_READ_BYTES) as usize];
                reader.read_exact(body).map_err(read_err)?;
                fmt = Some(parse_fmt(body, size, p)?);
            }
            b"data" => {
                let fmt =
                    fmt.ok_or_else(|| not_wav("data chunk comes before the fmt chunk".into()))?;
                return data_extent(fmt, size, available, p);
            }
            _ => {
                // LIST, fact, bext, …: metadata we do not need.
                if size as u64 > available {
                    return Err(truncated(format!(
                        "chunk `{}` declares {size} bytes but only {available} follow, and no data chunk was found",
                        String::from_utf8_lossy(&id)
                    )));
                }
            }
        }
        // Chunks are padded to an even length.
        pos += size as u64 + (size as u64 & 1);
        reader.seek(SeekFrom::Start(pos)).map_err(read_err)?;
    }
    Err(not_wav(format!(
        "no data chunk among the first {MAX_CHUNKS_BEFORE_DATA} chunks"
    )))
}

/// How many bytes of whole frames the data chunk holds, checked against
/// what the input has.
fn data_extent(
    fmt: FmtChunk,
    declared: u32,
    available: u64,
    path: &str,
) -> Result<WavInfo, AudioError> {
    let block = fmt.block_align as u64;
    let data_bytes = if declared == UNKNOWN_DATA_SIZE {
        tracing::debug!(path, "data chunk of unknown size: reading to end of file");
        available - available % block
    } else {
        if declared as u64 > available {
            return Err(AudioError::Truncated {
                path: path.to_string(),
                reason: format!(
                    "the data chunk declares {declared} bytes ({} frames, {:.2} s) but the file holds only {available} ({:.2} s)",
                    declared as u64 / block,
                    (declared as u64 / block) as f64 / fmt.sample_rate as f64,
                    (available / block) as f64 / fmt.sample_rate as f64,
                ),
            });
        }
        if !(declared as u64).is_multiple_of(block) {
            tracing::warn!(
                path,
                declared,
                block_align = fmt.block_align,
                "data chunk is not a whole number of frames; ignoring the partial frame"
            );
        }
        declared as u64 - declared as u64 % block
    };
    if data_bytes == 0 {
        return Err(AudioError::Empty {
            path: path.to_string(),
            reason: "the data chunk holds 0 sample frames".into(),
        });
    }
    let info = WavInfo {
        channels: fmt.channels,
        sample_rate: fmt.sample_rate,
        format: fmt.format,
        block_align: fmt.block_align,
        data_bytes,
    };
    tracing::debug!(
        path,
        channels = info.channels,
        sample_rate = info.sample_rate,
        format = ?info.format,
        frames = info.frames(),
        "WAV header"
    );
    Ok(info)
}

/// Opens a file for [`WavBlocks`]; a directory is not a WAV file.
fn open_file(path: &Path) -> Result<WavBlocks<File>, AudioError> {
    let p = path.display().to_string();
    let open_err = |source: std::io::Error| AudioError::Open {
        path: p.clone(),
        source,
    };
    let file = File::open(path).map_err(open_err)?;
    if file.metadata().map_err(open_err)?.is_dir() {
        return Err(AudioError::NotWav {
            path: p.clone(),
            reason: "is a directory".into(),
        });
    }
    WavBlocks::open(file, &p)
}

/// Name used in the errors of the in-memory entry points.
const IN_MEMORY: &str = "(in-memory WAV)";

/// Reads a WAV file into interleaved f32 samples.
pub fn decode_wav(path: &Path) -> Result<DecodedAudio, AudioError> {
    decode_blocks(open_file(path)?)
}

/// [`decode_wav`] of a WAV file's bytes.
pub fn decode_wav_bytes(bytes: &[u8]) -> Result<DecodedAudio, AudioError> {
    decode_blocks(WavBlocks::open(Cursor::new(bytes), IN_MEMORY)?)
}

/// [`decode_wav`] of any seekable reader; `name` is used in error messages.
pub fn decode_wav_reader<R: Read + Seek>(
    reader: R,
    name: &str,
) -> Result<DecodedAudio, AudioError> {
    decode_blocks(WavBlocks::open(reader, name)?)
}

fn decode_blocks<R: Read>(mut blocks: WavBlocks<R>) -> Result<DecodedAudio, AudioError> {
    let info = *blocks.info();
    // Bounded by the input's length: `data_bytes` was checked against it.
    let mut samples = Vec::with_capacity((info.frames() * info.channels as u64) as usize);
    while let Some(block) = blocks.next_block()? {
        samples.extend_from_slice(block);
    }
    Ok(DecodedAudio {
        samples,
        channels: info.channels,
        sample_rate: info.sample_rate,
        format: info.format,
    })
}

/// Reads a WAV file as mono f32 at its own sample rate (channels averaged
/// block by block); returns the samples and the rate.
pub fn read_wav_mono(path: &Path) -> Result<(Vec<f32>, u32), AudioError> {
    let mut blocks = open_file(path)?;
    let info = *blocks.info();
    let channels = info.channels as usize;
    let mut mono = Vec::with_capacity(info.frames() as usize);
    let mut block_mono = Vec::new();
    while let Some(block) = blocks.next_block()? {
        resample::downmix_into(block, channels, &mut block_mono);
        mono.extend_from_slice(&block_mono);
    }
    Ok((mono, info.sample_rate))
}

/// Reads a WAV file as 16 kHz mono f32, the form every model consumes.
pub fn read_wav_16k_mono(path: &Path) -> Result<Vec<f32>, AudioError> {
    blocks_16k_mono(open_file(path)?)
}

/// [`read_wav_16k_mono`] of a WAV file's bytes.
pub fn wav_bytes_16k_mono(bytes: &[u8]) -> Result<Vec<f32>, AudioError> {
    blocks_16k_mono(WavBlocks::open(Cursor::new(bytes), IN_MEMORY)?)
}

/// Decodes, downmixes and resamples one block at a time, so that nothing
/// but the 16 kHz result grows with the file.
fn blocks_16k_mono<R: Read>(mut blocks: WavBlocks<R>) -> Result<Vec<f32>, AudioError> {
    let info = *blocks.info();
    let channels = info.channels as usize;
    let name = blocks.name.clone();
    let named = |e: AudioError| match e {
        AudioError::Resample(reason) => AudioError::Resample(format!("{name}: {reason}")),
        other => other,
    };
    let mut resampler =
        resample::StreamResampler::new(info.sample_rate, MODEL_SAMPLE_RATE).map_err(named)?;
    // At most 16 × the frames (the lowest rate is 1 kHz), which the input holds.
    let mut out =
        Vec::with_capacity(
            resample::output_len(info.frames(), info.sample_rate, MODEL_SAMPLE_RATE) as usize,
        );
    let mut mono = Vec::new();
    while let Some(block) = blocks.next_block()? {
        resample::downmix_into(block, channels, &mut mono);
        resampler
            .push_with(&mono, |ready| out.extend_from_slice(ready))
            .map_err(named)?;
    }
    resampler
        .flush_with(|ready| out.extend_from_slice(ready))
        .map_err(named)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A WAV file assembled byte by byte, so tests control every header field.
    struct WavBytes {
        format_code: u16,
        channels: u16,
        sample_rate: u32,
        bits: u16,
        extensible: bool,
        extra_chunks_before_data: Vec<([u8; 4], Vec<u8>)>,
        data: Vec<u8>,
        declared_data_len: Option<u32>,
    }

    impl WavBytes {
        fn pcm(bits: u16, channels: u16, sample_rate: u32, data: Vec<u8>) -> Self {
            Self {
                format_code: WAVE_FORMAT_PCM,
                channels,
                sample_rate,
                bits,
                extensible: false,
                extra_chunks_before_data: vec![],
                data,
                declared_data_len: None,
            }
        }

        fn bytes(&self) -> Vec<u8> {
            let container = self.bits.div_ceil(8);
            let block_align = container * self.channels;
            let mut fmt = Vec::new();
            let code = if self.extensible {
                WAVE_FORMAT_EXTENSIBLE
            } else {
                self.format_code
            };
            fmt.extend(code.to_le_bytes());
            fmt.extend(self.channels.to_le_bytes());
            fmt.extend(self.sample_rate.to_le_bytes());
            fmt.extend((self.sample_rate * block_align as u32).to_le_bytes());
            fmt.extend(block_align.to_le_bytes());
            fmt.extend((container * 8).to_le_bytes());
            if self.extensible {
                fmt.extend(22u16.to_le_bytes());
                fmt.extend(self.bits.to_le_bytes());
                fmt.extend(0u32.to_le_bytes());
                fmt.extend(self.format_code.to_le_bytes());
                fmt.extend(EXTENSIBLE_GUID_TAIL);
            }
            let mut body = b"WAVE".to_vec();
            let mut chunk = |id: &[u8; 4], content: &[u8], declared: u32| {
                body.extend(id);
                body.extend(declared.to_le_bytes());
                body.extend(content);
                if content.len() % 2 == 1 {
                    body.push(0);
                }
            };
            for (id, content) in &self.extra_chunks_before_data {
                chunk(id, content, content.len() as u32);
            }
            chunk(b"fmt ", &fmt, fmt.len() as u32);
            chunk(
                b"data",
                &self.data,
                self.declared_data_len.unwrap_or(self.data.len() as u32),
            );
            let mut out = b"RIFF".to_vec();
            out.extend((body.len() as u32).to_le_bytes());
            out.extend(body);
            out
        }
    }

    fn write_temp(bytes: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("input.wav");
        std::fs::write(&path, bytes).unwrap();
        (dir, path)
    }

    fn decode_bytes(bytes: &[u8]) -> Result<DecodedAudio, AudioError> {
        let (_dir, path) = write_temp(bytes);
        decode_wav(&path)
    }

    #[test]
    fn pcm_widths_decode_to_the_same_values() {
        // -0.5, 0.25, and the most negative code of each width (exactly -1).
        let cases: Vec<(u16, Vec<u8>)> = vec![
            (8, vec![64, 160, 0]),
            (
                16,
                [-16384i16, 8192, i16::MIN]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            (
                24,
                [-4_194_304i32, 2_097_152, -8_388_608]
                    .iter()
                    .flat_map(|v| v.to_le_bytes()[..3].to_vec())
                    .collect(),
            ),
            (
                32,
                [-1_073_741_824i32, 536_870_912, i32::MIN]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
        ];
        for (bits, data) in cases {
            for extensible in [false, true] {
                let mut wav = WavBytes::pcm(bits, 1, 16_000, data.clone());
                wav.extensible = extensible;
                let decoded = decode_bytes(&wav.bytes()).unwrap();
                assert_eq!(decoded.samples, vec![-0.5, 0.25, -1.0], "{bits} bit");
                assert_eq!(decoded.sample_rate, 16_000);
            }
        }
    }

    #[test]
    fn float_32_and_64() {
        let values = [0.125f64, -0.75, 1.0];
        for (bits, data) in [
            (
                32u16,
                values
                    .iter()
                    .flat_map(|v| (*v as f32).to_le_bytes())
                    .collect::<Vec<_>>(),
            ),
            (64, values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ] {
            for extensible in [false, true] {
                let mut wav = WavBytes::pcm(bits, 1, 8_000, data.clone());
                wav.format_code = WAVE_FORMAT_IEEE_FLOAT;
                wav.extensible = extensible;
                let decoded = decode_bytes(&wav.bytes()).unwrap();
                assert_eq!(decoded.samples, vec![0.125, -0.75, 1.0], "{bits} bit float");
                assert_eq!(
                    decoded.format,
                    SampleFormat::Float {
                        bytes: bits as u8 / 8
                    }
                );
            }
        }
    }

    #[test]
    fn matches_hound_writer_for_multichannel_files() {
        // hound writes WAVE_FORMAT_EXTENSIBLE for > 2 channels and > 16 bits.
        let dir = tempfile::tempdir().unwrap();
        for (bits, channels) in [(16u16, 2u16), (24, 5), (32, 3), (8, 2)] {
            let path = dir.path().join(format!("{bits}_{channels}.wav"));
            let spec = hound::WavSpec {
                channels,
                sample_rate: 44_100,
                bits_per_sample: bits,
                sample_format: hound::SampleFormat::Int,
            };
            let mut w = hound::WavWriter::create(&path, spec).unwrap();
            let full_scale = 1i64 << (bits - 1);
            let codes: Vec<i32> = (0..channels as i64 * 10)
                .map(|i| ((i * 37 % 19 - 9) * full_scale / 10) as i32)
                .collect();
            for &c in &codes {
                w.write_sample(c).unwrap();
            }
            w.finalize().unwrap();
            let decoded = decode_wav(&path).unwrap();
            assert_eq!(decoded.channels, channels);
            assert_eq!(decoded.sample_rate, 44_100);
            assert_eq!(decoded.frames(), 10);
            for (got, code) in decoded.samples.iter().zip(&codes) {
                let want = *code as f64 / full_scale as f64;
                assert!(
                    (*got as f64 - want).abs() < 1e-6,
                    "{bits}/{channels}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn skips_metadata_chunks_with_odd_sizes() {
        let mut wav = WavBytes::pcm(16, 1, 16_000, 1000i16.to_le_bytes().repeat(4));
        wav.extra_chunks_before_data = vec![(*b"LIST", b"odd".to_vec()), (*b"junk", vec![7; 10])];
        let decoded = decode_bytes(&wav.bytes()).unwrap();
        assert_eq!(decoded.samples.len(), 4);
        assert!((decoded.samples[0] - 1000.0 / 32768.0).abs() < 1e-7);
    }

    #[test]
    fn unknown_data_size_reads_to_end_of_file() {
        let mut wav = WavBytes::pcm(16, 2, 16_000, 0i16.to_le_bytes().repeat(6));
        wav.declared_data_len = Some(UNKNOWN_DATA_SIZE);
        assert_eq!(decode_bytes(&wav.bytes()).unwrap().frames(), 3);
    }

    #[test]
    fn truncated_data_is_reported_with_both_lengths() {
        let wav = WavBytes::pcm(16, 1, 16_000, vec![0; 2000]).bytes();
        let cut = &wav[..wav.len() - 500];
        match decode_bytes(cut) {
            Err(AudioError::Truncated { reason, path }) => {
                assert!(
                    reason.contains("2000") && reason.contains("1500"),
                    "{reason}"
                );
                assert!(path.ends_with("input.wav"));
            }
            other => panic!("expected Truncated, got {other:?}"),
        }
        // Cut inside the header.
        assert!(matches!(
            decode_bytes(&wav[..30]),
            Err(AudioError::Truncated { .. })
        ));
        assert!(matches!(
            decode_bytes(&wav[..40]),
            Err(AudioError::Truncated { .. })
        ));
    }

    #[test]
    fn empty_inputs() {
        assert!(matches!(decode_bytes(&[]), Err(AudioError::Empty { .. })));
        let no_samples = WavBytes::pcm(16, 1, 16_000, vec![]).bytes();
        match decode_bytes(&no_samples) {
            Err(AudioError::Empty { reason, .. }) => assert!(reason.contains("0 sample frames")),
            other => panic!("expected Empty, got {other:?}"),
        }
    }

    #[test]
    fn not_wav_and_unsupported_codecs() {
        assert!(matches!(
            decode_bytes(b"hello, this is text and not audio\n"),
            Err(AudioError::NotWav { .. })
        ));
        for (code, name) in [(0x0006u16, "A-law"), (0x0055, "MP3"), (0x0002, "ADPCM")] {
            let mut wav = WavBytes::pcm(8, 1, 8_000, vec![0; 16]);
            wav.format_code = code;
            match decode_bytes(&wav.bytes()) {
                Err(AudioError::Unsupported { reason, .. }) => {
                    assert!(reason.contains(name), "{reason}")
                }
                other => panic!("expected Unsupported for {name}, got {other:?}"),
            }
        }
        let mut zero_channels = WavBytes::pcm(16, 1, 8_000, vec![0; 4]).bytes();
        zero_channels[22] = 0; // channel count in the fmt chunk
        assert!(matches!(
            decode_bytes(&zero_channels),
            Err(AudioError::NotWav { .. })
        ));
        let missing = Path::new("/nonexistent/dir/x.wav");
        assert!(matches!(decode_wav(missing), Err(AudioError::Open { .. })));
    }

    #[test]
    fn rates_and_channel_counts_outside_the_limits_are_refused() {
        for rate in [1u32, 999, 384_001, 2_147_483_647, u32::MAX] {
            match decode_bytes(&WavBytes::pcm(16, 1, rate, vec![0; 64]).bytes()) {
                Err(AudioError::Unsupported { reason, .. }) => {
                    assert!(
                        reason.contains(&format!("sample rate {rate} Hz")),
                        "{reason}"
                    )
                }
                other => panic!("{rate} Hz: expected Unsupported, got {other:?}"),
            }
        }
        for rate in [1_000, 384_000] {
            let wav = WavBytes::pcm(16, 1, rate, vec![0; 64]).bytes();
            assert_eq!(decode_wav_bytes(&wav).unwrap().sample_rate, rate);
            assert!(wav_bytes_16k_mono(&wav).is_ok());
        }
        let mut wav = WavBytes::pcm(8, 32, 16_000, vec![128; 64]);
        assert_eq!(decode_bytes(&wav.bytes()).unwrap().channels, 32);
        wav.channels = 33;
        wav.data = vec![128; 66];
        match decode_bytes(&wav.bytes()) {
            Err(AudioError::Unsupported { reason, .. }) => assert!(reason.contains("33 channels")),
            other => panic!("expected Unsupported, got {other:?}"),
        }
    }

    #[test]
    fn non_finite_and_huge_float_samples_are_refused() {
        for (bad, what) in [
            (f32::NAN, "NaN"),
            (f32::NEG_INFINITY, "-inf"),
            (3.0e38, "300000000"),
        ] {
            let mut values = [0.5f32; 10];
            values[7] = bad;
            let mut wav = WavBytes::pcm(
                32,
                2,
                16_000,
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            );
            wav.format_code = WAVE_FORMAT_IEEE_FLOAT;
            match decode_wav_bytes(&wav.bytes()) {
                Err(AudioError::BadSamples { reason, .. }) => {
                    assert!(reason.contains("sample 3 of channel 1"), "{reason}");
                    assert!(reason.contains(what), "{reason}");
                }
                other => panic!("{bad}: expected BadSamples, got {other:?}"),
            }
        }
        // Loud but finite float audio is kept as it is.
        let mut wav = WavBytes::pcm(32, 1, 16_000, 4.0f32.to_le_bytes().repeat(4));
        wav.format_code = WAVE_FORMAT_IEEE_FLOAT;
        assert_eq!(
            decode_wav_bytes(&wav.bytes()).unwrap().samples,
            vec![4.0; 4]
        );
    }

    #[test]
    fn long_fmt_chunks_are_skipped_past_and_chunk_runs_are_bounded() {
        // A fmt chunk with 60 extra bytes after the 40 of WAVE_FORMAT_EXTENSIBLE.
        let mut wav = WavBytes::pcm(16, 1, 16_000, 1000i16.to_le_bytes().repeat(3));
        wav.extensible = true;
        let mut bytes = wav.bytes();
        let fmt_size_at = 16;
        let fmt_end = 20 + 40;
        bytes[fmt_size_at..fmt_size_at + 4].copy_from_slice(&100u32.to_le_bytes());
        bytes.splice(fmt_end..fmt_end, [0xAB; 60]);
        assert_eq!(decode_wav_bytes(&bytes).unwrap().samples.len(), 3);
        // Thousands of empty chunks and never a data chunk.
        let mut many = b"RIFF\0\0\0\0WAVE".to_vec();
        for _ in 0..5_000 {
            many.extend(b"junk\0\0\0\0");
        }
        match decode_wav_bytes(&many) {
            Err(AudioError::NotWav { reason, .. }) => assert!(reason.contains("no data chunk")),
            other => panic!("expected NotWav, got {other:?}"),
        }
    }

    #[test]
    fn block_by_block_reading_equals_reading_whole() {
        // 24-bit stereo: 6-byte frames, so blocks end inside READ_BLOCK_BYTES;
        // several blocks long.
        let frames = 3 * READ_BLOCK_BYTES / 6 + 123;
        let codes: Vec<i32> = (0..frames as i32 * 2)
            .map(|i| (i * 7919 % 16_000_000) - 8_000_000)
            .collect();
        let data: Vec<u8> = codes
            .iter()
            .flat_map(|c| c.to_le_bytes()[..3].to_vec())
            .collect();
        let bytes = WavBytes::pcm(24, 2, 44_100, data).bytes();
        let decoded = decode_wav_bytes(&bytes).unwrap();
        assert_eq!(decoded.frames(), frames);
        for (got, code) in decoded.samples.iter().zip(&codes) {
            assert_eq!(*got, *code as f32 / 8_388_608.0);
        }
        // The block-wise 16 kHz path gives exactly what converting the
        // whole signal at once gives.
        let whole = resample::resample(
            &resample::downmix(&decoded.samples, 2),
            44_100,
            MODEL_SAMPLE_RATE,
        )
        .unwrap();
        assert_eq!(wav_bytes_16k_mono(&bytes).unwrap(), whole);
        let (_dir, path) = write_temp(&bytes);
        assert_eq!(read_wav_16k_mono(&path).unwrap(), whole);
        let (mono, rate) = read_wav_mono(&path).unwrap();
        assert_eq!(
            (mono, rate),
            (resample::downmix(&decoded.samples, 2), 44_100)
        );
    }

    #[test]
    fn read_16k_mono_downmixes_and_resamples() {
        // Stereo 32 kHz: left = +0.5, right = -0.25 → mono 0.125, half the frames.
        let frames = 3200;
        let data: Vec<u8> = (0..frames)
            .flat_map(|_| [16384i16, -8192].into_iter().flat_map(|v| v.to_le_bytes()))
            .collect();
        let (_dir, path) = write_temp(&WavBytes::pcm(16, 2, 32_000, data).bytes());
        let mono = read_wav_16k_mono(&path).unwrap();
        assert_eq!(mono.len(), frames / 2);
        // Away from the edges (where the filter sees the step from silence).
        for v in &mono[100..mono.len() - 100] {
            assert!((v - 0.125).abs() < 1e-3, "{v}");
        }
    }
}
