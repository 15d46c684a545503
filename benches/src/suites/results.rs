//! The throughput suite's figures: samples per (figure, target), turned
//! into the printed table.

use std::collections::HashMap;

use crate::cli::Throughput;
use crate::table::{Better, Table};
use crate::targets::Kind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fig {
    SelectTps,
    SelectLatency,
    SelectCpu,
    SelectPipes,
    FixedTps,
    FixedHostCpu,
    FixedSwitches,
    FixedCpu,
    ConnectRate,
    ConnectCpu,
    CopyMbps,
    CopyCpu,
    CopyHostCpu,
    TpcbTps,
    TpcbLatency,
    TpcbCpu,
    RssLow,
    RssHigh,
    KibPerConn,
    SlabKibPerConn,
    PipesZero,
    PipesLow,
    PipesHigh,
}

impl Fig {
    const ALL: [Fig; 23] = [
        Fig::SelectTps,
        Fig::SelectLatency,
        Fig::SelectCpu,
        Fig::SelectPipes,
        Fig::FixedTps,
        Fig::FixedHostCpu,
        Fig::FixedSwitches,
        Fig::FixedCpu,
        Fig::ConnectRate,
        Fig::ConnectCpu,
        Fig::CopyMbps,
        Fig::CopyCpu,
        Fig::CopyHostCpu,
        Fig::TpcbTps,
        Fig::TpcbLatency,
        Fig::TpcbCpu,
        Fig::RssLow,
        Fig::RssHigh,
        Fig::KibPerConn,
        Fig::SlabKibPerConn,
        Fig::PipesZero,
        Fig::PipesLow,
        Fig::PipesHigh,
    ];

    /// CPU and memory of the balancer: no such figure for direct.
    fn balancer_only(self) -> bool {
        !matches!(
            self,
            Fig::SelectTps
                | Fig::SelectLatency
                | Fig::FixedTps
                | Fig::FixedHostCpu
                | Fig::FixedSwitches
                | Fig::ConnectRate
                | Fig::CopyMbps
                | Fig::CopyHostCpu
                | Fig::TpcbTps
                | Fig::TpcbLatency
        )
    }

    /// Label, which way is better, decimals.
    fn describe(self, opts: &Throughput, rate: Option<u64>) -> (String, Better, usize) {
        let rate = rate.map_or_else(|| "?".to_owned(), |r| r.to_string());
        let (low, high) = opts.memory.unwrap_or_default();
        let copy_mb = opts.copy_rows * crate::copy::ROW_BYTES / 1_000_000;
        use Better::{Higher, Lower};
        match self {
            Fig::SelectTps => ("select-only TPS (-S -c16 -j2)".into(), Higher, 0),
            Fig::SelectLatency => ("select-only latency ms".into(), Lower, 3),
            Fig::SelectCpu => ("select-only: balancer CPU s/10k tx".into(), Lower, 3),
            Fig::SelectPipes => ("select-only: most pipe fds held".into(), Lower, 0),
            Fig::FixedTps => (format!("select-only at -R {}: TPS reached", rate), Higher, 0),
            Fig::FixedHostCpu => (format!("select-only at -R {}: host CPU s/10k tx", rate), Lower, 3),
            Fig::FixedSwitches => (format!("select-only at -R {rate}: host context switches/tx"), Lower, 2),
            Fig::FixedCpu => (format!("select-only at -R {rate}: balancer CPU s/10k tx"), Lower, 3),
            Fig::ConnectRate => ("new connections/s (-S -C -c8 -j2)".into(), Higher, 0),
            Fig::ConnectCpu => ("connect: balancer CPU s/10k conn".into(), Lower, 3),
            Fig::CopyMbps => (format!("COPY TO STDOUT MB/s ({copy_mb} MB)"), Higher, 0),
            Fig::CopyCpu => ("COPY: balancer CPU s/GB".into(), Lower, 3),
            Fig::CopyHostCpu => ("COPY: host CPU s/GB".into(), Lower, 3),
            Fig::TpcbTps => ("TPC-B TPS (-c64 -j2)".into(), Higher, 0),
            Fig::TpcbLatency => ("TPC-B latency ms".into(), Lower, 3),
            Fig::TpcbCpu => ("TPC-B: balancer CPU s/10k tx".into(), Lower, 3),
            Fig::RssLow => (format!("RSS MiB, {low} idle conns"), Lower, 1),
            Fig::RssHigh => (format!("RSS MiB, {high} idle conns"), Lower, 1),
            Fig::KibPerConn => (format!("KiB per idle conn ({low}->{high})"), Lower, 1),
            Fig::SlabKibPerConn => (format!("kernel slab KiB per idle conn ({low}->{high})"), Lower, 2),
            Fig::PipesZero => ("pipe fds held, 0 idle (inherited too)".into(), Lower, 0),
            Fig::PipesLow => (format!("pipe fds held, {low} idle"), Lower, 0),
            Fig::PipesHigh => (format!("pipe fds held, {high} idle"), Lower, 0),
        }
    }
}

#[derive(Default)]
pub struct Results {
    samples: HashMap<(Fig, Kind), Vec<f64>>,
    notes: Vec<String>,
    /// The fixed rate used (`pgbench -R`).
    pub rate: Option<u64>,
}

impl Results {
    pub fn record(&mut self, fig: Fig, kind: Kind, value: f64) {
        self.samples.entry((fig, kind)).or_default().push(value);
    }

    /// The first value recorded for `fig` through `kind`.
    pub fn first(&self, fig: Fig, kind: Kind) -> Option<f64> {
        self.samples.get(&(fig, kind))?.first().copied()
    }

    /// A line printed under the table (failures, skipped steps).
    pub fn note(&mut self, note: String) {
        eprintln!("note: {note}");
        self.notes.push(note);
    }

    /// The table; figures nobody measured are left out.
    pub fn render(&self, opts: &Throughput) -> String {
        let labels: Vec<&str> = opts.targets.iter().map(|k| k.label()).collect();
        let mut table = Table::new(&labels, &[Kind::Direct.label(), Kind::Haproxy.label(), Kind::HaproxyLog.label()]);
        for fig in Fig::ALL {
            let samples: Vec<Option<Vec<f64>>> = opts
                .targets
                .iter()
                .map(|&k| {
                    let applies = k != Kind::Direct || !fig.balancer_only();
                    applies.then(|| self.samples.get(&(fig, k)).cloned().unwrap_or_default())
                })
                .collect();
            if samples.iter().flatten().any(|s| !s.is_empty()) {
                let (label, better, decimals) = fig.describe(opts, self.rate);
                table.add(&label, better, decimals, samples);
            }
        }
        let mut out = table.render();
        for note in &self.notes {
            out += &format!("note: {note}\n");
        }
        out
    }
}
