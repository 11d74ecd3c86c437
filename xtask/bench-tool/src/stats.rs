//! Latency samples and their percentiles.

use std::time::Instant;

use serde_json::{Map, Value};

/// The nearest-rank percentile of sorted samples: the smallest sample that `pct` percent
/// of the samples are at most. 100 is the maximum; `None` if there are no samples.
pub fn percentile<T: Copy>(sorted: &[T], pct: usize) -> Option<T> {
    let rank = (pct * sorted.len()).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

/// `p50_us`, `p90_us`, `p99_us` and `max_us` of sorted samples, each `null` if there are none.
pub fn latency_fields<T: Copy>(sorted: &[T], to_json: impl Fn(T) -> Value) -> Map<String, Value> {
    [("p50_us", 50), ("p90_us", 90), ("p99_us", 99), ("max_us", 100)]
        .into_iter()
        .map(|(key, pct)| (key.to_string(), percentile(sorted, pct).map_or(Value::Null, &to_json)))
        .collect()
}

/// Rounds to `decimals` places, for JSON that people read.
pub fn round(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}

/// One client thread's results.
pub struct Tally<T> {
    pub samples: Vec<T>,
    pub errors: u64,
    first_error: Option<(Instant, String)>,
}

impl<T> Default for Tally<T> {
    fn default() -> Self {
        Tally { samples: Vec::new(), errors: 0, first_error: None }
    }
}

impl<T> Tally<T> {
    pub fn error(&mut self, e: &anyhow::Error) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some((Instant::now(), format!("{e:#}")));
        }
    }

    /// Adds another thread's results; the first error stays the earliest of either.
    pub fn merge(mut self, other: Self) -> Self {
        self.samples.extend(other.samples);
        self.errors += other.errors;
        self.first_error = match (self.first_error, other.first_error) {
            (Some(a), Some(b)) => Some(if b.0 < a.0 { b } else { a }),
            (a, b) => a.or(b),
        };
        self
    }

    pub fn first_error(&self) -> Option<&str> {
        self.first_error.as_ref().map(|(_, e)| e.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let hundred: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&hundred, 50), Some(50));
        assert_eq!(percentile(&hundred, 90), Some(90));
        assert_eq!(percentile(&hundred, 99), Some(99));
        assert_eq!(percentile(&hundred, 100), Some(100));
        assert_eq!(percentile(&hundred, 0), Some(1));

        let ten: Vec<u32> = (1..=10).collect();
        assert_eq!(percentile(&ten, 50), Some(5));
        assert_eq!(percentile(&ten, 99), Some(10));
        assert_eq!(percentile(&[7.5], 50), Some(7.5));
        assert_eq!(percentile::<u32>(&[], 50), None);
    }

    #[test]
    fn fields_and_rounding() {
        let f = latency_fields(&[1.04, 2.0, 3.0, 4.0], |x| round(x, 1).into());
        assert_eq!(Value::Object(f), serde_json::json!({"p50_us": 2.0, "p90_us": 4.0, "p99_us": 4.0, "max_us": 4.0}));
        let f = latency_fields::<u32>(&[], Value::from);
        assert!(f.values().all(Value::is_null) && f.len() == 4);
        assert_eq!(round(12.345, 1), 12.3);
    }

    #[test]
    fn merge_keeps_the_earliest_error() {
        let mut a = Tally { samples: vec![1], ..Tally::default() };
        let mut b = Tally { samples: vec![2], ..Tally::default() };
        b.error(&anyhow::anyhow!("first"));
        a.error(&anyhow::anyhow!("second"));
        let m = a.merge(b);
        assert_eq!((m.samples, m.errors, m.first_error.map(|e| e.1)), (vec![1, 2], 2, Some("first".into())));
    }
}
