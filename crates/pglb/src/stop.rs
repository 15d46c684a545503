//! Leaving: a shutdown (SIGTERM/SIGINT) refuses new, held and queued
//! clients and drains; a retirement after an upgrade only stops accepting
//! and lets everything already here finish. Both end in [`Server::drain`].

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::run::Server;
use crate::signals::Signals;
use crate::systemd::Notifier;

impl Server {
    /// SIGTERM/SIGINT: `/health` turns 503, new, held and queued clients get
    /// 57P01, sessions may finish for `shutdown_timeout`, then are closed. A
    /// second signal stops at once. systemd hears STOPPING=1, and its stop
    /// timeout is extended while the drain runs.
    pub(crate) async fn shutdown(self, signals: &mut Signals, notifier: Notifier) {
        notifier.stopping();
        let drained = CancellationToken::new();
        tokio::spawn({
            let drained = drained.clone();
            async move {
                loop {
                    notifier.extend(Duration::from_secs(15));
                    tokio::select! {
                        _ = drained.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    }
                }
            }
        });
        let _drained = drained.drop_guard();
        self.admin.draining.store(true, Ordering::Relaxed);
        self.common.draining.cancel();
        let open = self.contexts.open_sessions();
        let timeout = self.config.shutdown_timeout;
        tracing::info!(sessions = open, timeout = ?timeout, "draining: new clients are refused; waiting for sessions to finish");
        self.drain(signals).await;
    }

    /// After an upgrade handed the sockets to `pid`: accept nothing more,
    /// keep serving open sessions and held or queued clients (no 57P01, no
    /// STOPPING=1) for up to `shutdown_timeout`, then exit. Admin states
    /// the new process sends on `channel` meanwhile apply here too. A stop signal
    /// meanwhile closes what is left at once.
    pub(crate) async fn retire(mut self, signals: &mut Signals, pid: u32, channel: crate::upgrade::Channel) {
        tokio::spawn(crate::upgrade::overlap_apply(channel, self.admin.clusters.load_full()));
        for live in std::mem::take(&mut self.listeners) {
            live.stop.cancel();
        }
        self.admin_stop.cancel();
        let open = self.contexts.open_sessions();
        let timeout = self.config.shutdown_timeout;
        tracing::info!(
            pid,
            sessions = open,
            timeout = ?timeout,
            "upgrade done: pid {pid} accepts now; this process finishes its sessions and its held and queued clients, then exits"
        );
        self.drain(signals).await;
    }

    /// Lets sessions finish for `shutdown_timeout` (a stop signal ends the
    /// wait), closes the rest, and stops everything.
    async fn drain(self, signals: &mut Signals) {
        self.sessions.close();
        let timeout = self.config.shutdown_timeout;
        tokio::select! {
            _ = self.sessions.wait() => tracing::info!("all sessions finished"),
            _ = tokio::time::sleep(timeout) => {
                tracing::warn!(timeout = ?timeout, "shutdown timeout: closing the remaining sessions");
                self.contexts.close_all(pglb_routing::CloseReason::ShutdownTimeout);
                let _ = tokio::time::timeout(Duration::from_secs(2), self.sessions.wait()).await;
            }
            _ = signals.stop() => {
                tracing::warn!("second stop signal: exiting now");
            }
        }
        for live in &self.listeners {
            live.stop.cancel();
        }
        self.common.hard_stop.cancel();
        for cluster in self.clusters {
            cluster.stop().await;
        }
        self.background.cancel();
        // The admin endpoint's last answers (an upgrade's outcome) go out.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.admin_task).await;
        tracing::info!("pglb stopped");
    }
}
