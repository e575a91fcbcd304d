//! Fuzzing of every loader a user's file goes through: a seeded mutation loop on stable Rust.
//!
//! Each target starts from real inputs (the committed fixtures, or files built here) and
//! mutates them: byte flips, inserts and deletes, chunk duplication, splicing two inputs, and
//! mutators that know the format (JSON values and keys, a safetensors header's dtypes, shapes,
//! offsets and length, PNG chunks with their CRCs fixed, JPEG frame headers, merges lines and
//! A1111 prompt syntax). Every execution runs under `catch_unwind` and a watchdog: a panic, an
//! execution longer than [`HANG`] (a hang; one still running after a minute ends the process)
//! or an allocation larger than [`max_alloc`] (what would abort the process, or have the kernel
//! kill it) is a failure that prints the target, the seed and the execution, and writes the
//! input to `tests/fuzz-corpus/<target>/`. The run is deterministic for a seed; how an input is
//! executed (which samplers, dtypes, paddings) follows from its hash, so a saved input replays
//! the same way.
//!
//! - `cargo test -p sd-tests --test fuzz`: a short seeded run of each target, and a replay of
//!   every file in `tests/fuzz-corpus/<target>/` (the regression corpus).
//! - `cargo xtask fuzz [--execs N] [--seed S] [--target NAME]`: the long run (`long_run`,
//!   ignored here), in release, with `SD_FUZZ_EXECS`, `SD_FUZZ_SEED` and `SD_FUZZ_TARGET`.
//! - `cargo xtask fuzz --target NAME --replay PATH`: one input, with how deep it got and how
//!   long it took (`SD_FUZZ_SHOW=1` prints every error the inputs run into).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use burn::tensor::{DType, Tensor};
use sd_conditioner::{ClipTextConfig, ClipTextModel, ClipTokenizer, Padding, PromptSyntax};
use sd_core::AutoencoderKlConfig;
use sd_core::weights::{LoadOptions, SafetensorsFile};
use sd_decoder::VaeDecoder;
use sd_encoder::VaeEncoder;
use sd_schedulers::{HostNoise, SchedulerConfig};
use sd_unet::{UNet2DConditionConfig, UNet2DConditionModel};

type B = sd_core::backend::Flex;

/// The names `SD_FUZZ_TARGET` and the corpus folders use, in the order the long run takes them.
const TARGETS: &[&str] = &[
    "safetensors",
    "latents",
    "unet_config",
    "vae_config",
    "clip_config",
    "scheduler_config",
    "model_folder",
    "single_file",
    "tokenizer",
    "prompt",
    "image",
    "lora",
    "train_config",
    "dataset",
];

/// An execution that takes longer than this is a hang (`SD_FUZZ_HANG_SECS` overrides).
const HANG: Duration = Duration::from_secs(5);

/// Modules are built from a mutant config only below this many parameters.
const MAX_BUILD_PARAMETERS: f64 = 2e6;

/// The seed of the short runs in `cargo test`.
const TEST_SEED: u64 = 0x5d_f022;

// ---------------------------------------------------------------------------------------------
// Allocation guard: an allocation this large from a few-KB input is a missing bound. Refusing it
// turns what would be an abort ("memory allocation of N bytes failed") or the OOM killer into a
// reproducer written to disk before the process dies.

struct Guard;

static MAX_ALLOC: AtomicUsize = AtomicUsize::new(4 << 30);

/// The largest allocation allowed (`SD_FUZZ_MAX_ALLOC` bytes; 4 GiB by default).
fn max_alloc() -> usize {
    MAX_ALLOC.load(Ordering::Relaxed)
}

// SAFETY: every call is forwarded to `System`, or refused with a null pointer (allowed by the
// `GlobalAlloc` contract).
unsafe impl GlobalAlloc for Guard {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > max_alloc() {
            refused(layout.size());
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > max_alloc() {
            refused(layout.size());
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > max_alloc() {
            refused(new_size);
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Guard = Guard;

thread_local! {
    /// Set while refusing, so that the reporting's own allocations are not checked again.
    static REFUSING: Cell<bool> = const { Cell::new(false) };
}

/// Reports a refused allocation: saves every running execution's input (one of them asked).
/// The process usually aborts right after, in `handle_alloc_error`.
fn refused(size: usize) {
    if REFUSING.with(|r| r.replace(true)) {
        return;
    }
    eprintln!(
        "fuzz: ALLOCATION of {size} bytes refused (over {} bytes); the process will abort",
        max_alloc()
    );
    for slot in running_slots() {
        if let Ok(state) = slot.state.try_lock()
            && let Some((_, exec, input)) = state.as_ref()
        {
            let path = save_failure(slot.target, "alloc", input);
            eprintln!(
                "fuzz: target `{}`, seed {}, execution {exec}: input saved to {}",
                slot.target,
                slot.seed,
                path.display()
            );
        }
    }
    REFUSING.with(|r| r.set(false));
}

// ---------------------------------------------------------------------------------------------
// Randomness: SplitMix64, so that a seed means the same inputs on every platform and version.

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `1 / n`.
    fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn word(&mut self, items: &[&'static str]) -> &'static str {
        items[self.below(items.len())]
    }

    /// Small sizes are likelier: `1..=max`, roughly log-uniform.
    fn size(&mut self, max: usize) -> usize {
        let bits = usize::BITS - max.leading_zeros();
        let cap = 1usize << self.below(bits as usize + 1);
        self.range(1, cap.clamp(1, max.max(1)))
    }
}

fn hash_of(parts: &[&[u8]]) -> u64 {
    let mut h = DefaultHasher::new();
    for p in parts {
        p.hash(&mut h);
    }
    h.finish()
}

// ---------------------------------------------------------------------------------------------
// The harness.

/// A mutator: a new input from a base input and another to splice from.
type Mutator = fn(&mut Rng, &[u8], &[u8]) -> Vec<u8>;
/// An execution of a target on one input: how deep it got.
type Exec = Box<dyn FnMut(&[u8]) -> u32>;
/// A running execution: when it started, its index and its input.
type Running = Option<(Instant, u64, Arc<Vec<u8>>)>;
/// How an execution ended: how deep it got, or the failure's kind and message.
type Outcome = Result<u32, (&'static str, String)>;

/// One loader under test: its seed inputs, its mutator and its execution, which returns how
/// deep the input got (0: refused at once; higher: parsed, built, ran), to keep deep mutants.
struct Target {
    name: &'static str,
    corpus: Vec<Vec<u8>>,
    mutate: Mutator,
    exec: Exec,
}

/// What one failed execution was.
#[derive(Debug, Clone)]
struct Failure {
    kind: &'static str,
    message: String,
    exec: u64,
    input: PathBuf,
}

/// What a run of one target did.
struct Report {
    target: &'static str,
    execs: u64,
    seconds: f64,
    /// How many executions got past the first check (depth ≥ 1).
    deep: u64,
    /// Executions by the depth they reached (the last counts 4 and deeper).
    depths: [u64; 5],
    failures: Vec<Failure>,
}

/// A running execution, for the watchdog and the allocation guard.
struct Slot {
    target: &'static str,
    seed: u64,
    /// When the current execution started, its index and its input.
    state: Mutex<Running>,
}

static SLOTS: Mutex<Vec<Arc<Slot>>> = Mutex::new(Vec::new());

fn running_slots() -> Vec<Arc<Slot>> {
    SLOTS.try_lock().map(|s| s.clone()).unwrap_or_default()
}

fn hang_limit() -> Duration {
    static LIMIT: OnceLock<Duration> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var("SD_FUZZ_HANG_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(HANG, Duration::from_secs_f64)
    })
}

/// Starts, once, the thread that ends the process when an execution runs far past
/// [`hang_limit`] (a hung thread cannot be stopped), after saving its input; and installs the
/// panic hook.
fn start_harness() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Some(n) = std::env::var("SD_FUZZ_MAX_ALLOC")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            MAX_ALLOC.store(n, Ordering::Relaxed);
        }
        let default_hook = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if IN_EXEC.with(Cell::get) {
                let location = info
                    .location()
                    .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
                    .unwrap_or_default();
                LAST_PANIC.with(|p| *p.borrow_mut() = Some(location));
            } else {
                default_hook(info);
            }
        }));
        // An execution over the limit is a failure when it ends; one that does not end within
        // a minute (or 12 limits) is taken for hung for good and ends the process.
        let limit = (hang_limit() * 12).max(Duration::from_secs(60));
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(100));
                for slot in running_slots() {
                    let hung = slot.state.lock().ok().and_then(|s| {
                        s.as_ref()
                            .filter(|(start, ..)| start.elapsed() > limit)
                            .map(|(start, exec, input)| (start.elapsed(), *exec, input.clone()))
                    });
                    if let Some((elapsed, exec, input)) = hung {
                        let path = save_failure(slot.target, "hang", &input);
                        eprintln!(
                            "fuzz: HANG: target `{}`, seed {}, execution {exec} has run {:.1} s \
                             (limit {:.1} s); input saved to {}",
                            slot.target,
                            slot.seed,
                            elapsed.as_secs_f64(),
                            limit.as_secs_f64(),
                            path.display()
                        );
                        std::process::exit(3);
                    }
                }
            }
        });
    });
}

thread_local! {
    static IN_EXEC: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz-corpus")
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Writes a failing input to `tests/fuzz-corpus/<target>/<kind>-<hash>` and returns the path.
fn save_failure(target: &str, kind: &str, input: &[u8]) -> PathBuf {
    let dir = corpus_dir().join(target);
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{kind}-{:016x}", hash_of(&[input])));
    let _ = std::fs::write(&path, input);
    path
}

/// Runs one input: `Ok(depth)`, or the failure's kind and message.
fn run_one(target: &mut Target, slot: &Slot, exec: u64, input: Vec<u8>) -> (Arc<Vec<u8>>, Outcome) {
    let input = Arc::new(input);
    let start = Instant::now();
    *slot.state.lock().unwrap() = Some((start, exec, input.clone()));
    IN_EXEC.with(|f| f.set(true));
    LAST_PANIC.with(|p| p.borrow_mut().take());
    let result = panic::catch_unwind(AssertUnwindSafe(|| (target.exec)(&input)));
    IN_EXEC.with(|f| f.set(false));
    *slot.state.lock().unwrap() = None;
    let elapsed = start.elapsed();
    let outcome = match result {
        Ok(depth) if elapsed <= hang_limit() => Ok(depth),
        Ok(_) => Err(("hang", format!("took {:.1} s", elapsed.as_secs_f64()))),
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(non-string panic payload)".into());
            let location = LAST_PANIC
                .with(|p| p.borrow_mut().take())
                .unwrap_or_else(|| "(another thread)".into());
            Err(("crash", format!("panicked at {location}: {message}")))
        }
    };
    (input, outcome)
}

/// Registers a slot for the watchdog; removed when dropped.
struct Registered(Arc<Slot>);

impl Registered {
    fn new(target: &'static str, seed: u64) -> Self {
        start_harness();
        let slot = Arc::new(Slot {
            target,
            seed,
            state: Mutex::new(None),
        });
        SLOTS.lock().unwrap().push(slot.clone());
        Registered(slot)
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        SLOTS.lock().unwrap().retain(|s| !Arc::ptr_eq(s, &self.0));
    }
}

/// Mutants are cut to this length (splices of splices would otherwise grow without bound).
const MAX_INPUT: usize = 8 << 20;

/// The most distinct failures kept (and inputs written) per target and run.
const MAX_FAILURES: usize = 20;

