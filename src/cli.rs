//! Command line: argument definitions and dispatch. Library errors are turned
//! into messages and exit codes here, at the binary's edge.

use crate::audio::{wav, AudioError};
use crate::device::DeviceChoice;
use crate::eval::run::EvalOptions;
use crate::fetch::{self, FetchError};
use crate::model::whisper::{DecoderWeights, Task};
use crate::model::RecognizerOptions;
use crate::output::{write_transcript, OutputFormat};
use crate::stream::sink::{LiveFormat, StdoutSink};
use crate::stream::tracker::TrackerConfig;
use crate::transcribe::TranscribeOptions;
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A command-line mirror of a library enum: the same variants with clap's
/// `ValueEnum` (a variant's doc comment is its help in `--help`), and
/// conversions both ways, so the library types need no clap and the
/// defaults shown are the library's `Default`s.
macro_rules! value_enum {
    ($(#[$meta:meta])* $name:ident => $lib:ty { $($(#[$vmeta:meta])* $variant:ident),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
        pub enum $name {
            $($(#[$vmeta])* $variant),*
        }
        impl From<$name> for $lib {
            fn from(v: $name) -> Self {
                match v {
                    $($name::$variant => <$lib>::$variant),*
                }
            }
        }
        impl From<$lib> for $name {
            fn from(v: $lib) -> Self {
                match v {
                    $(<$lib>::$variant => $name::$variant),*
                }
            }
        }
    };
}

value_enum! {
    /// `--compute`.
    DeviceArg => DeviceChoice {
        /// CUDA if compiled in and present, else Metal if compiled in, else CPU.
        Auto,
        Cpu,
        Cuda,
        Metal,
    }
}

value_enum! {
    /// `--decoder-weights`.
    DecoderWeightsArg => DecoderWeights {
        /// Int8 copies (a quarter of the memory traffic; logits within ~1e-2).
        Int8,
        /// The f32 weights as loaded (bit-for-bit the reference computation).
        F32,
    }
}

value_enum! {
    /// `transcribe --task`.
    TaskArg => Task {
        Transcribe,
        Translate,
    }
}

value_enum! {
    /// `transcribe --format`.
    OutputFormatArg => OutputFormat {
        Text,
        Jsonl,
        Srt,
        Vtt,
    }
}

value_enum! {
    /// Live `--format`.
    LiveFormatArg => LiveFormat {
        /// One line of text per final.
        Text,
        /// Every event as a JSON object per line.
        Jsonl,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ComputeDType {
    F32,
    F16,
    Bf16,
}

impl ComputeDType {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            ComputeDType::F32 => candle_core::DType::F32,
            ComputeDType::F16 => candle_core::DType::F16,
            ComputeDType::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// Exit code for unusable input (bad audio file, bad arguments).
pub const EXIT_BAD_INPUT: u8 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "stepaudio-live",
    version,
    about = "Real-time streaming speech-to-text",
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(flatten)]
    pub live: LiveArgs,
}

/// Live transcription (the default command): one source, events to stdout.
#[derive(Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("source").args(["mic", "input", "stdin", "list_devices"])))]
pub struct LiveArgs {
    /// Capture from a microphone (the default input device unless --device).
    #[arg(long)]
    pub mic: bool,
    /// Input device name (exact, or a unique part of it); see --list-devices.
    #[arg(long, requires = "mic")]
    pub device: Option<String>,
    /// When the microphone fails or disappears, exit (status 1, after the
    /// open segment's final) instead of opening it again with back-off.
    #[arg(long, requires = "mic")]
    pub no_reconnect: bool,
    /// List audio input devices and exit.
    #[arg(long)]
    pub list_devices: bool,
    /// Transcribe a WAV file as a stream.
    #[arg(long, value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// Pace --input like a live source instead of as fast as possible.
    #[arg(long, requires = "input")]
    pub realtime: bool,
    /// Read raw s16le audio from stdin (needs --rate).
    #[arg(long, requires = "rate")]
    pub stdin: bool,
    /// Sample rate of --stdin audio (1000 to 384000).
    #[arg(long, value_name = "HZ", value_parser = clap::value_parser!(u32).range(
        crate::audio::MIN_SAMPLE_RATE as i64..=crate::audio::MAX_SAMPLE_RATE as i64))]
    pub rate: Option<u32>,
    /// Channels of --stdin audio (interleaved, 1 to 32).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(
        1..=crate::audio::MAX_CHANNELS as i64))]
    pub channels: u16,
    /// Output: text (a line per final) or jsonl (every event).
    #[arg(long = "format", value_enum, default_value_t = LiveFormat::default().into())]
    pub live_format: LiveFormatArg,
    /// Also serve the events over WebSocket (and the captions page) on ADDR.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = crate::server::DEFAULT_ADDR)]
    pub ws: Option<String>,
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub stream: StreamArgs,
    /// Seconds between stats events in jsonl output (0: only at the end).
    #[arg(long, default_value_t = 10.0)]
    pub stats_interval: f64,
}

