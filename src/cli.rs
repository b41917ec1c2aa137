//! Command line: argument definitions and dispatch. Library errors are turned
//! into messages and exit codes here, at the binary's edge.

use crate::audio::{wav, AudioError};
use crate::device::{select_device, DeviceChoice};
use crate::model::{hub, whisper::load::load_whisper};
use crate::output::{write_transcript, OutputFormat};
use crate::transcribe::{Task, TranscribeOptions};
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit code for unusable input (bad audio file, bad arguments).
pub const EXIT_BAD_INPUT: u8 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "stepaudio-live",
    version,
    about = "Real-time streaming speech-to-text",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub global: GlobalArgs,
}

#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// Model name (looked up in the cache, fetched if missing) or directory.
    #[arg(long, global = true, default_value = "tiny.en")]
    pub model: String,
    /// Tensor device.
    #[arg(long, global = true, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// More log output on stderr (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Transcribe audio files and print their text.
    Transcribe(TranscribeArgs),
    /// List or fetch models.
    Models {
        #[command(subcommand)]
        action: ModelsAction,
    },
    /// Word error rate over a manifest: transcribe it, or score --hyp.
    Eval(crate::eval::run::EvalArgs),
}

#[derive(Subcommand, Debug)]
pub enum ModelsAction {
    /// Known model names and whether they are in the cache.
    List,
    /// Download a model into the cache.
    Fetch { name: String },
}

#[derive(Args, Debug)]
pub struct TranscribeArgs {
    /// WAV files (any PCM width, float, channel count and sample rate).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
    /// Spoken language (e.g. en, zh, de); detected when omitted on multilingual models.
    #[arg(long)]
    pub language: Option<String>,
    #[arg(long, value_enum, default_value_t = Task::Transcribe)]
    pub task: Task,
    /// Decode without timestamp tokens (one segment per 30 s window).
    #[arg(long)]
    pub no_timestamps: bool,
    /// Do not feed the previous window's text back as a prompt.
    #[arg(long)]
    pub no_condition: bool,
    /// Text to prime the decoder with (names, spelling).
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
            if err
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
    match cli.command {
        Some(Command::Transcribe(args)) => transcribe(&cli.global, args),
        Some(Command::Models { action }) => models(action),
        Some(Command::Eval(args)) => {
            let stdout = &mut std::io::stdout().lock();
            crate::eval::run::run_eval(&args, &cli.global.model, cli.global.device, stdout)?;
            Ok(ExitCode::SUCCESS)
        }
        None => {
            anyhow::bail!("nothing to do: give a subcommand (see --help)")
        }
    }
}

fn models(action: ModelsAction) -> anyhow::Result<ExitCode> {
    match action {
        ModelsAction::List => {
            let models_dir = hub::cache_dir().join("models");
            println!("cache: {}", models_dir.display());
            println!("{:<18} {:<7} {:<64} path", "name", "cached", "sources");
            for m in hub::KNOWN_MODELS {
                println!(
                    "{:<18} {:<7} {:<64} {}",
                    m.name,
                    if hub::is_cached(m.name) { "yes" } else { "no" },
                    m.sources(),
                    hub::cached_path(m.name).display()
                );
            }
            // Models put into the cache by hand (not in the table).
            let mut others: Vec<String> = std::fs::read_dir(&models_dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| !n.starts_with('.') && hub::known_model(n).is_none())
                .collect();
            others.sort();
            for name in others {
                let path = models_dir.join(&name);
                let cached = crate::model::detect_layout(&path).is_ok();
                println!(
                    "{:<18} {:<7} {:<64} {}",
                    name,
                    if cached { "yes" } else { "no" },
                    "(local)",
                    path.display()
                );
            }
        }
        ModelsAction::Fetch { name } => {
            if hub::is_cached(&name) {
                eprintln!("{name} is already in the cache");
            }
            match hub::fetch_model(&name) {
                Ok(dir) => println!("{}", dir.display()),
                Err(e @ crate::model::ModelError::UnknownName { .. }) => {
                    eprintln!("error: {e}");
                    return Ok(ExitCode::from(EXIT_BAD_INPUT));
                }
                Err(e) => return Err(e.into()),
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
    let device = select_device(global.device)?;
    let dir = hub::resolve_model(&global.model)?;
    let model = load_whisper(&dir, &device, candle_core::DType::F32)
        .with_context(|| format!("loading model {}", dir.display()))?;
    let opts = TranscribeOptions {
        language: args.language.clone(),
        task: args.task,
        timestamps: !args.no_timestamps,
        condition_on_previous_text: !args.no_condition,
        initial_prompt: args.prompt.clone(),
        ..Default::default()
    };
    let stdout = std::io::stdout();
    for (name, audio) in inputs {
        let transcript = model
            .transcribe(&audio, &opts)
            .with_context(|| format!("transcribing {name}"))?;
        let mut lock = stdout.lock();
        write_transcript(&mut lock, args.format, &name, &transcript.segments)?;
    }
    Ok(ExitCode::SUCCESS)
}
