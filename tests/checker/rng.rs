//! A small deterministic RNG (SplitMix64) and the derivation of independent streams.
//!
//! Every choice the checker makes comes from a stream derived from the seed, a stream id (one
//! per task: each reader, the writer, the fault planner, the origin) and an operation index.
//! A task draws the choices of its `k`-th operation from `derive(seed, stream, k)`, so how
//! many numbers an earlier operation consumed (retries, say) or how the tasks were scheduled
//! never shifts the choices of later operations.

/// Stream ids. Readers use `READER_BASE + reader index`.
pub const STREAM_SETUP: u64 = 1;
pub const STREAM_WRITER: u64 = 2;
pub const STREAM_FAULTS: u64 = 3;
pub const STREAM_ORIGIN: u64 = 4;
pub const READER_BASE: u64 = 1_000;
/// The MLflow run's writers (`mlflow.rs`) use `WRITER_BASE + writer index`.
pub const WRITER_BASE: u64 = 100;

/// SplitMix64: tiny, fast, well distributed, and enough for choosing test operations.
#[derive(Debug, Clone)]
pub struct Rng(u64);

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The stream of operation `op` of task `stream` under `seed`.
    pub fn derive(seed: u64, stream: u64, op: u64) -> Self {
        let a = mix(seed ^ 0x9e37_79b9_7f4a_7c15);
        let b = mix(a ^ stream.wrapping_mul(0xd1b5_4a32_d192_ed03));
        Self(mix(b ^ op.wrapping_mul(0x8cb9_2ba7_2f3d_8dd7)))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        // Multiply-shift: unbiased enough for test choices.
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// Index of a choice drawn with the given weights.
    pub fn weighted(&mut self, weights: &[u64]) -> usize {
        let total: u64 = weights.iter().sum();
        let mut x = self.below(total);
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        weights.len() - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: Vec<u64> = (0..5).map(|_| Rng::derive(7, 2, 3).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(
            Rng::derive(7, 2, 3).next_u64(),
            Rng::derive(7, 2, 4).next_u64()
        );
        assert_ne!(
            Rng::derive(7, 2, 3).next_u64(),
            Rng::derive(7, 3, 3).next_u64()
        );
        assert_ne!(
            Rng::derive(7, 2, 3).next_u64(),
            Rng::derive(8, 2, 3).next_u64()
        );
        let mut r = Rng::new(1);
        for _ in 0..1000 {
            let x = r.range(3, 5);
            assert!((3..=5).contains(&x));
        }
    }
}
