//! Accuracy of shorter Whisper encoder windows for short segments: each
//! English eval file of at most 8 s decoded as one window of W seconds
//! (audio + silence), W in {4+, 10, 15, 20, 30}; WER and time per W.
use stepaudio_live::eval::wer::{score, ErrorCounts, Unit};
use stepaudio_live::model::whisper::decoding::DecodingOptions;

fn main() -> anyhow::Result<()> {
    let dir = stepaudio_live::model::hub::resolve_model("tiny.en")?;
    let mut model = stepaudio_live::model::whisper::load::load_whisper(
        &dir,
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )?;
    model.decoder.quantize_for_decoding()?;
    let manifest = std::fs::read_to_string("../shared/eval/speech/manifest.tsv")?;
    let windows = [0usize, 10, 15, 20, 30];
    let mut totals = vec![ErrorCounts::default(); windows.len()];
    let mut times = vec![0f64; windows.len()];
    let prompt = model.task_tokens(None, Default::default(), false)?;
    let opts = DecodingOptions {
        timestamps: false,
        max_new_tokens: 96,
        ..Default::default()
    };
    for line in manifest.lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        if cols[2] != "en" || cols[3].parse::<f64>()? > 8.0 {
            continue;
        }
        let audio = stepaudio_live::audio::wav::read_wav_16k_mono(std::path::Path::new(&format!(
            "../shared/eval/speech/{}",
            cols[1]
        )))?;
        let mut row = format!("{:<30}", cols[0]);
        for (i, &w) in windows.iter().enumerate() {
            // 0: the audio plus 2 s, rounded up to 2 s.
            let frames = if w == 0 {
                ((audio.len() / 160 + 200).div_ceil(200) * 200).min(3000)
            } else {
                w * 100
            };
            let t = std::time::Instant::now();
            let mel = model.mel.whisper_frames(&audio, frames);
            let enc = model.encode(&mel)?;
            let cross = model.cross_attention(&enc)?;
            let out = model.greedy_decode(&cross, &prompt, 0, &opts)?;
            times[i] += t.elapsed().as_secs_f64();
            let text = model.tokenizer.decode_text(&out.tokens);
            let c = score(cols[8], &text, Unit::Word);
            row += &format!(" {:>6.2}", c.rate());
            totals[i].add(&c);
        }
        println!("{row}");
    }
    for (i, w) in windows.iter().enumerate() {
        println!(
            "window {w:>2} s: WER {:.2} %, time {:.1} s",
            100.0 * totals[i].rate(),
            times[i]
        );
    }
    Ok(())
}
