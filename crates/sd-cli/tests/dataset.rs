//! `sd dataset shapes`: deterministic files from a seed, no held-out combination in any
//! caption, and one `sd: …` line for what it refuses.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd-cli-dataset-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Runs `sd` with a deadline (a hang is a failure, not a stuck test): exit code, stdout,
/// stderr.
fn sd(args: &[&str]) -> (Option<i32>, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sd"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs");
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("sd {args:?} hung for two minutes");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `sd dataset shapes --out DIR --count N --seed S`, asserted to succeed with its one line.
fn shapes(out: &Path, count: usize, seed: u64) {
    let stdout = shapes_with(out, count, seed, &[]);
    assert!(stdout.contains(&count.to_string()), "{stdout}");
}

/// `sd dataset shapes --out DIR --count N --seed S` and more flags, asserted to succeed with
/// one line naming the folder; that line.
fn shapes_with(out: &Path, count: usize, seed: u64, more: &[&str]) -> String {
    let (out, count, seed) = (out.to_str().unwrap(), count.to_string(), seed.to_string());
    let mut args = vec![
        "dataset", "shapes", "--out", out, "--count", &count, "--seed", &seed,
    ];
    args.extend(more);
    let (code, stdout, stderr) = sd(&args);
    assert_eq!(code, Some(0), "{args:?}: {stderr}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.contains(out), "{stdout}");
    stdout
}

/// Whether a caption names a held-out combination: spelled out here rather than asked of the
/// library, so that the tests do not trust the code they test.
fn is_held_out(caption: &str) -> bool {
    let red_and_blue = caption.contains("red ") && caption.contains("blue ");
    red_and_blue || caption.contains("yellow circle") || caption.contains("green triangle")
}

/// The folder's files, sorted by name, with their bytes.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().into_string().unwrap(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn same_seed_writes_the_same_bytes_and_no_held_out_caption() {
    let (a, b) = (scratch("a"), scratch("b"));
    shapes(&a, 200, 42);
    shapes(&b, 200, 42);
    let written = files(&a);
    assert_eq!(written.len(), 400);
    assert!(written == files(&b), "the same seed wrote different files");
    assert_eq!(written[0].0, "00000.png");
    assert_eq!(written[399].0, "00199.txt");

    for (name, bytes) in &written {
        if name.ends_with(".png") {
            assert!(bytes.starts_with(b"\x89PNG"), "{name}");
            continue;
        }
        let caption = std::str::from_utf8(bytes).unwrap();
        let caption = caption.lines().next().unwrap_or_default();
        assert!(caption.starts_with("a "), "{name}: {caption:?}");
        assert!(!is_held_out(caption), "{name}: {caption:?} is held out");
    }

    let c = scratch("c");
    shapes(&c, 200, 43);
    assert!(written != files(&c), "another seed wrote the same files");
    for dir in [a, b, c] {
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// `--extra-colours N` writes N more images after the `--count` ones (which stay as they were),
/// each naming a colour outside the palette, none held out.
#[test]
fn extra_colours_come_after_the_palette_images() {
    let (plain, mixed) = (scratch("plain"), scratch("mixed"));
    shapes(&plain, 20, 5);
    let stdout = shapes_with(&mixed, 20, 5, &["--extra-colours", "50"]);
    assert!(stdout.contains("70"), "{stdout}");
    let written = files(&mixed);
    assert_eq!(written.len(), 140);
    assert!(written[..40] == files(&plain), "the palette images changed");
    for (name, bytes) in written[40..].iter().filter(|(n, _)| n.ends_with(".txt")) {
        let caption = std::str::from_utf8(bytes).unwrap().trim_end();
        let extra = ["teal ", "pink ", "brown ", "black ", "grey "];
        assert!(
            extra.iter().any(|c| caption.contains(c)),
            "{name}: {caption:?} has no extra colour"
        );
        assert!(!is_held_out(caption), "{name}: {caption:?} is held out");
    }
    for dir in [plain, mixed] {
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// `--canonical` writes the same images with every two-object caption said with `above` or
/// `to the left of`: the same scene, the top or left object named first.
#[test]
fn canonical_captions_name_the_same_scenes_top_or_left_first() {
    let (drawn, canonical) = (scratch("drawn"), scratch("canonical"));
    shapes(&drawn, 100, 7);
    shapes_with(&canonical, 100, 7, &["--canonical"]);
    let mut rewritten = 0;
    for ((name, said), (_, written)) in files(&drawn).iter().zip(&files(&canonical)) {
        if name.ends_with(".png") {
            assert!(said == written, "{name}: the images differ");
            continue;
        }
        let (said, written) = (
            std::str::from_utf8(said).unwrap().trim_end(),
            std::str::from_utf8(written).unwrap().trim_end(),
        );
        // Rewritten by hand here: `b below a` is `a above b`, `b to the right of a` is `a to
        // the left of b`.
        let expected = [
            (" below ", " above "),
            (" to the right of ", " to the left of "),
        ]
        .iter()
        .find_map(|(relation, opposite)| {
            let (b, a) = said.split_once(relation)?;
            Some(format!("{a}{opposite}{b}"))
        })
        .unwrap_or_else(|| said.to_string());
        assert_eq!(written, expected, "{name}");
        rewritten += usize::from(said != written);
    }
    assert!(rewritten > 10, "only {rewritten} of 100 captions rewritten");
    for dir in [drawn, canonical] {
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// Asserts the command fails with one `sd: …` line containing `needle`, and no panic.
fn refused(args: &[&str], needle: &str) {
    let (code, stdout, stderr) = sd(args);
    assert!(
        matches!(code, Some(c) if c != 0),
        "{args:?} exited {code:?}"
    );
    assert!(stdout.is_empty(), "{stdout}");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    assert!(stderr.starts_with("sd: "), "{stderr}");
    assert!(
        stderr.contains(needle),
        "{args:?}: {stderr} lacks {needle:?}"
    );
}

#[test]
fn refuses_a_non_empty_folder_and_a_zero_count() {
    let dir = scratch("refused");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("keep.txt"), "not a dataset").unwrap();
    let path = dir.to_str().unwrap();
    refused(
        &[
            "dataset", "shapes", "--out", path, "--count", "3", "--seed", "1",
        ],
        path,
    );
    assert_eq!(files(&dir).len(), 1, "wrote into a non-empty folder");

    let empty = scratch("zero");
    let empty_path = empty.to_str().unwrap();
    refused(
        &["dataset", "shapes", "--out", empty_path, "--count", "0"],
        empty_path,
    );
    assert!(!empty.exists(), "made a folder for nothing");

    refused(
        &["dataset", "shapes", "--out", empty_path, "--count", "many"],
        "count",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
