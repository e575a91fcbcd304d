//! Aspect-ratio buckets, kohya's way (`BucketManager` of sd-scripts): each image trains at the
//! bucket whose shape is nearest its aspect ratio, so portrait and landscape images are not
//! cropped to squares; a batch holds images of one bucket.
//!
//! Two modes, as kohya's: predefined buckets (every `step`-multiple width from `min_size` to
//! `max_size` with the height that keeps the area at most `resolution²`), where each image is
//! scaled to cover its bucket and cropped; and `no_upscale`, where an image larger than the
//! area is scaled down to it and every bucket is the image's own size floored to `step`, so
//! that small images are never enlarged.

use rand::seq::SliceRandom;

use crate::error::{DataError, Result};
use crate::order::epoch_rng;

/// The bucket settings (kohya's `--min_bucket_reso`, `--max_bucket_reso`,
/// `--bucket_reso_steps`, `--bucket_no_upscale`; the area is `resolution²`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketConfig {
    /// The training resolution in pixels: buckets hold at most `resolution²` pixels.
    pub resolution: u32,
    /// The smallest bucket side in pixels (`--min_bucket_reso`).
    pub min_size: u32,
    /// The largest bucket side in pixels (`--max_bucket_reso`).
    pub max_size: u32,
    /// Every bucket side is a multiple of this (`--bucket_reso_steps`); a multiple of 8.
    pub step: u32,
    /// Buckets from each image's own size, never enlarging it (`--bucket_no_upscale`).
    pub no_upscale: bool,
}

impl BucketConfig {
    /// kohya's defaults for a resolution: sides from 256 to 1024 in steps of 64.
    pub fn new(resolution: u32) -> Self {
        Self {
            resolution,
            min_size: 256.min(resolution),
            max_size: 1024.max(resolution),
            step: 64,
            no_upscale: false,
        }
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        let ok = self.step >= 8
            && self.step.is_multiple_of(8)
            && self.min_size >= self.step
            && self.min_size <= self.max_size
            && self.max_size <= 8192
            && self.resolution >= self.min_size
            && self.resolution <= self.max_size;
        if ok {
            Ok(())
        } else {
            Err(DataError::Config(format!(
                "buckets need a step that is a multiple of 8 and min ≤ resolution ≤ max ≤ 8192, \
                 got step {}, min {}, max {}, resolution {}",
                self.step, self.min_size, self.max_size, self.resolution
            )))
        }
    }

    /// The predefined bucket shapes `(width, height)`, sorted (`make_bucket_resolutions`).
    pub fn predefined(&self) -> Vec<(u32, u32)> {
        let area = u64::from(self.resolution).pow(2);
        let step = self.step;
        let mut out = std::collections::BTreeSet::new();
        let side = ((area as f64).sqrt() as u32 / step) * step;
        out.insert((side, side));
        let mut width = self.min_size;
        while width <= self.max_size {
            let height = self
                .max_size
                .min((((area / u64::from(width)) / u64::from(step)) * u64::from(step)) as u32);
            if height >= self.min_size {
                out.insert((width, height));
                out.insert((height, width));
            }
            width += step;
        }
        out.into_iter().collect()
    }

    fn round_to_step(&self, x: f64) -> u32 {
        let x = (x + 0.5) as u32;
        x - x % self.step
    }

    /// The bucket `(width, height)` of a `w × h` image and the size it is resized to before
    /// the crop (at least the bucket on both sides).
    pub fn assign(&self, w: u32, h: u32) -> ((u32, u32), (u32, u32)) {
        let aspect = f64::from(w) / f64::from(h);
        if self.no_upscale {
            let area = f64::from(self.resolution).powi(2);
            let resized = if f64::from(w) * f64::from(h) > area {
                let rw = (area * aspect).sqrt();
                let rh = area / rw;
                let bw = self.round_to_step(rw).max(self.step);
                let bh_w = self.round_to_step(f64::from(bw) / aspect).max(self.step);
                let bh = self.round_to_step(rh).max(self.step);
                let bw_h = self.round_to_step(f64::from(bh) * aspect).max(self.step);
                let err_w = (f64::from(bw) / f64::from(bh_w) - aspect).abs();
                let err_h = (f64::from(bw_h) / f64::from(bh) - aspect).abs();
                if err_w < err_h {
                    (bw, (f64::from(bw) / aspect + 0.5) as u32)
                } else {
                    ((f64::from(bh) * aspect + 0.5) as u32, bh)
                }
            } else {
                (w, h)
            };
            let bucket = (
                (resized.0 - resized.0 % self.step).max(self.step),
                (resized.1 - resized.1 % self.step).max(self.step),
            );
            let resized = (resized.0.max(bucket.0), resized.1.max(bucket.1));
            return (bucket, resized);
        }
        let buckets = self.predefined();
        let bucket = buckets
            .iter()
            .copied()
            .min_by(|a, b| {
                let ea = (f64::from(a.0) / f64::from(a.1) - aspect).abs();
                let eb = (f64::from(b.0) / f64::from(b.1) - aspect).abs();
                ea.total_cmp(&eb)
            })
            .unwrap_or((self.resolution, self.resolution));
        let bucket_aspect = f64::from(bucket.0) / f64::from(bucket.1);
        // Scale so that the image covers the bucket, then crop the excess.
        let scale = if aspect > bucket_aspect {
            f64::from(bucket.1) / f64::from(h)
        } else {
            f64::from(bucket.0) / f64::from(w)
        };
        let resized = (
            ((f64::from(w) * scale + 0.5) as u32).max(bucket.0),
            ((f64::from(h) * scale + 0.5) as u32).max(bucket.1),
        );
        (bucket, resized)
    }
}

