//! Fuzzing on stable Rust: the three parsers that take bytes from outside —
//! the WAV reader, the WebSocket client messages (`start`/`end` and binary
//! audio frames) and the HTTP request head — get seeded, reproducible
//! streams of hostile inputs: mutations of real recordings from `assets/`
//! and of well-formed messages (bit flips, bytes set to boundary values,
//! truncation, lying chunk sizes, extreme `fmt ` fields, splices, NaN
//! floats) and structure-aware generators.
//!
//! Every input must end in `Ok` or a typed error, and
//! - no panic (each case runs under `catch_unwind`);
//! - no allocation beyond a stated bound: the decoded sample count fits the
//!   input's bytes, and the largest single allocation and the peak of live
//!   heap during the case (counted by this binary's global allocator) stay
//!   under `FIXED_ALLOC_BOUND` + a small multiple of the input's length;
//! - no hang: each case is timed (the thread's CPU time) and fails above
//!   `FUZZ_CASE_LIMIT_MS` (2000 ms); a watchdog saves the input and aborts
//!   when a case runs 60 s of wall time.
//!
//! Environment: `FUZZ_SEED` (default 20261130), `FUZZ_SCALE` (multiplies the
//! fixed iteration counts, default 1: about a minute for all three on a
//! 2-core machine), `FUZZ_SECONDS` (run each harness for that long instead,
//! as `scripts/fuzz_long.sh` does). A failing input is written to
//! `target/fuzz-failures/`; copy it to `tests/fixtures/fuzz/` (named
//! `wav-*`, `ws-*` or `http-*`) and `regression_fixtures_stay_fixed` replays it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use stepaudio_live::audio::wav::{decode_wav_bytes, wav_bytes_16k_mono};
use stepaudio_live::audio::{
    AudioError, MAX_CHANNELS, MAX_FLOAT_SAMPLE, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE,
};
use stepaudio_live::server::http::{self, HeadError, MAX_HEAD_BYTES};
use stepaudio_live::server::protocol::{
    decode_audio, parse_client_message, ClientMessage, ErrorCode, SampleFormat,
};

// ---------------------------------------------------------------------------
// Allocation accounting: every allocation of a thread inside a case counts.

struct CountingAlloc;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    /// The input of the case running on this thread (for the oversize guard).
    static CASE_INPUT: Cell<(*const u8, usize)> = const { Cell::new((std::ptr::null(), 0)) };
    static IN_GUARD: Cell<bool> = const { Cell::new(false) };
}

/// A single request above this is reported (its input saved) before the
/// allocator refuses it, which aborts the process: `Vec::with_capacity`
/// sized by a header would otherwise just take the machine's memory.
const HARD_ALLOC_CAP: usize = 1 << 30;

fn note_alloc(size: usize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + size as isize;
        live.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

fn note_free(size: usize) {
    let _ = LIVE.try_with(|live| live.set(live.get() - size as isize));
}

/// Straight to the process's stderr, past the test harness's capture, for
/// messages written just before the process aborts.
fn to_stderr(msg: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(msg.as_bytes());
}

fn oversize(size: usize) {
    // Saving allocates; should that ever be oversize too, it is refused.
    if IN_GUARD.try_with(|g| g.replace(true)).unwrap_or(true) {
        return;
    }
    if let Ok((ptr, len)) = CASE_INPUT.try_with(|c| c.get()) {
        if !ptr.is_null() {
            // SAFETY: set by `run_case` to the input it borrows for the case.
            let input = unsafe { std::slice::from_raw_parts(ptr, len) };
            let path = save_failure("oversize-alloc", input);
            to_stderr(&format!(
                "allocation of {size} bytes requested inside a fuzz case; input saved to {}\n",
                path.display()
            ));
        }
    }
    let _ = IN_GUARD.try_with(|g| g.set(false));
}

// SAFETY: every method forwards to the system allocator with the caller's
// layout and pointer unchanged (or returns null, which `GlobalAlloc` allows
// for a failed allocation); the counting around it (and the report of an
// oversized request, guarded against re-entry by a thread-local flag) never
// touches the memory it hands out.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > HARD_ALLOC_CAP {
            oversize(layout.size());
            return std::ptr::null_mut();
        }
        let p = System.alloc(layout);
        if !p.is_null() {
            note_alloc(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > HARD_ALLOC_CAP {
            oversize(layout.size());
            return std::ptr::null_mut();
        }
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            note_alloc(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        note_free(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > HARD_ALLOC_CAP {
            oversize(new_size);
            return std::ptr::null_mut();
        }
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            note_free(layout.size());
            note_alloc(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

// ---------------------------------------------------------------------------
// A small PRNG (SplitMix64): the same seed gives the same inputs everywhere.

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

// ---------------------------------------------------------------------------
// The case runner.

/// Allocations a case may make whatever its input: the resampler's filter
/// table (at most 16 MiB, built beside a window and a copy of the same
/// size), block buffers, runtime and JSON overhead.
const FIXED_ALLOC_BOUND: usize = 64 << 20;
/// Bytes of live heap a case may hold per byte of input: 4 for the f32
/// samples of `decode_wav_bytes` plus 64 for the 16 kHz output of an input
/// at 1 kHz (16 × the frames, 4 bytes each), plus slack.
const ALLOC_PER_INPUT_BYTE: usize = 80;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn seed() -> u64 {
    env_u64("FUZZ_SEED").unwrap_or(20_261_130)
}

fn case_limit() -> Duration {
    Duration::from_millis(env_u64("FUZZ_CASE_LIMIT_MS").unwrap_or(2_000))
}

/// CPU time of the calling thread. Cases are judged by it rather than by
/// wall time, which on a loaded machine includes whole scheduler slices of
/// other processes (a 20 µs HTTP case took 1.4 s of wall time in a 10-minute
/// run beside two builds). A case that blocks instead of computing is left
/// to the watchdog's wall-clock limit.
fn thread_cpu_time() -> Duration {
    #[cfg(unix)]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid clock id and a pointer to a timespec we own.
        if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0 {
            return Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
        }
    }
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed()
}

/// How long a harness runs: a fixed number of cases (scaled by
/// `FUZZ_SCALE`) or, with `FUZZ_SECONDS`, a time budget.
enum Budget {
    Cases(u64),
    Time(Duration),
}

fn budget(default_cases: u64) -> Budget {
    if let Some(s) = env_u64("FUZZ_SECONDS") {
        return Budget::Time(Duration::from_secs(s));
    }
    let scale: f64 = std::env::var("FUZZ_SCALE")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(1.0);
    Budget::Cases(((default_cases as f64 * scale).round() as u64).max(1))
}

fn failure_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("fuzz-failures")
}

/// FNV-1a, to name saved inputs by their content.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn save_failure(harness: &str, input: &[u8]) -> PathBuf {
    let dir = failure_dir();
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{harness}-{:016x}.bin", fnv(input)));
    let _ = std::fs::write(&path, input);
    path
}

/// What the watchdog knows about the case running in each harness.
struct Running {
    harness: &'static str,
    since: Instant,
    input: Vec<u8>,
}

static RUNNING: Mutex<Vec<Running>> = Mutex::new(Vec::new());
const WATCHDOG_ABORT: Duration = Duration::from_secs(60);

fn start_watchdog() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        std::thread::spawn(|| loop {
            std::thread::sleep(Duration::from_millis(500));
            let running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
            for r in running.iter() {
                if r.since.elapsed() > WATCHDOG_ABORT {
                    let path = save_failure(&format!("{}-hang", r.harness), &r.input);
                    to_stderr(&format!(
                        "fuzz {}: a case ran over {:?}; input saved to {}; aborting\n",
                        r.harness,
                        WATCHDOG_ABORT,
                        path.display()
                    ));
                    std::process::abort();
                }
            }
        });
    });
}

