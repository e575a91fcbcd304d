//! Row kernels written as plain loops over 16-lane blocks, compiled once per instruction set
//! (AVX-512, AVX2+FMA, baseline) and picked at run time, so the compiler vectorises them
//! without a `target-cpu` flag.

/// Lanes per block: one AVX-512 register of f32, two AVX2 ones.
const LANES: usize = 16;

/// `eˣ` to about one ulp (Cephes `expf`: Cody–Waite reduction `x = n ln2 + r`, `|r| ≤ ln2/2`,
/// and a degree-7 polynomial for `eʳ`), in branch-free arithmetic that vectorises. Inputs below
/// −87 are clamped there (`e⁻⁸⁷ ≈ 1.6e-38`, the smallest exponent the bit trick can build);
/// the softmax only feeds it `x − max ≤ 0`.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that `n · LN2_HI` is exact for |n| < 2⁹.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2²³: adding it rounds to the nearest integer, left in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = if x < -87.0 { -87.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let n_bits = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = x - n * LN2_HI - n * LN2_LO;
    let r2 = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e_r = p * r2 + r + 1.0;
    e_r * f32::from_bits(((n_bits + 127) << 23) as u32)
}

/// The largest element (−∞ for an empty row).
#[inline(always)]
fn max_of(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let blocks = row.chunks_exact(LANES);
    let rest = blocks.remainder();
    for block in blocks {
        for (m, &x) in lanes.iter_mut().zip(block) {
            *m = if x > *m { x } else { *m };
        }
    }
    lanes
        .iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// `row ← exp(row − shift)`; returns the sum of the new row.
#[inline(always)]
fn exp_shifted(row: &mut [f32], shift: f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut blocks = row.chunks_exact_mut(LANES);
    for block in &mut blocks {
        for (s, x) in lanes.iter_mut().zip(block.iter_mut()) {
            *x = exp(*x - shift);
            *s += *x;
        }
    }
    let mut sum = 0.0;
    for x in blocks.into_remainder() {
        *x = exp(*x - shift);
        sum += *x;
    }
    lanes.iter().sum::<f32>() + sum
}

/// Unnormalised softmax of each `cols`-wide row of `rows`, in place: `exp(x − max)` over the
/// first `valid(r)` entries of row `r`, zeros after them (a causal mask). Writes `1 / sum` of
/// each row into `inverse_sums`.
#[inline(always)]
fn softmax_rows_impl(
    rows: &mut [f32],
    cols: usize,
    valid: &dyn Fn(usize) -> usize,
    inverse_sums: &mut [f32],
) {
    for (r, (row, inverse)) in rows
        .chunks_exact_mut(cols)
        .zip(inverse_sums.iter_mut())
        .enumerate()
    {
        let (kept, masked) = row.split_at_mut(valid(r).min(cols));
        masked.fill(0.0);
        let max = max_of(kept);
        let sum = exp_shifted(kept, max);
        *inverse = if sum > 0.0 { 1.0 / sum } else { 0.0 };
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn softmax_rows_avx512(
    rows: &mut [f32],
    cols: usize,
    valid: &dyn Fn(usize) -> usize,
    inverse_sums: &mut [f32],
) {
    softmax_rows_impl(rows, cols, valid, inverse_sums)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn softmax_rows_avx2(
    rows: &mut [f32],
    cols: usize,
    valid: &dyn Fn(usize) -> usize,
    inverse_sums: &mut [f32],
) {
    softmax_rows_impl(rows, cols, valid, inverse_sums)
}

/// See `softmax_rows_impl`; dispatched on the CPU's instruction sets.
pub fn softmax_rows(
    rows: &mut [f32],
    cols: usize,
    valid: &dyn Fn(usize) -> usize,
    inverse_sums: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (and so AVX2 and FMA), checked just above.
            return unsafe { softmax_rows_avx512(rows, cols, valid, inverse_sums) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA, checked just above.
            return unsafe { softmax_rows_avx2(rows, cols, valid, inverse_sums) };
        }
    }
    softmax_rows_impl(rows, cols, valid, inverse_sums)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_the_standard_library() {
        let mut worst = 0f32;
        // Inside the clamps at −87 and 88.
        for i in -86_999..=87_999 {
            let x = i as f32 * 1e-3;
            let (ours, std) = (exp(x), x.exp());
            worst = worst.max(((ours - std) / std).abs());
        }
        assert!(worst < 3e-7, "relative error {worst}");
    }

    #[test]
    fn softmax_rows_match_a_plain_softmax_and_mask() {
        let cols = 37;
        let mut rows: Vec<f32> = (0..3 * cols)
            .map(|i| ((i * 7919) % 23) as f32 * 0.3)
            .collect();
        let original = rows.clone();
        let mut inverse = [0f32; 3];
        softmax_rows(&mut rows, cols, &|r| 20 + r, &mut inverse);
        for r in 0..3 {
            let kept = &original[r * cols..r * cols + 20 + r];
            let max = kept.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = kept.iter().map(|x| (x - max).exp()).sum();
            for c in 0..cols {
                let expected = if c < 20 + r {
                    (original[r * cols + c] - max).exp() / sum
                } else {
                    0.0
                };
                let got = rows[r * cols + c] * inverse[r];
                assert!(
                    (got - expected).abs() < 1e-6,
                    "row {r} col {c}: {got} vs {expected}"
                );
            }
        }
    }
}
