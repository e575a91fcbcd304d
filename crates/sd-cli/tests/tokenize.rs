//! `sd tokenize` as a person runs it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn sd(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sd"))
        .args(args)
        .output()
        .expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn tokenize_prints_chunks_and_weights() {
    let (ok, stdout, _) = sd(&["tokenize", "a photograph of an (astronaut:1.3) BREAK horse"]);
    assert!(ok);
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["token_count"], 6);
    assert_eq!(json["chunk_count"], 2);
    assert_eq!(json["chunks"][0][5], 18376, "astronaut");
    assert_eq!(json["weights"][0][5], 1.3);
    assert_eq!(json["chunks"][0].as_array().unwrap().len(), 77);
    let (ok, stdout, _) = sd(&["tokenize", "--padding", "bang", "cat"]);
    assert!(ok);
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["chunks"][0][76], 0, "padded with `!`");
}

#[test]
fn errors_are_one_line_and_non_zero() {
    let (ok, _, stderr) = sd(&["tokenize", "--tokenizer", "/nonexistent", "cat"]);
    assert!(!ok);
    assert!(
        stderr.starts_with("sd: /nonexistent/vocab.json"),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1);
}

/// Asserts that `sd` failed with one `sd: …` line and no panic, and returns that line.
fn one_clear_line(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sd"))
        .args(args)
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("sd: "), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn odd_prompts_have_a_defined_result() {
    // A 2,000-token prompt: 27 chunks, no panic.
    let long = vec!["cat"; 2_000].join(" ");
    let (ok, stdout, stderr) = sd(&["tokenize", &long]);
    assert!(ok, "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["token_count"], 2_000);
    assert_eq!(json["chunk_count"], 27);
    // Control characters are whitespace or dropped by the normaliser, never a failure.
    let (ok, stdout, stderr) = sd(&["tokenize", "a\u{1}b\tc\u{7f}d\u{200b}e\r\nf"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("token_count"));
}

#[cfg(unix)]
#[test]
fn invalid_utf8_on_the_command_line_is_an_error_not_a_panic() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let out = Command::new(env!("CARGO_BIN_EXE_sd"))
        .arg("tokenize")
        .arg(OsStr::from_bytes(b"caf\xe9"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("UTF-8"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn long_prompts_end_in_one_clear_line_quickly() {
    let start = std::time::Instant::now();
    // One 100,000-letter word took over a minute in the tokenizer; now it is refused at once.
    let word = "a".repeat(100_000);
    let err = one_clear_line(&["tokenize", &word]);
    assert!(
        err.contains("100000 characters") && err.contains("20000"),
        "{err}"
    );
    // 10,000 words are too many characters too, and 3,000 too many chunks.
    let err = one_clear_line(&["tokenize", &vec!["cat"; 10_000].join(" ")]);
    assert!(err.contains("39999 characters"), "{err}");
    let err = one_clear_line(&["tokenize", &vec!["cat"; 3_000].join(" ")]);
    assert!(
        err.contains("40 chunks") && err.contains("at most 32"),
        "{err}"
    );
    // A word at the length bound is tokenized (linearly) before its chunks are counted.
    let word: String = (0..20_000)
        .map(|i| char::from(b'a' + (i * 7 % 26) as u8))
        .collect();
    let err = one_clear_line(&["tokenize", &word]);
    assert!(err.contains("chunks"), "{err}");
    assert!(start.elapsed().as_secs() < 60, "took {:?}", start.elapsed());
}

#[test]
fn weights_that_overflow_end_in_one_clear_line() {
    let huge = format!("(cat:1{})", "0".repeat(39));
    let err = one_clear_line(&["tokenize", &huge]);
    assert!(err.contains("`cat`") && err.contains("1e39"), "{err}");
    let nested = format!("{}cat{}", "(".repeat(1000), ")".repeat(1000));
    let err = one_clear_line(&["tokenize", &nested]);
    assert!(err.contains("1000 deep") && err.contains("100"), "{err}");
    let err = one_clear_line(&["tokenize", &"(".repeat(10_000)]);
    assert!(err.contains("10000 deep"), "{err}");
    let err = one_clear_line(&["tokenize", &"(".repeat(50_000)]);
    assert!(err.contains("50000 characters"), "{err}");
    // Unbalanced brackets within the bounds stay accepted, as in A1111.
    let (ok, stdout, stderr) = sd(&["tokenize", "((cat) [dog"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("chunk_count"));
}

/// A1111 reads BREAK inside brackets as the word, weighted by the bracket times −1.
#[test]
fn break_inside_brackets_is_text_as_in_a1111() {
    let count = |prompt: &str| {
        let (ok, stdout, stderr) = sd(&["tokenize", prompt]);
        assert!(ok, "{stderr}");
        let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        (json["chunk_count"].clone(), json["token_count"].clone())
    };
    assert_eq!(count("(8k BREAK realistic)"), (1.into(), 4.into()));
    assert_eq!(count("[8k BREAK realistic]"), (1.into(), 4.into()));
    assert_eq!(count("8k BREAK realistic"), (2.into(), 3.into()));
}

/// A folder of its own under the temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sd-tokenize-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// A copy of the tiny SD 2.x fixture's vocab.json and merges.txt, without its configs.
    fn with_tiny_vocab(name: &str) -> Self {
        let dir = Self::new(name);
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/pipeline/tiny_sd2_vpred/model/tokenizer");
        for file in ["vocab.json", "merges.txt"] {
            std::fs::copy(fixture.join(file), dir.0.join(file)).unwrap();
        }
        dir
    }

    fn write(&self, file: &str, text: &str) {
        std::fs::write(self.0.join(file), text).unwrap();
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn last_id(args: &[&str]) -> serde_json::Value {
    let (ok, stdout, stderr) = sd(args);
    assert!(ok, "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    json["chunks"][0][76].clone()
}

/// The folder's pad token decides, as in the pipeline (`padding_of`); `--padding` overrides.
#[test]
fn a_tokenizer_folder_decides_the_padding() {
    let (bang, eos) = (0, 999);
    let dir = TempDir::with_tiny_vocab("pad-bang");
    dir.write("special_tokens_map.json", r#"{"pad_token": "!"}"#);
    assert_eq!(
        last_id(&["tokenize", "--tokenizer", dir.path(), "cat"]),
        bang
    );
    assert_eq!(
        last_id(&[
            "tokenize",
            "--tokenizer",
            dir.path(),
            "--padding",
            "eos",
            "cat"
        ]),
        eos
    );
    let dir = TempDir::with_tiny_vocab("pad-eos");
    dir.write(
        "special_tokens_map.json",
        r#"{"pad_token": {"content": "<|endoftext|>", "lstrip": false}}"#,
    );
    assert_eq!(
        last_id(&["tokenize", "--tokenizer", dir.path(), "cat"]),
        eos
    );
    assert_eq!(
        last_id(&[
            "tokenize",
            "--tokenizer",
            dir.path(),
            "--padding",
            "bang",
            "cat"
        ]),
        bang
    );
    // No pad token anywhere: end-of-text, as the pipeline.
    let dir = TempDir::with_tiny_vocab("pad-none");
    assert_eq!(
        last_id(&["tokenize", "--tokenizer", dir.path(), "cat"]),
        eos
    );
    // The committed SD 2.x fixture says `!` in tokenizer_config.json.
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/pipeline/tiny_sd2_vpred/model/tokenizer");
    assert_eq!(
        last_id(&["tokenize", "--tokenizer", fixture.to_str().unwrap(), "cat"]),
        bang
    );
    // The built-in vocabulary still pads with end-of-text unless told.
    assert_eq!(last_id(&["tokenize", "cat"]), 49407);
}

/// `sd tokenize … | head`: a reader that goes away ends the command quietly, exit 0.
#[test]
fn a_closed_pipe_ends_quietly() {
    let prompt = vec!["cat"; 2_000].join(" ");
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_sd"))
            .args(["tokenize", &prompt])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("runs")
    };
    // Closed before the first write.
    let mut child = spawn();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_ne!(out.status.code(), Some(101), "{stderr}");
    assert!(out.status.success(), "{:?} {stderr}", out.status);
    assert!(stderr.is_empty(), "{stderr}");
    // Closed after a few bytes.
    let mut child = spawn();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 16];
    stdout.read_exact(&mut first).unwrap();
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{:?} {stderr}", out.status);
}

/// Every problem in a tokenizer's files names the file, and merges.txt's the line.
#[test]
fn tokenizer_file_errors_name_the_file() {
    let dir = TempDir::with_tiny_vocab("bad-vocab");
    dir.write("vocab.json", r#"{"a": 1,"#);
    let err = one_clear_line(&["tokenize", "--tokenizer", dir.path(), "cat"]);
    assert!(
        err.contains(&format!("{}/vocab.json: ", dir.path())),
        "{err}"
    );
    dir.write(
        "vocab.json",
        r#"{"<|startoftext|>": 0, "<|endoftext|>": -1}"#,
    );
    let err = one_clear_line(&["tokenize", "--tokenizer", dir.path(), "cat"]);
    assert!(
        err.contains(&format!("{}/vocab.json: ", dir.path())) && err.contains("-1"),
        "{err}"
    );
    let dir = TempDir::with_tiny_vocab("bad-merges");
    dir.write("merges.txt", "#version: 0.2\ni n\nt\n");
    let err = one_clear_line(&["tokenize", "--tokenizer", dir.path(), "cat"]);
    assert!(
        err.contains(&format!("{}/merges.txt: line 3", dir.path())),
        "{err}"
    );
    dir.write("merges.txt", "#version: 0.2\ni n\nzz qq\n");
    let err = one_clear_line(&["tokenize", "--tokenizer", dir.path(), "cat"]);
    assert!(
        err.contains(&format!("{}/merges.txt: line 3", dir.path())) && err.contains("`zz`"),
        "{err}"
    );
    let dir = TempDir::new("bad-json");
    dir.write(
        "tokenizer.json",
        r#"{"model": {"type": "BPE", "vocab": {}, "merges": [1]}}"#,
    );
    let err = one_clear_line(&["tokenize", "--tokenizer", dir.path(), "cat"]);
    assert!(
        err.contains(&format!("{}/tokenizer.json: ", dir.path())) && err.contains("merges[0]"),
        "{err}"
    );
}