fn set_running(harness: &'static str, input: Option<&[u8]>) {
    let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
    running.retain(|r| r.harness != harness);
    if let Some(input) = input {
        running.push(Running {
            harness,
            since: Instant::now(),
            input: input.to_vec(),
        });
    }
}

#[derive(Default)]
struct Stats {
    cases: u64,
    ok: u64,
    errors: u64,
    crashes: u64,
    hangs: u64,
    over_alloc: u64,
    slowest: Duration,
    slowest_wall: Duration,
    peak_heap: usize,
    failures: Vec<String>,
}

impl Stats {
    fn summary(&self, harness: &str, seed: u64, elapsed: Duration) -> String {
        format!(
            "fuzz {harness}: seed {seed}: {} inputs tried in {:.1} s ({} ok, {} typed errors), \
             {} crashes, {} hangs, {} over the allocation bound; slowest case {:.1} ms CPU \
             ({:.1} ms wall), largest heap growth in a case {:.1} MiB",
            self.cases,
            elapsed.as_secs_f64(),
            self.ok,
            self.errors,
            self.crashes,
            self.hangs,
            self.over_alloc,
            self.slowest.as_secs_f64() * 1e3,
            self.slowest_wall.as_secs_f64() * 1e3,
            self.peak_heap as f64 / (1 << 20) as f64
        )
    }
}

/// Runs one case: `check` returns `Ok(true)` for an accepted input,
/// `Ok(false)` for a typed error, `Err(why)` for a broken invariant.
fn run_case(
    harness: &'static str,
    input: &[u8],
    stats: &mut Stats,
    check: impl FnOnce() -> Result<bool, String>,
) {
    set_running(harness, Some(input));
    let _ = CASE_INPUT.try_with(|c| c.set((input.as_ptr(), input.len())));
    let base = LIVE.with(|l| l.get());
    PEAK.with(|p| p.set(base));
    LARGEST.with(|l| l.set(0));
    let t0 = Instant::now();
    let cpu0 = thread_cpu_time();
    let outcome = catch_unwind(AssertUnwindSafe(check));
    let cpu = thread_cpu_time().saturating_sub(cpu0);
    let wall = t0.elapsed();
    let growth = (PEAK.with(|p| p.get()) - base).max(0) as usize;
    let largest = LARGEST.with(|l| l.get());
    let _ = CASE_INPUT.try_with(|c| c.set((std::ptr::null(), 0)));
    set_running(harness, None);

    stats.cases += 1;
    stats.slowest = stats.slowest.max(cpu);
    stats.slowest_wall = stats.slowest_wall.max(wall);
    stats.peak_heap = stats.peak_heap.max(growth);
    let fail = |kind: &str, why: String, stats: &mut Stats| {
        let path = save_failure(harness, input);
        let line = format!("{kind}: {why} (input saved to {})", path.display());
        eprintln!("fuzz {harness}: {line}");
        if stats.failures.len() < 20 {
            stats.failures.push(line);
        }
    };
    match outcome {
        Ok(Ok(true)) => stats.ok += 1,
        Ok(Ok(false)) => stats.errors += 1,
        Ok(Err(why)) => {
            stats.crashes += 1;
            fail("broken invariant", why, stats);
        }
        Err(panic) => {
            stats.crashes += 1;
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            fail("panic", msg, stats);
        }
    }
    if cpu > case_limit() {
        stats.hangs += 1;
        fail("too slow", format!("{cpu:?} CPU, {wall:?} wall"), stats);
    }
    let bound = FIXED_ALLOC_BOUND + ALLOC_PER_INPUT_BYTE * input.len();
    if growth > bound || largest > bound {
        stats.over_alloc += 1;
        fail(
            "allocation over the bound",
            format!("peak heap growth {growth} B, largest allocation {largest} B, bound {bound} B"),
            stats,
        );
    }
}

/// Drives a harness: `one(rng, stats)` generates and runs one case.
fn drive(harness: &'static str, default_cases: u64, mut one: impl FnMut(&mut Rng, &mut Stats)) {
    start_watchdog();
    let seed = seed();
    let mut rng = Rng::new(seed ^ fnv(harness.as_bytes()));
    let mut stats = Stats::default();
    let t0 = Instant::now();
    match budget(default_cases) {
        Budget::Cases(n) => {
            for _ in 0..n {
                one(&mut rng, &mut stats);
            }
        }
        Budget::Time(limit) => {
            while t0.elapsed() < limit {
                for _ in 0..64 {
                    one(&mut rng, &mut stats);
                }
            }
        }
    }
    let summary = stats.summary(harness, seed, t0.elapsed());
    println!("{summary}");
    assert!(
        stats.crashes == 0 && stats.hangs == 0 && stats.over_alloc == 0,
        "{summary}\n{}",
        stats.failures.join("\n")
    );
}

/// Panics are caught and reported with their input by `run_case`; the
/// default hook's message and backtrace for each would bury the summary.
fn quiet_panics() {
    static SET: OnceLock<()> = OnceLock::new();
    SET.get_or_init(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // The runner reports the message with the saved input.
            if std::env::var_os("FUZZ_VERBOSE_PANICS").is_some() {
                default(info);
            }
        }));
    });
}