/// Segmenting and recogniser options, shared by live sources and the
/// server's audio-in sessions.
#[derive(Args, Debug, Clone)]
pub struct StreamArgs {
    /// Spoken language for multilingual models (default en).
    #[arg(long = "lang")]
    pub lang: Option<String>,
    /// VAD aggressiveness, 0 (keeps most) to 3 (rejects most non-speech).
    // 1, not 2: mode 2 cut a hoarse speaker's words out of segments (eval
    // cold corpus: "the original one" lost); the noise it lets through is
    // what the no-speech rule catches.
    #[arg(long, default_value_t = TrackerConfig::default().vad_mode,
          value_parser = clap::value_parser!(u8).range(0..=3))]
    pub vad_mode: u8,
    /// VAD frame length in ms: 10, 20 or 30.
    #[arg(long, default_value_t = TrackerConfig::default().frame_ms, value_parser = parse_vad_frame_ms)]
    pub vad_frame_ms: u32,
    /// Silence (ms) that ends a segment.
    #[arg(long, default_value_t = TrackerConfig::default().hangover_ms)]
    pub hangover_ms: u32,
    /// Continuous speech (ms) needed to open a segment (shorter blips, e.g. clicks, are ignored).
    #[arg(long, default_value_t = TrackerConfig::default().min_speech_ms)]
    pub min_speech_ms: u32,
    /// Audio (ms) kept before the detected speech onset.
    #[arg(long, default_value_t = TrackerConfig::default().pre_roll_ms)]
    pub pre_roll_ms: u32,
    /// Audio (ms) kept after the last voiced frame.
    #[arg(long, default_value_t = TrackerConfig::default().tail_pad_ms)]
    pub tail_pad_ms: u32,
    /// Longest segment (s); longer speech is cut at the quietest recent point.
    #[arg(long, default_value_t = TrackerConfig::default().max_segment_ms as f64 / 1000.0)]
    pub max_segment: f64,
    /// Seconds of new audio between partial hypotheses.
    #[arg(long, default_value_t = TrackerConfig::default().partial_interval_ms as f64 / 1000.0)]
    pub partial_interval: f64,
    /// Step-Audio 2 system prompt (default: the Chinese ASR prompt; `--lang en` the English one).
    #[arg(long = "asr-prompt", visible_alias = "prompt")]
    pub prompt: Option<String>,
    /// Step-Audio 2: restart from the system prompt when the context passes this many tokens.
    #[arg(long, default_value_t = RecognizerOptions::default().step_audio_max_context)]
    pub max_context: usize,
    /// Whisper: run the encoder over the whole 30 s window for every decode
    /// (as offline transcription) instead of only the segment's audio plus
    /// 0.5 s, with the padding's states reused from a padding-only window.
    #[arg(long)]
    pub full_window: bool,
    /// Encode an open segment's whole audio for every partial instead of
    /// only the audio since its last partial plus 1 s (the earlier audio's
    /// encoder states, or Step-Audio 2's audio rows and KV cache, reused).
    /// Finals are always encoded whole.
    #[arg(long)]
    pub full_partials: bool,
    /// Whisper: decode the previous segment again in front of the next one,
    /// its text forced, when it is at most this long (s; 0: off), so a
    /// segment's first words have the speech before them as context.
    #[arg(long, default_value_t = RecognizerOptions::default().whisper_carry_seconds,
          value_parser = parse_seconds)]
    pub carry_audio: f64,
}

