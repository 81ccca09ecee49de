//! Sample statistics for the benchmark table: median and spread of a handful of runs, and the
//! ours ÷ Nix's ratio.
//!
//! Owns only arithmetic over measured numbers. Must never invent a figure: an empty sample set
//! has no median (`None`), and a ratio against zero is `None`, not infinity.

/// The measurements of one figure for one hook, in the row's unit.
#[derive(Clone, Debug, Default)]
pub struct Samples {
    pub values: Vec<f64>,
}

impl Samples {
    pub fn new() -> Self {
        Samples::default()
    }

    pub fn push(&mut self, v: f64) {
        self.values.push(v);
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self
            .values
            .iter()
            .copied()
            .filter(|x| x.is_finite())
            .collect();
        v.sort_by(f64::total_cmp);
        v
    }

    /// The median (mean of the two middle values for an even count).
    pub fn median(&self) -> Option<f64> {
        let v = self.sorted();
        let n = v.len();
        match n {
            0 => None,
            _ if n % 2 == 1 => Some(v[n / 2]),
            _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
        }
    }

    pub fn min(&self) -> Option<f64> {
        self.sorted().first().copied()
    }

    pub fn max(&self) -> Option<f64> {
        self.sorted().last().copied()
    }
}

/// `a ÷ b` of two medians, when both exist and `b` is not zero.
pub fn ratio(a: &Samples, b: &Samples) -> Option<f64> {
    let (a, b) = (a.median()?, b.median()?);
    (b != 0.0).then_some(a / b)
}

/// Formats a number with a sensible number of significant digits for a table cell.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// `median (min–max)` in the given unit, or `—` without samples.
pub fn fmt_samples(s: &Samples, unit: &str) -> String {
    match (s.median(), s.min(), s.max()) {
        (Some(m), Some(lo), Some(hi)) => {
            format!("{} {unit} ({}–{})", fmt_num(m), fmt_num(lo), fmt_num(hi))
        }
        _ => "—".to_owned(),
    }
}

/// Self-checks run by `cargo test --benches` (see `main`).
pub fn self_test() {
    let s = |v: &[f64]| Samples { values: v.to_vec() };
    assert_eq!(s(&[]).median(), None);
    assert_eq!(s(&[3.0]).median(), Some(3.0));
    assert_eq!(s(&[5.0, 1.0, 3.0]).median(), Some(3.0));
    assert_eq!(s(&[4.0, 1.0, 3.0, 2.0]).median(), Some(2.5));
    assert_eq!(s(&[4.0, f64::NAN, 1.0]).median(), Some(2.5));
    assert_eq!(s(&[4.0, 1.0, 9.0]).min(), Some(1.0));
    assert_eq!(s(&[4.0, 1.0, 9.0]).max(), Some(9.0));
    assert_eq!(ratio(&s(&[1.0, 2.0, 3.0]), &s(&[8.0])), Some(0.25));
    assert_eq!(ratio(&s(&[1.0]), &s(&[0.0])), None);
    assert_eq!(ratio(&s(&[]), &s(&[1.0])), None);
    assert_eq!(fmt_num(1234.4), "1234");
    assert_eq!(fmt_num(12.34), "12.3");
    assert_eq!(fmt_num(1.234), "1.23");
    assert_eq!(fmt_num(0.1234), "0.123");
    assert_eq!(fmt_samples(&s(&[2.0, 1.0, 3.0]), "s"), "2.00 s (1.00–3.00)");
    assert_eq!(fmt_samples(&s(&[]), "s"), "—");
}