// ---------------------------------------------------------------------------
// WAV: seeds, generator, mutations, checks.

fn assets_dir() -> PathBuf {
    std::env::var_os("STEPAUDIO_LIVE_SPEECH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("assets"))
}

/// Every recording in `assets/`: (name, bytes).
fn asset_files() -> &'static Vec<(String, Vec<u8>)> {
    static FILES: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    FILES.get_or_init(|| {
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(assets_dir())
            .expect("assets/ holds the recordings the fuzzer starts from")
            .filter_map(|e| {
                let p = e.ok()?.path();
                (p.extension()? == "wav")
                    .then(|| (p.file_name().unwrap().to_string_lossy().into_owned(), p))
            })
            .map(|(name, p)| (name, std::fs::read(p).unwrap()))
            .collect();
        files.sort();
        assert!(
            !files.is_empty(),
            "no WAV files in {}",
            assets_dir().display()
        );
        files
    })
}

/// The assets as 16 kHz mono samples, the material generated files are cut from.
fn speech_pool() -> &'static Vec<Vec<f32>> {
    static POOL: OnceLock<Vec<Vec<f32>>> = OnceLock::new();
    POOL.get_or_init(|| {
        asset_files()
            .iter()
            .map(|(name, bytes)| {
                let d = decode_wav_bytes(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
                stepaudio_live::audio::resample::downmix(&d.samples, d.channels as usize)
            })
            .collect()
    })
}

/// Raw asset files small enough that a mutated rate of 1 kHz (16 × the
/// samples) stays well inside the time limit.
fn small_assets() -> Vec<&'static [u8]> {
    asset_files()
        .iter()
        .filter(|(_, b)| b.len() <= 128 * 1024)
        .map(|(_, b)| b.as_slice())
        .collect()
}

#[derive(Clone, Copy, Debug)]
enum Enc {
    U8,
    I16,
    I24,
    I20In24,
    I32,
    F32,
    F64,
}

impl Enc {
    fn container(self) -> u16 {
        match self {
            Enc::U8 => 1,
            Enc::I16 => 2,
            Enc::I24 | Enc::I20In24 => 3,
            Enc::I32 | Enc::F32 => 4,
            Enc::F64 => 8,
        }
    }

    fn code(self) -> u16 {
        match self {
            Enc::F32 | Enc::F64 => 3,
            _ => 1,
        }
    }

    fn valid_bits(self) -> u16 {
        match self {
            Enc::I20In24 => 20,
            other => other.container() * 8,
        }
    }

    fn write(self, v: f32, out: &mut Vec<u8>) {
        let v = v.clamp(-1.0, 1.0);
        match self {
            Enc::U8 => out.push(((v * 127.0) as i32 + 128) as u8),
            Enc::I16 => out.extend(((v * 32767.0) as i16).to_le_bytes()),
            Enc::I24 => out.extend(&((v * 8_388_607.0) as i32).to_le_bytes()[..3]),
            Enc::I20In24 => out.extend(&(((v * 524_287.0) as i32) << 4).to_le_bytes()[..3]),
            Enc::I32 => out.extend(((v as f64 * 2_147_483_647.0) as i32).to_le_bytes()),
            Enc::F32 => out.extend(v.to_le_bytes()),
            Enc::F64 => out.extend((v as f64).to_le_bytes()),
        }
    }
}

fn chunk(out: &mut Vec<u8>, id: &[u8; 4], body: &[u8], declared: u32) {
    out.extend(id);
    out.extend(declared.to_le_bytes());
    out.extend(body);
    if body.len() % 2 == 1 {
        out.push(0);
    }
}

/// A well-formed (mostly) WAV file cut from a real recording, with random
/// encoding, channel count, rate, header style and extra chunks.
fn generate_wav(rng: &mut Rng) -> Vec<u8> {
    let pool = speech_pool();
    let speech = rng.pick(pool);
    let enc = *rng.pick(&[
        Enc::U8,
        Enc::I16,
        Enc::I16,
        Enc::I24,
        Enc::I20In24,
        Enc::I32,
        Enc::F32,
        Enc::F64,
    ]);
    let channels = *rng.pick(&[1u16, 1, 1, 2, 2, 3, 6, 8, 32]);
    let rate = *rng.pick(&[
        8_000u32, 11_025, 16_000, 16_000, 22_050, 32_000, 44_100, 48_000, 96_000, 1_000, 1_001,
        383_999, 384_000,
    ]);
    let frames = rng.below(4_000.min(speech.len()) + 1);
    let start = rng.below(speech.len() - frames + 1);
    let mut data = Vec::with_capacity(frames * channels as usize * enc.container() as usize);
    for &s in &speech[start..start + frames] {
        for c in 0..channels {
            enc.write(s * (1.0 - 0.02 * c as f32), &mut data);
        }
    }
    let extensible = rng.chance(30);
    let block_align = enc.container() * channels;
    let mut fmt = Vec::new();
    fmt.extend((if extensible { 0xFFFE } else { enc.code() }).to_le_bytes());
    fmt.extend(channels.to_le_bytes());
    fmt.extend(rate.to_le_bytes());
    fmt.extend((rate.wrapping_mul(block_align as u32)).to_le_bytes());
    fmt.extend(block_align.to_le_bytes());
    fmt.extend((enc.container() * 8).to_le_bytes());
    if extensible {
        fmt.extend(22u16.to_le_bytes());
        fmt.extend(enc.valid_bits().to_le_bytes());
        fmt.extend(0u32.to_le_bytes());
        fmt.extend(enc.code().to_le_bytes());
        fmt.extend([
            0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x80, 0x00, 0x00, 0xAA, 0x00, 0x38, 0x9B, 0x71,
        ]);
    } else if rng.chance(20) {
        fmt.extend(0u16.to_le_bytes()); // cbSize of WAVEFORMATEX
    }
    let mut body = b"WAVE".to_vec();
    let extra = |rng: &mut Rng, body: &mut Vec<u8>| {
        let n = rng.below(3);
        for _ in 0..n {
            let id = *rng.pick(&[*b"LIST", *b"fact", *b"JUNK", *b"bext", *b"id3 "]);
            let len = rng.below(40);
            let content = rng.bytes(len);
            chunk(body, &id, &content, len as u32);
        }
    };
    if rng.chance(30) {
        extra(rng, &mut body);
    }
    chunk(&mut body, b"fmt ", &fmt, fmt.len() as u32);
    if rng.chance(30) {
        extra(rng, &mut body);
    }
    let declared = if rng.chance(10) {
        u32::MAX
    } else {
        data.len() as u32
    };
    chunk(&mut body, b"data", &data, declared);
    if rng.chance(20) {
        extra(rng, &mut body);
    }
    let mut out = b"RIFF".to_vec();
    let riff_size = if rng.chance(10) {
        rng.next_u64() as u32
    } else {
        body.len() as u32
    };
    out.extend(riff_size.to_le_bytes());
    out.extend(body);
    out
}

