//! The crate's layering rule (the module map of docs/architecture.md),
//! checked on the source text. Above all: the model layer (`src/model/`)
//! knows nothing of the command line, the offline driver, the stream
//! engine, the server, model fetching or evaluation, and the kernels under
//! it (`src/ops/`) know nothing of the crate at all. Every path into the
//! crate that a module names must start with a module its row allows.
//!
//! Each `crate::…` path in code (comments and string literals are skipped;
//! `use crate::{a, b}` groups are split) is checked, and so is every
//! `super::` chain that would climb out of the module's directory. A second
//! check keeps clap in `src/cli.rs`, tokio in `src/server/` and candle in
//! the tensor layers.

use std::path::{Path, PathBuf};

/// (directory or file under `src/`, top-level modules its code may name
/// besides itself).
const RULES: &[(&str, &[&str])] = &[
    ("audio", &["audio"]),
    ("ops", &["ops"]),
    ("frontend.rs", &["frontend", "ops"]),
    ("device.rs", &["device", "ops"]),
    ("model", &["model", "ops", "frontend", "device"]),
    ("fetch", &["fetch", "model"]),
    ("transcribe.rs", &["transcribe", "model", "frontend"]),
    ("output.rs", &["output", "transcribe"]),
    ("stream", &["stream", "audio", "frontend", "model"]),
    ("server", &["server", "stream", "model", "audio"]),
    (
        "eval",
        &["eval", "fetch", "model", "audio", "transcribe", "device"],
    ),
];

/// External crates confined to some files (paths under `src/`, a directory
/// covering everything in it).
const CONFINED: &[(&str, &[&str])] = &[
    ("clap", &["cli.rs", "main.rs"]),
    ("tokio", &["server"]),
    (
        "candle_core",
        &["ops", "model", "device.rs", "eval", "cli.rs"],
    ),
    ("candle_nn", &["ops", "model"]),
];

