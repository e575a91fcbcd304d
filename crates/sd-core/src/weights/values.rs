//! One tensor's values, from the file's bytes straight into the dtype and layout the model
//! holds them in: read once (positioned reads, so that tensors load in parallel), cast once
//! (the `half` crate's vectorised casts: F16C on x86), and, for a linear weight, transposed in
//! the same pass. burn-store's path made four copies of each tensor (an unaligned byte vector,
//! its aligned copy, the cast, a byte-by-byte transpose), each into freshly faulted memory: SD
//! 1.5's U-Net took 10 s to load from a 1.7 GB f16 file already in the page cache.

use burn::tensor::{DType, TensorData};
use bytemuck::Pod;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// Where a tensor's bytes are.
#[derive(Clone, Copy)]
pub(super) enum Source<'a> {
    /// In memory (the whole file was read).
    Memory(&'a [u8]),
    /// In an open file, from this byte offset.
    File(&'a std::fs::File, u64),
}

/// Elements cast per block: a few hundred KiB of source and destination, in cache together.
const BLOCK: usize = 1 << 16;

/// Source rows taken per block of a transpose: 16 f32 of a destination row are one cache line.
const TRANSPOSE_ROWS: usize = 16;

impl Source<'_> {
    /// Fills `dst` with the bytes from `offset` (relative to this source's start).
    fn read(&self, offset: usize, dst: &mut [u8]) -> std::io::Result<()> {
        match *self {
            Source::Memory(bytes) => {
                let src = bytes
                    .get(offset..offset + dst.len())
                    .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
                dst.copy_from_slice(src);
                Ok(())
            }
            Source::File(file, start) => read_at(file, start + offset as u64, dst),
        }
    }
}

/// A positioned read: threads read one file at once without sharing a cursor.
#[cfg(unix)]
fn read_at(file: &std::fs::File, offset: u64, dst: &mut [u8]) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, dst, offset)
}