/// (offset of the chunk header, id, declared size) of each chunk.
fn chunks_of(wav: &[u8]) -> Vec<(usize, [u8; 4], u32)> {
    let mut found = Vec::new();
    let mut pos = 12usize;
    while pos + 8 <= wav.len() && found.len() < 64 {
        let id = [wav[pos], wav[pos + 1], wav[pos + 2], wav[pos + 3]];
        let size = u32::from_le_bytes([wav[pos + 4], wav[pos + 5], wav[pos + 6], wav[pos + 7]]);
        found.push((pos, id, size));
        pos = match pos.checked_add(8 + size as usize + (size as usize & 1)) {
            Some(p) => p,
            None => break,
        };
    }
    found
}

const INTERESTING_U32: &[u32] = &[
    0,
    1,
    2,
    3,
    7,
    8,
    15,
    16,
    999,
    1_000,
    8_000,
    16_000,
    44_100,
    48_000,
    65_535,
    65_536,
    383_999,
    384_000,
    384_001,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_FFFE,
    0xFFFF_FFFF,
];
const INTERESTING_U16: &[u16] = &[
    0, 1, 2, 3, 4, 6, 7, 8, 12, 16, 17, 20, 24, 31, 32, 33, 48, 63, 64, 255, 256, 0x7FFF, 0x8000,
    0xFFFE, 0xFFFF,
];
const INTERESTING_U8: &[u8] = &[0, 1, 0x7F, 0x80, 0xFE, 0xFF];

/// A position biased towards the header, where the parser makes its decisions.
fn position(rng: &mut Rng, len: usize) -> usize {
    if rng.chance(60) {
        rng.below(len.min(80))
    } else {
        rng.below(len)
    }
}

fn mutate_wav(rng: &mut Rng, wav: &mut Vec<u8>, donors: &[&[u8]]) {
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        if wav.is_empty() {
            let n = 1 + rng.below(64);
            wav.extend(rng.bytes(n));
            continue;
        }
        match rng.below(12) {
            // Bit flip.
            0 => {
                let i = position(rng, wav.len());
                wav[i] ^= 1 << rng.below(8);
            }
            // A byte set to a boundary value.
            1 => {
                let i = position(rng, wav.len());
                wav[i] = *rng.pick(INTERESTING_U8);
            }
            // Truncation (often inside the header).
            2 => {
                let cut = position(rng, wav.len() + 1);
                wav.truncate(cut);
            }
            // A chunk size that lies (RIFF's own or one chunk's).
            3 => {
                let chunks = chunks_of(wav);
                let at = if chunks.is_empty() || rng.chance(20) {
                    4
                } else {
                    rng.pick(&chunks).0 + 4
                };
                if at + 4 <= wav.len() {
                    let old = u32::from_le_bytes(wav[at..at + 4].try_into().unwrap());
                    let v = match rng.below(4) {
                        0 => *rng.pick(INTERESTING_U32),
                        1 => old.wrapping_add(1 + rng.below(3) as u32),
                        2 => old.wrapping_sub(1 + rng.below(3) as u32),
                        _ => (wav.len() as u32).wrapping_mul(2),
                    };
                    wav[at..at + 4].copy_from_slice(&v.to_le_bytes());
                }
            }
            // A fmt field overwritten with an extreme value.
            4 | 5 => {
                let Some(&(pos, _, _)) = chunks_of(wav).iter().find(|c| &c.1 == b"fmt ") else {
                    continue;
                };
                let f = pos + 8;
                // (offset, width): code, channels, rate, byte rate, block
                // align, bits, cbSize, valid bits, channel mask, GUID code.
                let (off, width) = *rng.pick(&[
                    (0usize, 2usize),
                    (2, 2),
                    (4, 4),
                    (4, 4),
                    (8, 4),
                    (12, 2),
                    (14, 2),
                    (16, 2),
                    (18, 2),
                    (20, 4),
                    (24, 2),
                ]);
                if f + off + width <= wav.len() {
                    if width == 4 {
                        let v = if rng.chance(80) {
                            *rng.pick(INTERESTING_U32)
                        } else {
                            rng.next_u64() as u32
                        };
                        wav[f + off..f + off + 4].copy_from_slice(&v.to_le_bytes());
                    } else {
                        let v = if off == 0 || off == 24 {
                            *rng.pick(&[0u16, 1, 2, 3, 6, 7, 0x55, 0xFFFE, 0xFFFF, 0x11])
                        } else {
                            *rng.pick(INTERESTING_U16)
                        };
                        wav[f + off..f + off + 2].copy_from_slice(&v.to_le_bytes());
                    }
                }
            }
            // Splice: a prefix of this one and the rest of another input.
            6 => {
                let donor = *rng.pick(donors);
                let cut = rng.below(wav.len() + 1);
                let from = rng.below(donor.len() + 1);
                wav.truncate(cut);
                wav.extend_from_slice(&donor[from..donor.len().min(from + 64 * 1024)]);
            }
            // NaN, infinities and huge values where samples are.
            7 => {
                let bits: u32 = *rng.pick(&[
                    0x7FC0_0000,
                    0xFFC0_0000,
                    0x7F80_0000,
                    0xFF80_0000,
                    0x7F7F_FFFF,
                    0x0000_0001,
                ]);
                let data = chunks_of(wav)
                    .iter()
                    .find(|c| &c.1 == b"data")
                    .map(|c| c.0 + 8)
                    .unwrap_or(0);
                if data < wav.len() {
                    let n = 1 + rng.below(8);
                    for _ in 0..n {
                        let i = data + rng.below(wav.len() - data);
                        let i = i - (i - data) % 4;
                        if rng.chance(50) && i + 8 <= wav.len() {
                            let wide: u64 = *rng.pick(&[
                                0x7FF8_0000_0000_0000,
                                0x7FF0_0000_0000_0000,
                                0x7FEF_FFFF_FFFF_FFFF,
                            ]);
                            wav[i..i + 8].copy_from_slice(&wide.to_le_bytes());
                        } else if i + 4 <= wav.len() {
                            wav[i..i + 4].copy_from_slice(&bits.to_le_bytes());
                        }
                    }
                }
            }
            // Insert or delete bytes.
            8 => {
                let i = position(rng, wav.len() + 1);
                let n = 1 + rng.below(16);
                if rng.chance(50) {
                    let bytes = rng.bytes(n);
                    wav.splice(i..i, bytes);
                } else {
                    let end = (i + n).min(wav.len());
                    wav.drain(i..end);
                }
            }
            // A chunk duplicated, or an odd one inserted before the data.
            9 => {
                let chunks = chunks_of(wav);
                if let Some(&(pos, id, size)) = chunks.get(rng.below(chunks.len().max(1))) {
                    let end = (pos + 8 + (size as usize).min(256)).min(wav.len());
                    let copy = wav[pos..end].to_vec();
                    if rng.chance(50) {
                        wav.splice(pos..pos, copy);
                    } else {
                        let mut odd = Vec::new();
                        let junk_id = if rng.chance(50) { id } else { *b"\0\0\0\0" };
                        let len = rng.below(9);
                        let body = rng.bytes(len);
                        chunk(
                            &mut odd,
                            &junk_id,
                            &body,
                            *rng.pick(&[len as u32, 0, 1, 0xFFFF_FFFF]),
                        );
                        wav.splice(pos..pos, odd);
                    }
                }
            }
            // Another container id.
            10 => {
                let id = *rng.pick(&[*b"RIFX", *b"RF64", *b"BW64", *b"riff", *b"RIFF"]);
                let n = wav.len().min(4);
                wav[..n].copy_from_slice(&id[..n]);
            }
            // A run of random bytes over the data.
            _ => {
                let i = rng.below(wav.len());
                let n = (1 + rng.below(64)).min(wav.len() - i);
                let bytes = rng.bytes(n);
                wav[i..i + n].copy_from_slice(&bytes);
            }
        }
    }
}

