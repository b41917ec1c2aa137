//! Times the stages of Step-Audio 2 ASR on one WAV: log-mel, encoder,
//! adapter, prefill, and ms per decoded token, with a real checkpoint
//! (`--model DIR`) or with random weights at a given configuration
//! (`--random-weights`, default the real mini shape; shrink it for the CPU
//! with `--layers`, `--vocab-size`, …).
//!
//! ```text
//! cargo run --release --example benchmark_step_audio2 -- --random-weights \
//!     --layers 2 --vocab-size 4096 --device cpu --tokens 16
//! cargo run --release --features cuda --example benchmark_step_audio2 -- \
//!     --random-weights --device cuda --dtype bf16
//! ```
//! Decoding runs a fixed number of greedy steps (EOT does not stop it, since
//! random weights say EOT whenever they like). GPU work is synchronised
//! before each stage's clock stops.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::Parser;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use stepaudio_live::cli::{ComputeDType, DeviceArg};
use stepaudio_live::device::{default_dtype, select_device};
use stepaudio_live::frontend::{LogMel, MelExtractor, SAMPLE_RATE};
use stepaudio_live::model::step_audio2::config::StepAudio2Config;
use stepaudio_live::model::step_audio2::load::{load_step_audio2, random_weights};
use stepaudio_live::model::step_audio2::prompt::{StepTokenizer, SystemPrompt};
use stepaudio_live::model::step_audio2::{SessionOptions, StepAudio2, TurnOptions};