/// Runs `execs` executions of `name` from `seed`: the corpus itself first, then mutants of the
/// corpus and of earlier mutants that got deep.
fn fuzz(name: &str, execs: u64, seed: u64, progress: bool) -> Report {
    let mut target = make_target(name);
    let registered = Registered::new(target.name, seed);
    let mut pool: Vec<Vec<u8>> = target.corpus.clone();
    let seeds = pool.len();
    let name_hash = hash_of(&[name.as_bytes()]);
    let mut failures: Vec<Failure> = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    let mut deep = 0;
    let mut depths = [0u64; 5];
    let mut max_depth = 0;
    let start = Instant::now();
    let mut last_print = Instant::now();
    for exec in 0..execs {
        let mut rng = Rng::new(seed ^ name_hash ^ exec.wrapping_mul(0x2545_f491_4f6c_dd1d));
        let input = if (exec as usize) < seeds {
            pool[exec as usize].clone()
        } else {
            let base = if rng.one_in(2) {
                rng.below(seeds)
            } else {
                rng.below(pool.len())
            };
            let other = rng.below(pool.len());
            let mut input = (target.mutate)(&mut rng, &pool[base], &pool[other]);
            input.truncate(MAX_INPUT);
            input
        };
        let (input, outcome) = run_one(&mut target, &registered.0, exec, input);
        match outcome {
            Ok(depth) => {
                depths[(depth as usize).min(4)] += 1;
                max_depth = max_depth.max(depth);
                // Keep some of the mutants that got deep, most of those that got deepest, to
                // mutate further: valid-but-odd inputs reach the code after the checks.
                if depth > 0 {
                    deep += 1;
                    if rng.one_in(if depth >= max_depth { 2 } else { 8 }) {
                        if pool.len() < seeds + 256 {
                            pool.push(input.to_vec());
                        } else {
                            let at = seeds + rng.below(256);
                            pool[at] = input.to_vec();
                        }
                    }
                }
            }
            Err((kind, message)) => {
                // One input per distinct failure: a panic's location, or the kind.
                let key = match kind {
                    "crash" if !message.contains("(another thread)") => {
                        message.split(": ").next().unwrap_or_default().to_string()
                    }
                    "crash" => message.lines().next().unwrap_or_default().to_string(),
                    _ => kind.to_string(),
                };
                if !seen.contains(&key) && failures.len() < MAX_FAILURES {
                    seen.push(key);
                    let path = save_failure(target.name, kind, &input);
                    eprintln!(
                        "fuzz: {} in target `{}`, seed {seed}, execution {exec}: {message}\n  \
                         input saved to {}",
                        kind.to_uppercase(),
                        target.name,
                        path.display()
                    );
                    failures.push(Failure {
                        kind,
                        message,
                        exec,
                        input: path,
                    });
                }
            }
        }
        if progress && last_print.elapsed() > Duration::from_secs(30) {
            last_print = Instant::now();
            let s = start.elapsed().as_secs_f64();
            eprintln!(
                "fuzz: {name}: {} of {execs} executions, {:.0}/s, {} failure(s), {} MB resident, \
                 largest kept input {} KB",
                exec + 1,
                (exec + 1) as f64 / s,
                failures.len(),
                resident_mb().map_or("?".into(), |mb| mb.to_string()),
                pool.iter().map(Vec::len).max().unwrap_or(0) >> 10
            );
        }
    }
    Report {
        target: target.name,
        execs,
        seconds: start.elapsed().as_secs_f64(),
        deep,
        depths,
        failures,
    }
}

/// The process's resident memory in MB (Linux's `/proc/self/status`), for the progress lines:
/// a run whose memory grows shows it there long before the kernel kills it.
fn resident_mb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kb: u64 = kb.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb >> 10)
}

/// A number from the input's hash that picks an execution's options (which loaders, dtypes,
/// samplers), so that an input runs the same way in a replay as in the run that found it.
fn variant(input: &[u8]) -> u64 {
    hash_of(&[input])
}

/// The value, or `None` for an error, which `SD_FUZZ_SHOW=1` prints (to see what the mutants
/// run into).
fn ok<T, E: std::fmt::Display>(result: Result<T, E>) -> Option<T> {
    static SHOW: OnceLock<bool> = OnceLock::new();
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            if *SHOW.get_or_init(|| std::env::var_os("SD_FUZZ_SHOW").is_some()) {
                let text = e.to_string();
                let cut: String = text.chars().take(300).collect();
                eprintln!("fuzz: error: {cut}");
            }
            None
        }
    }
}