/// The invariants of the WAV entry points on one input.
fn check_wav(input: &[u8]) -> Result<bool, String> {
    let decoded = decode_wav_bytes(input);
    let mono = wav_bytes_16k_mono(input);
    match (&decoded, &mono) {
        (Ok(d), Ok(m)) => {
            if d.samples.len() > input.len() {
                return Err(format!(
                    "{} samples decoded from {} bytes",
                    d.samples.len(),
                    input.len()
                ));
            }
            if !(1..=MAX_CHANNELS).contains(&d.channels)
                || !(MIN_SAMPLE_RATE..=MAX_SAMPLE_RATE).contains(&d.sample_rate)
            {
                return Err(format!(
                    "accepted {} channels at {} Hz",
                    d.channels, d.sample_rate
                ));
            }
            if d.samples.len() % d.channels as usize != 0 || d.samples.is_empty() {
                return Err(format!(
                    "{} samples for {} channels",
                    d.samples.len(),
                    d.channels
                ));
            }
            if let Some(s) = d
                .samples
                .iter()
                .find(|s| s.is_nan() || s.abs() > MAX_FLOAT_SAMPLE)
            {
                return Err(format!("decoded sample {s}"));
            }
            let frames = d.frames() as u64;
            let want = (frames * 16_000).div_ceil(d.sample_rate as u64);
            if m.len() as u64 != want {
                return Err(format!(
                    "{frames} frames at {} Hz gave {} samples at 16 kHz, not {want}",
                    d.sample_rate,
                    m.len()
                ));
            }
            if let Some(s) = m.iter().find(|s| !s.is_finite()) {
                return Err(format!("resampled sample {s}"));
            }
            Ok(true)
        }
        (Err(a), Err(b)) => {
            if a.to_string().is_empty() || b.to_string().is_empty() {
                return Err("an error without a message".into());
            }
            Ok(false)
        }
        _ => Err(format!(
            "decode_wav_bytes and wav_bytes_16k_mono disagree: {:?} vs {:?}",
            decoded.as_ref().map(|d| d.samples.len()),
            mono.as_ref().map(|m| m.len())
        )),
    }
}

fn one_wav_case(rng: &mut Rng, stats: &mut Stats) {
    let small = small_assets();
    let mut input = if rng.chance(25) {
        rng.pick(&small).to_vec()
    } else {
        generate_wav(rng)
    };
    // Most inputs are mutated; some generated ones stay valid on purpose.
    if rng.chance(85) {
        let donor_a = generate_wav(rng);
        let donors: Vec<&[u8]> = vec![donor_a.as_slice(), *rng.pick(&small)];
        mutate_wav(rng, &mut input, &donors);
    }
    run_case("wav", &input, stats, || check_wav(&input));
}

#[test]
fn fuzz_wav_parser() {
    quiet_panics();
    drive("wav", 18_000, one_wav_case);
}

// ---------------------------------------------------------------------------
// WebSocket client messages.

fn json_value(rng: &mut Rng, depth: usize) -> String {
    let scalars: &[&str] = &[
        "0",
        "1",
        "-1",
        "3",
        "7",
        "8",
        "32",
        "33",
        "999",
        "1000",
        "16000",
        "48000",
        "384000",
        "384001",
        "2147483647",
        "4294967295",
        "4294967296",
        "18446744073709551615",
        "18446744073709551616",
        "-9223372036854775808",
        "1e9",
        "1e400",
        "-0",
        "0.5",
        "16000.0",
        "1.7976931348623157e308",
        "true",
        "false",
        "null",
        "\"s16le\"",
        "\"f32le\"",
        "\"S16LE\"",
        "\"mp3\"",
        "\"\"",
        "\"en\"",
        "\"\\u0000\"",
        "\"\\ud800\"",
        "\"é😀\"",
        "\"start\"",
        "\"end\"",
    ];
    match rng.below(if depth > 3 { 1 } else { 6 }) {
        0..=2 => rng.pick(scalars).to_string(),
        3 => format!("\"{}\"", "x".repeat(rng.below(2_000))),
        4 => {
            let n = rng.below(4);
            let items: Vec<String> = (0..n).map(|_| json_value(rng, depth + 1)).collect();
            format!("[{}]", items.join(","))
        }
        _ => json_object(rng, depth + 1),
    }
}

