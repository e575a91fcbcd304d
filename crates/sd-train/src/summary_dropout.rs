//! Summary dropout: a caption's end-of-text token and the padding after it replaced by the
//! empty caption's.
//!
//! CLIP's text encoder is causal: a word's output has seen only the words before it, but the
//! end-of-text token and the padding after it have seen the whole caption. A U-Net trained on
//! all 77 outputs can read the whole scene from those summaries alone, and then an unseen
//! combination of familiar words (a colour with a shape it never had) reaches it as an unseen
//! whole. With the summaries dropped for part of the batch it has to read the words
//! themselves, each of which it has met. (The built-in shapes model's probes: with the
//! summaries of a held-out prompt swapped for those of a seen one, it drew the seen prompt's
//! colours; see docs/shapes.md.)

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor, TensorData};

/// `context` holds the `n` captions' encoder outputs followed by the empty caption's (`n + 1`
/// rows, as `ids`); returns the `n` rows with, where `drop` says so, the positions from the
/// first `eos` token on taken from the empty caption's row.
pub(crate) fn drop_summaries<B: Backend>(
    context: Tensor<B, 3>,
    ids: &[Vec<u32>],
    eos: u32,
    drop: &[bool],
) -> Tensor<B, 3> {
    let [rows, tokens, width] = context.dims();
    let n = rows - 1;
    let empty = context.clone().narrow(0, n, 1).expand([n, tokens, width]);
    let context = context.narrow(0, 0, n);
    let mut mask = vec![false; n * tokens];
    for (i, (row, _)) in ids.iter().zip(drop).enumerate().filter(|(_, (_, d))| **d) {
        let start = row.iter().position(|&t| t == eos).unwrap_or(tokens);
        mask[i * tokens + start..(i + 1) * tokens].fill(true);
    }
    let mask =
        Tensor::<B, 3, Bool>::from_data(TensorData::new(mask, [n, tokens, 1]), &context.device())
            .expand([n, tokens, width]);
    context.mask_where(mask, empty)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sd_core::backend::Flex;

    #[test]
    fn only_the_marked_rows_lose_their_summaries() {
        let device = Default::default();
        // Two captions of 3 and 2 tokens before the end-of-text token (9), then the empty one.
        let ids = vec![
            vec![8, 1, 2, 9, 9],
            vec![8, 3, 9, 9, 9],
            vec![8, 9, 9, 9, 9],
        ];
        let values: Vec<f32> = (0..3 * 5 * 2).map(|v| v as f32).collect();
        let context = Tensor::<Flex, 3>::from_data(TensorData::new(values, [3, 5, 2]), &device);
        let out = drop_summaries(context.clone(), &ids, 9, &[true, false]);
        assert_eq!(out.dims(), [2, 5, 2]);
        let got: Vec<f32> = out.into_data().to_vec().unwrap();
        let mut want: Vec<f32> = (0..2 * 5 * 2).map(|v| v as f32).collect();
        // Row 0 from its end-of-text token (position 3) on: the empty row's positions 3 and 4.
        want[6..10].copy_from_slice(&[26.0, 27.0, 28.0, 29.0]);
        assert_eq!(got, want);
        let kept = drop_summaries(context, &ids, 9, &[false, false]);
        let kept: Vec<f32> = kept.into_data().to_vec().unwrap();
        assert_eq!(kept, (0..20).map(|v| v as f32).collect::<Vec<_>>());
    }
}