/// A positioned read: threads read one file at once without sharing a cursor.
#[cfg(windows)]
fn read_at(file: &std::fs::File, mut offset: u64, mut dst: &mut [u8]) -> std::io::Result<()> {
    while !dst.is_empty() {
        match std::os::windows::fs::FileExt::seek_read(file, dst, offset)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                dst = &mut dst[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

/// A dtype values are held in, and the casts into it from each stored float dtype.
trait Element: Pod + burn::tensor::Element + Send {
    /// `out[i] = src[i]` cast from `stored` (`src` holds `out.len()` values of it).
    fn cast(stored: DType, src: &[u8], out: &mut [Self]);
    /// NaN or ±∞.
    fn is_non_finite(self) -> bool;
}

/// `src` (bytes of `S` values, maybe unaligned) as an aligned slice: borrowed where it already
/// is one, else copied into `scratch`.
fn aligned<'s, S: Pod>(src: &'s [u8], scratch: &'s mut Vec<S>) -> &'s [S] {
    match bytemuck::try_cast_slice(src) {
        Ok(values) => values,
        Err(_) => {
            scratch.clear();
            scratch.resize(src.len() / size_of::<S>(), S::zeroed());
            bytemuck::cast_slice_mut(scratch).copy_from_slice(src);
            scratch
        }
    }
}

impl Element for f32 {
    fn cast(stored: DType, src: &[u8], out: &mut [f32]) {
        match stored {
            DType::F32 => bytemuck::cast_slice_mut(out).copy_from_slice(src),
            DType::F16 => aligned::<f16>(src, &mut Vec::new()).convert_to_f32_slice(out),
            DType::BF16 => aligned::<bf16>(src, &mut Vec::new()).convert_to_f32_slice(out),
            _ => {
                for (o, &v) in out.iter_mut().zip(aligned::<f64>(src, &mut Vec::new())) {
                    *o = v as f32;
                }
            }
        }
    }
    fn is_non_finite(self) -> bool {
        !self.is_finite()
    }
}

impl Element for f16 {
    fn cast(stored: DType, src: &[u8], out: &mut [f16]) {
        match stored {
            DType::F16 => bytemuck::cast_slice_mut(out).copy_from_slice(src),
            DType::F32 => out.convert_from_f32_slice(aligned::<f32>(src, &mut Vec::new())),
            DType::BF16 => {
                for (o, v) in out.iter_mut().zip(aligned::<bf16>(src, &mut Vec::new())) {
                    *o = f16::from_f32(v.to_f32());
                }
            }
            _ => {
                for (o, &v) in out.iter_mut().zip(aligned::<f64>(src, &mut Vec::new())) {
                    *o = f16::from_f64(v);
                }
            }
        }
    }
    fn is_non_finite(self) -> bool {
        !self.is_finite()
    }
}

impl Element for bf16 {
    fn cast(stored: DType, src: &[u8], out: &mut [bf16]) {
        match stored {
            DType::BF16 => bytemuck::cast_slice_mut(out).copy_from_slice(src),
            DType::F32 => out.convert_from_f32_slice(aligned::<f32>(src, &mut Vec::new())),
            DType::F16 => {
                for (o, v) in out.iter_mut().zip(aligned::<f16>(src, &mut Vec::new())) {
                    *o = bf16::from_f32(v.to_f32());
                }
            }
            _ => {
                for (o, &v) in out.iter_mut().zip(aligned::<f64>(src, &mut Vec::new())) {
                    *o = bf16::from_f64(v);
                }
            }
        }
    }
    fn is_non_finite(self) -> bool {
        !self.is_finite()
    }
}

impl Element for f64 {
    fn cast(stored: DType, src: &[u8], out: &mut [f64]) {
        match stored {
            DType::F64 => bytemuck::cast_slice_mut(out).copy_from_slice(src),
            DType::F32 => {
                for (o, &v) in out.iter_mut().zip(aligned::<f32>(src, &mut Vec::new())) {
                    *o = f64::from(v);
                }
            }
            DType::F16 => {
                for (o, v) in out.iter_mut().zip(aligned::<f16>(src, &mut Vec::new())) {
                    *o = v.to_f64();
                }
            }
            _ => {
                for (o, v) in out.iter_mut().zip(aligned::<bf16>(src, &mut Vec::new())) {
                    *o = v.to_f64();
                }
            }
        }
    }
    fn is_non_finite(self) -> bool {
        !self.is_finite()
    }
}

/// A tensor's values as `target`, `shape` read from `source` stored as `stored` (a float
/// dtype), and how many of them are NaN or ±∞ (counted on each block as it is cast, while in
/// cache; after the cast, so that a value beyond a narrower dtype's range counts). With
/// `transpose`, the 2-D `[rows, cols]` stored values come back as `[cols, rows]` (a PyTorch
/// linear weight as Burn holds it).
pub(super) fn read_values(
    source: Source<'_>,
    stored: DType,
    target: DType,
    shape: &[usize],
    transpose: bool,
) -> std::io::Result<(TensorData, usize)> {
    match target {
        DType::F16 => read_as::<f16>(source, stored, shape, transpose),
        DType::BF16 => read_as::<bf16>(source, stored, shape, transpose),
        DType::F64 => read_as::<f64>(source, stored, shape, transpose),
        _ => read_as::<f32>(source, stored, shape, transpose),
    }
}

fn read_as<T: Element>(
    source: Source<'_>,
    stored: DType,
    shape: &[usize],
    transpose: bool,
) -> std::io::Result<(TensorData, usize)> {
    let count: usize = shape.iter().product();
    let size = stored.size();
    // The model keeps this buffer: backed by huge pages where the system allows.
    let mut out = sd_kernels::allocator::zeroed_huge::<T>(count);
    let mut raw = Vec::new();
    let mut non_finite = 0;
    let mut dims = shape.to_vec();
    match (transpose, shape) {
        (true, &[rows, cols]) if rows > 0 && cols > 0 => {
            // Blocks of whole source rows, cast into `block`, then written out column by
            // column: each destination row receives TRANSPOSE_ROWS adjacent values at a time.
            let mut block = vec![T::zeroed(); TRANSPOSE_ROWS * cols];
            for first in (0..rows).step_by(TRANSPOSE_ROWS) {
                let n = TRANSPOSE_ROWS.min(rows - first);
                raw.resize(n * cols * size, 0u8);
                source.read(first * cols * size, &mut raw)?;
                let block = &mut block[..n * cols];
                T::cast(stored, &raw, block);
                non_finite += block.iter().filter(|v| v.is_non_finite()).count();
                for c in 0..cols {
                    let dst = &mut out[c * rows + first..][..n];
                    for (r, d) in dst.iter_mut().enumerate() {
                        *d = block[r * cols + c];
                    }
                }
            }
            dims.reverse();
        }
        _ => {
            for (i, dst) in out.chunks_mut(BLOCK).enumerate() {
                let offset = i * BLOCK * size;
                if stored == T::dtype() {
                    source.read(offset, bytemuck::cast_slice_mut(dst))?;
                } else {
                    raw.resize(dst.len() * size, 0u8);
                    source.read(offset, &mut raw)?;
                    T::cast(stored, &raw, dst);
                }
                non_finite += dst.iter().filter(|v| v.is_non_finite()).count();
            }
        }
    }
    Ok((TensorData::new(out, dims), non_finite))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of<T: Pod>(values: &[T]) -> Vec<u8> {
        bytemuck::cast_slice(values).to_vec()
    }

    /// Every stored dtype into every target, through memory at an odd (unaligned) offset and
    /// through a file, plain and transposed, equals the scalar cast of each value.
    #[test]
    fn every_cast_and_transpose_matches_the_scalar_cast() {
        let (rows, cols) = (37, 5);
        let values: Vec<f32> = (0..rows * cols).map(|i| (i as f32 - 90.0) * 0.37).collect();
        let stored: [(DType, Vec<u8>); 4] = [
            (DType::F32, bytes_of(&values)),
            (
                DType::F64,
                bytes_of(&values.iter().map(|&v| f64::from(v)).collect::<Vec<_>>()),
            ),
            (
                DType::F16,
                bytes_of(&values.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>()),
            ),
            (
                DType::BF16,
                bytes_of(
                    &values
                        .iter()
                        .map(|&v| bf16::from_f32(v))
                        .collect::<Vec<_>>(),
                ),
            ),
        ];
        let path = std::env::temp_dir().join(format!("sd-core-values-{}", std::process::id()));
        for (dtype, bytes) in &stored {
            // What each stored value is, as f64.
            let exact: Vec<f64> = (0..rows * cols)
                .map(|i| {
                    let b = &bytes[i * dtype.size()..][..dtype.size()];
                    match dtype {
                        DType::F32 => f64::from(f32::from_le_bytes(b.try_into().unwrap())),
                        DType::F64 => f64::from_le_bytes(b.try_into().unwrap()),
                        DType::F16 => f16::from_le_bytes(b.try_into().unwrap()).to_f64(),
                        _ => bf16::from_le_bytes(b.try_into().unwrap()).to_f64(),
                    }
                })
                .collect();
            let mut padded = vec![7u8];
            padded.extend_from_slice(bytes);
            std::fs::write(&path, &padded).unwrap();
            let file = std::fs::File::open(&path).unwrap();
            for source in [Source::Memory(&padded[1..]), Source::File(&file, 1)] {
                for target in [DType::F32, DType::F64, DType::F16, DType::BF16] {
                    for transpose in [false, true] {
                        let (data, non_finite) =
                            read_values(source, *dtype, target, &[rows, cols], transpose).unwrap();
                        assert_eq!(non_finite, 0);
                        let got: Vec<f64> = data.convert::<f64>().to_vec().unwrap();
                        for r in 0..rows {
                            for c in 0..cols {
                                let at = if transpose {
                                    c * rows + r
                                } else {
                                    r * cols + c
                                };
                                let want = match target {
                                    DType::F16 => f16::from_f64(exact[r * cols + c]).to_f64(),
                                    DType::BF16 => bf16::from_f64(exact[r * cols + c]).to_f64(),
                                    DType::F32 => f64::from(exact[r * cols + c] as f32),
                                    _ => exact[r * cols + c],
                                };
                                assert_eq!(got[at], want, "{dtype:?} → {target:?} at ({r}, {c})");
                            }
                        }
                    }
                }
            }
        }
        std::fs::remove_file(&path).unwrap();
    }
}