/// Batches drawn bucket by bucket: every epoch, each bucket's examples are shuffled and cut
/// into batches, and the batches of all buckets shuffled together; a pure function of the
/// seed and the epoch, so any batch of the run can be recomputed on resume.
#[derive(Debug, Clone)]
pub struct BucketBatches {
    /// The example indices of each bucket.
    groups: Vec<Vec<usize>>,
    batch: usize,
    seed: u64,
    epoch: Option<(u64, Vec<Vec<usize>>)>,
}

impl BucketBatches {
    /// `buckets[i]` is example `i`'s bucket.
    pub fn new(buckets: &[(u32, u32)], batch: usize, seed: u64) -> Self {
        let mut by_bucket: std::collections::BTreeMap<(u32, u32), Vec<usize>> = Default::default();
        for (i, b) in buckets.iter().enumerate() {
            by_bucket.entry(*b).or_default().push(i);
        }
        Self {
            groups: by_bucket.into_values().collect(),
            batch: batch.max(1),
            seed,
            epoch: None,
        }
    }

    /// Batches per epoch.
    pub fn per_epoch(&self) -> u64 {
        self.groups
            .iter()
            .map(|g| g.len().div_ceil(self.batch) as u64)
            .sum::<u64>()
            .max(1)
    }

    /// The examples of batch `index` of the run (counted over all epochs).
    pub fn batch(&mut self, index: u64) -> Vec<usize> {
        let per_epoch = self.per_epoch();
        let (epoch, at) = (index / per_epoch, (index % per_epoch) as usize);
        if self.epoch.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut rng = epoch_rng(self.seed, epoch);
            let mut batches = Vec::new();
            for group in &self.groups {
                let mut group = group.clone();
                group.shuffle(&mut rng);
                batches.extend(group.chunks(self.batch).map(<[usize]>::to_vec));
            }
            batches.shuffle(&mut rng);
            self.epoch = Some((epoch, batches));
        }
        self.epoch
            .as_ref()
            .and_then(|(_, b)| b.get(at).cloned())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predefined_buckets_are_kohyas() {
        // sd-scripts' make_bucket_resolutions((512, 512), 256, 1024, 64).
        let buckets = BucketConfig::new(512).predefined();
        for expected in [
            (512, 512),
            (256, 1024),
            (1024, 256),
            (384, 640),
            (640, 384),
            (448, 576),
        ] {
            assert!(
                buckets.contains(&expected),
                "{expected:?} missing from {buckets:?}"
            );
        }
        assert!(
            buckets
                .iter()
                .all(|(w, h)| w * h <= 512 * 512 && w % 64 == 0 && h % 64 == 0)
        );
        // The 17 shapes sd-scripts lists for 512² (checked against its function).
        assert_eq!(buckets.len(), 17);
    }

    #[test]
    fn images_go_to_the_nearest_aspect_and_cover_it() {
        let c = BucketConfig::new(512);
        let (bucket, resized) = c.assign(1200, 800);
        assert_eq!(bucket, (640, 384));
        assert!(resized.0 >= 640 && resized.1 >= 384);
        assert_eq!(c.assign(700, 700).0, (512, 512));
        let small = BucketConfig {
            no_upscale: true,
            ..c
        };
        // A small image keeps its size, floored to the step; a large one is scaled down.
        assert_eq!(small.assign(300, 200), ((256, 192), (300, 200)));
        let (bucket, _) = small.assign(2000, 1000);
        assert!(bucket.0 * bucket.1 <= 512 * 512 && bucket.0 > bucket.1);
    }

    #[test]
    fn batches_hold_one_bucket_and_cover_the_epoch() {
        let buckets = [(64, 64), (64, 128), (64, 64), (64, 64), (64, 128)];
        let mut b = BucketBatches::new(&buckets, 2, 1);
        assert_eq!(b.per_epoch(), 3);
        let mut seen: Vec<usize> = (0..3).flat_map(|i| b.batch(i)).collect();
        for i in 0..3 {
            let batch = b.batch(i);
            assert!(batch.iter().all(|&e| buckets[e] == buckets[batch[0]]));
        }
        seen.sort();
        assert_eq!(seen, vec![0, 1, 2, 3, 4]);
        let mut again = BucketBatches::new(&buckets, 2, 1);
        assert_eq!(again.batch(4), b.batch(4));
    }
}
