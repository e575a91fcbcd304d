//! Helpers the command tests share.

use std::path::{Path, PathBuf};

/// The tiny SD 1.x fixture model (diffusers folder).
#[allow(dead_code)]
pub fn tiny_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/pipeline/tiny_sd1/model")
}

/// Copies a folder tree (a model to break a copy of).
#[allow(dead_code)]
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Runs the `sd` binary: (success, stdout, stderr).
#[allow(dead_code)]
pub fn sd(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sd"))
        .args(args)
        .output()
        .expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `parameters` text chunk of a PNG.
#[allow(dead_code)]
pub fn parameters(path: &Path) -> String {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let reader = decoder.read_info().unwrap();
    reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
        .map(|t| t.text.clone())
        .expect("a parameters chunk")
}
