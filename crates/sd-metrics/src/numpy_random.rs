//! numpy's legacy `RandomState(seed)` as far as torch-fidelity uses it: `permutation(n)` (which
//! `choice(n, k, replace=False)` cuts to its first `k`). Reproduced draw for draw, so that KID
//! picks the same subsets and the Inception Score the same split as the reference.

use rand_mt::Mt;

/// `numpy.random.RandomState(seed)`: MT19937 seeded by `init_genrand(seed)`.
pub struct RandomState {
    mt: Mt,
}

impl RandomState {
    /// The generator `RandomState(seed)` makes.
    pub fn new(seed: u32) -> Self {
        Self { mt: Mt::new(seed) }
    }

    /// numpy's `random_interval(max)`: uniform in `0..=max`, by masking to the smallest
    /// all-ones mask over `max` and rejecting what lies above (legacy path, 32-bit draws).
    fn interval(&mut self, max: u32) -> u32 {
        if max == 0 {
            return 0;
        }
        let mut mask = max;
        for shift in [1, 2, 4, 8, 16] {
            mask |= mask >> shift;
        }
        loop {
            let value = self.mt.next_u32() & mask;
            if value <= max {
                return value;
            }
        }
    }

    /// `RandomState.permutation(n)`: `arange(n)` shuffled by Fisher-Yates from the end.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut values: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.interval(i as u32) as usize;
            values.swap(i, j);
        }
        values
    }

    /// `RandomState.choice(n, k, replace=False)`: the first `k` of a permutation.
    pub fn choice_without_replacement(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut all = self.permutation(n);
        all.truncate(k);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutations_match_numpy() {
        // `r = np.random.RandomState(2020)`; `r.permutation(10)`, `r.permutation(5)`,
        // `r.choice(1000, 5, replace=False)` (numpy 2.4.6).
        let mut rng = RandomState::new(2020);
        assert_eq!(rng.permutation(10), [2, 4, 9, 1, 5, 7, 6, 3, 8, 0]);
        assert_eq!(rng.permutation(5), [1, 2, 3, 4, 0]);
        assert_eq!(
            rng.choice_without_replacement(1000, 5),
            [445, 287, 423, 107, 157]
        );
    }
}