fn json_object(rng: &mut Rng, depth: usize) -> String {
    let keys = [
        "type",
        "protocol",
        "sample_rate",
        "channels",
        "format",
        "language",
        "publish",
        "vad_mode",
        "since",
        "colour",
        "",
        "TYPE",
    ];
    let n = rng.below(8);
    let fields: Vec<String> = (0..n)
        .map(|_| format!("\"{}\":{}", rng.pick(&keys), json_value(rng, depth + 1)))
        .collect();
    format!("{{{}}}", fields.join(","))
}

/// A `start` that is valid, or off in one or two fields.
fn near_valid_start(rng: &mut Rng) -> String {
    let mut fields: Vec<(String, String)> = vec![
        ("type".into(), "\"start\"".into()),
        ("protocol".into(), "1".into()),
        (
            "sample_rate".into(),
            rng.pick(&["16000", "48000", "44100", "8000", "1000", "384000"])
                .to_string(),
        ),
        (
            "channels".into(),
            rng.pick(&["1", "2", "6", "32"]).to_string(),
        ),
        (
            "format".into(),
            rng.pick(&["\"s16le\"", "\"f32le\""]).to_string(),
        ),
    ];
    if rng.chance(30) {
        fields.push(("language".into(), "\"en\"".into()));
    }
    if rng.chance(30) {
        fields.push(("publish".into(), "true".into()));
    }
    if rng.chance(30) {
        fields.push(("vad_mode".into(), rng.pick(&["0", "3"]).to_string()));
    }
    for _ in 0..rng.below(3) {
        let i = rng.below(fields.len());
        match rng.below(3) {
            0 => fields[i].1 = json_value(rng, 2),
            1 => {
                fields.remove(i);
            }
            _ => {
                let dup = fields[i].clone();
                fields.push(dup);
            }
        }
    }
    let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
    format!("{{{}}}", body.join(","))
}

fn ws_text(rng: &mut Rng) -> String {
    match rng.below(10) {
        0..=3 => near_valid_start(rng),
        4 => r#"{"type":"end"}"#.to_string(),
        5 => json_object(rng, 0),
        6 => {
            // Deep nesting: serde_json's recursion limit must answer, not the stack.
            let depth = 1 + rng.below(20_000);
            let open = rng.pick(&["[", "{\"a\":"]);
            format!("{}{}", open.repeat(depth), "1")
        }
        _ => {
            // Byte-level mutation of a valid message, made valid UTF-8 again
            // (tungstenite refuses text frames that are not).
            let mut bytes = near_valid_start(rng).into_bytes();
            for _ in 0..1 + rng.below(4) {
                if bytes.is_empty() {
                    break;
                }
                let i = rng.below(bytes.len());
                match rng.below(4) {
                    0 => bytes[i] ^= 1 << rng.below(8),
                    1 => bytes[i] = *rng.pick(&[b'"', b'{', b'}', b',', b':', b'\\', 0, 0xFF]),
                    2 => bytes.truncate(i),
                    _ => {
                        let n = 1 + rng.below(8);
                        let junk = rng.bytes(n);
                        bytes.splice(i..i, junk);
                    }
                }
            }
            String::from_utf8_lossy(&bytes).into_owned()
        }
    }
}

fn check_ws(text: &str, frames: &[(Vec<u8>, SampleFormat, u16)]) -> Result<bool, String> {
    let accepted = match parse_client_message(text) {
        Ok(ClientMessage::Start(s)) => {
            if !(MIN_SAMPLE_RATE..=MAX_SAMPLE_RATE).contains(&s.sample_rate)
                || !(1..=MAX_CHANNELS).contains(&s.channels)
                || s.vad_mode.is_some_and(|m| m > 3)
            {
                return Err(format!("accepted an out-of-range start: {s:?}"));
            }
            true
        }
        Ok(ClientMessage::End) => true,
        Err(e) => {
            if e.message.is_empty() {
                return Err(format!("{:?} without a message", e.code));
            }
            false
        }
    };
    let mut out = Vec::new();
    for (bytes, format, channels) in frames {
        match decode_audio(bytes, *format, *channels, &mut out) {
            Ok(()) => {
                if out.len() != bytes.len() / format.bytes() {
                    return Err(format!(
                        "{} bytes of {format:?} decoded to {} samples",
                        bytes.len(),
                        out.len()
                    ));
                }
                if let Some(s) = out
                    .iter()
                    .find(|s| s.is_nan() || s.abs() > MAX_FLOAT_SAMPLE)
                {
                    return Err(format!("decoded sample {s}"));
                }
            }
            Err(e) if e.code == ErrorCode::BadAudio => {}
            Err(e) => return Err(format!("decode_audio answered {:?}", e.code)),
        }
    }
    Ok(accepted)
}

fn one_ws_case(rng: &mut Rng, stats: &mut Stats) {
    let text = ws_text(rng);
    // Binary frames: with the channels/format of a valid start, and with
    // values no validated start has (0 or 65535 channels).
    let mut frames = Vec::new();
    for _ in 0..rng.below(4) {
        let format = *rng.pick(&[SampleFormat::S16le, SampleFormat::F32le]);
        let channels = if rng.chance(80) {
            *rng.pick(&[1u16, 2, 3, 32])
        } else {
            *rng.pick(&[0u16, 33, u16::MAX])
        };
        let len = if rng.chance(70) {
            rng.below(64) * format.bytes() * channels.clamp(1, 32) as usize
        } else {
            rng.below(4_096)
        };
        let mut bytes = rng.bytes(len);
        if format == SampleFormat::F32le && rng.chance(50) {
            for s in bytes.chunks_exact_mut(4) {
                let v = (rng.next_u64() % 2_000) as f32 / 1_000.0 - 1.0;
                s.copy_from_slice(&v.to_le_bytes());
            }
        }
        frames.push((bytes, format, channels));
    }
    // The saved input is the text; frames are replayed from the seed.
    run_case("ws", text.as_bytes(), stats, || check_ws(&text, &frames));
}

#[test]
fn fuzz_websocket_messages() {
    quiet_panics();
    drive("ws", 1_000_000, one_ws_case);
}

// ---------------------------------------------------------------------------
// HTTP request heads.

/// Delivers its bytes in pieces of the given sizes (cycled), as a TCP
/// stream might.
struct Pieces<'a> {
    data: &'a [u8],
    sizes: Vec<usize>,
    next: usize,
}