fn rust_files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_path_buf()];
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())) {
        let p = entry.unwrap().path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// The source without comments (line, doc and nested block comments) and
/// without the contents of string and char literals (raw strings included),
/// line by line.
fn code_lines(text: &str) -> Vec<String> {
    #[derive(PartialEq)]
    enum State {
        Code,
        Block(usize),
        Str,
        /// A raw string closed by `"` and this many `#`.
        Raw(usize),
    }
    let b = text.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(b.len());
    let mut state = State::Code;
    let mut i = 0;
    while i < b.len() {
        let rest = &b[i..];
        if b[i] == b'\n' {
            out.push(b'\n');
            i += 1;
            continue;
        }
        match state {
            State::Block(depth) => {
                if rest.starts_with(b"*/") {
                    state = if depth == 1 {
                        State::Code
                    } else {
                        State::Block(depth - 1)
                    };
                    i += 2;
                } else if rest.starts_with(b"/*") {
                    state = State::Block(depth + 1);
                    i += 2;
                } else {
                    i += 1;
                }
            }
            State::Str => {
                if b[i] == b'\\' && i + 1 < b.len() && b[i + 1] != b'\n' {
                    i += 2;
                } else {
                    if b[i] == b'"' {
                        state = State::Code;
                    }
                    i += 1;
                }
            }
            State::Raw(hashes) => {
                if b[i] == b'"' && rest[1..].iter().take_while(|&&c| c == b'#').count() >= hashes {
                    state = State::Code;
                    i += 1 + hashes;
                } else {
                    i += 1;
                }
            }
            State::Code => {
                let word_before = i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
                if rest.starts_with(b"//") {
                    while i < b.len() && b[i] != b'\n' {
                        i += 1;
                    }
                } else if rest.starts_with(b"/*") {
                    state = State::Block(1);
                    i += 2;
                } else if b[i] == b'"' {
                    state = State::Str;
                    i += 1;
                } else if (b[i] == b'r' || rest.starts_with(b"br")) && !word_before {
                    // r"…", r#"…"#, br"…"
                    let start = if b[i] == b'b' { i + 2 } else { i + 1 };
                    let hashes = b[start..].iter().take_while(|&&c| c == b'#').count();
                    if b.get(start + hashes) == Some(&b'"') {
                        state = State::Raw(hashes);
                        i = start + hashes + 1;
                    } else {
                        out.push(b[i]);
                        i += 1;
                    }
                } else if b[i] == b'\'' {
                    // a char literal ('x', '\'', '\u{..}') or a lifetime ('a)
                    let lit = match rest.get(1) {
                        Some(b'\\') => rest[2..].iter().position(|&c| c == b'\'').map(|p| p + 3),
                        Some(_) => {
                            let ch_len = text[i + 1..].chars().next().map_or(1, char::len_utf8);
                            (rest.get(1 + ch_len) == Some(&b'\'')).then_some(ch_len + 2)
                        }
                        None => None,
                    };
                    match lit {
                        Some(n) => i += n,
                        None => {
                            out.push(b'\'');
                            i += 1;
                        }
                    }
                } else {
                    out.push(b[i]);
                    i += 1;
                }
            }
        }
    }
    String::from_utf8_lossy(&out)
        .split('\n')
        .map(str::to_string)
        .collect()
}

/// The first segment of every path that follows `crate::` in `code`.
fn crate_roots(code: &str) -> Vec<String> {
    let mut roots = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `stepaudio_crate::`
        }
        let rest_trim = rest.trim_start();
        if let Some(group) = rest_trim.strip_prefix('{') {
            // `crate::{a::b, c}`: the first segment of each item at depth 0.
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        roots.push(first_segment(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            roots.push(first_segment(&item));
        } else {
            roots.push(first_segment(rest_trim));
        }
    }
    roots.retain(|r| !r.is_empty());
    roots
}

fn first_segment(path: &str) -> String {
    path.trim()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// How many modules `file` sits below the layer's root module.
fn module_depth(root: &Path, file: &Path) -> usize {
    let rel = file.strip_prefix(root).unwrap_or(file);
    let parts = rel.components().count();
    let is_mod = file.file_name().is_some_and(|n| n == "mod.rs");
    if root.is_file() {
        0
    } else if is_mod {
        parts - 1
    } else {
        parts
    }
}

/// The longest run of `super::` in `code`.
fn longest_super_chain(code: &str) -> usize {
    let mut best = 0;
    let mut rest = code;
    while let Some(at) = rest.find("super::") {
        let mut n = 0;
        let mut tail = &rest[at..];
        while let Some(t) = tail.strip_prefix("super::") {
            n += 1;
            tail = t;
        }
        best = best.max(n);
        rest = tail;
    }
    best
}

#[test]
fn lower_layers_do_not_import_upper_ones() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut violations = Vec::new();
    for (dir, allowed) in RULES {
        let root = src.join(dir);
        let files = rust_files(&root);
        assert!(!files.is_empty(), "no sources under {}", root.display());
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            // An inline `mod tests` adds one level `super::` may climb.
            let max_super = module_depth(&root, &file) + 1;
            for (n, line) in code_lines(&text).iter().enumerate() {
                for r in crate_roots(line) {
                    if !allowed.contains(&r.as_str()) {
                        violations.push(format!(
                            "{}:{}: `crate::{r}` (src/{dir} may use {allowed:?})",
                            file.display(),
                            n + 1
                        ));
                    }
                }
                if longest_super_chain(line) > max_super {
                    violations.push(format!(
                        "{}:{}: `super::` climbs out of src/{dir}",
                        file.display(),
                        n + 1
                    ));
                }
                if line.contains("stepaudio_live::") {
                    violations.push(format!(
                        "{}:{}: names the crate by its external name",
                        file.display(),
                        n + 1
                    ));
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "layering rule broken:\n{}",
        violations.join("\n")
    );
}

/// clap belongs to the command line (no library type derives its traits),
/// tokio to the server, candle to the layers that hold tensors.
#[test]
fn external_crates_stay_in_their_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut violations = Vec::new();
    for file in rust_files(&src) {
        let rel = file.strip_prefix(&src).unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        let lines = code_lines(&text);
        for (krate, allowed) in CONFINED {
            if allowed.iter().any(|a| rel.starts_with(a)) {
                continue;
            }
            for (n, line) in lines.iter().enumerate() {
                let words = line.split(|c: char| !(c.is_alphanumeric() || c == '_'));
                if words.into_iter().any(|w| w == *krate) {
                    violations.push(format!(
                        "{}:{}: `{krate}` outside {allowed:?}",
                        file.display(),
                        n + 1
                    ));
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "crates outside their layers:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_checker_sees_imports() {
    let lines = code_lines(concat!(
        "use crate::{audio::wav, cli::Cli}; // crate::server\n",
        "let s = \"crate::eval \\\" crate::stream\"; /* crate::fetch /* nested */ */ crate::transcribe::x();\n",
        "let r = r#\"crate::server \" \"#; let c = '\"'; let l: &'static str = \"\"; crate::output::y();\n",
        "/// crate::eval in a doc comment\n",
        "let z = \"换 crate::cli\"; crate::fetch::z();",
    ));
    let roots: Vec<String> = lines.iter().flat_map(|l| crate_roots(l)).collect();
    assert_eq!(roots, ["audio", "cli", "transcribe", "output", "fetch"]);
    assert_eq!(longest_super_chain("use super::super::super::x;"), 3);
}