fn describe(failures: &[Failure]) -> String {
    failures
        .iter()
        .map(|f| {
            format!(
                "  {} (execution {}): {}\n    input: {}",
                f.kind,
                f.exec,
                f.message,
                f.input.display()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------------
// Generic byte mutators.

const INTERESTING_BYTES: &[u8] = &[
    0, 1, 0x7f, 0x80, 0xff, b'"', b'\\', b'{', b'}', b'[', b']', b',', b':', b'-', b'.', b'0',
    b'1', b'9', b'e', b' ', b'\n', 0xc3, 0xe2, 0xf0,
];

const INTERESTING_U64: &[u64] = &[
    0,
    1,
    2,
    7,
    8,
    0x7f,
    0xff,
    0x7fff,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
    u64::MAX - 7,
];

const TOKENS: &[&str] = &[
    "null",
    "true",
    "false",
    "-1",
    "0",
    "1e308",
    "1e400",
    "-0.0",
    "NaN",
    "Infinity",
    "[",
    "]",
    "{",
    "}",
    "\"",
    ",",
    ":",
    "\\u0000",
    "\\ud800",
    "18446744073709551615",
    "[[[[[[[[",
    "\u{fffd}",
];

/// One random edit of `data`; `other` is another input to splice from.
fn mutate_once(rng: &mut Rng, data: &mut Vec<u8>, other: &[u8], focus: std::ops::Range<usize>) {
    let len = data.len();
    // Where to edit: mostly inside `focus` (e.g. a header), else anywhere.
    let pos = |rng: &mut Rng, len: usize| {
        if !focus.is_empty() && focus.end <= len && !rng.one_in(4) {
            rng.range(focus.start, focus.end - 1)
        } else {
            rng.below(len + 1).min(len)
        }
    };
    match rng.below(11) {
        0 if len > 0 => {
            let at = pos(rng, len - 1).min(len - 1);
            data[at] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let at = pos(rng, len - 1).min(len - 1);
            data[at] = *rng.pick(INTERESTING_BYTES);
        }
        2 => {
            let at = pos(rng, len);
            let n = rng.size(16);
            let bytes: Vec<u8> = (0..n)
                .map(|_| {
                    if rng.one_in(2) {
                        *rng.pick(INTERESTING_BYTES)
                    } else {
                        rng.next() as u8
                    }
                })
                .collect();
            data.splice(at..at, bytes);
        }
        3 if len > 0 => {
            let at = pos(rng, len - 1).min(len - 1);
            let n = rng.size(64).min(len - at);
            data.drain(at..at + n);
        }
        4 if len > 0 => {
            // Duplicate a chunk somewhere else.
            let at = rng.below(len);
            let n = rng.size(256).min(len - at);
            let chunk = data[at..at + n].to_vec();
            let to = pos(rng, len);
            data.splice(to..to, chunk);
        }
        5 if !other.is_empty() => {
            // Splice: a prefix of this input and a suffix of the other.
            let a = pos(rng, len);
            let b = rng.below(other.len());
            data.truncate(a);
            data.extend_from_slice(&other[b..]);
        }
        6 if len >= 8 => {
            let width = *rng.pick(&[1usize, 2, 4, 8]);
            let at = pos(rng, len - width).min(len - width);
            let v = *rng.pick(INTERESTING_U64);
            let bytes = if rng.one_in(2) {
                v.to_le_bytes()
            } else {
                v.to_be_bytes()
            };
            let bytes = if rng.one_in(2) {
                &bytes[..width]
            } else {
                &bytes[8 - width..]
            };
            data[at..at + width].copy_from_slice(bytes);
        }
        7 => {
            let at = pos(rng, len);
            let token = rng.pick(TOKENS).as_bytes().to_vec();
            if rng.one_in(2) || at + token.len() > len {
                data.splice(at..at, token);
            } else {
                let n = token.len();
                data.splice(at..at + n, token);
            }
        }
        8 if len > 0 => data.truncate(pos(rng, len)),
        9 if len > 2 => {
            // Swap two chunks.
            let n = rng.size(64).min(len / 2);
            let a = rng.below(len - n + 1);
            let b = rng.below(len - n + 1);
            if a + n <= b || b + n <= a {
                for i in 0..n {
                    data.swap(a + i, b + i);
                }
            }
        }
        _ if len > 0 => {
            // Repeat one byte many times.
            let at = pos(rng, len - 1).min(len - 1);
            let n = rng.size(1024);
            let byte = data[at];
            data.splice(at..at, std::iter::repeat_n(byte, n));
        }
        _ => data.push(rng.next() as u8),
    }
}

/// 1 to 4 random byte edits (mostly 1).
fn mutate_bytes(
    rng: &mut Rng,
    data: &[u8],
    other: &[u8],
    focus: std::ops::Range<usize>,
) -> Vec<u8> {
    let mut out = data.to_vec();
    let n = if rng.one_in(2) { 1 } else { rng.range(1, 4) };
    for _ in 0..n {
        mutate_once(rng, &mut out, other, focus.clone());
    }
    out
}

// ---------------------------------------------------------------------------------------------
// JSON: a tree that keeps numbers as written and allows duplicate keys, so that mutants can
// hold what serde_json's `Value` cannot (NaN, 1e400, a key twice).

#[derive(Clone, Debug)]
enum J {
    Null,
    Bool(bool),
    Num(String),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

impl J {
    fn parse(bytes: &[u8]) -> Option<J> {
        serde_json::from_slice::<serde_json::Value>(bytes)
            .ok()
            .map(|v| J::from_value(&v))
    }

    fn from_value(v: &serde_json::Value) -> J {
        use serde_json::Value;
        match v {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Number(n) => J::Num(n.to_string()),
            Value::String(s) => J::Str(s.clone()),
            Value::Array(a) => J::Arr(a.iter().map(J::from_value).collect()),
            Value::Object(o) => J::Obj(
                o.iter()
                    .map(|(k, v)| (k.clone(), J::from_value(v)))
                    .collect(),
            ),
        }
    }

    fn write(&self, out: &mut String, pretty: bool, depth: usize) {
        let indent = |out: &mut String, d: usize| {
            if pretty {
                out.push('\n');
                out.extend(std::iter::repeat_n(' ', 2 * d));
            }
        };
        match self {
            J::Null => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Num(n) => out.push_str(n),
            J::Str(s) => out.push_str(&serde_json::to_string(s).unwrap()),
            J::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    indent(out, depth + 1);
                    item.write(out, pretty, depth + 1);
                }
                if !items.is_empty() {
                    indent(out, depth);
                }
                out.push(']');
            }
            J::Obj(fields) => {
                out.push('{');
                for (i, (k, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    indent(out, depth + 1);
                    out.push_str(&serde_json::to_string(k).unwrap());
                    out.push_str(if pretty { ": " } else { ":" });
                    v.write(out, pretty, depth + 1);
                }
                if !fields.is_empty() {
                    indent(out, depth);
                }
                out.push('}');
            }
        }
    }

    fn to_bytes(&self, pretty: bool) -> Vec<u8> {
        let mut s = String::new();
        self.write(&mut s, pretty, 0);
        s.into_bytes()
    }

    /// Visits every node in pre-order with its path (child indices), the root first.
    fn walk(&self, path: &mut Vec<usize>, visit: &mut impl FnMut(&[usize])) {
        visit(path);
        let children: Box<dyn Iterator<Item = &J>> = match self {
            J::Arr(items) => Box::new(items.iter()),
            J::Obj(fields) => Box::new(fields.iter().map(|(_, v)| v)),
            _ => Box::new(std::iter::empty()),
        };
        for (i, c) in children.enumerate() {
            path.push(i);
            c.walk(path, visit);
            path.pop();
        }
    }

    /// The path of a node drawn uniformly, by reservoir sampling over one walk: memory in the
    /// tree's depth. (Collecting every node's path took memory in nodes × depth: a long list
    /// nested a few hundred deep asked for gigabytes.)
    fn random_path(&self, rng: &mut Rng) -> Vec<usize> {
        let mut chosen = Vec::new();
        let mut seen = 0;
        self.walk(&mut Vec::new(), &mut |path| {
            seen += 1;
            if rng.below(seen) == 0 {
                chosen = path.to_vec();
            }
        });
        chosen
    }

    /// The length of the compact JSON text.
    fn len(&self) -> usize {
        match self {
            J::Null => 4,
            J::Bool(b) => {
                if *b {
                    4
                } else {
                    5
                }
            }
            J::Num(n) => n.len(),
            J::Str(s) => s.len() + 2,
            J::Arr(items) => 2 + items.iter().map(|v| v.len() + 1).sum::<usize>(),
            J::Obj(fields) => {
                2 + fields
                    .iter()
                    .map(|(k, v)| k.len() + 4 + v.len())
                    .sum::<usize>()
            }
        }
    }

    fn at(&mut self, path: &[usize]) -> &mut J {
        match path.split_first() {
            None => self,
            Some((&i, rest)) => match self {
                J::Arr(items) => items[i].at(rest),
                J::Obj(fields) => fields[i].1.at(rest),
                _ => unreachable!("paths only lead into containers"),
            },
        }
    }

    /// Every object key and string value in the tree.
    fn strings(&self, out: &mut Vec<String>) {
        match self {
            J::Str(s) => out.push(s.clone()),
            J::Arr(items) => items.iter().for_each(|i| i.strings(out)),
            J::Obj(fields) => {
                for (k, v) in fields {
                    out.push(k.clone());
                    v.strings(out);
                }
            }
            _ => {}
        }
    }
}

/// Numbers written as text: the edges of every integer and float type, and what Python's
/// json writes for non-finite floats.
const NUMBERS: &[&str] = &[
    "0",
    "-1",
    "1",
    "2",
    "3",
    "7",
    "77",
    "1e9",
    "1e308",
    "-1e308",
    "1e400",
    "-0.0",
    "0.5",
    "1e-300",
    "1e-45",
    "65536",
    "1000000",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "NaN",
    "Infinity",
    "-Infinity",
    "2.5",
    "1.0",
    "0.0",
    "-2",
];

/// Strings config fields take, and then some.
const WORDS: &[&str] = &[
    "",
    "abc",
    "gelu",
    "quick_gelu",
    "silu",
    "swish",
    "mish",
    "relu",
    "linear",
    "scaled_linear",
    "squaredcos_cap_v2",
    "sigmoid",
    "epsilon",
    "v_prediction",
    "sample",
    "leading",
    "trailing",
    "linspace",
    "dpmsolver++",
    "sde-dpmsolver++",
    "dpmsolver",
    "midpoint",
    "heun",
    "bh1",
    "bh2",
    "zero",
    "sigma_min",
    "text_time",
    "text",
    "image",
    "fourier",
    "positional",
    "scale_shift",
    "CrossAttnDownBlock2D",
    "DownBlock2D",
    "UpBlock2D",
    "CrossAttnUpBlock2D",
    "UNetMidBlock2DCrossAttn",
    "UNetMidBlock2D",
    "UNetMidBlock2DSimpleCrossAttn",
    "DownEncoderBlock2D",
    "UpDecoderBlock2D",
    "AttnDownEncoderBlock2D",
    "StableDiffusionXLPipeline",
    "StableDiffusionPipeline",
    "EulerDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "LCMScheduler",
    "float16",
    "fp16",
    "\u{0}",
    "é\u{301}😀",
];

fn random_value(rng: &mut Rng, dict: &[String], original: &J) -> J {
    match rng.below(12) {
        0..=2 => J::Num(rng.pick(NUMBERS).to_string()),
        3 => J::Str(rng.pick(WORDS).to_string()),
        4 if !dict.is_empty() => J::Str(rng.pick(dict).clone()),
        5 => J::Null,
        6 => J::Bool(rng.one_in(2)),
        7 => J::Arr(Vec::new()),
        8 => J::Obj(Vec::new()),
        9 => J::Arr(vec![original.clone()]),
        10 => {
            // Deep nesting.
            let mut v = original.clone();
            for _ in 0..rng.size(300) {
                v = J::Arr(vec![v]);
            }
            v
        }
        _ => J::Str(rng.range(0, 1_000_000).to_string()),
    }
}

/// The most JSON text one edit may add by repeating a value. Unbounded, 20,000 copies of a
/// list that was itself a long list took `unet_config`'s long run (seed 7) past 24 GB, where the
/// kernel killed it at execution 198,915.
const MAX_JSON_GROWTH: usize = 64 << 10;

/// JSON mutants are cut to this length. Config files are a few KB; a quarter of a MB still shows
/// a parse that is not linear, and mutants of megabytes had slowed the config targets' long runs
/// from thousands of executions a second to hundreds.
const MAX_JSON_INPUT: usize = 256 << 10;

/// One structure-aware edit of a JSON tree.
fn mutate_json_tree(rng: &mut Rng, tree: &mut J, dict: &[String]) {
    let path = tree.random_path(rng);
    let node = tree.at(&path);
    match node {
        J::Obj(fields) if !fields.is_empty() && rng.one_in(2) => {
            let i = rng.below(fields.len());
            match rng.below(4) {
                0 => {
                    fields.remove(i);
                }
                1 => {
                    // The same key twice, the second with another value.
                    let (k, v) = fields[i].clone();
                    let v = random_value(rng, dict, &v);
                    fields.insert(rng.below(fields.len() + 1), (k, v));
                }
                2 if !dict.is_empty() => {
                    let k = rng.pick(dict).clone();
                    let v = random_value(rng, dict, &J::Null);
                    fields.push((k, v));
                }
                _ => {
                    if !dict.is_empty() {
                        fields[i].0 = rng.pick(dict).clone();
                    }
                }
            }
        }
        J::Arr(items) if rng.one_in(2) => match rng.below(5) {
            0 if !items.is_empty() => {
                items.remove(rng.below(items.len()));
            }
            1 if !items.is_empty() => {
                let i = rng.below(items.len());
                let v = items[i].clone();
                items.insert(i, v);
            }
            2 if rng.one_in(16) => {
                // A very long list, with an odd last entry: the parse and its error must stay
                // linear.
                let v = items.first().cloned().unwrap_or(J::Num("1".into()));
                let n = rng.size(20_000).min(MAX_JSON_GROWTH / (v.len() + 1));
                items.extend(std::iter::repeat_n(v, n));
                items.push(random_value(rng, dict, &J::Null));
            }
            2 => items.clear(),
            3 if !items.is_empty() => {
                let v = items[rng.below(items.len())].clone();
                for _ in 0..rng.size(64).min(MAX_JSON_GROWTH / (v.len() + 1)) {
                    items.push(v.clone());
                }
            }
            _ => items.push(random_value(rng, dict, &J::Null)),
        },
        J::Num(n) if rng.one_in(3) => {
            // Near the original: ±1, ×2, ÷2, negated.
            if let Ok(v) = n.parse::<f64>() {
                let v = match rng.below(5) {
                    0 => v + 1.0,
                    1 => v - 1.0,
                    2 => v * 2.0,
                    3 => v / 2.0,
                    _ => -v,
                };
                *n = if v.fract() == 0.0 && v.abs() < 1e15 {
                    format!("{}", v as i64)
                } else {
                    format!("{v}")
                };
            }
        }
        other => {
            let original = other.clone();
            *other = if rng.one_in(4) {
                random_value(rng, dict, &original)
            } else {
                same_kind_value(rng, dict, &original)
            };
        }
    }
}

/// A value of the same kind as `original` (what a config field accepts, mostly), an odd one.
fn same_kind_value(rng: &mut Rng, dict: &[String], original: &J) -> J {
    match original {
        J::Num(_) => J::Num(rng.pick(NUMBERS).to_string()),
        J::Str(_) if !dict.is_empty() && rng.one_in(2) => J::Str(rng.pick(dict).clone()),
        J::Str(_) => J::Str(rng.pick(WORDS).to_string()),
        J::Bool(b) => J::Bool(!b),
        // An optional field: give it a number, a word or a list.
        J::Null => match rng.below(3) {
            0 => J::Num(rng.pick(NUMBERS).to_string()),
            1 => J::Str(rng.pick(WORDS).to_string()),
            _ => J::Arr(vec![J::Num(rng.pick(NUMBERS).to_string()); rng.range(1, 4)]),
        },
        _ => random_value(rng, dict, original),
    }
}

/// A JSON input: mostly edits of its tree (1 to 3), else byte edits.
fn mutate_json(rng: &mut Rng, data: &[u8], other: &[u8]) -> Vec<u8> {
    if !rng.one_in(6)
        && let Some(mut tree) = J::parse(data)
    {
        let mut dict = Vec::new();
        tree.strings(&mut dict);
        if let Some(o) = J::parse(other) {
            o.strings(&mut dict);
        }
        let edits = if rng.one_in(3) { rng.range(2, 4) } else { 1 };
        for _ in 0..edits {
            mutate_json_tree(rng, &mut tree, &dict);
        }
        let mut out = tree.to_bytes(rng.one_in(2));
        out.truncate(MAX_JSON_INPUT);
        return out;
    }
    let mut out = mutate_bytes(rng, data, other, 0..0);
    out.truncate(MAX_JSON_INPUT);
    out
}

// ---------------------------------------------------------------------------------------------
// Safetensors.

/// A safetensors file from `(key, dtype, shape, bytes)`, with optional `__metadata__`.
fn safetensors_bytes(
    tensors: &[(&str, &str, Vec<usize>, Vec<u8>)],
    metadata: Option<&str>,
) -> Vec<u8> {
    let mut header = String::from("{");
    if let Some(m) = metadata {
        header.push_str(&format!("\"__metadata__\":{m},"));
    }
    let mut offset = 0;
    let mut data = Vec::new();
    for (i, (key, dtype, shape, bytes)) in tensors.iter().enumerate() {
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!(
            "{}:{{\"dtype\":\"{dtype}\",\"shape\":{shape:?},\"data_offsets\":[{offset},{}]}}",
            serde_json::to_string(key).unwrap(),
            offset + bytes.len()
        ));
        offset += bytes.len();
        data.extend_from_slice(bytes);
    }
    header.push('}');
    while !header.len().is_multiple_of(8) {
        header.push(' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&data);
    out
}

fn f32_bytes(values: impl IntoIterator<Item = f32>) -> Vec<u8> {
    values.into_iter().flat_map(f32::to_le_bytes).collect()
}

fn f16_bytes(values: impl IntoIterator<Item = f32>) -> Vec<u8> {
    values
        .into_iter()
        .flat_map(|v| half::f16::from_f32(v).to_le_bytes())
        .collect()
}

fn bf16_bytes(values: impl IntoIterator<Item = f32>) -> Vec<u8> {
    values
        .into_iter()
        .flat_map(|v| half::bf16::from_f32(v).to_le_bytes())
        .collect()
}

/// Deterministic values in about [-1, 1].
fn wave(n: usize) -> impl Iterator<Item = f32> {
    (0..n).map(|i| ((i as f32) * 0.37).sin())
}

/// The header's byte range, when the first 8 bytes are a length that fits.
fn header_range(data: &[u8]) -> std::ops::Range<usize> {
    match data.get(..8) {
        Some(b) => {
            let n = u64::from_le_bytes(b.try_into().unwrap());
            if n.saturating_add(8) <= data.len() as u64 {
                0..8 + n as usize
            } else {
                0..8.min(data.len())
            }
        }
        None => 0..data.len(),
    }
}

const ST_DTYPES: &[&str] = &[
    "F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL",
    "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "E8M0", "C64", "f32", "",
];

/// One edit of a safetensors header's values (dtype, shape, data_offsets, keys, metadata) or of
/// its 8-byte length; the data section is kept.
fn mutate_safetensors_header(rng: &mut Rng, data: &[u8]) -> Option<Vec<u8>> {
    let range = header_range(data);
    if range.len() <= 8 {
        return None;
    }
    let mut tree = J::parse(&data[8..range.end])?;
    let J::Obj(fields) = &mut tree else {
        return None;
    };
    if fields.is_empty() {
        return None;
    }
    let i = rng.below(fields.len());
    let keys: Vec<String> = fields.iter().map(|(k, _)| k.clone()).collect();
    let mut copy = None;
    let mut swap = None;
    let (key, entry) = &mut fields[i];
    let num = |v: u64| J::Num(v.to_string());
    let mut length_edit = None;
    match rng.below(8) {
        0 | 1 => {
            if let J::Obj(parts) = entry
                && let Some((_, dtype)) = parts.iter_mut().find(|(k, _)| k == "dtype")
            {
                *dtype = J::Str(rng.pick(ST_DTYPES).to_string());
            }
        }
        2 | 3 => {
            if let J::Obj(parts) = entry
                && let Some((_, shape)) = parts.iter_mut().find(|(k, _)| k == "shape")
            {
                if !matches!(shape, J::Arr(_)) {
                    *shape = J::Arr(vec![]);
                }
                let J::Arr(dims) = shape else {
                    unreachable!("made an array above")
                };
                match rng.below(6) {
                    0 if !dims.is_empty() => {
                        let d = rng.below(dims.len());
                        dims[d] = J::Num(rng.pick(NUMBERS).to_string());
                    }
                    1 if !dims.is_empty() => {
                        let d = rng.below(dims.len());
                        dims[d] = num(*rng.pick(INTERESTING_U64));
                    }
                    2 => dims.push(num(rng.range(0, 3) as u64)),
                    3 if !dims.is_empty() => {
                        dims.remove(rng.below(dims.len()));
                    }
                    4 => {
                        // A shape whose element count overflows.
                        *dims = vec![num(1 << 32), num(1 << 32), num(rng.range(1, 16) as u64)];
                    }
                    _ => {
                        // The same element count in another shape: the file still opens, and
                        // the shape check of the load must catch it.
                        let values: Vec<u64> = dims
                            .iter()
                            .map(|d| match d {
                                J::Num(n) => n.parse().unwrap_or(1),
                                _ => 1,
                            })
                            .collect();
                        let count = values.iter().fold(1u64, |a, &b| a.wrapping_mul(b));
                        *dims = match rng.below(4) {
                            0 => vec![num(count)],
                            1 => values.iter().rev().map(|&v| num(v)).collect(),
                            2 => {
                                let mut v: Vec<J> = values.iter().map(|&v| num(v)).collect();
                                v.insert(rng.below(v.len() + 1), num(1));
                                v
                            }
                            _ if count.is_multiple_of(2) && count > 0 => {
                                vec![num(2), num(count / 2)]
                            }
                            _ => vec![num(count), num(1), num(1)],
                        };
                    }
                }
            }
        }
        4 | 5 => {
            if let J::Obj(parts) = entry
                && let Some((_, offsets)) = parts.iter_mut().find(|(k, _)| k == "data_offsets")
            {
                if let J::Arr(o) = offsets
                    && o.len() == 2
                    && rng.one_in(2)
                {
                    let j = rng.below(2);
                    let old: u64 = match &o[j] {
                        J::Num(n) => n.parse().unwrap_or(0),
                        _ => 0,
                    };
                    o[j] = num(match rng.below(4) {
                        0 => old.wrapping_add(1),
                        1 => old.wrapping_sub(1),
                        2 => old.wrapping_add(rng.size(1 << 20) as u64),
                        _ => *rng.pick(INTERESTING_U64),
                    });
                } else {
                    *offsets = match rng.below(4) {
                        0 => J::Arr(vec![num(0), num(u64::MAX)]),
                        1 => J::Arr(vec![num(u64::MAX - 1), num(u64::MAX)]),
                        2 => J::Arr(vec![num(5), num(1)]),
                        _ => J::Arr(vec![num(0)]),
                    };
                }
            }
        }
        6 => match rng.below(5) {
            0 => *key = rng.pick(&keys).clone(),
            4 => swap = Some(rng.below(keys.len())),
            1 => *key = "latents".into(),
            2 => *key = "__metadata__".into(),
            _ => copy = Some((format!("{key}.copy"), entry.clone())),
        },
        _ => {
            length_edit = Some(match rng.below(5) {
                0 => (range.len() as u64 - 8).wrapping_add(1),
                1 => (range.len() as u64 - 8).wrapping_sub(1),
                2 => data.len() as u64,
                3 => *rng.pick(INTERESTING_U64),
                _ => rng.next(),
            });
        }
    }
    if let Some(copy) = copy {
        fields.push(copy);
    }
    if let Some(j) = swap {
        // Two tensors trade names: valid offsets, wrong shapes or values.
        let k = fields[i].0.clone();
        fields[i].0 = std::mem::replace(&mut fields[j].0, k);
    }
    Some(rebuild(data, &range, &tree, length_edit))
}

/// The file with its header replaced by `tree` (length fixed, or `length` when given).
fn rebuild(data: &[u8], range: &std::ops::Range<usize>, tree: &J, length: Option<u64>) -> Vec<u8> {
    let header = tree.to_bytes(false);
    let mut out = length.unwrap_or(header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&data[range.end..]);
    out
}

/// Values written over the data section, keeping its length: NaN, infinities, f16's max, and
/// random bytes.
fn mutate_safetensors_data(rng: &mut Rng, data: &[u8]) -> Option<Vec<u8>> {
    let header = header_range(data);
    if header.len() <= 8 || header.end + 4 > data.len() {
        return None;
    }
    let mut out = data.to_vec();
    let at = header.end + rng.below(data.len() - header.end - 3);
    let value: &[u8] = match rng.below(6) {
        0 => &[0x00, 0x00, 0xc0, 0x7f],
        1 => &[0x00, 0x00, 0x80, 0x7f],
        2 => &[0x00, 0x00, 0x80, 0xff],
        3 => &[0x00, 0x7c],
        4 => &[0xff, 0x7b, 0xff, 0x7b],
        _ => &[0x5a, 0xa5, 0x01, 0xfe],
    };
    out[at..at + value.len()].copy_from_slice(value);
    Some(out)
}

fn mutate_safetensors(rng: &mut Rng, data: &[u8], other: &[u8]) -> Vec<u8> {
    if rng.one_in(6)
        && let Some(out) = mutate_safetensors_data(rng, data)
    {
        return out;
    }
    if rng.one_in(2)
        && let Some(out) = mutate_safetensors_header(rng, data)
    {
        if rng.one_in(4) {
            let range = header_range(&out);
            return mutate_bytes(rng, &out, other, range);
        }
        return out;
    }
    let range = header_range(data);
    mutate_bytes(rng, data, other, range)
}

/// The tiny VAE's weights, its config and the small handmade files the safetensors and latents
/// targets start from.
fn safetensors_corpus() -> Vec<Vec<u8>> {
    let vae = fixtures().join("pipeline/tiny_sd1/model/vae/diffusion_pytorch_model.safetensors");
    vec![
        std::fs::read(vae).expect("the tiny VAE's weights"),
        safetensors_bytes(
            &[
                ("decoder.conv_in.bias", "F16", vec![32], f16_bytes(wave(32))),
                (
                    "decoder.conv_in.weight",
                    "BF16",
                    vec![32, 4, 3, 3],
                    bf16_bytes(wave(1152)),
                ),
                (
                    "text_model.embeddings.position_ids",
                    "I64",
                    vec![1, 4],
                    (0..4i64).flat_map(i64::to_le_bytes).collect(),
                ),
                (
                    "post_quant_conv.bias",
                    "F64",
                    vec![4],
                    (0..4).flat_map(|i| (i as f64).to_le_bytes()).collect(),
                ),
            ],
            Some("{\"format\":\"pt\"}"),
        ),
        safetensors_bytes(&[], None),
    ]
}

fn latents_corpus() -> Vec<Vec<u8>> {
    vec![
        safetensors_bytes(
            &[("latents", "F32", vec![1, 4, 8, 8], f32_bytes(wave(256)))],
            None,
        ),
        safetensors_bytes(
            &[("latents", "F16", vec![2, 4, 4, 4], f16_bytes(wave(128)))],
            Some("{\"seed\":\"1\"}"),
        ),
        safetensors_bytes(
            &[
                ("latents", "BF16", vec![1, 4, 2, 2], bf16_bytes(wave(16))),
                ("noise", "F32", vec![3], f32_bytes(wave(3))),
            ],
            None,
        ),
    ]
}

/// A scratch folder for one target, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sd-fuzz-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tiny_vae_config() -> AutoencoderKlConfig {
    AutoencoderKlConfig::from_file(fixtures().join("pipeline/tiny_sd1/model/vae/config.json"))
        .expect("the tiny VAE's config")
}

fn safetensors_target() -> Target {
    let device = Default::default();
    let config = tiny_vae_config();
    let decoder = VaeDecoder::<B>::new(&config, &device).expect("the tiny VAE decoder");
    let encoder = VaeEncoder::<B>::new(&config, &device).expect("the tiny VAE encoder");
    let scratch = Scratch::new("safetensors");
    let path = scratch.0.join("weights.safetensors");
    let exec = move |input: &[u8]| {
        let _keep = &scratch;
        let v = variant(input);
        let mut depth = 0;
        let mut files = Vec::new();
        if let Ok(file) = SafetensorsFile::from_bytes(&path, input.to_vec()) {
            files.push(file);
        }
        // Every 16th input also goes through the file paths, the streaming one included.
        if v.is_multiple_of(16) {
            std::fs::write(&path, input).unwrap();
            if let Ok(file) = SafetensorsFile::open(&path) {
                files.push(file);
            }
            if let Ok(file) = SafetensorsFile::open_streaming(&path) {
                files.push(file);
            }
        }
        for (i, file) in files.iter().enumerate() {
            depth = depth.max(1);
            for entry in file.entries() {
                let _ = file.tensor_data(&entry.key, DType::F32);
            }
            let options = LoadOptions {
                dtype: if v.is_multiple_of(3) {
                    DType::F16
                } else {
                    DType::F32
                },
                reject_unexpected: !v.is_multiple_of(5),
                check_finite: !v.is_multiple_of(7),
                matrix_dtype: (v % 4 == 1).then_some(DType::BF16),
            };
            if decoder.clone().load_weights(file, options).is_ok() {
                depth = 2;
            }
            if i > 0 || v.is_multiple_of(4) {
                let _ = encoder.clone().load_weights(file, options);
            }
        }
        depth
    };
    Target {
        name: "safetensors",
        corpus: safetensors_corpus(),
        mutate: mutate_safetensors,
        exec: Box::new(exec),
    }
}

/// What `sd generate --init-latents` does with the file (sd-cli's `read_latents`).
fn latents_target() -> Target {
    let scratch = Scratch::new("latents");
    let path = scratch.0.join("latents.safetensors");
    let exec = move |input: &[u8]| {
        let _keep = &scratch;
        let v = variant(input);
        let file = if v.is_multiple_of(16) {
            std::fs::write(&path, input).unwrap();
            SafetensorsFile::open(&path)
        } else {
            SafetensorsFile::from_bytes(&path, input.to_vec())
        };
        let Some(file) = ok(file) else { return 0 };
        let Some(entry) = file.entries().iter().find(|e| e.key == "latents") else {
            return 1;
        };
        if entry.shape.len() != 4 || !entry.is_float() {
            return 1;
        }
        match file.tensor_data("latents", DType::F32) {
            Ok(data) => {
                let _ = data.to_vec::<f32>();
                2
            }
            Err(_) => 1,
        }
    };
    Target {
        name: "latents",
        corpus: latents_corpus(),
        mutate: mutate_safetensors,
        exec: Box::new(exec),
    }
}

// ---------------------------------------------------------------------------------------------
// Configs.

fn model_dir() -> PathBuf {
    fixtures().join("pipeline/tiny_sd1/model")
}

fn read_fixture(rel: &str) -> Vec<u8> {
    let path = model_dir().join(rel);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Configs from the other fixtures, as more seeds.
fn extra_configs(rel: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for model in [
        "tiny_sdxl",
        "tiny_sd2_vpred",
        "tiny_sd1_turbo",
        "tiny_sd1_inpaint",
    ] {
        let path = fixtures()
            .join("pipeline")
            .join(model)
            .join("model")
            .join(rel);
        if let Ok(bytes) = std::fs::read(path) {
            out.push(bytes);
        }
    }
    out
}

fn config_corpus(rel: &str) -> Vec<Vec<u8>> {
    let mut corpus = vec![read_fixture(rel)];
    corpus.extend(extra_configs(rel));
    corpus
}

/// A target that writes the input to `config.json` in a scratch folder and runs `exec` on it.
fn config_target(
    name: &'static str,
    rel: &str,
    mut exec: impl FnMut(&Path, u64) -> u32 + 'static,
) -> Target {
    let scratch = Scratch::new(name);
    let path = scratch.0.join("config.json");
    Target {
        name,
        corpus: config_corpus(rel),
        mutate: mutate_json,
        exec: Box::new(move |input: &[u8]| {
            let _keep = &scratch;
            let v = variant(input);
            std::fs::write(&path, input).unwrap();
            exec(&path, v)
        }),
    }
}

fn unet_config_target() -> Target {
    let device = Default::default();
    config_target("unet_config", "unet/config.json", move |path, _| {
        let Some(config) = ok(UNet2DConditionConfig::from_file(path)) else {
            return 0;
        };
        if sd::memory::unet_parameters(&config) >= MAX_BUILD_PARAMETERS {
            return 1;
        }
        ok(UNet2DConditionModel::<B>::new(&config, &device)).map_or(1, |_| 2)
    })
}

fn vae_config_target() -> Target {
    let device = Default::default();
    config_target("vae_config", "vae/config.json", move |path, v| {
        let Some(config) = ok(AutoencoderKlConfig::from_file(path)) else {
            return 0;
        };
        if sd::memory::vae_half_parameters(&config) >= MAX_BUILD_PARAMETERS {
            return 1;
        }
        let mut depth = 1;
        if let Some(decoder) = ok(VaeDecoder::<B>::new(&config, &device)) {
            depth = 2;
            // A small decode now and then: a config that builds must also run.
            if v.is_multiple_of(4) {
                let z = Tensor::<B, 4>::zeros([1, config.latent_channels, 2, 2], &device);
                let _ = decoder.decode(z);
            }
        }
        if let Some(encoder) = ok(VaeEncoder::<B>::new(&config, &device)) {
            depth += 1;
            if v % 4 == 2 {
                let f = config.downsample_factor().clamp(1, 64);
                let x = Tensor::<B, 4>::zeros([1, config.in_channels, 2 * f, 2 * f], &device);
                let _ = encoder.encode(x);
            }
        }
        depth
    })
}

/// CLIP's parameter count: embeddings, layers (attention, MLP, norms), projection.
fn clip_parameters(c: &ClipTextConfig) -> f64 {
    let h = c.hidden_size as f64;
    let layer = 4.0 * (h * h + h) + 2.0 * h * c.intermediate_size as f64 + 6.0 * h;
    (c.vocab_size as f64 + c.max_position_embeddings as f64) * h
        + c.num_hidden_layers as f64 * layer
        + h * c.projection_dim as f64
}

fn clip_config_target() -> Target {
    let device = Default::default();
    let mut target = config_target("clip_config", "text_encoder/config.json", move |path, v| {
        let Some(config) = ok(ClipTextConfig::from_file(path)) else {
            return 0;
        };
        if clip_parameters(&config) >= MAX_BUILD_PARAMETERS {
            return 1;
        }
        let Some(model) = ok(ClipTextModel::<B>::new(
            &config,
            v.is_multiple_of(2),
            &device,
        )) else {
            return 1;
        };
        // Token ids as a tokenizer gives them: in range, the end token, and (now and then) one
        // from a bigger vocabulary than the model's.
        let vocab = config.vocab_size as u32;
        let mut ids: Vec<u32> = (0..5u32).map(|i| (i * 7919) % vocab.max(1)).collect();
        ids.push(config.eos_token_id);
        if v.is_multiple_of(8) {
            ids.push(49407);
        }
        let len = if v.is_multiple_of(3) { 77 } else { ids.len() };
        ids.resize(len, config.eos_token_id);
        ok(model.forward(&[ids])).map_or(2, |_| 3)
    });
    target
        .corpus
        .extend(extra_configs("text_encoder_2/config.json"));
    for case in [
        "clip_quick_gelu",
        "legacy_eos_2",
        "openclip_gelu_projection",
    ] {
        if let Ok(bytes) = std::fs::read(
            fixtures()
                .join("clip")
                .join(case)
                .join("text_encoder/config.json"),
        ) {
            target.corpus.push(bytes);
        }
    }
    target
}

/// Step counts whose `set_timesteps` must finish within the time budget: up to 1000 (more than
/// any real run; the pipeline takes up to `sd::MAX_STEPS`, and Karras and KDPM2 schedules cost
/// steps × training steps to lay out, seconds at 10⁴ × 10⁵, negligible next to 10⁴ U-Net
/// steps), and values far above any training schedule, which must be refused at once.
fn reachable_steps(n: usize) -> bool {
    n <= 1000 || n > 1 << 24
}

/// The sampler and steps of a `scheduler_config` input: the `_fuzz_sampler` and `_fuzz_steps`
/// keys (ignored by the config parser), so that a replay runs what the run that found it ran.
fn fuzz_choices(input: &[u8]) -> (Option<String>, Option<usize>) {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(input) else {
        return (None, None);
    };
    let sampler = value["_fuzz_sampler"].as_str().map(str::to_string);
    let steps = value["_fuzz_steps"]
        .as_u64()
        .map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    (sampler, steps)
}

fn scheduler_config_target() -> Target {
    let device = Default::default();
    let names = sd_schedulers::known_names();
    let scratch = Scratch::new("scheduler_config");
    let path = scratch.0.join("scheduler_config.json");
    let exec = move |input: &[u8]| {
        let _keep = &scratch;
        std::fs::write(&path, input).unwrap();
        let Some(config) = ok(SchedulerConfig::from_file(&path)) else {
            return 0;
        };
        let v = variant(input);
        let mut rng = Rng::new(v);
        let (sampler, steps) = fuzz_choices(input);
        let mut depth = 1;
        let class = config.class_name.clone().unwrap_or_default();
        let sampler = sampler.unwrap_or_else(|| rng.pick(&names).to_string());
        for name in [class.as_str(), sampler.as_str(), *rng.pick(&names)] {
            let Some(mut scheduler) = ok(sd_schedulers::from_name::<B>(name, config.clone()))
            else {
                continue;
            };
            depth = depth.max(2);
            let mut all_steps = vec![
                *rng.pick(&[0, 1, 2, 3, 4]),
                *rng.pick(&[10, 25, 50, 150, 999, 1000, 1001, usize::MAX, usize::MAX / 2]),
                rng.range(1, 200),
            ];
            all_steps.extend(steps);
            for n in all_steps {
                if !reachable_steps(n) || ok(scheduler.set_timesteps(n)).is_none() {
                    continue;
                }
                let _ = scheduler.init_noise_sigma();
                if n > 4 {
                    continue;
                }
                depth = 3;
                // A few steps on a tiny latent, as the pipeline runs them.
                let mut sample = Tensor::<B, 4>::ones([1, 4, 2, 2], &device);
                let _ = scheduler.set_begin_index(rng.below(n + 2));
                let _ = scheduler.add_noise(sample.clone(), sample.clone());
                let mut noise = HostNoise::new(v);
                let total = scheduler.timesteps().len().min(16);
                for _ in 0..total {
                    let input = scheduler.scale_model_input(sample.clone());
                    match scheduler.step(input * 0.1, sample.clone(), &mut noise) {
                        Ok(out) => sample = out.prev_sample,
                        Err(_) => break,
                    }
                }
            }
        }
        depth
    };
    let mut corpus = config_corpus("scheduler/scheduler_config.json");
    corpus.extend(common_scheduler_configs());
    // Each seed names a sampler and a step count for the mutator to vary.
    let names = sd_schedulers::known_names();
    for (i, seed) in corpus.iter_mut().enumerate() {
        if let Ok(serde_json::Value::Object(mut map)) = serde_json::from_slice(seed) {
            map.insert("_fuzz_sampler".into(), names[(i * 7) % names.len()].into());
            map.insert("_fuzz_steps".into(), [4, 20, 1000][i % 3].into());
            *seed = serde_json::to_vec_pretty(&map).unwrap();
        }
    }
    Target {
        name: "scheduler_config",
        corpus,
        mutate: mutate_json,
        exec: Box::new(exec),
    }
}

/// One scheduler fixture's config per sampler family, as more seeds.
fn common_scheduler_configs() -> Vec<Vec<u8>> {
    let dir = fixtures().join("schedulers");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    paths.sort();
    let mut families = Vec::new();
    let mut out = Vec::new();
    for case in paths {
        let name = case.file_name().unwrap().to_string_lossy().into_owned();
        let family = name.split('_').next().unwrap_or_default().to_string();
        if families.contains(&family) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(case.join("manifest.json")) else {
            continue;
        };
        let Ok(manifest) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        if manifest["scheduler_config"].is_object() {
            families.push(family);
            out.push(serde_json::to_vec_pretty(&manifest["scheduler_config"]).unwrap());
        }
    }
    out
}

/// The files of the model folder a `model_folder` input may replace.
const MODEL_FILES: &[&str] = &[
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/tokenizer_config.json",
];

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// `<path in the folder>\n<contents>`.
fn split_named(input: &[u8]) -> Option<(&str, &[u8])> {
    let nl = input.iter().position(|&b| b == b'\n')?;
    let name = std::str::from_utf8(&input[..nl]).ok()?;
    Some((name, &input[nl + 1..]))
}

fn mutate_named(rng: &mut Rng, data: &[u8], other: &[u8]) -> Vec<u8> {
    let Some((name, body)) = split_named(data) else {
        return data.to_vec();
    };
    let other_body = split_named(other).map_or(other, |(_, b)| b);
    let mut out = format!("{name}\n").into_bytes();
    out.extend(mutate_json(rng, body, other_body));
    out
}

/// `sd::Model::from_folder` on a copy of the tiny SD 1.x folder with one file replaced by the
/// mutant; when it opens, the small components are loaded from it too.
fn model_folder_target() -> Target {
    let device = Default::default();
    let scratch = Scratch::new("model_folder");
    let dir = scratch.0.join("model");
    copy_tree(&model_dir(), &dir);
    let corpus = MODEL_FILES
        .iter()
        .map(|rel| {
            let mut input = format!("{rel}\n").into_bytes();
            input.extend(read_fixture(rel));
            input
        })
        .collect();
    let exec = move |input: &[u8]| {
        let _keep = &scratch;
        let v = variant(input);
        let Some((rel, body)) = split_named(input) else {
            return 0;
        };
        if !MODEL_FILES.contains(&rel) {
            return 0;
        }
        let path = dir.join(rel);
        std::fs::write(&path, body).unwrap();
        let mut depth = 0;
        if let Some(model) = ok(sd::Model::from_folder(&dir, None)) {
            depth = 1;
            if sd::memory::vae_half_parameters(model.vae_config()) < MAX_BUILD_PARAMETERS
                && ok(model.load_vae_decoder::<B>(&device)).is_some()
            {
                depth += 1;
            }
            if v.is_multiple_of(4)
                && ok(model.load_conditioner::<B>(
                    PromptSyntax::default(),
                    (v / 4 % 3) as usize,
                    &device,
                ))
                .is_some()
            {
                depth += 1;
            }
            if v.is_multiple_of(8)
                && sd::memory::unet_parameters(model.unet_config()) < MAX_BUILD_PARAMETERS
                && ok(model.load_unet::<B>(&device)).is_some()
            {
                depth += 1;
            }
        }
        std::fs::write(&path, read_fixture(rel)).unwrap();
        depth
    };
    Target {
        name: "model_folder",
        corpus,
        mutate: mutate_named,
        exec: Box::new(exec),
    }
}

/// A single-file checkpoint (the tiny SD 1.x one, original layout): `Model::from_single_file`
/// detects the family from the keys and shapes; with the tiny folder's configs (`config_dir`)
/// the small components are loaded from it too.
fn single_file_target() -> Target {
    let device = Default::default();
    let scratch = Scratch::new("single_file");
    let path = scratch.0.join("checkpoint.safetensors");
    let corpus = vec![
        std::fs::read(fixtures().join("pipeline/tiny_sd1/tiny_sd1.safetensors"))
            .expect("the tiny single-file checkpoint"),
    ];
    let exec = move |input: &[u8]| {
        let _keep = &scratch;
        std::fs::write(&path, input).unwrap();
        let v = variant(input);
        let mut depth = 0;
        if ok(sd::Model::from_single_file(&path, None)).is_some() {
            depth = 1;
        }
        let config_dir = model_dir();
        if let Some(model) = ok(sd::Model::from_single_file(&path, Some(&config_dir))) {
            depth = 2;
            if ok(model.load_vae_decoder::<B>(&device)).is_some() {
                depth += 1;
            }
            if v.is_multiple_of(4)
                && ok(model.load_conditioner::<B>(PromptSyntax::default(), 0, &device)).is_some()
            {
                depth += 1;
            }
            if v % 8 == 1 && ok(model.load_unet::<B>(&device)).is_some() {
                depth += 1;
            }
        }
        depth
    };
    Target {
        name: "single_file",
        corpus,
        mutate: mutate_safetensors,
        exec: Box::new(exec),
    }
}

/// `sd generate --lora FILE`: a LoRA file read (every layout) and merged into tiny_sd1's U-Net
/// and text encoder, strictly or leaving unmatched layers out.
fn lora_target() -> Target {
    let device = Default::default();
    let scratch = Scratch::new("lora");
    let path = scratch.0.join("lora.safetensors");
    let loras = fixtures().join("lora/tiny_sd1");
    let corpus = [
        "kohya.safetensors",
        "diffusers.safetensors",
        "peft/adapter_model.safetensors",
    ]
    .iter()
    .map(|f| std::fs::read(loras.join(f)).expect("the fixture LoRAs"))
    .collect();
    let model = sd::Model::from_folder(model_dir(), None).expect("tiny_sd1");
    let exec = move |input: &[u8]| {
        let _keep = &scratch;
        std::fs::write(&path, input).unwrap();
        let v = variant(input);
        let Some(file) = ok(sd_lora::LoraFile::open(&path)) else {
            return 0;
        };
        let weight = [1.0, -0.5, 2.0][(v % 3) as usize];
        let Some(with) = ok(model
            .clone()
            .with_lora_ignore_unmatched(v.is_multiple_of(2))
            .with_loras(vec![(Arc::new(file), weight)]))
        else {
            return 1;
        };
        let mut depth = 2;
        if ok(with.load_unet::<B>(&device)).is_some() {
            depth += 1;
        }
        if v.is_multiple_of(3)
            && ok(with.load_conditioner::<B>(PromptSyntax::default(), 0, &device)).is_some()
        {
            depth += 1;
        }
        depth
    };
    Target {
        name: "lora",
        corpus,
        mutate: mutate_safetensors,
        exec: Box::new(exec),
    }
}

// ---------------------------------------------------------------------------------------------
// Tokenizer files and prompts.

const SEPARATOR: &[u8] = b"\n\x00--merges.txt--\x00\n";

/// `V<vocab.json>SEPARATOR<merges.txt>`, or `T<tokenizer.json>` (a folder with that alone).
fn tokenizer_corpus() -> Vec<Vec<u8>> {
    let mut both = b"V".to_vec();
    both.extend(read_fixture("tokenizer/vocab.json"));
    both.extend_from_slice(SEPARATOR);
    both.extend(read_fixture("tokenizer/merges.txt"));
    let mut json = b"T".to_vec();
    json.extend(read_fixture("tokenizer/tokenizer.json"));
    vec![both, json]
}

fn split_tokenizer(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&kind, rest) = input.split_first()?;
    if kind == b'T' {
        return Some((kind, rest, &[]));
    }
    let at = rest.windows(SEPARATOR.len()).position(|w| w == SEPARATOR)?;
    Some((kind, &rest[..at], &rest[at + SEPARATOR.len()..]))
}

/// Line edits of `merges.txt`: drop, repeat, swap lines; lines of one or three parts, unknown
/// symbols, a `#version` line, long lines.
fn mutate_merges(rng: &mut Rng, data: &[u8], other: &[u8]) -> Vec<u8> {
    if rng.one_in(3) {
        return mutate_bytes(rng, data, other, 0..0);
    }
    let text = String::from_utf8_lossy(data);
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for _ in 0..rng.range(1, 3) {
        let n = lines.len();
        let i = rng.below(n + 1).min(n.saturating_sub(1));
        match rng.below(8) {
            0 if n > 0 => {
                lines.remove(i);
            }
            1 if n > 0 => {
                let l = lines[i].clone();
                lines.insert(rng.below(n), l);
            }
            2 if n > 1 => {
                let j = rng.below(n);
                lines.swap(i, j);
            }
            3 => lines.insert(
                i.min(n),
                rng.pick(&[
                    "a",
                    "a b c",
                    "",
                    " ",
                    "a  b",
                    "#version: 0.2",
                    "\u{0} \u{0}",
                    "</w> </w>",
                    "<|endoftext|> a",
                ])
                .to_string(),
            ),
            4 => {
                let long: String = std::iter::repeat_n('x', rng.size(5000)).collect();
                lines.insert(i.min(n), format!("{long} y"));
            }
            5 if n > 0 => {
                // A merge of the pieces of another merge (a chain).
                let parts: Vec<String> =
                    lines[rng.below(n)].split(' ').map(str::to_string).collect();
                lines.insert(i.min(n), parts.concat() + " " + &parts.concat());
            }
            6 => lines.clear(),
            _ => lines.insert(i.min(n), "é \u{301}".to_string()),
        }
    }
    let mut out = lines.join(if rng.one_in(8) { "\r\n" } else { "\n" });
    if rng.one_in(2) {
        out.push('\n');
    }
    out.into_bytes()
}

fn mutate_tokenizer(rng: &mut Rng, data: &[u8], other: &[u8]) -> Vec<u8> {
    let Some((kind, first, second)) = split_tokenizer(data) else {
        return mutate_bytes(rng, data, other, 0..0);
    };
    let mut out = vec![kind];
    if kind == b'T' {
        out.extend(mutate_json(rng, first, other));
        return out;
    }
    let (other_first, other_second) =
        split_tokenizer(other).map_or((other, other), |(_, a, b)| (a, b));
    if rng.one_in(2) {
        out.extend(mutate_json(rng, first, other_first));
        out.extend_from_slice(SEPARATOR);
        out.extend_from_slice(second);
    } else {
        out.extend_from_slice(first);
        out.extend_from_slice(SEPARATOR);
        out.extend(mutate_merges(rng, second, other_second));
    }
    out
}

const PROMPTS: &[&str] = &[
    "a photograph of an astronaut riding a horse",
    "masterpiece, best quality, (cat:1.2), [dog], ((sharp)), (blurry:0.5)",
    "a castle BREAK a dragon, (fire:1.3) BREAK",
    "\\(literal parentheses\\) and \\[brackets\\] \\\\ backslash",
    "",
];

fn tokenize_a_few(tokenizer: &ClipTokenizer, rng: &mut Rng) {
    let _ = tokenizer.encode("a photo of a cat");
    let _ = tokenizer.encode_padded(rng.word(PROMPTS));
    let _ = sd_conditioner::tokenize_prompt(tokenizer, rng.word(PROMPTS));
    let _ = sd_conditioner::tokenize_prompt(tokenizer, &random_prompt(rng));
}

fn tokenizer_target() -> Target {
    let scratch = Scratch::new("tokenizer");
    let dir = scratch.0.clone();
    let exec = move |input: &[u8]| {
        let _keep = &scratch;
        let v = variant(input);
        let Some((kind, first, second)) = split_tokenizer(input) else {
            return 0;
        };
        for name in ["vocab.json", "merges.txt", "tokenizer.json"] {
            let _ = std::fs::remove_file(dir.join(name));
        }
        if kind == b'T' {
            std::fs::write(dir.join("tokenizer.json"), first).unwrap();
        } else {
            std::fs::write(dir.join("vocab.json"), first).unwrap();
            std::fs::write(dir.join("merges.txt"), second).unwrap();
        }
        let padding = if v.is_multiple_of(2) {
            Padding::EndOfText
        } else {
            Padding::Exclamation
        };
        let Some(tokenizer) = ok(ClipTokenizer::from_folder(&dir, padding)) else {
            return 0;
        };
        let mut rng = Rng::new(v);
        tokenize_a_few(&tokenizer, &mut rng);
        1
    };
    Target {
        name: "tokenizer",
        corpus: tokenizer_corpus(),
        mutate: mutate_tokenizer,
        exec: Box::new(exec),
    }
}

/// A random A1111 prompt: words (unicode, long ones now and then), emphasis `( )`, `[ ]`,
/// weights `(x:1.5)` (odd ones too), `BREAK`, escapes, unbalanced and deeply nested brackets.
fn random_prompt(rng: &mut Rng) -> String {
    let mut out = String::new();
    random_prompt_into(rng, &mut out, 0);
    out
}

fn random_prompt_into(rng: &mut Rng, out: &mut String, depth: usize) {
    const WORDS: &[&str] = &[
        "a",
        "photo",
        "of",
        "cat",
        "astronaut",
        "horse",
        "masterpiece",
        "best quality",
        "猫",
        "café",
        "😀",
        "ﬁ",
        "Ⅻ",
        "\u{200b}",
        "\u{0}",
        "e\u{301}",
        "<|endoftext|>",
        "<|startoftext|>",
        "<lora:x:1>",
        "{a|b}",
        "AND",
        "1girl",
        "'s",
        "don't",
        "3.14",
        "\u{feff}",
        "Ǆ",
        "ß",
        "İ",
    ];
    const WEIGHTS: &[&str] = &[
        "1.5",
        "0",
        "-1",
        "1e39",
        "-1e39",
        "1e308",
        "nan",
        "inf",
        "-inf",
        "0.0001",
        "",
        "abc",
        "1.2.3",
        "9999999999999999999999",
        "+2",
        ".5",
        "1e-39",
        " 1.1 ",
    ];
    let n = rng.range(1, 12);
    for _ in 0..n {
        match rng.below(20) {
            0..=7 => out.push_str(rng.word(WORDS)),
            8 => {
                let len = rng.size(50);
                for _ in 0..len {
                    out.push((b'a' + rng.below(26) as u8) as char);
                }
            }
            9 if depth < 8 => {
                out.push('(');
                random_prompt_into(rng, out, depth + 1);
                out.push(')');
            }
            10 if depth < 8 => {
                out.push('(');
                random_prompt_into(rng, out, depth + 1);
                out.push(':');
                out.push_str(rng.word(WEIGHTS));
                out.push(')');
            }
            11 if depth < 8 => {
                out.push('[');
                random_prompt_into(rng, out, depth + 1);
                out.push(']');
            }
            12 => out.push_str(rng.word(&[" BREAK ", "BREAK", " BREAK", "BREAKfast", "break"])),
            13 => out.push_str(rng.word(&["\\(", "\\)", "\\[", "\\]", "\\\\", "\\", "\\:"])),
            14 => out
                .push_str(rng.word(&["(", ")", "[", "]", ":", "::", ",", ", ", "\n", "\t", "  "])),
            15 if rng.one_in(10) => {
                // A very long word (A1111 prompts have no length limit; the tokenizer must stay
                // fast).
                let len = rng.size(4000);
                let c = *rng.pick(&['a', 'z', 'é', '猫', '(']);
                out.extend(std::iter::repeat_n(c, len));
            }
            16 if rng.one_in(20) => {
                // Deep nesting, or many unbalanced brackets (issue 19).
                let d = rng.size(1000);
                let open = rng.word(&["(", "[", "(("]);
                let close = if open.starts_with('[') { "]" } else { ")" };
                for _ in 0..d {
                    out.push_str(open);
                }
                out.push_str("cat");
                if rng.one_in(2) {
                    for _ in 0..d {
                        out.push_str(close);
                    }
                }
            }
            17 => {
                out.push_str(rng.word(WORDS));
                out.push(':');
                out.push_str(rng.word(WEIGHTS));
            }
            _ => out.push(' '),
        }
        if rng.one_in(2) {
            out.push(' ');
        }
    }
}

fn mutate_prompt(rng: &mut Rng, data: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = mutate_prompt_once(rng, data, other);
    // Prompts up to 64 KiB: past the tokenizer's bound, short enough to stay fast.
    out.truncate(64 << 10);
    out
}

fn mutate_prompt_once(rng: &mut Rng, data: &[u8], other: &[u8]) -> Vec<u8> {
    match rng.below(3) {
        0 => random_prompt(rng).into_bytes(),
        1 => {
            // Splice a random fragment into the prompt, at a character boundary.
            let text = String::from_utf8_lossy(data).into_owned();
            let mut at = rng.below(text.len() + 1);
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            let mut out = text[..at].to_string();
            out.push_str(&random_prompt(rng));
            out.push_str(&text[at..]);
            out.into_bytes()
        }
        _ => mutate_bytes(rng, data, other, 0..0),
    }
}

fn prompt_target() -> Target {
    let end_of_text = ClipTokenizer::embedded(Padding::EndOfText).expect("the embedded tokenizer");
    let exclamation =
        ClipTokenizer::embedded(Padding::Exclamation).expect("the embedded tokenizer");
    let exec = move |input: &[u8]| {
        let v = variant(input);
        let prompt = String::from_utf8_lossy(input);
        let tokenizer = if v.is_multiple_of(2) {
            &end_of_text
        } else {
            &exclamation
        };
        let _ = sd_conditioner::parse_weights(&prompt);
        // `sd generate` takes A1111's <lora:…> tags out first.
        let _ = sd_lora::extract_prompt_loras(&prompt);
        match sd_conditioner::tokenize_prompt(tokenizer, &prompt) {
            Ok(_) => 1,
            Err(_) => 0,
        }
    };
    Target {
        name: "prompt",
        corpus: PROMPTS.iter().map(|p| p.as_bytes().to_vec()).collect(),
        mutate: mutate_prompt,
        exec: Box::new(exec),
    }
}

// ---------------------------------------------------------------------------------------------
// Images.

fn crc32(bytes: &[u8]) -> u32 {
    static TABLE: OnceLock<[u32; 256]> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    !bytes.iter().fold(!0u32, |c, &b| {
        table[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8)
    })
}

/// A PNG's chunks after the signature: (type, data).
fn png_chunks(data: &[u8]) -> Option<Vec<([u8; 4], Vec<u8>)>> {
    if data.get(..8)? != b"\x89PNG\r\n\x1a\n" {
        return None;
    }
    let mut chunks = Vec::new();
    let mut at = 8;
    while at + 12 <= data.len() {
        let len = u32::from_be_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        let kind: [u8; 4] = data[at + 4..at + 8].try_into().unwrap();
        let end = at.checked_add(12)?.checked_add(len)?;
        if end > data.len() {
            return None;
        }
        chunks.push((kind, data[at + 8..at + 8 + len].to_vec()));
        at = end;
    }
    Some(chunks)
}

fn png_from_chunks(chunks: &[([u8; 4], Vec<u8>)], fix_crc: bool) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, body) in chunks {
        out.extend((body.len() as u32).to_be_bytes());
        out.extend(kind);
        out.extend(body);
        let mut crc_input = kind.to_vec();
        crc_input.extend(body);
        let crc = if fix_crc {
            crc32(&crc_input)
        } else {
            0xdead_beef
        };
        out.extend(crc.to_be_bytes());
    }
    out
}

const SIDES: &[u32] = &[
    0,
    1,
    7,
    8,
    9,
    64,
    16383,
    16384,
    16385,
    65535,
    65536,
    0x7fff_ffff,
    0x8000_0000,
    u32::MAX,
];

/// Edits that keep a PNG's chunk CRCs right, so that the decoder reads on: the header's size,
/// depth, colour type and interlacing, chunk bodies, chunks dropped, repeated or added.
fn mutate_png(rng: &mut Rng, data: &[u8]) -> Option<Vec<u8>> {
    let mut chunks = png_chunks(data)?;
    if chunks.is_empty() {
        return None;
    }
    match rng.below(6) {
        0 | 1 => {
            if let Some((_, ihdr)) = chunks.iter_mut().find(|(k, _)| k == b"IHDR")
                && ihdr.len() >= 13
            {
                match rng.below(5) {
                    0 => ihdr[0..4].copy_from_slice(&rng.pick(SIDES).to_be_bytes()),
                    1 => ihdr[4..8].copy_from_slice(&rng.pick(SIDES).to_be_bytes()),
                    2 => ihdr[8] = *rng.pick(&[0, 1, 2, 3, 4, 8, 16, 32]),
                    3 => ihdr[9] = *rng.pick(&[0, 1, 2, 3, 4, 5, 6, 7]),
                    _ => ihdr[10 + rng.below(3)] = *rng.pick(&[0, 1, 2, 255]),
                }
            }
        }
        2 => {
            let i = rng.below(chunks.len());
            let body = std::mem::take(&mut chunks[i].1);
            chunks[i].1 = mutate_bytes(rng, &body, &[], 0..0);
        }
        3 if chunks.len() > 1 => {
            chunks.remove(rng.below(chunks.len()));
        }
        4 => {
            let i = rng.below(chunks.len());
            let c = chunks[i].clone();
            chunks.insert(rng.below(chunks.len() + 1), c);
        }
        _ => {
            let kind = *rng.pick(&[
                b"PLTE", b"tRNS", b"acTL", b"fcTL", b"fdAT", b"gAMA", b"iCCP", b"zTXt", b"sBIT",
                b"IDAT", b"IEND", b"cICP",
            ]);
            let body: Vec<u8> = (0..rng.size(64)).map(|_| rng.next() as u8).collect();
            chunks.insert(rng.range(1, chunks.len()), (*kind, body));
        }
    }
    Some(png_from_chunks(&chunks, !rng.one_in(16)))
}

/// Edits of a JPEG's frame header (its size and components) and tables, found by marker.
fn mutate_jpeg(rng: &mut Rng, data: &[u8]) -> Option<Vec<u8>> {
    if data.get(..2)? != [0xff, 0xd8] {
        return None;
    }
    let markers: Vec<usize> = (2..data.len().saturating_sub(4))
        .filter(|&i| data[i] == 0xff && (0xc0..=0xfe).contains(&data[i + 1]))
        .collect();
    let mut out = data.to_vec();
    let sof = markers
        .iter()
        .copied()
        .find(|&i| matches!(data[i + 1], 0xc0..=0xc2));
    match (rng.below(4), sof) {
        (0 | 1, Some(i)) if i + 10 < out.len() => {
            // SOF: length(2) precision(1) height(2) width(2) components(1) ...
            match rng.below(4) {
                0 => out[i + 5..i + 7].copy_from_slice(&(*rng.pick(SIDES) as u16).to_be_bytes()),
                1 => out[i + 7..i + 9].copy_from_slice(&(*rng.pick(SIDES) as u16).to_be_bytes()),
                2 => out[i + 9] = *rng.pick(&[0, 1, 2, 3, 4, 5, 255]),
                _ => out[i + 4] = *rng.pick(&[0, 1, 8, 12, 16, 255]),
            }
        }
        (2, _) if !markers.is_empty() => {
            // Bytes just after a marker (its length and table values).
            let i = *rng.pick(&markers);
            for _ in 0..rng.range(1, 4) {
                let at = (i + 2 + rng.below(16)).min(out.len() - 1);
                out[at] = rng.next() as u8;
            }
        }
        (_, _) if !markers.is_empty() => {
            // Repeat or drop a marker segment.
            let k = rng.below(markers.len());
            let start = markers[k];
            let end = markers.get(k + 1).copied().unwrap_or(out.len());
            let segment = out[start..end].to_vec();
            if rng.one_in(2) {
                out.splice(start..start, segment);
            } else {
                out.drain(start..end);
            }
        }
        _ => return None,
    }
    Some(out)
}

fn mutate_image(rng: &mut Rng, data: &[u8], other: &[u8]) -> Vec<u8> {
    if !rng.one_in(3)
        && let Some(out) = mutate_png(rng, data).or_else(|| mutate_jpeg(rng, data))
    {
        return out;
    }
    mutate_bytes(rng, data, other, 0..0)
}

fn encode(image: image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut out, format)
        .expect("encoding a seed image");
    out.into_inner()
}

fn image_corpus() -> Vec<Vec<u8>> {
    let rgb = image::RgbImage::from_fn(24, 16, |x, y| {
        image::Rgb([(x * 10) as u8, (y * 15) as u8, ((x + y) * 5) as u8])
    });
    let gray = image::GrayImage::from_fn(16, 16, |x, y| image::Luma([((x ^ y) * 16) as u8]));
    let rgba16 = image::ImageBuffer::<image::Rgba<u16>, Vec<u16>>::from_fn(8, 8, |x, y| {
        image::Rgba([
            (x * 8000) as u16,
            (y * 8000) as u16,
            30000,
            65535 - (x * 1000) as u16,
        ])
    });
    vec![
        std::fs::read(fixtures().join("pipeline/tiny_sd1_img2img/init.png")).expect("init.png"),
        std::fs::read(fixtures().join("pipeline/tiny_sd1_inpaint/mask.png")).expect("mask.png"),
        encode(
            image::DynamicImage::ImageRgb8(rgb.clone()),
            image::ImageFormat::Jpeg,
        ),
        encode(
            image::DynamicImage::ImageLuma8(gray.clone()),
            image::ImageFormat::Jpeg,
        ),
        encode(
            image::DynamicImage::ImageLuma8(gray),
            image::ImageFormat::Png,
        ),
        encode(
            image::DynamicImage::ImageRgba16(rgba16),
            image::ImageFormat::Png,
        ),
        encode(
            image::DynamicImage::ImageRgb8(rgb).into_rgba8().into(),
            image::ImageFormat::Png,
        ),
    ]
}

/// `--init-image` and `--mask` as `sd generate` reads them.
fn image_target() -> Target {
    let scratch = Scratch::new("image");
    let path = scratch.0.join("input.png");
    let exec = move |input: &[u8]| {
        let _keep = &scratch;
        std::fs::write(&path, input).unwrap();
        let mut depth = 0;
        let _ = sd_core::image_io::image_dimensions(&path);
        if let Ok(image) = sd_core::image_io::decode_image(&path) {
            depth = 1;
            let _ = image.to_luma8();
        }
        if let Ok(rgb) = sd_core::image_io::read_rgb(&path, 8) {
            depth = 2;
            // As the pipeline takes it (a larger image is refused by the memory estimate first).
            if u64::from(rgb.width()) * u64::from(rgb.height()) <= 2048 * 2048 {
                let _ = sd_core::image_io::image_to_data(&rgb);
            }
        }
        depth
    };
    Target {
        name: "image",
        corpus: image_corpus(),
        mutate: mutate_image,
        exec: Box::new(exec),
    }
}

/// The settings `sd train --config` reads (TOML or JSON) and a checkpoint's
/// `training_state.json` that `--resume` reads, each then validated as a run would be.
fn train_config_target() -> Target {
    let scratch = Scratch::new("train_config");
    let dir = scratch.0.clone();
    let exec = move |input: &[u8]| {
        let _keep = &scratch;
        let v = variant(input);
        let Ok(text) = std::str::from_utf8(input) else {
            return 0;
        };
        let config = if !text.trim_start().starts_with('{') {
            ok(sd_train::TrainConfig::from_toml(text))
        } else if text.contains("\"config\"") {
            std::fs::write(dir.join(sd_train::checkpoint::STATE_FILE), input).unwrap();
            ok(sd_train::checkpoint::read_state(&dir)).map(|state| {
                let _ = state.optimizer_steps();
                state.config
            })
        } else {
            ok(sd_train::TrainConfig::from_json(text))
        };
        let Some(config) = config else {
            return 0;
        };
        if ok(config.validate()).is_none() {
            return 1;
        }
        // What a run derives from valid settings before its first step.
        let _ = config.to_json();
        if let Some(lora) = &config.lora {
            let _ = ok(lora.target_set());
            let _ = ok(lora.init_kind());
        }
        if v.is_multiple_of(2) {
            let _ = ok(sd_train::LrSchedule::new(
                config.learning_rate,
                config.lr_scheduler,
                config.lr_warmup_steps,
                config.max_steps,
            ));
        }
        2
    };
    let mut corpus = Vec::new();
    for stage in ["unet", "vae", "vae2"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../crates/sd-shapes/model/training")
            .join(stage)
            .join("train_config.json");
        if let Ok(bytes) = std::fs::read(path) {
            let state = format!(
                "{{\"step\": 300, \"ema_steps\": 300, \"config\": {}}}",
                String::from_utf8_lossy(&bytes)
            );
            corpus.push(bytes);
            corpus.push(state.into_bytes());
        }
    }
    corpus.push(
        b"model = \"model\"\ndata = \"images\"\noutput = \"out\"\nmax_steps = 100\n\
          batch_size = 2\nlearning_rate = 1e-4\nlr_scheduler = \"cosine\"\nsnr_gamma = 5.0\n\
          min_timestep = 200\nmax_timestep = 900\n\n[lora]\nrank = 4\nalpha = 4.0\n"
            .to_vec(),
    );
    Target {
        name: "train_config",
        corpus,
        mutate: |rng, data, other| {
            if data.first() == Some(&b'{') {
                mutate_json(rng, data, other)
            } else {
                mutate_bytes(rng, data, other, 0..0)
            }
        },
        exec: Box::new(exec),
    }
}

/// A training folder as `sd train --data` opens it: `metadata.jsonl` (the input) beside two
/// images, then every image's header checked as a run does before its first step.
fn dataset_target() -> Target {
    let scratch = Scratch::new("dataset");
    let dir = scratch.0.clone();
    let png = encode(
        image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(8, 8, |x, y| {
            image::Rgb([(x * 30) as u8, (y * 30) as u8, 90])
        })),
        image::ImageFormat::Png,
    );
    std::fs::write(dir.join("a.png"), &png).unwrap();
    std::fs::write(dir.join("b.png"), &png[..png.len() / 2]).unwrap();
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("sub/c.png"), &png).unwrap();
    let exec = move |input: &[u8]| {
        let _keep = &scratch;
        let v = variant(input);
        std::fs::write(dir.join("metadata.jsonl"), input).unwrap();
        let column = ["text", "caption", "additional_feature"][(v % 3) as usize];
        let Some(data) = ok(sd_data::Dataset::open(&dir, Some(column))) else {
            return 0;
        };
        let _ = data.len();
        if ok(data.check_images()).is_none() {
            let (kept, _) = data.without_bad_images();
            return if kept.is_empty() { 1 } else { 2 };
        }
        3
    };
    Target {
        name: "dataset",
        corpus: vec![
            b"{\"file_name\": \"a.png\", \"text\": \"a red circle\"}\n\
              {\"file_name\": \"sub/c.png\", \"text\": [\"one\", \"two\"]}\n"
                .to_vec(),
            b"{\"file_name\": \"a.png\", \"caption\": \"x\", \"additional_feature\": \"y\"}\n\n\
              {\"file_name\": \"b.png\", \"caption\": \"z\", \"text\": \"w\"}\n"
                .to_vec(),
        ],
        mutate: |rng, data, other| {
            // Mutate one line as JSON now and then, else the bytes.
            let lines: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
            if rng.one_in(2) && !lines.is_empty() {
                let k = rng.below(lines.len());
                let mut out = Vec::new();
                for (i, line) in lines.iter().enumerate() {
                    if i > 0 {
                        out.push(b'\n');
                    }
                    if i == k {
                        out.extend(mutate_json(rng, line, other));
                    } else {
                        out.extend_from_slice(line);
                    }
                }
                out
            } else {
                mutate_bytes(rng, data, other, 0..0)
            }
        },
        exec: Box::new(exec),
    }
}

