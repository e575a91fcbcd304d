//! `x W + b` as one matrix multiply over all rows, accumulated onto the broadcast bias.

use rayon::prelude::*;

use super::multiply;

/// The `rows × d_out` output: `multiply(out, accumulate)` accumulates onto rows holding the
/// bias, or, without one, writes every element of the buffer without reading any (no zero
/// fill first: for the transformer's 84 MB projections it was a pass over memory as long as
/// the bias's).
fn with_bias_rows(
    rows: usize,
    d_out: usize,
    bias: Option<&[f32]>,
    multiply: impl FnOnce(*mut f32, bool),
) -> Vec<f32> {
    let len = rows * d_out;
    let mut out = Vec::with_capacity(len);
    match bias {
        Some(bias) => {
            out.spare_capacity_mut()[..len]
                .par_chunks_mut(d_out)
                .for_each(|row| {
                    for (v, b) in row.iter_mut().zip(bias) {
                        v.write(*b);
                    }
                });
            // SAFETY: every element was written just above.
            unsafe { out.set_len(len) };
            multiply(out.as_mut_ptr(), true);
        }
        None => {
            multiply(out.as_mut_ptr(), false);
            // SAFETY: a multiply that does not accumulate writes every element of its `rows ×
            // d_out` output (the callers' contract with `multiply`).
            unsafe { out.set_len(len) };
        }
    }
    out
}

/// `x`: `[rows, d_in]`, `weight`: `[d_in, d_out]` (Burn's `Linear` layout), `bias`: `[d_out]`,
/// all row-major; returns `[rows, d_out]`. `None` when the lengths do not fit together.
pub fn linear(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    d_in: usize,
    d_out: usize,
) -> Option<Vec<f32>> {
    if d_in == 0
        || d_out == 0
        || !x.len().is_multiple_of(d_in)
        || weight.len() != d_in * d_out
        || bias.is_some_and(|b| b.len() != d_out)
    {
        return None;
    }
    let rows = x.len() / d_in;
    Some(with_bias_rows(rows, d_out, bias, |out, accumulate| {
        // SAFETY: `x` is `rows × d_in`, `weight` `d_in × d_out` and `out` room for `rows ×
        // d_out`, all row-major, as checked above.
        unsafe {
            multiply(
                [rows, d_out, d_in],
                (out, [d_out, 1]),
                (x.as_ptr(), [d_in, 1]),
                (weight.as_ptr(), [d_out, 1]),
                accumulate,
                1.0,
                true,
            );
        }
    }))
}

/// [`linear`] on channels-first input: `x`: `[batch, d_in, tokens]` (a feature map's
/// channels × pixels); returns token-major `[batch, tokens, d_out]`, without transposing `x`.
pub fn linear_from_channels(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    d_in: usize,
    d_out: usize,
    tokens: usize,
) -> Option<Vec<f32>> {
    if d_in == 0
        || d_out == 0
        || tokens == 0
        || !x.len().is_multiple_of(d_in * tokens)
        || weight.len() != d_in * d_out
        || bias.is_some_and(|b| b.len() != d_out)
    {
        return None;
    }
    let batch = x.len() / (d_in * tokens);
    Some(with_bias_rows(
        batch * tokens,
        d_out,
        bias,
        |out, accumulate| {
            for (image, x) in x.chunks_exact(d_in * tokens).enumerate() {
                // SAFETY: `x` is this image's `d_in × tokens` (read as its transpose, `tokens ×
                // d_in` with row stride 1 and column stride `tokens`), `weight` `d_in × d_out` and
                // the image's `tokens × d_out` rows of `out` (room for `batch · tokens` of them),
                // all inside the sizes checked above.
                unsafe {
                    multiply(
                        [tokens, d_out, d_in],
                        (out.add(image * tokens * d_out), [d_out, 1]),
                        (x.as_ptr(), [1, tokens]),
                        (weight.as_ptr(), [d_out, 1]),
                        accumulate,
                        1.0,
                        true,
                    );
                }
            }
        },
    ))
}