impl tokio::io::AsyncRead for Pieces<'_> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let size = self.sizes[self.next % self.sizes.len()];
        self.next += 1;
        let n = size.min(self.data.len()).min(buf.remaining());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        std::task::Poll::Ready(Ok(()))
    }
}

fn http_head(rng: &mut Rng) -> Vec<u8> {
    // Mostly well-formed parts (so that the checks after parsing run too),
    // each sometimes replaced by a malformed one.
    let odd = |rng: &mut Rng| rng.chance(6);
    let method = if odd(rng) {
        *rng.pick(&["", "G ET", "get", "\u{1}", "GET\t"])
    } else {
        *rng.pick(&["GET", "GET", "GET", "POST", "HEAD"])
    };
    let mut target = rng
        .pick(&[
            "/",
            "/v1/audio",
            "/v1/subscribe",
            "/healthz",
            "*",
            "//",
            "/%",
            "/%zz",
            "/%e2%82",
            "/\u{e9}",
        ])
        .to_string();
    if rng.chance(50) {
        let q = *rng.pick(&[
            "token=s3cret",
            "token=%73%33cret",
            "token=%",
            "token=%%%",
            "token=%+1%-1",
            "token",
            "=&&==&",
            "token=a+b%20c&token=x",
            "since=5&token=%e2%82",
            "",
        ]);
        target = format!("{target}?{q}");
    }
    if rng.chance(3) {
        target.push_str(&"a".repeat(rng.below(20_000)));
    }
    let version = if odd(rng) {
        *rng.pick(&["HTTP/2", "HTTP/1.1x", "", "http/1.1"])
    } else {
        *rng.pick(&["HTTP/1.1", "HTTP/1.1", "HTTP/1.0"])
    };
    let mut head = format!("{method} {target} {version}\r\n").into_bytes();
    let names = [
        "Host",
        "Upgrade",
        "Connection",
        "Origin",
        "Authorization",
        "Sec-WebSocket-Key",
        "Sec-WebSocket-Version",
        "X-Junk",
        "host",
    ];
    let values: &[&[u8]] = &[
        b"127.0.0.1:8765",
        b"websocket",
        b"Upgrade",
        b"keep-alive, Upgrade",
        b"http://127.0.0.1:8765",
        b"https://evil.example",
        b"Bearer s3cret",
        b"Bearer",
        b"bearer  s3cret ",
        b"dGhlIHNhbXBsZSBub25jZQ==",
        b"13",
        b"",
        b" \t ",
        b"\xff\xfe\x80",
        b",,,",
    ];
    // Up to 48 headers are allowed; sometimes more.
    let count = if rng.chance(5) {
        40 + rng.below(20)
    } else {
        rng.below(8)
    };
    for _ in 0..count {
        let name = if odd(rng) {
            *rng.pick(&["", "Bad Name", "\u{e9}", "X\u{0}"])
        } else {
            *rng.pick(&names)
        };
        head.extend(name.as_bytes());
        head.extend(b": ");
        head.extend(*rng.pick(values));
        if rng.chance(1) {
            head.extend(vec![b'v'; rng.below(MAX_HEAD_BYTES + 10)]);
        }
        head.extend(if odd(rng) { &b"\n"[..] } else { &b"\r\n"[..] });
    }
    if !odd(rng) {
        head.extend(b"\r\n");
    }
    if rng.chance(30) {
        let n = rng.below(64);
        let rest = rng.bytes(n);
        head.extend(rest);
    }
    // Byte-level mutations on a fraction.
    if rng.chance(25) && !head.is_empty() {
        for _ in 0..1 + rng.below(4) {
            if head.is_empty() {
                break;
            }
            let i = rng.below(head.len());
            match rng.below(5) {
                0 => head[i] ^= 1 << rng.below(8),
                1 => head[i] = *rng.pick(&[0u8, b'\r', b'\n', b' ', b':', 0x7F, 0xFF]),
                2 => head.truncate(i),
                3 => {
                    let n = 1 + rng.below(8);
                    let junk = rng.bytes(n);
                    head.splice(i..i, junk);
                }
                _ => {
                    head.splice(i..i, b"\r\n\r\n".iter().copied());
                }
            }
        }
    }
    head
}

fn check_http(input: &[u8], sizes: &[usize], rt: &tokio::runtime::Runtime) -> Result<bool, String> {
    let whole = rt.block_on(http::read_head(&mut &input[..]));
    let mut pieces = Pieces {
        data: input,
        sizes: sizes.to_vec(),
        next: 0,
    };
    let split = rt.block_on(http::read_head(&mut pieces));
    let terminator = input
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4);
    let kind = |r: &Result<http::RequestHead, HeadError>| match r {
        Ok(h) => format!("ok {} {} {:?} {:?}", h.method, h.path, h.headers, h.rest),
        Err(HeadError::Incomplete) => "incomplete".into(),
        Err(HeadError::TooLarge) => "too large".into(),
        Err(HeadError::Malformed(_)) => "malformed".into(),
        Err(HeadError::Io(e)) => format!("io {e}"),
    };
    match &whole {
        Ok(h) => {
            let end = terminator.ok_or("a head without a blank line was accepted")?;
            if end > MAX_HEAD_BYTES {
                return Err(format!("a head of {end} bytes was accepted"));
            }
            // `rest` is only what came after the head (one read's worth at most).
            if !input[end..].starts_with(&h.rest) {
                return Err("`rest` is not the bytes after the head".into());
            }
            // Everything the server asks of a head.
            let _ = h.query_param("token");
            let _ = h.query_param("");
            let _ = h.query_param("since");
            let _ = http::authorized(h, Some("s3cret"));
            let _ = http::authorized(h, None);
            let _ = http::origin_allowed(h, &[]);
            let _ = http::origin_allowed(h, &["*".into(), "https://x.example".into()]);
            let _ = h.is_websocket_upgrade();
            let _ = http::upgrade_response(h);
        }
        Err(HeadError::Io(e)) => return Err(format!("I/O error from a byte slice: {e}")),
        Err(_) => {}
    }
    // Reading in pieces must not change the answer (except for `rest`,
    // which holds whatever the last read brought).
    let strip = |s: String| s.split(" [").next().unwrap_or("").to_string();
    if strip(kind(&whole)) != strip(kind(&split)) {
        return Err(format!(
            "read whole: {}; read in pieces {sizes:?}: {}",
            kind(&whole),
            kind(&split)
        ));
    }
    Ok(whole.is_ok())
}

