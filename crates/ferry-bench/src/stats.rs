//! Small statistics over repeated runs, and table formatting.

use std::fmt::Write as _;

/// The median of `values` (sorted in place); the mean of the middle two for an even count.
///
/// NaN for an empty slice. NaNs in the input sort last (total order).
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_unstable_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// The smallest value, ignoring NaNs; NaN if there is none.
pub fn min(values: &[f64]) -> f64 {
    values
        .iter()
        .copied()
        .filter(|v| !v.is_nan())
        .reduce(f64::min)
        .unwrap_or(f64::NAN)
}

/// The largest value, ignoring NaNs; NaN if there is none.
pub fn max(values: &[f64]) -> f64 {
    values
        .iter()
        .copied()
        .filter(|v| !v.is_nan())
        .reduce(f64::max)
        .unwrap_or(f64::NAN)
}

/// Median and range of repeated measurements.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Number of values.
    pub n: usize,
    /// Smallest value.
    pub min: f64,
    /// Median.
    pub median: f64,
    /// Largest value.
    pub max: f64,
}

impl Summary {
    /// Summarizes `values` (not modified).
    pub fn of(values: &[f64]) -> Summary {
        let mut sorted = values.to_vec();
        Summary {
            n: values.len(),
            min: min(values),
            median: median(&mut sorted),
            max: max(values),
        }
    }

    /// The summary of `f` over the `items` that `keep` picks (a column of a report).
    pub fn over<T>(items: &[T], keep: impl Fn(&T) -> bool, f: impl Fn(&T) -> f64) -> Summary {
        let v: Vec<f64> = items.iter().filter(|r| keep(r)).map(f).collect();
        Summary::of(&v)
    }

    /// `median (min-max)` with `decimals` digits after the point, each value divided by
    /// `scale` first (e.g. 1e9 to print bytes/s as GB/s); just the value when n is 1.
    pub fn display(&self, scale: f64, decimals: usize) -> String {
        let f = |v: f64| format!("{:.*}", decimals, v / scale);
        if self.n == 1 {
            f(self.median)
        } else {
            format!("{} ({}-{})", f(self.median), f(self.min), f(self.max))
        }
    }
}

/// One table row: the first cell left-aligned, the others right-aligned, each padded to
/// its width in `widths` (cells beyond `widths` are not padded), separated by two spaces.
pub fn table_row<S: AsRef<str>>(cells: &[S], widths: &[usize]) -> String {
    let mut row = String::new();
    for (i, cell) in cells.iter().enumerate() {
        let cell = cell.as_ref();
        let w = widths.get(i).copied().unwrap_or(0);
        if i > 0 {
            row.push_str("  ");
        }
        // Writing to a String cannot fail.
        let _ = if i == 0 {
            write!(row, "{cell:<w$}")
        } else {
            write!(row, "{cell:>w$}")
        };
    }
    row.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&mut [7.0]), 7.0);
        assert!(median(&mut []).is_nan());
    }

    #[test]
    fn min_max_skip_nan() {
        let v = [2.0, f64::NAN, -1.0, 5.0];
        assert_eq!(min(&v), -1.0);
        assert_eq!(max(&v), 5.0);
        assert!(min(&[]).is_nan());
        assert!(max(&[f64::NAN]).is_nan());
    }

    #[test]
    fn summary_and_row() {
        let s = Summary::of(&[3.0e9, 1.0e9, 2.0e9]);
        assert_eq!((s.n, s.min, s.median, s.max), (3, 1.0e9, 2.0e9, 3.0e9));
        assert_eq!(s.display(1e9, 1), "2.0 (1.0-3.0)");
        assert_eq!(Summary::of(&[1.5]).display(1.0, 2), "1.50");
        assert_eq!(
            table_row(&["qemu", "3.4", "75"], &[6, 5, 4]),
            "qemu      3.4    75"
        );
        assert_eq!(table_row(&["a", "b"], &[]), "a  b");
    }
}