/// [`linear`] written channels-first onto a residual: `x`: token-major `[batch, tokens,
/// d_in]`, `residual`: `[batch, d_out, tokens]`; returns `residual + (x W + b)ᵀ` as `[batch,
/// d_out, tokens]`, the layout of the feature map the tokens came from.
pub fn linear_to_channels(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    residual: &[f32],
    [d_in, d_out, tokens]: [usize; 3],
) -> Option<Vec<f32>> {
    if d_in == 0
        || d_out == 0
        || tokens == 0
        || !x.len().is_multiple_of(d_in * tokens)
        || weight.len() != d_in * d_out
        || bias.is_some_and(|b| b.len() != d_out)
        || residual.len() != x.len() / d_in * d_out
    {
        return None;
    }
    let mut out = residual.to_vec();
    if let Some(bias) = bias {
        out.par_chunks_mut(tokens).enumerate().for_each(|(i, row)| {
            let b = bias[i % d_out];
            row.iter_mut().for_each(|v| *v += b);
        });
    }
    for (x, out) in x
        .chunks_exact(tokens * d_in)
        .zip(out.chunks_exact_mut(d_out * tokens))
    {
        // SAFETY: `out` is this image's `d_out × tokens`, computed as `Wᵀ xᵀ`: `weight` read as
        // its transpose (`d_out × d_in`, row stride 1, column stride `d_out`) and `x` as its
        // transpose (`d_in × tokens`, row stride 1, column stride `d_in`), all inside the slices
        // checked above.
        unsafe {
            multiply(
                [d_out, tokens, d_in],
                (out.as_mut_ptr(), [tokens, 1]),
                (weight.as_ptr(), [1, d_out]),
                (x.as_ptr(), [1, d_in]),
                true,
                1.0,
                true,
            );
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_matches_the_sum_and_refuses_bad_sizes() {
        let (rows, d_in, d_out) = (5, 7, 3);
        let x: Vec<f32> = (0..rows * d_in).map(|i| (i as f32 * 0.3).sin()).collect();
        let w: Vec<f32> = (0..d_in * d_out).map(|i| (i as f32 * 0.7).cos()).collect();
        let b = [0.5, -1.0, 2.0];
        let out = linear(&x, &w, Some(&b), d_in, d_out).expect("consistent sizes");
        for r in 0..rows {
            for o in 0..d_out {
                let expected: f32 = b[o]
                    + (0..d_in)
                        .map(|i| x[r * d_in + i] * w[i * d_out + o])
                        .sum::<f32>();
                assert!((out[r * d_out + o] - expected).abs() < 1e-5);
            }
        }
        let no_bias = linear(&x, &w, None, d_in, d_out).expect("consistent sizes");
        assert!((no_bias[0] + b[0] - out[0]).abs() < 1e-5);
        assert!(linear(&x[1..], &w, None, d_in, d_out).is_none());

        // The same map on channels-first input, and back onto a residual.
        let tokens = rows;
        let channels_first: Vec<f32> = (0..d_in * tokens)
            .map(|i| x[(i % tokens) * d_in + i / tokens])
            .collect();
        let from = linear_from_channels(&channels_first, &w, Some(&b), d_in, d_out, tokens)
            .expect("consistent sizes");
        assert!(from.iter().zip(&out).all(|(a, b)| (a - b).abs() < 1e-5));
        let residual: Vec<f32> = (0..d_out * tokens).map(|i| i as f32).collect();
        let to = linear_to_channels(&x, &w, Some(&b), &residual, [d_in, d_out, tokens])
            .expect("consistent sizes");
        for o in 0..d_out {
            for t in 0..tokens {
                let expected = residual[o * tokens + t] + out[t * d_out + o];
                assert!((to[o * tokens + t] - expected).abs() < 1e-4);
            }
        }
        assert!(linear(&x, &w, Some(&b[..2]), d_in, d_out).is_none());
    }
}
