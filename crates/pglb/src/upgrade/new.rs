//! The new pglb's side of an upgrade: take the sockets and the state from
//! the running pglb, get ready without accepting, then take over.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::time::Duration;

use anyhow::{anyhow, Context};
use pglb_control::state_file::States;
use pglb_control::Command as Topology;
use serde_json::json;
use tokio::net::{TcpListener, UnixStream};
use tokio::sync::oneshot;

use super::channel::Channel;
use super::{SOCKET_ENV, STEP_WITHIN};
use crate::run::Server;

/// What the running pglb handed over, until this process takes over.
pub struct Incoming {
    channel: Channel,
    /// The old process's pid.
    pub from: u32,
    admin: Option<(SocketAddr, OwnedFd)>,
    listeners: Vec<(SocketAddr, OwnedFd)>,
    /// The old process's safety state when it handed the sockets over.
    pub state: States,
    /// The hand-over version the old process speaks.
    version: u64,
}

impl Incoming {
    /// Connects to the running pglb when this process was started by it for
    /// an upgrade (`PGLB_UPGRADE_SOCKET` is set), and takes its sockets.
    pub async fn connect() -> anyhow::Result<Option<Self>> {
        let Some(path) = std::env::var_os(SOCKET_ENV) else { return Ok(None) };
        let path = std::path::PathBuf::from(path);
        let stream = UnixStream::connect(&path)
            .await
            .with_context(|| format!("upgrade: cannot reach the running pglb at {}", path.display()))?;
        let mut channel = Channel::new(stream);
        let (hello, mut fds) = tokio::time::timeout(STEP_WITHIN, channel.expect("hello"))
            .await
            .map_err(|_| anyhow!("upgrade: the running pglb sent nothing within {STEP_WITHIN:?}"))?
            .context("upgrade: no sockets from the running pglb")?;
        let version = match super::channel::peer_version(&hello, "running pglb") {
            Ok(version) => version,
            Err(why) => {
                let _ = channel.send(&json!({ "type": "failed", "why": why }), &[]).await;
                anyhow::bail!("upgrade: {why}");
            }
        };
        let addr = |v: &serde_json::Value| {
            v.as_str().and_then(|s| s.parse::<SocketAddr>().ok()).ok_or_else(|| anyhow!("upgrade: bad address {v}"))
        };
        let admin = addr(&hello["admin"])?;
        let addrs: Vec<SocketAddr> =
            hello["listeners"].as_array().into_iter().flatten().map(addr).collect::<anyhow::Result<_>>()?;
        if fds.len() != addrs.len() + 1 {
            anyhow::bail!("upgrade: {} sockets came for {} addresses", fds.len(), addrs.len() + 1);
        }
        let listeners = addrs.into_iter().zip(fds.split_off(1)).collect();
        let admin_fd = fds.pop().ok_or_else(|| anyhow!("upgrade: no admin socket"))?;
        let state = pglb_control::state_file::parse(hello["state"].as_str().unwrap_or_default())
            .map_err(|why| anyhow!("upgrade: the running pglb's state is unreadable: {why}"))?;
        let from = hello["pid"].as_u64().and_then(|p| u32::try_from(p).ok()).unwrap_or_default();
        tracing::info!(
            from,
            "upgrade: took the listening sockets from the running pglb; not accepting until it is ready"
        );
        Ok(Some(Self { channel, from, admin: Some((admin, admin_fd)), listeners, state, version }))
    }

    /// The running pglb's listening socket for `addr`, if it had one.
    pub fn listener(&mut self, addr: SocketAddr) -> Option<anyhow::Result<TcpListener>> {
        let at = self.listeners.iter().position(|(a, _)| *a == addr)?;
        let (_, fd) = self.listeners.swap_remove(at);
        Some(adopt(addr, fd))
    }

    /// The running pglb's admin socket, if it listens on `addr`.
    pub fn admin(&mut self, addr: SocketAddr) -> Option<anyhow::Result<TcpListener>> {
        match self.admin.take() {
            Some((a, fd)) if a == addr => Some(adopt(addr, fd)),
            other => {
                self.admin = other;
                None
            }
        }
    }

    /// Tells the running pglb why this process cannot take over.
    pub async fn fail(&self, why: &anyhow::Error) {
        let _ = self.channel.send(&json!({ "type": "failed", "why": format!("{why:#}") }), &[]).await;
    }

    /// Ready (first checks done): waits for the final state, applies it,
    /// starts accepting. Returns once systemd knows this process as the main
    /// one (or the old process stopped answering).
    pub async fn take_over(mut self, server: &Server) -> anyhow::Result<()> {
        for (addr, _) in self.listeners.drain(..) {
            tracing::warn!(%addr, "upgrade: the running pglb listens on {addr}, which this config does not name; that port closes when the old process exits");
        }
        // The version both speak: an old process of an earlier release
        // refuses a newer one, and this binary speaks every earlier one.
        let ready = json!({ "type": "ready", "version": self.version.min(super::channel::VERSION) });
        self.channel.send(&ready, &[]).await.context("upgrade: cannot tell the running pglb")?;
        let (go, _) = self.channel.expect("go").await.context("upgrade: the running pglb ended the hand-over")?;
        let state = pglb_control::state_file::parse(go["state"].as_str().unwrap_or_default())
            .map_err(|why| anyhow!("upgrade: the running pglb's final state is unreadable: {why}"))?;
        for cluster in &server.clusters {
            let name = &cluster.config.name;
            let (now, over) =
                (state.get(name).cloned().unwrap_or_default(), self.state.remove(name).unwrap_or_default());
            if now != over {
                let (reply, done) = oneshot::channel();
                cluster.topology.commands.send(Topology::Restore { saved: now, over, reply }).await?;
                done.await?;
            }
            cluster.topology.commands.send(Topology::KeepSaving).await?;
        }
        // What the old process knows now: an admin action from here on is
        // passed to it during the overlap.
        let clusters: Vec<_> = server.clusters.iter().map(|c| c.topology.clone()).collect();
        let handed_admin = super::overlap::admin_states(&clusters);
        server.accepting.send_replace(true);
        self.channel
            .send(&json!({ "type": "accepting" }), &[])
            .await
            .context("upgrade: cannot tell the running pglb")?;
        tracing::info!(from = self.from, "upgrade: accepting clients; the old process finishes its sessions");
        match tokio::time::timeout(Duration::from_secs(10), self.channel.expect("main")).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "upgrade: the old process did not confirm the hand-over"),
            Err(_) => tracing::warn!("upgrade: the old process did not confirm the hand-over within 10s"),
        }
        crate::systemd::speak();
        if self.version >= super::overlap::SINCE_VERSION {
            tokio::spawn(super::overlap::relay(self.channel, clusters, handed_admin, self.version));
        }
        Ok(())
    }
}

/// A listening socket received from the old process, checked to be one.
fn adopt(addr: SocketAddr, fd: OwnedFd) -> anyhow::Result<TcpListener> {
    let std = std::net::TcpListener::from(fd);
    let local =
        std.local_addr().with_context(|| format!("upgrade: the socket handed over for {addr} is not usable"))?;
    if local != addr {
        anyhow::bail!("upgrade: the socket handed over for {addr} is bound to {local}");
    }
    std.set_nonblocking(true)?;
    TcpListener::from_std(std).with_context(|| format!("upgrade: cannot serve the socket handed over for {addr}"))
}
