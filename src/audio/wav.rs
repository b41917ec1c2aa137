//! WAV decoding: PCM integers of 8 (unsigned), 16, 24 and 32 bits (or any
//! width padded into 1–4 byte containers), IEEE float of 32 and 64 bits,
//! plain or WAVE_FORMAT_EXTENSIBLE headers, any channel count and rate.
//!
//! The RIFF parser is our own rather than `hound`'s so that a file cut short
//! is reported as such (declared vs. present bytes) instead of as a generic
//! I/O error halfway through decoding, and so that 64-bit float works.

use super::{resample, AudioError, MODEL_SAMPLE_RATE};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
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
        0x6750 | 0x6751 | 0x674F => "Ogg Vorbis",
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

fn parse_fmt(body: &[u8], path: &str) -> Result<FmtChunk, AudioError> {
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
            "fmt chunk is {} bytes, at least 16 expected",
            body.len()
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
                "WAVE_FORMAT_EXTENSIBLE fmt chunk is {} bytes, 40 expected",
                body.len()
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
    let container_bytes = block_align / channels;
    if container_bytes == 0 || block_align % channels != 0 {
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
                    container_bytes * 8
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

/// Turns the raw bytes of whole frames into f32 samples in [-1, 1].
fn convert(data: &[u8], format: SampleFormat) -> Vec<f32> {
    match format {
        SampleFormat::Int {
            container_bytes: 1, ..
        } => data.iter().map(|&b| (b as f32 - 128.0) / 128.0).collect(),
        SampleFormat::Int {
            container_bytes: 2, ..
        } => data
            .chunks_exact(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]) as f32 / 32_768.0)
            .collect(),
        SampleFormat::Int {
            container_bytes: 3, ..
        } => data
            // Put the 3 bytes in the top of an i32 so the sign extends.
            .chunks_exact(3)
            .map(|c| (i32::from_le_bytes([0, c[0], c[1], c[2]]) >> 8) as f32 / 8_388_608.0)
            .collect(),
        SampleFormat::Int { .. } => data
            .chunks_exact(4)
            .map(|c| (i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64 / 2_147_483_648.0) as f32)
            .collect(),
        SampleFormat::Float { bytes: 4 } => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        SampleFormat::Float { .. } => data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
    }
}

/// Reads a WAV file into interleaved f32 samples.
pub fn decode_wav(path: &Path) -> Result<DecodedAudio, AudioError> {
    let p = path.display().to_string();
    let open_err = |source: std::io::Error| AudioError::Open {
        path: p.clone(),
        source,
    };
    let not_wav = |reason: String| AudioError::NotWav {
        path: p.clone(),
        reason,
    };
    let mut file = File::open(path).map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    if meta.is_dir() {
        return Err(not_wav("is a directory".into()));
    }
    let file_len = meta.len();
    if file_len == 0 {
        return Err(AudioError::Empty {
            path: p.clone(),
            reason: "the file is empty (0 bytes)".into(),
        });
    }
    let mut header = [0u8; 12];
    let got = read_up_to(&mut file, &mut header).map_err(open_err)?;
    match &header[..4.min(got)] {
        b"RIFF" if got == 12 && &header[8..12] == b"WAVE" => {}
        b"RIFX" => {
            return Err(AudioError::Unsupported {
                path: p.clone(),
                reason: "big-endian RIFX container".into(),
            })
        }
        b"RF64" | b"BW64" => {
            return Err(AudioError::Unsupported {
                path: p.clone(),
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
    loop {
        let mut chunk_header = [0u8; 8];
        let got = read_up_to(&mut file, &mut chunk_header).map_err(open_err)?;
        if got < 8 {
            return Err(match fmt {
                None => AudioError::Truncated {
                    path: p.clone(),
                    reason: format!("the file ends after {file_len} bytes, before a fmt chunk"),
                },
                Some(_) => AudioError::Truncated {
                    path: p.clone(),
                    reason: format!("the file ends after {file_len} bytes, before a data chunk"),
                },
            });
        }
        pos += 8;
        let id = [
            chunk_header[0],
            chunk_header[1],
            chunk_header[2],
            chunk_header[3],
        ];
        let size = le_u32(&chunk_header, 4);
        let available = file_len - pos;
        match &id {
            b"fmt " => {
                if size as u64 > available {
                    return Err(AudioError::Truncated {
                        path: p.clone(),
                        reason: format!(
                            "fmt chunk declares {size} bytes but only {available} follow"
                        ),
                    });
                }
                let mut body = vec![0u8; size as usize];
                file.read_exact(&mut body).map_err(open_err)?;
                fmt = Some(parse_fmt(&body, &p)?);
            }
            b"data" => {
                let fmt =
                    fmt.ok_or_else(|| not_wav("data chunk comes before the fmt chunk".into()))?;
                return read_data(&mut file, &p, fmt, size, available);
            }
            _ => {
                // LIST, fact, bext, …: metadata we do not need.
                if size as u64 > available {
                    return Err(AudioError::Truncated {
                        path: p.clone(),
                        reason: format!(
                            "chunk `{}` declares {size} bytes but only {available} follow, and no data chunk was found",
                            String::from_utf8_lossy(&id)
                        ),
                    });
                }
            }
        }
        // Chunks are padded to an even length.
        let padded = size as u64 + (size as u64 & 1);
        pos += padded;
        file.seek(SeekFrom::Start(pos)).map_err(open_err)?;
    }
}

fn read_data(
    file: &mut File,
    path: &str,
    fmt: FmtChunk,
    declared: u32,
    available: u64,
) -> Result<DecodedAudio, AudioError> {
    let block = fmt.block_align as u64;
    let len = if declared == UNKNOWN_DATA_SIZE {
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
        if declared as u64 % block != 0 {
            tracing::warn!(
                path,
                declared,
                block_align = fmt.block_align,
                "data chunk is not a whole number of frames; ignoring the partial frame"
            );
        }
        declared as u64 - declared as u64 % block
    };
    if len == 0 {
        return Err(AudioError::Empty {
            path: path.to_string(),
            reason: "the data chunk holds 0 sample frames".into(),
        });
    }
    let mut data = vec![0u8; len as usize];
    file.read_exact(&mut data)
        .map_err(|source| AudioError::Open {
            path: path.to_string(),
            source,
        })?;
    let samples = convert(&data, fmt.format);
    tracing::debug!(
        path,
        channels = fmt.channels,
        sample_rate = fmt.sample_rate,
        format = ?fmt.format,
        frames = samples.len() / fmt.channels as usize,
        "decoded WAV"
    );
    Ok(DecodedAudio {
        samples,
        channels: fmt.channels,
        sample_rate: fmt.sample_rate,
        format: fmt.format,
    })
}

/// Like `read_exact`, but returns how many bytes were read when the file ends first.
fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Reads a WAV file as 16 kHz mono f32, the form every model consumes.
pub fn read_wav_16k_mono(path: &Path) -> Result<Vec<f32>, AudioError> {
    let decoded = decode_wav(path)?;
    let mono = resample::downmix(&decoded.samples, decoded.channels as usize);
    resample::resample(&mono, decoded.sample_rate, MODEL_SAMPLE_RATE).map_err(|e| match e {
        AudioError::Resample(reason) => {
            AudioError::Resample(format!("{}: {reason}", path.display()))
        }
        other => other,
    })
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
