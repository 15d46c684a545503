//! The result table: per figure, one line per target with the mean of its
//! samples and its ratio to each baseline target (e.g. direct, HAProxy).

use crate::stats;

/// Which way is good, printed so a ratio can be read at a glance.
#[derive(Debug, Clone, Copy)]
pub enum Better {
    Higher,
    Lower,
}

struct Row {
    figure: String,
    better: Better,
    decimals: usize,
    /// Per target, in the table's target order; `None`: the figure does
    /// not apply to that target (no line), empty: it failed (`-`).
    samples: Vec<Option<Vec<f64>>>,
}

pub struct Table {
    targets: Vec<String>,
    /// Indices into `targets` that get a "vs" column.
    baselines: Vec<usize>,
    rows: Vec<Row>,
}

impl Table {
    /// `baselines` that are not among `targets` are left out.
    pub fn new(targets: &[&str], baselines: &[&str]) -> Self {
        Self {
            targets: targets.iter().map(|t| (*t).to_owned()).collect(),
            baselines: baselines.iter().filter_map(|b| targets.iter().position(|t| t == b)).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a figure; `samples[i]` belongs to target `i`.
    pub fn add(&mut self, figure: &str, better: Better, decimals: usize, samples: Vec<Option<Vec<f64>>>) {
        self.rows.push(Row { figure: figure.to_owned(), better, decimals, samples });
    }

    pub fn render(&self) -> String {
        let show_range = self.rows.iter().flat_map(|r| &r.samples).flatten().any(|s| s.len() > 1);
        let mut header = vec!["figure".to_owned(), "better".into(), "target".into(), "value".into()];
        header.extend(self.baselines.iter().map(|&b| format!("vs {}", self.targets[b])));
        if show_range {
            header.push("min..max (n)".into());
        }
        let mut lines = vec![header];
        for row in &self.rows {
            let applies = self.targets.iter().enumerate().filter(|(i, _)| matches!(row.samples.get(*i), Some(Some(_))));
            for (n, (i, target)) in applies.enumerate() {
                lines.push(self.line(row, i, target, n == 0, show_range));
            }
        }
        layout(&lines, 3)
    }

    fn line(&self, row: &Row, i: usize, target: &str, first: bool, show_range: bool) -> Vec<String> {
        let samples = samples_of(row, i);
        let value = stats::mean(samples);
        let mut line = vec![
            if first { row.figure.clone() } else { String::new() },
            match (first, row.better) {
                (false, _) => String::new(),
                (true, Better::Higher) => "higher".into(),
                (true, Better::Lower) => "lower".into(),
            },
            target.to_owned(),
            value.map_or("-".into(), |v| format!("{v:.*}", row.decimals)),
        ];
        for &b in &self.baselines {
            let base = stats::mean(samples_of(row, b));
            line.push(match (value, base) {
                (Some(v), Some(base)) if base != 0.0 => {
                    format!("{:.2}x{}", v / base, spread(samples, samples_of(row, b)))
                }
                _ => "-".into(),
            });
        }
        if show_range {
            line.push(match (stats::min(samples), stats::max(samples)) {
                (Some(lo), Some(hi)) => format!("{lo:.*}..{hi:.*} ({})", row.decimals, row.decimals, samples.len()),
                _ => String::new(),
            });
        }
        line
    }
}

/// The ratio's spread over rounds: ` (lo..hi)` of the per-round ratios
/// (round `r` of one target over round `r` of the other, measured side by
/// side), when there is more than one round.
fn spread(samples: &[f64], base: &[f64]) -> String {
    let ratios: Vec<f64> = samples.iter().zip(base).filter(|(_, b)| **b != 0.0).map(|(v, b)| v / b).collect();
    match (ratios.len() > 1, stats::min(&ratios), stats::max(&ratios)) {
        (true, Some(lo), Some(hi)) => format!(" ({lo:.2}..{hi:.2})"),
        _ => String::new(),
    }
}

/// Target `i`'s samples of `row` (none if it does not apply).
fn samples_of(row: &Row, i: usize) -> &[f64] {
    row.samples.get(i).and_then(Option::as_deref).unwrap_or_default()
}

/// Left-aligns the first `text` columns, right-aligns the others (numbers).
pub fn layout(lines: &[Vec<String>], text: usize) -> String {
    let columns = lines.iter().map(Vec::len).max().unwrap_or(0);
    let width = |c: usize| lines.iter().filter_map(|l| l.get(c)).map(|s| s.chars().count()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns).map(width).collect();
    let mut out = String::new();
    for line in lines {
        let cells: Vec<String> = line
            .iter()
            .enumerate()
            .map(
                |(c, cell)| {
                    if c < text {
                        format!("{cell:<w$}", w = widths[c])
                    } else {
                        format!("{cell:>w$}", w = widths[c])
                    }
                },
            )
            .collect();
        out += cells.join("  ").trim_end();
        out.push('\n');
    }
    out
}
