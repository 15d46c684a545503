//! The checks suite's output: one row per (N, balancer), the idle baseline,
//! and a straight-line extrapolation of each figure to 500 backends.

use super::window::Rates;
use super::Balancer;
use crate::stats;
use crate::table::layout;

/// Where the extrapolation goes.
const FAR: f64 = 500.0;

/// One measured (balancer, N).
pub struct Row {
    pub balancer: Balancer,
    pub n: usize,
    pub rates: Rates,
}

/// The figures, each from a row's rates with the baseline subtracted where
/// it applies: (name, decimals, value).
type Figure = (&'static str, usize, fn(&Rates, &Rates) -> Option<f64>);

const FIGURES: [Figure; 4] = [
    ("balancer CPU %", 2, |r, _| r.balancer_cpu.map(|c| c * 100.0)),
    ("balancer RSS MiB", 1, |r, _| r.rss_mib),
    ("server CPU % (checks)", 2, |r, b| Some((r.server_cpu - b.server_cpu) * 100.0)),
    ("forks/s", 1, |r, b| Some(r.forks - b.forks)),
];

pub fn render(baseline: &Rates, rows: &[Row]) -> String {
    let mut header: Vec<String> = vec!["N".into(), "balancer".into()];
    header.extend(FIGURES.iter().map(|f| f.0.to_owned()));
    header.push("checks/s".into());
    let mut lines = vec![header];
    for row in rows {
        let mut line = vec![row.n.to_string(), row.balancer.label().to_owned()];
        line.extend(FIGURES.iter().map(|(_, decimals, f)| cell(f(&row.rates, baseline), *decimals)));
        line.push(cell(row.rates.checks, 1));
        lines.push(line);
    }
    let mut out = layout(&lines, 2);
    out += &format!(
        "idle baseline (the 3 servers, nothing checking): server CPU {:.2} %, forks {:.1}/s; \
         subtracted from `server CPU %` and `forks/s` above\n",
        baseline.server_cpu * 100.0,
        baseline.forks
    );
    out
}

/// The least-squares line through each balancer's points of each figure,
/// and its value at N = 500.
pub fn extrapolate(baseline: &Rates, rows: &[Row]) -> String {
    let mut ns: Vec<usize> = rows.iter().map(|r| r.n).collect();
    ns.sort_unstable();
    ns.dedup();
    let largest = ns.last().copied().unwrap_or(0);
    let measured = ns.iter().map(usize::to_string).collect::<Vec<_>>().join(", ");
    let out = format!(
        "\n== linear extrapolation to {FAR} backends: least squares value = a + b*N through N = {measured}; \
         measured only up to N = {largest}, so the N = {FAR} column assumes the cost stays linear ==\n"
    );
    let mut lines = vec![["balancer", "figure", "a", "b (per backend)", "r2", "at N=500"].map(str::to_owned).to_vec()];
    for balancer in Balancer::ALL {
        for (name, decimals, f) in FIGURES {
            let points: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r.balancer == balancer)
                .filter_map(|r| Some((r.n as f64, f(&r.rates, baseline)?)))
                .collect();
            let Some((a, b, r2)) = stats::line_fit(&points) else { continue };
            lines.push(vec![
                balancer.label().to_owned(),
                name.to_owned(),
                fixed(a, decimals),
                fixed(b, 4),
                fixed(r2, 3),
                fixed(a + b * FAR, decimals),
            ]);
        }
    }
    if lines.len() == 1 {
        return out + "(needs at least two backend counts)\n";
    }
    out + &layout(&lines, 2)
}

fn cell(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| fixed(v, decimals))
}

/// `v` with `decimals` decimals; no `-0.00` for a value that rounds to 0.
fn fixed(v: f64, decimals: usize) -> String {
    let text = format!("{v:.decimals$}");
    match text.strip_prefix('-') {
        Some(rest) if rest.chars().all(|c| c == '0' || c == '.') => rest.to_owned(),
        _ => text,
    }
}