/// WebSocket server options (`--ws` and `serve`).
#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// Secret every WebSocket client must send (`Authorization: Bearer` or `?token=`).
    #[arg(long, value_name = "SECRET")]
    pub token: Option<String>,
    /// Allow a non-loopback address without --token.
    #[arg(long)]
    pub insecure: bool,
    /// Web page origin allowed to connect besides the server's own (repeatable; `*` for any).
    #[arg(long = "allow-origin", value_name = "ORIGIN")]
    pub allow_origin: Vec<String>,
    /// Most audio-in sessions at once.
    #[arg(long, default_value_t = crate::server::Limits::default().max_sessions)]
    pub max_sessions: usize,
    /// Most subscribers at once.
    #[arg(long, default_value_t = crate::server::Limits::default().max_subscribers)]
    pub max_subscribers: usize,
    /// Largest WebSocket message a client may send (bytes).
    #[arg(long, default_value_t = crate::server::Limits::default().max_message_bytes)]
    pub max_message_bytes: usize,
    /// Events queued per subscriber before its partials are dropped.
    #[arg(long, default_value_t = crate::server::Limits::default().subscriber_queue)]
    pub subscriber_queue: usize,
    /// Finals kept per stream for subscribers that reconnect with `since`.
    #[arg(long, value_name = "N", default_value_t = crate::server::Limits::default().keep_finals)]
    pub keep_finals: usize,
    /// Streams whose finals are still kept after they end.
    #[arg(long, value_name = "N", default_value_t = crate::server::Limits::default().keep_streams)]
    pub keep_streams: usize,
    /// Live streams the engine decodes at once (the local source and every
    /// audio-in session); one more is refused with `too_many_sessions`.
    /// Default: the capacity measured for the model on this kind of device
    /// (README, "How many streams").
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_streams: Option<u64>,
    /// Most decodes the engine runs as one batch.
    #[arg(long, value_name = "N", default_value_t = crate::stream::engine::EngineConfig::default().max_batch as u64, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_batch: u64,
    /// Decode one batch at a time instead of the continuous batch (decodes
    /// joining the running batch between steps), where the continuous batch
    /// is the default (Step-Audio 2 on a GPU): finals a little sooner under
    /// load, fewer partials (README, "Many streams on one GPU").
    #[arg(long)]
    pub batch_at_a_time: bool,
    /// Least time between the starts of two partials of a stream while other
    /// streams wait for theirs: lower gives each stream partials more often
    /// under load, at some cost to how many streams fit (README, "The
    /// finals' deadline, and capacity with both bounds").
    #[arg(long, value_name = "MS", default_value_t = crate::stream::engine::EngineConfig::default().partial_spacing.as_millis() as u64)]
    pub partial_spacing_ms: u64,
}

impl ServerArgs {
    /// The stream engine's configuration for `model`.
    fn engine_config(
        &self,
        model: &crate::model::LoadedModel,
    ) -> crate::stream::engine::EngineConfig {
        let defaults = crate::stream::engine::EngineConfig::for_model(model);
        crate::stream::engine::EngineConfig {
            max_streams: self
                .max_streams
                .map_or(defaults.max_streams, |n| n as usize),
            max_batch: self.max_batch as usize,
            continuous: defaults.continuous && !self.batch_at_a_time,
            partial_spacing: std::time::Duration::from_millis(self.partial_spacing_ms),
            ..defaults
        }
    }
}

/// `serve`: the WebSocket server alone; audio comes only from clients.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on (host:port; port 0 picks a free one).
    #[arg(default_value = crate::server::DEFAULT_ADDR)]
    pub addr: String,
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub stream: StreamArgs,
}

