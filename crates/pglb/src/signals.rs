//! The signals pglb acts on: SIGHUP reloads, SIGUSR2 upgrades, SIGTERM and
//! SIGINT stop (a second one stops at once).

use anyhow::Context;
use tokio::signal::unix::{signal, Signal, SignalKind};

/// What a signal asks for.
pub enum Sig {
    Hup,
    Upgrade,
    Stop,
}

/// The signals pglb acts on.
pub struct Signals {
    pub hup: Signal,
    usr2: Signal,
    term: Signal,
    int: Signal,
}

impl Signals {
    pub fn new() -> anyhow::Result<Self> {
        let install = |kind| signal(kind).context("cannot install signal handlers");
        Ok(Self {
            hup: install(SignalKind::hangup())?,
            usr2: install(SignalKind::user_defined2())?,
            term: install(SignalKind::terminate())?,
            int: install(SignalKind::interrupt())?,
        })
    }

    /// The next signal.
    pub async fn next(&mut self) -> Sig {
        tokio::select! {
            _ = self.hup.recv() => Sig::Hup,
            _ = self.usr2.recv() => { tracing::info!("SIGUSR2 received: upgrading"); Sig::Upgrade }
            _ = self.term.recv() => { tracing::info!("SIGTERM received"); Sig::Stop }
            _ = self.int.recv() => { tracing::info!("SIGINT received"); Sig::Stop }
        }
    }

    /// Resolves on the next SIGTERM or SIGINT.
    pub async fn stop(&mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM received"),
            _ = self.int.recv() => tracing::info!("SIGINT received"),
        }
    }
}
