//! Latency summaries from raw samples. Every sample is kept and sorted, so
//! percentiles are exact (nearest rank) rather than bucketed: at the sizes a
//! run produces (at most a few million values) sorting costs well under a
//! second, and no histogram resolution has to be chosen.

use serde::Serialize;

/// Percentiles of a set of durations, in milliseconds.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Summary {
    pub count: usize,
    pub mean: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

/// Summarise microsecond samples as milliseconds.
pub fn summarize_micros(samples: &mut [u32]) -> Summary {
    if samples.is_empty() {
        return Summary::default();
    }
    samples.sort_unstable();
    let sum: u64 = samples.iter().map(|&s| u64::from(s)).sum();
    let ms = |v: u32| f64::from(v) / 1000.0;
    Summary {
        count: samples.len(),
        mean: sum as f64 / samples.len() as f64 / 1000.0,
        p50: ms(nearest_rank(samples, 0.50)),
        p95: ms(nearest_rank(samples, 0.95)),
        p99: ms(nearest_rank(samples, 0.99)),
        max: ms(samples[samples.len() - 1]),
    }
}

/// Percentiles of plain values (ratios such as stream stretch).
pub fn summarize_values(values: &mut [f64]) -> Summary {
    if values.is_empty() {
        return Summary::default();
    }
    values.sort_unstable_by(f64::total_cmp);
    Summary {
        count: values.len(),
        mean: values.iter().sum::<f64>() / values.len() as f64,
        p50: nearest_rank(values, 0.50),
        p95: nearest_rank(values, 0.95),
        p99: nearest_rank(values, 0.99),
        max: values[values.len() - 1],
    }
}

/// The smallest sample with at least `q` of the samples at or below it.
fn nearest_rank<T: Copy>(sorted: &[T], q: f64) -> T {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A duration as whole microseconds, saturating (a sample over an hour is
/// already a failed run).
pub fn micros(d: std::time::Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut samples: Vec<u32> = (1..=100).map(|ms| ms * 1000).collect();
        let s = summarize_micros(&mut samples);
        assert_eq!(s.count, 100);
        assert_eq!(s.p50, 50.0);
        assert_eq!(s.p95, 95.0);
        assert_eq!(s.p99, 99.0);
        assert_eq!(s.max, 100.0);
        assert!((s.mean - 50.5).abs() < 1e-9);
    }

    #[test]
    fn one_sample_is_every_percentile_and_none_is_zero() {
        let s = summarize_micros(&mut [2500]);
        assert_eq!((s.p50, s.p99, s.max), (2.5, 2.5, 2.5));
        assert_eq!(summarize_micros(&mut []), Summary::default());
    }

    #[test]
    fn values_sort_before_ranking() {
        let s = summarize_values(&mut [1.3, 1.0, 1.1, 1.2]);
        assert_eq!(s.p50, 1.1);
        assert_eq!(s.max, 1.3);
    }
}