#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// Model name (looked up in the cache, fetched if missing) or directory.
    #[arg(long, global = true, default_value = "tiny.en")]
    pub model: String,
    /// Compute device for the model.
    #[arg(long, global = true, value_enum, default_value_t = DeviceChoice::default().into())]
    pub compute: DeviceArg,
    /// Compute precision of the model (default: f32 on the CPU, bf16 on a GPU).
    #[arg(long, global = true, value_enum)]
    pub dtype: Option<ComputeDType>,
    /// Decoder weights for CPU decode steps: int8 (fast) or f32 (exact).
    #[arg(long, global = true, value_enum, default_value_t = DecoderWeights::default().into())]
    pub decoder_weights: DecoderWeightsArg,
    /// More log output on stderr (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Transcribe audio files and print their text.
    Transcribe(TranscribeArgs),
    /// List, fetch, verify or describe models.
    Models {
        #[command(subcommand)]
        action: ModelsAction,
    },
    /// Word error rate over a manifest: transcribe it, or score --hyp.
    Eval(EvalArgs),
    /// WebSocket server without a local source: clients send audio, subscribers get events.
    Serve(ServeArgs),
}

#[derive(Subcommand, Debug)]
pub enum ModelsAction {
    /// Known model names, their pinned sources and whether they are in the cache.
    List,
    /// Download a model into the cache (files checked against their pins).
    Fetch {
        name: String,
        /// Download again and replace the cached copy.
        #[arg(long)]
        force: bool,
    },
    /// Hash every file of cached models again and compare with the pins.
    Verify {
        /// One model (default: every known model in the cache).
        name: Option<String>,
    },
    /// Size and SHA-256 of every file in a model directory (or a cached name).
    Info { dir: String },
}

// `eval`'s options (the subcommand's about text is the doc of `Command::Eval`).
#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// Manifest: TSV with a header naming at least the columns id, file,
    /// language and transcript (file paths relative to the manifest).
    #[arg(long)]
    pub manifest: PathBuf,
    /// Only the entries of this language (manifest column); all when omitted.
    #[arg(long)]
    pub lang: Option<String>,
    /// Score these hypotheses (JSON lines with `id` and `text`) instead of
    /// transcribing with the model.
    #[arg(long)]
    pub hyp: Option<PathBuf>,
    /// Also write the hypotheses as JSON lines (the format --hyp reads).
    #[arg(long)]
    pub write_hyp: Option<PathBuf>,
    /// Print one JSON object instead of the human-readable report.
    #[arg(long)]
    pub json: bool,
}

impl EvalArgs {
    fn options(&self) -> EvalOptions {
        EvalOptions {
            manifest: self.manifest.clone(),
            lang: self.lang.clone(),
            hyp: self.hyp.clone(),
            write_hyp: self.write_hyp.clone(),
            json: self.json,
        }
    }
}

#[derive(Args, Debug)]
pub struct TranscribeArgs {
    /// WAV files (any PCM width, float, channel count and sample rate).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    #[arg(long, value_enum, default_value_t = OutputFormat::default().into())]
    pub format: OutputFormatArg,
    /// Spoken language (e.g. en, zh, de); detected when omitted on multilingual Whisper models. Step-Audio 2: `en` selects the English ASR prompt.
    #[arg(long)]
    pub language: Option<String>,
    #[arg(long, value_enum, default_value_t = Task::default().into())]
    pub task: TaskArg,
    /// Decode without timestamp tokens (one segment per 30 s window).
    #[arg(long)]
    pub no_timestamps: bool,
    /// Do not feed the previous window's text back as a prompt.
    #[arg(long)]
    pub no_condition: bool,
    /// Text to prime the decoder with (names, spelling); for Step-Audio 2, the ASR system prompt.
    #[arg(long)]
    pub prompt: Option<String>,
}

fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.global.verbose);
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            let fetch_code = err
                .chain()
                .find_map(|e| e.downcast_ref::<FetchError>().map(FetchError::exit_code));
            if let Some(code) = fetch_code {
                ExitCode::from(code)
            } else if err
                .chain()
                .any(|e| e.downcast_ref::<AudioError>().is_some())
            {
                ExitCode::from(EXIT_BAD_INPUT)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let live_source =
        cli.live.mic || cli.live.input.is_some() || cli.live.stdin || cli.live.list_devices;
    if cli.command.is_some() && live_source {
        eprintln!("error: --mic, --input, --stdin and --list-devices start live mode; they do not combine with a subcommand");
        return Ok(ExitCode::from(EXIT_BAD_INPUT));
    }
    match cli.command {
        Some(Command::Transcribe(args)) => transcribe(&cli.global, args),
        Some(Command::Models { action }) => models(action),
        Some(Command::Eval(args)) => {
            let stdout = &mut std::io::stdout().lock();
            crate::eval::run::run_eval(
                &args.options(),
                &cli.global.model,
                cli.global.compute.into(),
                cli.global.dtype.map(ComputeDType::dtype),
                cli.global.decoder_weights.into(),
                stdout,
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Serve(args)) => serve(&cli.global, &args),
        None => live(&cli.global, &cli.live),
    }
}

fn models(action: ModelsAction) -> anyhow::Result<ExitCode> {
    match action {
        ModelsAction::List => {
            let models_dir = fetch::models_dir();
            println!("cache: {}", models_dir.display());
            println!(
                "{:<18} {:<7} {:<96} path",
                "name", "cached", "sources (pinned)"
            );
            for m in fetch::KNOWN_MODELS {
                println!(
                    "{:<18} {:<7} {:<96} {}",
                    m.name,
                    if fetch::is_cached(m.name) {
                        "yes"
                    } else {
                        "no"
                    },
                    m.source_labels(),
                    fetch::cached_path(m.name).display()
                );
            }
            // Models put into the cache by hand (not in the table).
            let mut others: Vec<String> = std::fs::read_dir(&models_dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| !n.starts_with('.') && fetch::known_model(n).is_none())
                .collect();
            others.sort();
            for name in others {
                let path = models_dir.join(&name);
                let cached = crate::model::detect_layout(&path).is_ok();
                println!(
                    "{:<18} {:<7} {:<96} {}",
                    name,
                    if cached { "yes" } else { "no" },
                    "(local, not verified)",
                    path.display()
                );
            }
        }
        ModelsAction::Fetch { name, force } => {
            if fetch::is_cached(&name) && !force {
                eprintln!("{name} is already in the cache (checking it)");
            }
            println!("{}", fetch::fetch(&name, force)?.display());
        }
        ModelsAction::Verify { name } => {
            let names: Vec<String> = match name {
                Some(n) => vec![n],
                None => fetch::KNOWN_MODELS
                    .iter()
                    .filter(|m| fetch::cached_path(m.name).is_dir())
                    .map(|m| m.name.to_string())
                    .collect(),
            };
            let mut failed = None;
            for name in &names {
                match fetch::verify_cached(name) {
                    Ok(files) => println!("{name}: ok ({files} files match their pins)"),
                    Err(e) => {
                        println!("{name}: FAILED");
                        eprintln!("error: {e}");
                        failed.get_or_insert(e.exit_code());
                    }
                }
            }
            if names.is_empty() {
                eprintln!(
                    "no known model is in the cache ({})",
                    fetch::models_dir().display()
                );
            }
            if let Some(code) = failed {
                return Ok(ExitCode::from(code));
            }
        }
        ModelsAction::Info { dir } => {
            let path = if std::path::Path::new(&dir).is_dir() {
                std::path::PathBuf::from(&dir)
            } else if fetch::cached_path(&dir).is_dir() {
                fetch::cached_path(&dir)
            } else {
                return Err(FetchError::NoSuchDirectory { path: dir }.into());
            };
            let layout = crate::model::detect_layout(&path)?;
            let family = if crate::model::is_step_audio2_dir(&path) {
                "Step-Audio 2"
            } else {
                "Whisper"
            };
            println!("{}: {family}, {layout:?} layout", path.display());
            let files = fetch::describe_dir(&path)?;
            // Which known model, if any, these files are.
            let matches = fetch::KNOWN_MODELS.iter().find(|m| {
                m.files.iter().all(|pin| {
                    files.iter().any(|(p, size, sha)| {
                        p.file_name().is_some_and(|n| n == pin.name)
                            && pin.size.is_none_or(|s| s == *size)
                            && pin.sha256.is_none_or(|h| h == sha)
                    })
                })
            });
            for (file, size, sha) in &files {
                let name = file.file_name().unwrap_or_default().to_string_lossy();
                println!("{sha}  {size:>12}  {name}");
            }
            match matches {
                Some(m) => println!("matches the pins of known model `{}`", m.name),
                None => println!("matches no known model's pins"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn transcribe(global: &GlobalArgs, args: TranscribeArgs) -> anyhow::Result<ExitCode> {
    // Read every file first: a bad file fails fast, before the model loads.
    let mut inputs = Vec::with_capacity(args.files.len());
    for f in &args.files {
        inputs.push((f.display().to_string(), wav::read_wav_16k_mono(f)?));
    }
    let model = load_model(global)?;
    let opts = TranscribeOptions {
        language: args.language.clone(),
        task: args.task.into(),
        timestamps: !args.no_timestamps,
        condition_on_previous_text: !args.no_condition,
        initial_prompt: args.prompt.clone(),
        ..Default::default()
    };
    let step_audio = crate::model::step_audio2::SessionOptions {
        system_prompt: step_audio_prompt(args.prompt.as_deref(), args.language.as_deref()),
        ..Default::default()
    };
    let stdout = std::io::stdout();
    for (name, audio) in inputs {
        let transcript = crate::transcribe::transcribe_loaded(&model, &audio, &opts, &step_audio)
            .with_context(|| format!("transcribing {name}"))?;
        let mut lock = stdout.lock();
        write_transcript(&mut lock, args.format.into(), &name, &transcript.segments)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Step-Audio 2's ASR system prompt: the given text, else English for
/// `en`, else the published (Chinese) one.
fn step_audio_prompt(
    prompt: Option<&str>,
    lang: Option<&str>,
) -> crate::model::step_audio2::prompt::SystemPrompt {
    use crate::model::step_audio2::prompt::SystemPrompt;
    match (prompt, lang) {
        (Some(p), _) => SystemPrompt::Custom(p.to_string()),
        (None, Some("en")) => SystemPrompt::English,
        (None, _) => SystemPrompt::Chinese,
    }
}

/// Raises the stop flag on the first Ctrl-C / SIGTERM / SIGHUP (the pipeline
/// then flushes the open segment); a second signal exits at once.
fn install_stop_handler() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("second interrupt: exiting without flushing");
            std::process::exit(130);
        }
        eprintln!("stopping: finishing the current segment (interrupt again to quit now)");
    })
    .context("installing the signal handler")?;
    Ok(stop)
}

fn live(global: &GlobalArgs, args: &LiveArgs) -> anyhow::Result<ExitCode> {
    use crate::audio::source::{list_input_devices, start_source, SourceSpec};
    use crate::stream::pipeline::{run_live, LiveError, LiveOptions, Reconnect};
    if args.list_devices {
        for d in list_input_devices()? {
            println!("{d}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let spec = if args.mic {
        SourceSpec::Mic {
            device: args.device.clone(),
        }
    } else if let Some(path) = &args.input {
        SourceSpec::File {
            path: path.clone(),
            realtime: args.realtime,
        }
    } else if args.stdin {
        SourceSpec::Stdin {
            sample_rate: args.rate.unwrap_or(0),
            channels: args.channels,
        }
    } else {
        eprintln!(
            "nothing to do: give --mic, --input FILE or --stdin, or a subcommand (see --help)"
        );
        return Ok(ExitCode::from(EXIT_BAD_INPUT));
    };
    args.stream.validate()?;
    let stop = install_stop_handler()?;
    let model = load_model(global)?;
    let recognizer = model.recognizer(&args.stream.recognizer_options())?;
    // One engine for the local source and, with --ws, every audio-in session.
    let (engine, engine_thread) =
        crate::stream::engine::spawn(model.clone(), args.server.engine_config(&model))
            .context("starting the stream engine")?;
    // The server starts before the source, so that subscribers can join
    // before the first word.
    let server = match &args.ws {
        Some(addr) => {
            let config = server_config(addr, global, &args.server, &args.stream);
            let server = crate::server::Server::start_on(config, engine.clone(), None)?;
            announce(server.local_addr(), args.server.token.is_some());
            Some(server)
        }
        None => None,
    };
    let publisher = server.as_ref().map(|s| s.publisher());
    let source = start_source(&spec, stop.clone()).map_err(|e| match e {
        crate::audio::source::SourceError::Audio(a) => anyhow::Error::new(a),
        other => anyhow::Error::new(other),
    })?;
    let opts = LiveOptions {
        tracker: args.stream.tracker_config(),
        stats_interval: (args.stats_interval > 0.0)
            .then(|| std::time::Duration::from_secs_f64(args.stats_interval)),
        // A file or stdin that fails is not opened again.
        reconnect: (args.mic && !args.no_reconnect).then(|| Reconnect::new(spec.clone())),
    };
    let mut sink = StdoutSink::stdout(args.live_format.into());
    let mut stdout_gone = false;
    let result = run_live(source, &engine, recognizer, &opts, stop.clone(), |ev| {
        if let Some(p) = &publisher {
            p.publish(crate::server::protocol::LOCAL_STREAM, ev);
        }
        if stdout_gone {
            return;
        }
        if let Err(e) = sink.handle(ev) {
            // A closed pipe (`| head`) ends the stream cleanly.
            tracing::info!("stdout closed ({e}); stopping");
            stdout_gone = true;
            stop.store(true, Ordering::SeqCst);
        }
    });
    let _ = sink.finish();
    // Every local event is published by now; sessions flush, then all close.
    if let Some(server) = server {
        server.shutdown();
    }
    drop(engine);
    if engine_thread.join().is_err() {
        tracing::error!("the stream engine panicked");
    }
    let summary = result.map_err(|e| match e {
        LiveError::Source(_) if args.no_reconnect => anyhow::Error::new(e)
            .context("the microphone failed (--no-reconnect: not opening it again)"),
        e => e.into(),
    })?;
    tracing::info!(
        audio_s = summary.stats.audio_seconds,
        dropped = summary.stats.dropped_samples,
        "live transcription ended"
    );
    Ok(ExitCode::SUCCESS)
}

fn load_model(global: &GlobalArgs) -> anyhow::Result<crate::model::LoadedModel> {
    let dir = fetch::resolve(&global.model)?;
    Ok(crate::model::LoadedModel::load(
        &dir,
        global.compute.into(),
        global.dtype.map(ComputeDType::dtype),
        global.decoder_weights.into(),
    )?)
}

fn serve(global: &GlobalArgs, args: &ServeArgs) -> anyhow::Result<ExitCode> {
    args.stream.validate()?;
    let stop = install_stop_handler()?;
    let model = load_model(global)?;
    let config = crate::server::ServerConfig {
        engine: Some(args.server.engine_config(&model)),
        ..server_config(&args.addr, global, &args.server, &args.stream)
    };
    let token = args.server.token.is_some();
    let summary = crate::server::run_serve(config, model, stop, |addr| announce(addr, token))?;
    if summary.unflushed_sessions > 0 {
        anyhow::bail!(
            "{} session(s) had not flushed their last segment at shutdown",
            summary.unflushed_sessions
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Tells the user (and scripts, which parse the `listening on` line) where
/// the server is.
fn announce(addr: std::net::SocketAddr, token: bool) {
    let hint = if token { "?token=…" } else { "" };
    eprintln!(
        "listening on ws://{addr} (captions page http://{addr}/{hint}, subscribe {}, audio in {})",
        crate::server::protocol::SUBSCRIBE_PATH,
        crate::server::protocol::AUDIO_PATH
    );
}

fn server_config(
    addr: &str,
    global: &GlobalArgs,
    server: &ServerArgs,
    stream: &StreamArgs,
) -> crate::server::ServerConfig {
    crate::server::ServerConfig {
        addr: addr.to_string(),
        token: server.token.clone(),
        insecure: server.insecure,
        allowed_origins: server.allow_origin.clone(),
        limits: crate::server::Limits {
            max_sessions: server.max_sessions,
            max_subscribers: server.max_subscribers,
            max_message_bytes: server.max_message_bytes,
            subscriber_queue: server.subscriber_queue,
            keep_finals: server.keep_finals,
            keep_streams: server.keep_streams,
        },
        tracker: stream.tracker_config(),
        recognizer: stream.recognizer_options(),
        // A directory shows as its last component, a cache name as itself.
        model_name: std::path::Path::new(&global.model).file_name().map_or_else(
            || global.model.clone(),
            |n| n.to_string_lossy().into_owned(),
        ),
        engine: None,
    }
}

fn parse_vad_frame_ms(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(ms @ (10 | 20 | 30)) => Ok(ms),
        _ => Err(format!("`{s}`: WebRTC VAD frames are 10, 20 or 30 ms")),
    }
}

/// A length of audio in seconds: finite and not negative.
fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("`{s}`: expected seconds, a number ≥ 0")),
    }
}

impl StreamArgs {
    fn validate(&self) -> anyhow::Result<()> {
        if !(self.partial_interval > 0.0 && self.max_segment > 1.0) {
            anyhow::bail!("--partial-interval must be positive and --max-segment over 1 s");
        }
        Ok(())
    }

    fn tracker_config(&self) -> TrackerConfig {
        TrackerConfig {
            vad_mode: self.vad_mode,
            frame_ms: self.vad_frame_ms,
            pre_roll_ms: self.pre_roll_ms,
            min_speech_ms: self.min_speech_ms,
            hangover_ms: self.hangover_ms,
            tail_pad_ms: self.tail_pad_ms,
            max_segment_ms: (self.max_segment * 1000.0) as u32,
            partial_interval_ms: (self.partial_interval * 1000.0) as u32,
        }
    }

    fn recognizer_options(&self) -> RecognizerOptions {
        RecognizerOptions {
            language: self.lang.clone(),
            step_audio_prompt: step_audio_prompt(self.prompt.as_deref(), self.lang.as_deref()),
            step_audio_max_context: self.max_context,
            whisper_full_window: self.full_window,
            full_partials: self.full_partials,
            whisper_carry_seconds: self.carry_audio,
            ..RecognizerOptions::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The live options a bare command line gives are the library's defaults.
    #[test]
    fn live_defaults_are_the_library_defaults() {
        let cli = Cli::try_parse_from(["stepaudio-live"]).unwrap();
        let stream = &cli.live.stream;
        assert_eq!(stream.tracker_config(), TrackerConfig::default());
        let got = stream.recognizer_options();
        let want = RecognizerOptions::default();
        assert_eq!(got.language, want.language);
        assert_eq!(got.step_audio_max_context, want.step_audio_max_context);
        assert_eq!(got.whisper_full_window, want.whisper_full_window);
        assert_eq!(got.full_partials, want.full_partials);
        assert_eq!(got.whisper_carry_seconds, want.whisper_carry_seconds);
        assert_eq!(
            LiveFormat::from(cli.live.live_format),
            LiveFormat::default()
        );
        assert_eq!(
            DeviceChoice::from(cli.global.compute),
            DeviceChoice::default()
        );
        assert_eq!(
            DecoderWeights::from(cli.global.decoder_weights),
            DecoderWeights::default()
        );
    }
}
