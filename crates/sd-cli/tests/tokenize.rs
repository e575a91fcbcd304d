//! `sd tokenize` as a person runs it.

use std::process::Command;

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

#[test]
fn odd_prompts_have_a_defined_result() {
    // A 10,000-token prompt: 134 chunks, no panic.
    let long = vec!["cat"; 10_000].join(" ");
    let (ok, stdout, stderr) = sd(&["tokenize", &long]);
    assert!(ok, "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["token_count"], 10_000);
    assert_eq!(json["chunk_count"], 134);
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
