//! The order examples are seen in: a fresh permutation every epoch, a pure function of the
//! seed and the epoch, so that any position of the run can be recomputed on resume.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

/// A seeded, epoch-wise shuffled order over `len` examples.
#[derive(Debug, Clone)]
pub struct Order {
    len: usize,
    seed: u64,
    epoch: Option<(u64, Vec<usize>)>,
}

impl Order {
    /// The order for a dataset of `len` examples (at least one).
    pub fn new(len: usize, seed: u64) -> Self {
        Self {
            len,
            seed,
            epoch: None,
        }
    }

    /// The example seen at position `sample` of the run (counted over all epochs).
    pub fn example(&mut self, sample: u64) -> usize {
        let n = self.len.max(1) as u64;
        let (epoch, at) = (sample / n, (sample % n) as usize);
        if self.epoch.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut perm: Vec<usize> = (0..self.len).collect();
            perm.shuffle(&mut StdRng::seed_from_u64(mix(
                self.seed,
                epoch,
                0x5eed_0f0d,
            )));
            self.epoch = Some((epoch, perm));
        }
        self.epoch.as_ref().map_or(0, |(_, p)| p[at])
    }
}

/// The generator for epoch `epoch`'s shuffles.
pub(crate) fn epoch_rng(seed: u64, epoch: u64) -> StdRng {
    StdRng::seed_from_u64(mix(seed, epoch, 0x0b0c_4e75))
}

/// The generator for the per-sample choices (crop, flip, caption) of run position `sample`.
pub fn sample_rng(seed: u64, sample: u64) -> StdRng {
    StdRng::seed_from_u64(mix(seed, sample, 0xda7a))
}

/// SplitMix64-style mixing of a seed with a position and a stream tag.
fn mix(seed: u64, position: u64, stream: u64) -> u64 {
    let mut z = seed ^ position.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ stream.rotate_left(32);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_epoch_is_a_permutation_and_recomputable() {
        let mut order = Order::new(7, 3);
        let first: Vec<usize> = (0..7).map(|i| order.example(i)).collect();
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, (0..7).collect::<Vec<_>>());
        let second: Vec<usize> = (7..14).map(|i| order.example(i)).collect();
        assert_ne!(first, second);
        let mut fresh = Order::new(7, 3);
        assert_eq!(fresh.example(9), second[2]);
    }
}
