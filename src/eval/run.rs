//! `stepaudio-live eval`: word error rate over a manifest of recordings,
//! either by transcribing them with the loaded model or by scoring another
//! system's hypotheses (JSON lines `{"id": …, "text": …}`) with the same
//! scorer.

use super::wer::{self, ErrorCounts, Unit};
use super::EvalError;
use crate::audio::{wav, MODEL_SAMPLE_RATE};
use crate::device::DeviceChoice;
use crate::model::step_audio2::{prompt::SystemPrompt, SessionOptions};
use crate::model::{whisper::DecoderWeights, LoadedModel};
use crate::transcribe::{transcribe_loaded, TranscribeOptions};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What `eval` scores and how it reports (the command line's `eval` options).
#[derive(Debug, Clone)]
pub(crate) struct EvalOptions {
    /// Manifest: TSV with a header naming at least the columns id, file,
    /// language and transcript (file paths relative to the manifest).
    pub manifest: PathBuf,
    /// Only the entries of this language (manifest column); all when omitted.
    pub lang: Option<String>,
    /// Score these hypotheses (JSON lines with `id` and `text`) instead of
    /// transcribing with the model.
    pub hyp: Option<PathBuf>,
    /// Also write the hypotheses as JSON lines (the format `hyp` reads).
    pub write_hyp: Option<PathBuf>,
    /// Print one JSON object instead of the human-readable report.
    pub json: bool,
}

/// One line of the manifest.
#[derive(Debug, Clone)]
pub(crate) struct ManifestEntry {
    pub id: String,
    pub audio: PathBuf,
    pub language: String,
    pub duration_s: Option<f64>,
    pub transcript: String,
}

/// Reads a manifest TSV; columns are found by their header names.
pub(crate) fn read_manifest(path: &Path) -> Result<Vec<ManifestEntry>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|source| EvalError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let bad = |line: usize, reason: String| EvalError::Manifest {
        path: path.display().to_string(),
        line,
        reason,
    };
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines
        .next()
        .ok_or_else(|| bad(1, "the file is empty".into()))?;
    let columns: Vec<&str> = header.split('\t').map(str::trim).collect();
    let column = |name: &str| {
        columns.iter().position(|c| *c == name).ok_or_else(|| {
            bad(
                1,
                format!(
                    "no `{name}` column in the header (found: {})",
                    columns.join(", ")
                ),
            )
        })
    };
    let (id_col, file_col, lang_col, text_col) = (
        column("id")?,
        column("file")?,
        column("language")?,
        column("transcript")?,
    );
    let duration_col = columns.iter().position(|c| *c == "duration_s");
    let base = path.parent().unwrap_or(Path::new("."));
    let mut entries = Vec::new();
    for (index, line) in lines {
        let fields: Vec<&str> = line.split('\t').collect();
        let field = |col: usize, name: &str| {
            fields
                .get(col)
                .map(|f| f.trim())
                .ok_or_else(|| bad(index + 1, format!("missing the `{name}` field")))
        };
        let duration_s = match duration_col {
            Some(col) => field(col, "duration_s")?.parse::<f64>().ok(),
            None => None,
        };
        entries.push(ManifestEntry {
            id: field(id_col, "id")?.to_string(),
            audio: base.join(field(file_col, "file")?),
            language: field(lang_col, "language")?.to_string(),
            duration_s,
            transcript: field(text_col, "transcript")?.to_string(),
        });
    }
    Ok(entries)
}