#[derive(Parser, Debug)]
#[command(about = "Step-Audio 2 stage timings on one WAV")]
struct Args {
    /// Checkpoint directory (config.json, safetensors, tokenizer.json).
    #[arg(long, conflicts_with = "random_weights")]
    model: Option<PathBuf>,
    /// Random weights at the configuration below instead of a checkpoint.
    #[arg(long)]
    random_weights: bool,
    /// config.json to take the shape from (default: Step-Audio 2 mini).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Encoder and LLM layers (shrinks the model; the widths stay).
    #[arg(long)]
    layers: Option<usize>,
    #[arg(long)]
    encoder_layers: Option<usize>,
    #[arg(long)]
    llm_layers: Option<usize>,
    /// LLM vocabulary (embedding and lm_head rows).
    #[arg(long)]
    vocab_size: Option<usize>,
    /// tokenizer.json for random weights (its ids must fit the vocabulary).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// f32, f16 or bf16; default bf16 on a GPU, f32 on the CPU.
    #[arg(long, value_enum)]
    dtype: Option<ComputeDType>,
    /// WAV file, any rate and channels (default: the 7.1 s English clip in assets/).
    #[arg(long)]
    wav: Option<PathBuf>,
    /// System prompt: zh, en, or any other text.
    #[arg(long, default_value = "zh")]
    prompt: String,
    /// Greedy steps to time.
    #[arg(long, default_value_t = 32)]
    tokens: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn default_wav() -> PathBuf {
    let dir = std::env::var_os("STEPAUDIO_LIVE_SPEECH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_path("assets"));
    dir.join("en_ps_librivox_0870.wav")
}

fn build(args: &Args, device: &Device, dtype: DType) -> Result<StepAudio2> {
    if let Some(dir) = &args.model {
        return Ok(load_step_audio2(dir, device, dtype)?);
    }
    if !args.random_weights {
        bail!("pass --model DIR or --random-weights");
    }
    let cfg = match &args.config {
        Some(p) => StepAudio2Config::from_file(p)?,
        None => StepAudio2Config::mini(),
    };
    // --layers sets both; --encoder-layers / --llm-layers override it.
    let cfg = cfg.reshaped(
        args.encoder_layers.or(args.layers),
        args.llm_layers.or(args.layers),
        args.vocab_size,
    );
    let tok_path = args
        .tokenizer
        .clone()
        .unwrap_or_else(|| repo_path("tests/fixtures/step_audio2/tiny_ckpt/tokenizer.json"));
    let tokenizer = StepTokenizer::load(&tok_path)?;
    let t0 = Instant::now();
    let model = random_weights(&cfg, device, dtype, args.seed)?;
    device.synchronize()?;
    eprintln!(
        "random weights: encoder {}×{} ({} heads), LLM {}×{} ({}/{} heads, FFN {}, vocab {}) in {:.1} s",
        cfg.encoder.n_layer,
        cfg.encoder.n_state,
        cfg.encoder.n_head,
        cfg.text.num_layers,
        cfg.text.hidden_size,
        cfg.text.num_heads,
        cfg.text.num_kv_heads,
        cfg.text.intermediate_size,
        cfg.text.vocab_size,
        t0.elapsed().as_secs_f64()
    );
    Ok(StepAudio2::new(model, tokenizer)?)
}

#[derive(Default, Clone)]
struct Run {
    mel: Duration,
    encoder: Duration,
    adapter: Duration,
    /// Whole ASR prompt (system + human turn) from an empty cache.
    prefill_full: Duration,
    /// Human turn only, on top of the cached system prompt (the streaming case).
    prefill_turn: Duration,
    decode: Duration,
    decode_steps: usize,
    total: Duration,
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let device = select_device(args.device.into())?;
    let dtype = args
        .dtype
        .map_or_else(|| default_dtype(&device), ComputeDType::dtype);
    let wav = args.wav.clone().unwrap_or_else(default_wav);
    let audio = stepaudio_live::audio::wav::read_wav_16k_mono(&wav)
        .with_context(|| format!("reading {}", wav.display()))?;
    let seconds = audio.len() as f64 / SAMPLE_RATE as f64;
    let sa = build(&args, &device, dtype)?;
    let system_prompt = match args.prompt.as_str() {
        "zh" => SystemPrompt::Chinese,
        "en" => SystemPrompt::English,
        other => SystemPrompt::Custom(other.to_string()),
    };
    let opts = SessionOptions {
        system_prompt,
        max_new_tokens: args.tokens,
        ..Default::default()
    };
    let turn = TurnOptions {
        stop_at_eot: false,
        ..TurnOptions::new(args.tokens)
    };
    let extractor = MelExtractor::new(sa.model.config.encoder.n_mels);
    let llm = &sa.model.llm;
    let mut session = sa.session(opts.clone())?;
    let mut runs = Vec::new();
    let mut prompt_tokens = 0;
    let mut pieces = 0;
    for i in 0..args.warmup + args.repeats {
        let mut r = Run::default();
        let t0 = Instant::now();
        let mels = extractor.step_audio_pieces(&audio);
        r.mel = t0.elapsed();
        pieces = mels.len();

        let t = Instant::now();
        let refs: Vec<&LogMel> = mels.iter().collect();
        let enc = sa.model.encode(&refs)?;
        device.synchronize()?;
        r.encoder = t.elapsed();

        let t = Instant::now();
        let (rows, _) = sa.model.adapter.kept_rows(&enc)?;
        device.synchronize()?;
        r.adapter = t.elapsed();

        // Streaming path: the turn on top of the cached system prompt, then
        // `tokens` greedy steps; rolled back so every repeat is the same.
        let out = session.decode_partial(&sa, &rows, &[], &turn)?;
        r.prefill_turn = out.prefill_time;
        r.decode = out.decode_time;
        r.decode_steps = out.decode_steps;
        r.total = t0.elapsed();
        prompt_tokens = out.prompt_tokens;

        // The whole prompt from an empty cache, as one-shot ASR would do it.
        let counts: Vec<usize> = rows.iter().map(|r| r.dim(0)).collect::<Result<_, _>>()?;
        let prompt = sa
            .tokenizer
            .asr_prompt(opts.system_prompt.text(), &counts)?;
        let mut state = llm.new_state(prompt.len() + 1);
        let t = Instant::now();
        let embeds = sa.model.embed_prompt(&prompt, &rows)?.unsqueeze(0)?;
        let logits = llm.logits_last(&llm.forward(&embeds, &mut state)?)?;
        let _ = stepaudio_live::model::step_audio2::llm::argmax(&logits)?;
        r.prefill_full = t.elapsed();
        if i >= args.warmup {
            runs.push(r);
        }
    }
    let med = |f: fn(&Run) -> Duration| median(runs.iter().map(f).collect());
    let system_len = session.system_len();
    let steps = runs[0].decode_steps.max(1);
    let per_token = med(|r| r.decode) / steps as u32;
    println!(
        "Step-Audio 2 on {:?} {:?}: {} ({:.2} s), median of {} runs",
        device,
        dtype,
        wav.file_name().unwrap_or_default().to_string_lossy(),
        seconds,
        runs.len()
    );
    println!("| stage | ms | notes |");
    println!("|---|---:|---|");
    println!(
        "| log-mel | {:.2} | CPU, {pieces} piece(s) of ≤ 25 s |",
        ms(med(|r| r.mel))
    );
    println!("| encoder | {:.2} | |", ms(med(|r| r.encoder)));
    println!("| adapter | {:.2} | |", ms(med(|r| r.adapter)));
    println!(
        "| prefill, whole prompt | {:.2} | {} tokens from an empty cache |",
        ms(med(|r| r.prefill_full)),
        system_len + prompt_tokens
    );
    println!(
        "| prefill, turn | {:.2} | {} tokens after the cached {}-token system prompt |",
        ms(med(|r| r.prefill_turn)),
        prompt_tokens,
        system_len
    );
    println!(
        "| decode | {:.2} ms/token | {} steps, {:.1} tokens/s |",
        ms(per_token),
        steps,
        1.0 / per_token.as_secs_f64()
    );
    let total = med(|r| r.total);
    println!(
        "| end to end | {:.2} | mel → {} tokens; RTF {:.3} ({:.1}× real time) |",
        ms(total),
        steps + 1,
        total.as_secs_f64() / seconds,
        seconds / total.as_secs_f64()
    );
    Ok(())
}
