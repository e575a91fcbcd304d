//! Every numeric field of every component config of the tiny fixture models (SD 1.x and SDXL,
//! for its second text encoder and its U-Net's size/crop conditioning), numbers inside lists
//! included, set in turn to 0, −1, 10⁹ and the string `"x"`, through `sd generate` (issue 19).
//! Each run must end in exactly one `sd: …` line naming the config file and the field, with a
//! failing exit code that is not a panic's 101 (and no abort), unless the mutation leaves a valid
//! model ([`MAY_SUCCEED`]): then the run must succeed and write its image.
//!
//! The runs are spread over a few worker threads, each with its own copy of the models; a
//! validation failure is instant and a successful run of a tiny model takes about a second.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// What a numeric field is set to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mutation {
    Zero,
    MinusOne,
    Billion,
    Text,
}

use Mutation::{Billion, MinusOne, Text, Zero};

mod common;
use common::copy_dir;

impl Mutation {
    const ALL: [Mutation; 4] = [Zero, MinusOne, Billion, Text];

    fn json(self) -> Value {
        match self {
            Zero => Value::from(0),
            MinusOne => Value::from(-1),
            Billion => Value::from(1_000_000_000u64),
            Text => Value::from("x"),
        }
    }
}

/// The mutations that leave a valid model, as `(config file, field, value)`: the run must then
/// succeed and write the image. Entries for `text_encoder/config.json` hold for
/// `text_encoder_2/config.json` too. Every other mutation must be refused before anything is
/// built.
const MAY_SUCCEED: &[(&str, &str, Mutation)] = &[
    // The timestep frequency shift: 0 is diffusers' default (SD's value; 1 is the other one).
    ("unet/config.json", "freq_shift", Zero),
    // Padding 0 is diffusers' asymmetric downsampling padding, which the U-Net implements.
    ("unet/config.json", "downsample_padding", Zero),
    // Dropout is for training only; 0 is its default.
    ("unet/config.json", "dropout", Zero),
    ("text_encoder/config.json", "attention_dropout", Zero),
    // 0 is a token id below vocab_size: bos and pad are unused at inference, eos only picks the
    // pooled position.
    ("text_encoder/config.json", "bos_token_id", Zero),
    ("text_encoder/config.json", "eos_token_id", Zero),
    ("text_encoder/config.json", "pad_token_id", Zero),
    // The initialisation settings are for training only; 0 is a valid (degenerate) value.
    ("text_encoder/config.json", "initializer_factor", Zero),
    ("text_encoder/config.json", "initializer_range", Zero),
    // Timesteps may start at 0 (diffusers' default offset).
    ("scheduler/scheduler_config.json", "steps_offset", Zero),
];

/// The component configs walked, where the fixture has them.
const CONFIGS: [&str; 5] = [
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "scheduler/scheduler_config.json",
];

const FIXTURES: [&str; 2] = ["tiny_sd1", "tiny_sdxl"];

fn fixture_model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/pipeline")
        .join(name)
        .join("model")
}

/// One run: a fixture's config with one number replaced.
struct Case {
    fixture: usize,
    config: &'static str,
    /// A JSON pointer to the number.
    pointer: String,
    /// How an error names it: `block_out_channels[1]`.
    field: String,
    /// The top-level key, which every error about the field names.
    key: String,
    mutation: Mutation,
}

impl Case {
    fn may_succeed(&self) -> bool {
        let config = self.config.replace("text_encoder_2/", "text_encoder/");
        MAY_SUCCEED
            .iter()
            .any(|&(c, f, m)| c == config && f == self.field && m == self.mutation)
    }

    fn describe(&self) -> String {
        format!(
            "{}/{}: `{}` = {}",
            FIXTURES[self.fixture],
            self.config,
            self.field,
            self.mutation.json()
        )
    }
}

/// Every number under `value`, as (JSON pointer, display name, top-level key).
fn numbers(value: &Value, pointer: &str, name: &str, key: &str, out: &mut Vec<[String; 3]>) {
    match value {
        Value::Number(_) => out.push([pointer.into(), name.into(), key.into()]),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                numbers(
                    item,
                    &format!("{pointer}/{i}"),
                    &format!("{name}[{i}]"),
                    key,
                    out,
                );
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                let escaped = k.replace('~', "~0").replace('/', "~1");
                let name = if name.is_empty() {
                    k.clone()
                } else {
                    format!("{name}.{k}")
                };
                let key = if key.is_empty() { k } else { key };
                numbers(v, &format!("{pointer}/{escaped}"), &name, key, out);
            }
        }
        _ => {}
    }
}

fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for (fixture, name) in FIXTURES.iter().enumerate() {
        let model = fixture_model(name);
        for config in CONFIGS {
            let Ok(text) = std::fs::read_to_string(model.join(config)) else {
                continue;
            };
            let json: Value = serde_json::from_str(&text).unwrap();
            let mut found = Vec::new();
            numbers(&json, "", "", "", &mut found);
            for [pointer, field, key] in found {
                for mutation in Mutation::ALL {
                    cases.push(Case {
                        fixture,
                        config,
                        pointer: pointer.clone(),
                        field: field.clone(),
                        key: key.clone(),
                        mutation,
                    });
                }
            }
        }
    }
    cases
}

/// Runs `sd` with a deadline: the exit code (`None` when killed by a signal) and stderr.
fn sd(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sd"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs");
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            return (None, format!("hung for two minutes: sd {args:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs one case in a worker's model copies; `Err` says what went wrong.
fn run_case(case: &Case, models: &[PathBuf], out_dir: &Path) -> Result<(), String> {
    let model = &models[case.fixture];
    let config_path = model.join(case.config);
    let original = std::fs::read_to_string(&config_path).unwrap();
    let mut json: Value = serde_json::from_str(&original).unwrap();
    *json.pointer_mut(&case.pointer).unwrap() = case.mutation.json();
    std::fs::write(&config_path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    let out = out_dir.join("out.png");
    let _ = std::fs::remove_file(&out);
    let (code, stderr) = sd(&[
        "generate",
        "a cat",
        "--model",
        model.to_str().unwrap(),
        "--steps",
        "1",
        "-o",
        out.to_str().unwrap(),
        "-q",
    ]);
    std::fs::write(&config_path, original).unwrap();
    let what = case.describe();
    if stderr.contains("panicked") {
        return Err(format!("{what}: panicked: {stderr}"));
    }
    if case.may_succeed() {
        if code != Some(0) {
            return Err(format!(
                "{what}: allowed to succeed but exited {code:?}: {stderr}"
            ));
        }
        if !out.is_file() {
            return Err(format!("{what}: succeeded without writing {out:?}"));
        }
        let _ = std::fs::remove_file(&out);
        return Ok(());
    }
    match code {
        Some(0) => return Err(format!("{what}: accepted (exit 0); refuse it or allow it")),
        Some(101) => return Err(format!("{what}: exit 101 (a panic): {stderr}")),
        None => return Err(format!("{what}: killed by a signal (an abort?): {stderr}")),
        Some(_) => {}
    }
    let lines: Vec<&str> = stderr.trim_end().lines().collect();
    if lines.len() != 1 || !lines[0].starts_with("sd: ") {
        return Err(format!("{what}: not one `sd: ` line: {stderr:?}"));
    }
    if !lines[0].contains(case.config) {
        return Err(format!(
            "{what}: the error does not name the file: {stderr}"
        ));
    }
    if !lines[0].contains(&case.key) {
        return Err(format!(
            "{what}: the error does not name the field `{}`: {stderr}",
            case.key
        ));
    }
    if out.exists() {
        return Err(format!("{what}: failed but left {out:?}"));
    }
    Ok(())
}

#[test]
fn every_numeric_config_field_is_validated() {
    let started = Instant::now();
    let cases = cases();
    assert!(
        cases.len() > 300,
        "only {} cases: the fixtures' configs were not walked",
        cases.len()
    );
    for &(config, field, mutation) in MAY_SUCCEED {
        assert!(
            cases
                .iter()
                .any(|c| c.config == config && c.field == field && c.mutation == mutation),
            "MAY_SUCCEED lists ({config}, {field}, {mutation:?}), which no fixture has"
        );
    }
    let scratch = std::env::temp_dir().join(format!("sd-cli-configs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, 4);
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for w in 0..workers {
            let (cases, next, failures, scratch) = (&cases, &next, &failures, &scratch);
            scope.spawn(move || {
                let root = scratch.join(format!("worker{w}"));
                let models: Vec<PathBuf> = FIXTURES
                    .iter()
                    .map(|name| {
                        let dir = root.join(name);
                        copy_dir(&fixture_model(name), &dir);
                        dir
                    })
                    .collect();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(case) = cases.get(i) else { break };
                    if let Err(e) = run_case(case, &models, &root) {
                        failures.lock().unwrap().push(e);
                    }
                }
            });
        }
    });
    let _ = std::fs::remove_dir_all(&scratch);
    let failures = failures.into_inner().unwrap();
    eprintln!(
        "{} config mutations ({} allowed to succeed) on {workers} workers in {:.1} s",
        cases.len(),
        cases.iter().filter(|c| c.may_succeed()).count(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of {} config mutations misbehaved:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
