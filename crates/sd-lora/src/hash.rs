//! The hash A1111 records for a LoRA (`Lora hashes` in a PNG's parameters).

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use sha2::{Digest, Sha256};

/// kohya's "addnet" hash, as A1111 computes it for `.safetensors` LoRAs: SHA-256 of the file
/// after its header (so that editing the metadata keeps the hash), in lowercase hex. A1111
/// records the first 12 digits.
pub fn addnet_hash(path: impl AsRef<Path>) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut first = [0u8; 8];
    file.read_exact(&mut first)?;
    let n = u64::from_le_bytes(first);
    file.seek(SeekFrom::Start(8 + n))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buf)?;
        if read == 0 {
            break;
        }
        hasher.update(&buf[..read]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