/// Reads `{"id": …, "text": …}` lines.
pub(crate) fn read_hypotheses(path: &Path) -> Result<HashMap<String, String>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|source| EvalError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let bad = |line: usize, reason: String| EvalError::Hypotheses {
        path: path.display().to_string(),
        line,
        reason,
    };
    let mut out = HashMap::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| bad(index + 1, format!("not a JSON object: {e}")))?;
        let get = |key: &str| {
            value
                .get(key)
                .and_then(|v| v.as_str())
                .ok_or_else(|| bad(index + 1, format!("no string field `{key}`")))
        };
        let (id, text) = (get("id")?, get("text")?);
        if out.insert(id.to_string(), text.to_string()).is_some() {
            return Err(bad(index + 1, format!("id `{id}` appears twice")));
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct UtteranceResult {
    pub id: String,
    pub language: String,
    pub unit: Unit,
    pub reference: String,
    pub hypothesis: String,
    #[serde(flatten)]
    pub counts: ErrorCounts,
    pub rate: f64,
    pub audio_s: f64,
    /// Reading the audio plus transcribing it (not with --hyp).
    pub seconds: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct LanguageTotal {
    pub language: String,
    pub unit: Unit,
    pub utterances: usize,
    #[serde(flatten)]
    pub counts: ErrorCounts,
    /// Sum of errors over sum of reference tokens.
    pub rate: f64,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct EvalReport {
    pub manifest: String,
    /// The model directory, or the hypotheses file that was scored.
    pub system: String,
    pub languages: Vec<LanguageTotal>,
    /// The rate over all scored entries when they share one language.
    pub rate: Option<f64>,
    pub audio_s: f64,
    pub model_load_s: Option<f64>,
    /// Wall time of reading and transcribing every file (model load excluded).
    pub transcribe_s: Option<f64>,
    /// transcribe_s / audio_s.
    pub rtf: Option<f64>,
    /// Manifest ids that had no hypothesis (scored as empty).
    pub missing: Vec<String>,
    pub utterances: Vec<UtteranceResult>,
}

fn score_entry(
    entry: &ManifestEntry,
    hypothesis: String,
    audio_s: f64,
    seconds: Option<f64>,
) -> UtteranceResult {
    let unit = Unit::for_language(&entry.language);
    let counts = wer::score(&entry.transcript, &hypothesis, unit);
    UtteranceResult {
        id: entry.id.clone(),
        language: entry.language.clone(),
        unit,
        reference: entry.transcript.clone(),
        hypothesis,
        rate: counts.rate(),
        counts,
        audio_s,
        seconds,
    }
}

/// Runs the evaluation and writes the report (text or JSON) to `out`.
pub(crate) fn run_eval(
    args: &EvalOptions,
    model: &str,
    device: DeviceChoice,
    dtype: Option<candle_core::DType>,
    decoder_weights: DecoderWeights,
    out: &mut dyn Write,
) -> Result<EvalReport, EvalError> {
    let manifest = read_manifest(&args.manifest)?;
    let selected: Vec<&ManifestEntry> = manifest
        .iter()
        .filter(|e| args.lang.as_deref().is_none_or(|l| e.language == l))
        .collect();
    if selected.is_empty() {
        return Err(EvalError::NoEntries(format!(
            "{} has no entries{}",
            args.manifest.display(),
            args.lang
                .as_deref()
                .map(|l| format!(" with language `{l}`"))
                .unwrap_or_default()
        )));
    }
    let mut report = match &args.hyp {
        Some(path) => score_hypotheses(&selected, path)?,
        None => transcribe_entries(
            &selected,
            model,
            device,
            dtype,
            decoder_weights,
            args.lang.is_some(),
        )?,
    };
    report.manifest = args.manifest.display().to_string();
    if let Some(path) = &args.write_hyp {
        let mut lines = String::new();
        for u in &report.utterances {
            lines.push_str(&serde_json::json!({"id": u.id, "text": u.hypothesis}).to_string());
            lines.push('\n');
        }
        std::fs::write(path, lines).map_err(|source| EvalError::Io {
            path: path.display().to_string(),
            source,
        })?;
    }
    summarise(&mut report);
    let written = if args.json {
        serde_json::to_writer_pretty(&mut *out, &report)
            .map_err(std::io::Error::other)
            .and_then(|_| writeln!(out))
    } else {
        write_text_report(out, &report)
    };
    written.map_err(EvalError::Output)?;
    Ok(report)
}

fn score_hypotheses(selected: &[&ManifestEntry], path: &Path) -> Result<EvalReport, EvalError> {
    let mut hypotheses = read_hypotheses(path)?;
    let mut missing = Vec::new();
    let utterances = selected
        .iter()
        .map(|e| {
            let hyp = hypotheses.remove(&e.id).unwrap_or_else(|| {
                missing.push(e.id.clone());
                String::new()
            });
            score_entry(e, hyp, e.duration_s.unwrap_or(0.0), None)
        })
        .collect();
    if !missing.is_empty() {
        tracing::warn!(
            count = missing.len(),
            "entries without a hypothesis are scored as empty"
        );
    }
    if !hypotheses.is_empty() {
        tracing::warn!(
            count = hypotheses.len(),
            "hypotheses for ids not selected from the manifest are ignored"
        );
    }
    Ok(EvalReport {
        manifest: String::new(),
        system: path.display().to_string(),
        languages: vec![],
        rate: None,
        audio_s: 0.0,
        model_load_s: None,
        transcribe_s: None,
        rtf: None,
        missing,
        utterances,
    })
}

fn transcribe_entries(
    selected: &[&ManifestEntry],
    model: &str,
    device: DeviceChoice,
    dtype: Option<candle_core::DType>,
    decoder_weights: DecoderWeights,
    language_requested: bool,
) -> Result<EvalReport, EvalError> {
    let load_start = Instant::now();
    let dir = crate::fetch::resolve(model).map_err(EvalError::Fetch)?;
    let loaded = LoadedModel::load(&dir, device, dtype, decoder_weights)
        .map_err(|e| EvalError::Model(Box::new(e)))?;
    let model_load_s = load_start.elapsed().as_secs_f64();
    // Step-Audio 2 and multilingual Whisper models take every language.
    let multilingual = match &loaded {
        LoadedModel::Whisper(w) => w.config.is_multilingual(),
        LoadedModel::StepAudio2(_) => true,
    };
    let mut utterances = Vec::new();
    let mut total_seconds = 0.0;
    for entry in selected {
        if !multilingual && entry.language != "en" {
            if language_requested {
                return Err(EvalError::NoEntries(format!(
                    "{} is an English-only model; it cannot transcribe `{}` entries",
                    dir.display(),
                    entry.language
                )));
            }
            tracing::warn!(id = %entry.id, language = %entry.language, "skipped: English-only model");
            continue;
        }
        let start = Instant::now();
        let audio = wav::read_wav_16k_mono(&entry.audio).map_err(|source| EvalError::Audio {
            id: entry.id.clone(),
            source,
        })?;
        let options = TranscribeOptions {
            language: multilingual.then(|| entry.language.clone()),
            ..Default::default()
        };
        let step_audio = SessionOptions {
            system_prompt: if entry.language == "en" {
                SystemPrompt::English
            } else {
                SystemPrompt::Chinese
            },
            ..Default::default()
        };
        let transcript =
            transcribe_loaded(&loaded, &audio, &options, &step_audio).map_err(|source| {
                EvalError::Transcribe {
                    id: entry.id.clone(),
                    source: Box::new(source),
                }
            })?;
        let seconds = start.elapsed().as_secs_f64();
        total_seconds += seconds;
        let audio_s = audio.len() as f64 / MODEL_SAMPLE_RATE as f64;
        tracing::info!(id = %entry.id, audio_s, seconds, "transcribed");
        utterances.push(score_entry(
            entry,
            transcript.text(),
            audio_s,
            Some(seconds),
        ));
    }
    Ok(EvalReport {
        manifest: String::new(),
        system: dir.display().to_string(),
        languages: vec![],
        rate: None,
        audio_s: 0.0,
        model_load_s: Some(model_load_s),
        transcribe_s: Some(total_seconds),
        rtf: None,
        missing: vec![],
        utterances,
    })
}

/// Fills in the per-language totals, audio duration and real-time factor.
fn summarise(report: &mut EvalReport) {
    let mut by_language: BTreeMap<&str, LanguageTotal> = BTreeMap::new();
    for u in &report.utterances {
        let total = by_language
            .entry(&u.language)
            .or_insert_with(|| LanguageTotal {
                language: u.language.clone(),
                unit: u.unit,
                utterances: 0,
                counts: ErrorCounts::default(),
                rate: 0.0,
            });
        total.utterances += 1;
        total.counts.add(&u.counts);
    }
    report.languages = by_language
        .into_values()
        .map(|mut t| {
            t.rate = t.counts.rate();
            t
        })
        .collect();
    report.rate = match report.languages.as_slice() {
        [only] => Some(only.rate),
        _ => None,
    };
    report.audio_s = report.utterances.iter().map(|u| u.audio_s).sum();
    report.rtf = report
        .transcribe_s
        .filter(|_| report.audio_s > 0.0)
        .map(|t| t / report.audio_s);
}

fn write_text_report(out: &mut dyn Write, report: &EvalReport) -> std::io::Result<()> {
    writeln!(out, "system: {}", report.system)?;
    writeln!(
        out,
        "{:<34} {:>7} {:>4} {:>4} {:>4} {:>5} {:>8} {:>8}",
        "id", "rate", "S", "D", "I", "N", "audio s", "time s"
    )?;
    for u in &report.utterances {
        let c = &u.counts;
        writeln!(
            out,
            "{:<34} {:>6.2}% {:>4} {:>4} {:>4} {:>5} {:>8.2} {:>8}",
            u.id,
            100.0 * u.rate,
            c.substitutions,
            c.deletions,
            c.insertions,
            c.reference_len,
            u.audio_s,
            u.seconds
                .map(|s| format!("{s:.2}"))
                .unwrap_or_else(|| "-".into())
        )?;
        if c.errors() > 0 {
            writeln!(out, "    ref: {}", wer::normalize(&u.reference))?;
            writeln!(out, "    hyp: {}", wer::normalize(&u.hypothesis))?;
        }
    }
    for t in &report.languages {
        let c = &t.counts;
        writeln!(
            out,
            "{}: {} {:.2}% ({} errors / {} {}s: S {}, D {}, I {}) over {} utterances",
            t.language,
            t.unit.rate_name(),
            100.0 * t.rate,
            c.errors(),
            c.reference_len,
            match t.unit {
                Unit::Word => "word",
                Unit::Char => "character",
            },
            c.substitutions,
            c.deletions,
            c.insertions,
            t.utterances
        )?;
    }
    if !report.missing.is_empty() {
        writeln!(
            out,
            "no hypothesis (scored as empty): {}",
            report.missing.join(", ")
        )?;
    }
    match (report.transcribe_s, report.model_load_s, report.rtf) {
        (Some(t), Some(load), Some(rtf)) => writeln!(
            out,
            "audio {:.1} s, transcription wall time {t:.2} s (model load {load:.2} s), RTF {rtf:.3}",
            report.audio_s
        )?,
        _ => writeln!(out, "audio {:.1} s", report.audio_s)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    const MANIFEST: &str = "id\tfile\tlanguage\tduration_s\ttranscript\n\
        a\ta.wav\ten\t2.0\tAsk not what your country can do\n\
        b\tb.wav\ten\t3.0\tfor you\n\
        c\tc.wav\tzh\t1.0\t换一首歌\n";

    #[test]
    fn scores_external_hypotheses_per_language() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = write(dir.path(), "manifest.tsv", MANIFEST);
        let hyp = write(
            dir.path(),
            "hyp.jsonl",
            "{\"id\": \"a\", \"text\": \"Ask not what the country can do.\"}\n\
             {\"id\": \"c\", \"text\": \"换一首个\"}\n",
        );
        let args = EvalOptions {
            manifest,
            lang: None,
            hyp: Some(hyp),
            write_hyp: None,
            json: true,
        };
        let mut out = Vec::new();
        let report = run_eval(
            &args,
            "unused",
            DeviceChoice::Cpu,
            None,
            DecoderWeights::Int8,
            &mut out,
        )
        .unwrap();
        // en: a has 1 substitution of 7 words, b (missing) 2 deletions of 2.
        let en = &report.languages[0];
        assert_eq!(
            (
                en.language.as_str(),
                en.counts.errors(),
                en.counts.reference_len
            ),
            ("en", 3, 9)
        );
        assert!((en.rate - 3.0 / 9.0).abs() < 1e-12);
        let zh = &report.languages[1];
        assert_eq!(
            (zh.unit, zh.counts.errors(), zh.counts.reference_len),
            (Unit::Char, 1, 4)
        );
        assert_eq!(report.missing, vec!["b".to_string()]);
        assert_eq!(report.rate, None);
        assert!((report.audio_s - 6.0).abs() < 1e-9);
        let json: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(json["languages"][0]["substitutions"], 1);
        assert_eq!(json["utterances"][0]["id"], "a");

        let en_only = EvalOptions {
            lang: Some("en".into()),
            json: false,
            ..args
        };
        let mut text = Vec::new();
        let report = run_eval(
            &en_only,
            "unused",
            DeviceChoice::Cpu,
            None,
            DecoderWeights::Int8,
            &mut text,
        )
        .unwrap();
        assert_eq!(report.utterances.len(), 2);
        assert!((report.rate.unwrap() - 3.0 / 9.0).abs() < 1e-12);
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.contains("en: WER 33.33% (3 errors / 9 words"),
            "{text}"
        );
    }

    #[test]
    fn malformed_inputs_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let no_column = write(dir.path(), "m.tsv", "id\tfile\tlanguage\na\ta.wav\ten\n");
        let err = read_manifest(&no_column).unwrap_err().to_string();
        assert!(
            err.contains("m.tsv:1") && err.contains("transcript"),
            "{err}"
        );
        let hyp = write(
            dir.path(),
            "h.jsonl",
            "{\"id\": \"a\", \"text\": \"x\"}\nnot json\n",
        );
        let err = read_hypotheses(&hyp).unwrap_err().to_string();
        assert!(err.contains("h.jsonl:2"), "{err}");
        let duplicate = write(
            dir.path(),
            "d.jsonl",
            "{\"id\":\"a\",\"text\":\"x\"}\n{\"id\":\"a\",\"text\":\"y\"}\n",
        );
        assert!(read_hypotheses(&duplicate)
            .unwrap_err()
            .to_string()
            .contains("twice"));
    }
}