// ---------------------------------------------------------------------------------------------

fn make_target(name: &str) -> Target {
    match name {
        "safetensors" => safetensors_target(),
        "latents" => latents_target(),
        "unet_config" => unet_config_target(),
        "vae_config" => vae_config_target(),
        "clip_config" => clip_config_target(),
        "scheduler_config" => scheduler_config_target(),
        "model_folder" => model_folder_target(),
        "single_file" => single_file_target(),
        "tokenizer" => tokenizer_target(),
        "prompt" => prompt_target(),
        "image" => image_target(),
        "lora" => lora_target(),
        "train_config" => train_config_target(),
        "dataset" => dataset_target(),
        other => panic!("no fuzz target `{other}`; the targets are {TARGETS:?}"),
    }
}

/// The short seeded run of one target in `cargo test` (`SD_FUZZ_EXECS` overrides the count).
fn short_run(name: &str, execs: u64) {
    let execs = std::env::var("SD_FUZZ_EXECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(execs);
    let report = fuzz(name, execs, TEST_SEED, false);
    assert!(
        report.failures.is_empty(),
        "fuzz target `{name}` failed (seed {TEST_SEED}):\n{}",
        describe(&report.failures)
    );
    assert!(
        report.deep > 0,
        "no input of `{name}` got past the first check"
    );
}

#[test]
fn fuzz_safetensors() {
    short_run("safetensors", 1000);
}

#[test]
fn fuzz_latents() {
    short_run("latents", 2000);
}

#[test]
fn fuzz_unet_config() {
    short_run("unet_config", 2000);
}

#[test]
fn fuzz_vae_config() {
    short_run("vae_config", 1500);
}

#[test]
fn fuzz_clip_config() {
    short_run("clip_config", 1500);
}

#[test]
fn fuzz_scheduler_config() {
    short_run("scheduler_config", 1500);
}

#[test]
fn fuzz_model_folder() {
    short_run("model_folder", 300);
}

#[test]
fn fuzz_single_file() {
    short_run("single_file", 100);
}

#[test]
fn fuzz_tokenizer() {
    short_run("tokenizer", 600);
}

#[test]
fn fuzz_prompt() {
    short_run("prompt", 2000);
}

#[test]
fn fuzz_image() {
    short_run("image", 2000);
}

#[test]
fn fuzz_lora() {
    short_run("lora", 300);
}

#[test]
fn fuzz_train_config() {
    short_run("train_config", 2000);
}

#[test]
fn fuzz_dataset() {
    short_run("dataset", 1000);
}

/// Every file kept in `tests/fuzz-corpus/<target>/` runs without a panic, an abort or a hang.
#[test]
fn corpus_replays() {
    let mut failures = Vec::new();
    let mut replayed = 0;
    for &name in TARGETS {
        let dir = corpus_dir().join(name);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        paths.sort();
        if paths.is_empty() {
            continue;
        }
        let mut target = make_target(name);
        let registered = Registered::new(target.name, 0);
        for (i, path) in paths.iter().enumerate() {
            let input = std::fs::read(path).unwrap();
            replayed += 1;
            if let (_, Err((kind, message))) = run_one(&mut target, &registered.0, i as u64, input)
            {
                failures.push(format!("{} ({name}): {kind}: {message}", path.display()));
            }
        }
    }
    for entry in std::fs::read_dir(corpus_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().is_dir() {
            assert!(
                TARGETS.contains(&name.as_str()),
                "tests/fuzz-corpus/{name}: no such target"
            );
        }
    }
    eprintln!("fuzz: replayed {replayed} corpus file(s)");
    assert!(
        failures.is_empty(),
        "corpus inputs failed:\n{}",
        failures.join("\n")
    );
}

/// The long run: `SD_FUZZ_EXECS` executions (1,000,000 by default) of each target (or of the
/// comma-separated `SD_FUZZ_TARGET`s) from `SD_FUZZ_SEED`. Run by `cargo xtask fuzz`.
#[test]
#[ignore = "long: run by `cargo xtask fuzz`"]
fn long_run() {
    let env = |name: &str| std::env::var(name).ok().filter(|s| !s.is_empty());
    let execs: u64 = env("SD_FUZZ_EXECS").map_or(1_000_000, |s| s.parse().expect("SD_FUZZ_EXECS"));
    let seed: u64 = env("SD_FUZZ_SEED").map_or(1, |s| s.parse().expect("SD_FUZZ_SEED"));
    let targets: Vec<String> = env("SD_FUZZ_TARGET").map_or_else(
        || TARGETS.iter().map(|s| s.to_string()).collect(),
        |s| s.split(',').map(|t| t.trim().to_string()).collect(),
    );
    let mut reports = Vec::new();
    for name in &targets {
        eprintln!("fuzz: {name}: {execs} executions from seed {seed}");
        let report = fuzz(name, execs, seed, true);
        eprintln!(
            "fuzz: {name}: done in {:.1} s ({:.0}/s), {} failure(s)",
            report.seconds,
            report.execs as f64 / report.seconds,
            report.failures.len()
        );
        reports.push(report);
    }
    println!("\nfuzz: seed {seed}, {execs} executions per target");
    println!(
        "{:<18} {:>10} {:>10} {:>10} {:>8} {:>9}   by depth 0/1/2/3/4+ (%)",
        "target", "execs", "seconds", "execs/s", "deep %", "failures"
    );
    let mut total = (0u64, 0f64, 0usize);
    for r in &reports {
        let by_depth: Vec<String> = r
            .depths
            .iter()
            .map(|d| format!("{:.0}", 100.0 * *d as f64 / r.execs.max(1) as f64))
            .collect();
        println!(
            "{:<18} {:>10} {:>10.1} {:>10.0} {:>8.1} {:>9}   {}",
            r.target,
            r.execs,
            r.seconds,
            r.execs as f64 / r.seconds,
            100.0 * r.deep as f64 / r.execs.max(1) as f64,
            r.failures.len(),
            by_depth.join("/")
        );
        total.0 += r.execs;
        total.1 += r.seconds;
        total.2 += r.failures.len();
    }
    println!(
        "{:<18} {:>10} {:>10.1} {:>10.0} {:>8} {:>9}",
        "total",
        total.0,
        total.1,
        total.0 as f64 / total.1,
        "",
        total.2
    );
    let failed: Vec<String> = reports
        .iter()
        .filter(|r| !r.failures.is_empty())
        .map(|r| format!("{}:\n{}", r.target, describe(&r.failures)))
        .collect();
    assert!(failed.is_empty(), "fuzz failures:\n{}", failed.join("\n"));
}

/// The mutators themselves: deterministic for a seed, and they change their input.
#[test]
fn mutators_are_deterministic() {
    let corpus = safetensors_corpus();
    let a = mutate_safetensors(&mut Rng::new(7), &corpus[1], &corpus[2]);
    let b = mutate_safetensors(&mut Rng::new(7), &corpus[1], &corpus[2]);
    assert_eq!(a, b);
    let mut changed = 0;
    for seed in 0..100 {
        let config = read_fixture("unet/config.json");
        if mutate_json(&mut Rng::new(seed), &config, &config) != config {
            changed += 1;
        }
    }
    assert!(changed > 80, "only {changed} of 100 JSON mutants differ");
    // A PNG mutant with a fixed CRC still parses as chunks.
    let png = &image_corpus()[0];
    let chunks = png_chunks(png).expect("init.png's chunks");
    assert_eq!(png_from_chunks(&chunks, true), *png);
}

/// One JSON edit at most doubles a tree (a value copied once) and adds at most
/// [`MAX_JSON_GROWTH`] by repeating a value: the tree stays small even when the values repeated
/// are long (20,000 copies of one of these would be 400 MB), and mutants are cut to
/// [`MAX_JSON_INPUT`].
#[test]
fn json_mutants_stay_bounded() {
    let long = format!("[\"{}\"]", "x".repeat(20_000));
    let input = format!("{{\"a\":[{long},{long}],\"b\":[{long}]}}").into_bytes();
    let tree = J::parse(&input).expect("valid JSON");
    let dict = vec!["a".to_string()];
    for seed in 0..5_000 {
        let mut mutant = tree.clone();
        mutate_json_tree(&mut Rng::new(seed), &mut mutant, &dict);
        assert!(
            mutant.len() <= 2 * tree.len() + MAX_JSON_GROWTH + 1024,
            "seed {seed}: one edit grew a {} KB tree to {} KB",
            tree.len() >> 10,
            mutant.len() >> 10
        );
        let out = mutate_json(&mut Rng::new(seed), &input, &input);
        assert!(
            out.len() <= MAX_JSON_INPUT,
            "seed {seed}: {} bytes",
            out.len()
        );
    }
}

/// Runs one file through one target and says what happened (`cargo xtask fuzz --target NAME
/// --replay PATH`): to reproduce a failure under a debugger or time a slow input.
#[test]
#[ignore = "run by `cargo xtask fuzz --replay PATH`"]
fn replay() {
    let name = std::env::var("SD_FUZZ_TARGET").expect("SD_FUZZ_TARGET: the target");
    let path = std::env::var("SD_FUZZ_REPLAY").expect("SD_FUZZ_REPLAY: the input file");
    let input = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut target = make_target(&name);
    let registered = Registered::new(target.name, 0);
    let start = Instant::now();
    let (_, outcome) = run_one(&mut target, &registered.0, 0, input);
    let seconds = start.elapsed().as_secs_f64();
    match outcome {
        Ok(depth) => println!("fuzz: {path} through `{name}`: depth {depth}, {seconds:.3} s"),
        Err((kind, message)) => panic!("{path} through `{name}`: {kind}: {message}"),
    }
}