fn one_http_case(rng: &mut Rng, stats: &mut Stats, rt: &tokio::runtime::Runtime) {
    let input = http_head(rng);
    let sizes: Vec<usize> = (0..1 + rng.below(4))
        .map(|_| *rng.pick(&[1usize, 2, 3, 5, 7, 64, 1000, 4096]))
        .collect();
    run_case("http", &input, stats, || check_http(&input, &sizes, rt));
}

#[test]
fn fuzz_http_heads() {
    quiet_panics();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    drive("http", 600_000, |rng, stats| one_http_case(rng, stats, &rt));
}

// ---------------------------------------------------------------------------
// Regressions: inputs that once broke something, and the issue's cases.

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz")
}

#[test]
fn regression_fixtures_stay_fixed() {
    quiet_panics();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut stats = Stats::default();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(fixtures_dir())
        .expect("tests/fixtures/fuzz")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_none_or(|e| e != "md"))
        .collect();
    entries.sort();
    assert!(!entries.is_empty());
    for path in &entries {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let input = std::fs::read(path).unwrap();
        if name.starts_with("wav-") {
            run_case("wav", &input, &mut stats, || check_wav(&input));
        } else if name.starts_with("ws-") {
            let text = String::from_utf8_lossy(&input).into_owned();
            run_case("ws", &input, &mut stats, || check_ws(&text, &[]));
        } else if name.starts_with("http-") {
            run_case("http", &input, &mut stats, || {
                check_http(&input, &[1, 7, 4096], &rt)
            });
        } else {
            panic!("{name}: fixtures are named wav-*, ws-* or http-*");
        }
    }
    println!("{}", stats.summary("regressions", 0, Duration::ZERO));
    assert!(
        stats.crashes == 0 && stats.hangs == 0 && stats.over_alloc == 0,
        "{}",
        stats.failures.join("\n")
    );
}

/// The fixtures made for the issue's cases end in the error they should.
#[test]
fn issue_fixtures_end_in_the_right_error() {
    let wav = |name: &str| decode_wav_bytes(&std::fs::read(fixtures_dir().join(name)).unwrap());
    for name in [
        "wav-rate-1hz.wav",
        "wav-rate-2147483647hz.wav",
        "wav-fmt-65535-channels.wav",
    ] {
        assert!(
            matches!(wav(name), Err(AudioError::Unsupported { .. })),
            "{name}: {:?}",
            wav(name).map(|d| d.samples.len())
        );
    }
    for name in ["wav-float32-nan.wav", "wav-float32-huge.wav"] {
        match wav(name) {
            Err(AudioError::BadSamples { reason, .. }) => {
                assert!(reason.contains("sample "), "{name}: {reason}")
            }
            other => panic!("{name}: {:?}", other.map(|d| d.samples.len())),
        }
    }
    match wav("wav-data-size-lies.wav") {
        Err(AudioError::Truncated { reason, .. }) => {
            assert!(
                reason.contains("2147483647") && reason.contains("8000"),
                "{reason}"
            )
        }
        other => panic!("{:?}", other.map(|d| d.samples.len())),
    }
    for (name, field) in [
        ("ws-start-rate-2147483647.txt", "`sample_rate`"),
        ("ws-start-rate-1.txt", "`sample_rate`"),
    ] {
        let text = std::fs::read_to_string(fixtures_dir().join(name)).unwrap();
        let e = parse_client_message(&text).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadStart, "{name}");
        assert!(e.message.contains(field), "{name}: {}", e.message);
    }
}

/// A real recording whose header claims another sample rate.
fn asset_with_rate(rate: u32) -> Vec<u8> {
    let mut wav = std::fs::read(assets_dir().join("en_ps_cards_001.wav")).unwrap();
    let fmt = chunks_of(&wav)
        .into_iter()
        .find(|c| &c.1 == b"fmt ")
        .unwrap()
        .0
        + 8;
    wav[fmt + 4..fmt + 8].copy_from_slice(&rate.to_le_bytes());
    wav
}

#[test]
fn absurd_sample_rates_are_refused_before_anything_is_sized() {
    for rate in [1u32, 999, 384_001, 2_147_483_647, u32::MAX] {
        let wav = asset_with_rate(rate);
        let t0 = Instant::now();
        for result in [
            decode_wav_bytes(&wav).map(|_| ()),
            wav_bytes_16k_mono(&wav).map(|_| ()),
        ] {
            match result {
                Err(AudioError::Unsupported { reason, .. }) => {
                    assert!(reason.contains("sample rate"), "{rate} Hz: {reason}");
                    assert!(reason.contains(&rate.to_string()), "{rate} Hz: {reason}");
                }
                other => panic!("{rate} Hz: expected Unsupported, got {other:?}"),
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(1), "{rate} Hz");
    }
    // The edges are accepted.
    for rate in [MIN_SAMPLE_RATE, MAX_SAMPLE_RATE] {
        let m = wav_bytes_16k_mono(&asset_with_rate(rate)).unwrap();
        assert!(!m.is_empty());
    }
}

fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_stepaudio-live"))
}

use std::process::{Command, Stdio};

#[test]
fn the_cli_refuses_out_of_range_sources_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    // WAV headers: refused while reading, before any model is looked for.
    for rate in [1u32, 2_147_483_647] {
        let path = dir.path().join(format!("rate_{rate}.wav"));
        std::fs::write(&path, asset_with_rate(rate)).unwrap();
        let t0 = Instant::now();
        let out = binary()
            .args(["transcribe", "--model", "/nonexistent/model"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{rate} Hz: {stderr}");
        assert!(
            stderr.contains("sample rate") && stderr.contains(&format!("rate_{rate}.wav")),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{rate} Hz took {:?}",
            t0.elapsed()
        );
    }
    // --stdin parameters: refused when the arguments are parsed.
    for (args, field) in [
        (&["--rate", "1"][..], "--rate"),
        (&["--rate", "999"][..], "--rate"),
        (&["--rate", "384001"][..], "--rate"),
        (&["--rate", "16000", "--channels", "0"][..], "--channels"),
        (&["--rate", "16000", "--channels", "33"][..], "--channels"),
    ] {
        let out = binary()
            .arg("--stdin")
            .args(args)
            .args(["--model", "/nonexistent/model"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(field), "{args:?}: {stderr}");
    }
}
