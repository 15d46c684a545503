//! The reader task of one cluster: `GET /cluster` every `interval` (and at
//! once when pglb's checks see a role change), the leader's confirmation
//! of its lock on its own `/leader`, and what follows from them for the
//! topology task and the cluster's member list.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use pglb_config::{PatroniConfig, PatroniUrl};
use pglb_control::{Command, TopologyHandle};
use pglb_routing::{MemberView, ObservedRole, PatroniView, Trust};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::answer::{ClusterAnswer, Member};
use crate::client::{api_address, Client, ClientError};
use crate::roster::{Changes, MemberAddress, Roster};

/// Registers the reader's metrics.
pub fn describe_metrics() {
    metrics::describe_counter!(
        "pglb_patroni_reads_total",
        "Reads of Patroni's GET /cluster, by result: ok, unreachable (no REST API answered), error (an API answered without the cluster: DCS unavailable)."
    );
    metrics::describe_gauge!(
        "pglb_patroni_last_answer_timestamp_seconds",
        metrics::Unit::Seconds,
        "When a Patroni REST API last answered GET /cluster (Unix time)."
    );
}

/// One cluster's reader.
pub struct Reader {
    cluster: Arc<str>,
    config: PatroniConfig,
    client: Client,
    topology: TopologyHandle,
    members: Arc<watch::Sender<Vec<MemberAddress>>>,
    roster: Roster,
    /// The REST APIs the members publish (`api_url`), besides the config's.
    learnt: Vec<PatroniUrl>,
    /// The API that answered last: asked first next time.
    last_good: Option<PatroniUrl>,
    view: PatroniView,
}

/// Why no API gave the cluster: each one's error.
struct Failure {
    errors: Vec<String>,
}

impl Reader {
    /// A reader for `cluster`, reporting to `topology` and publishing the
    /// member list on `members` (which starts as the last known list).
    pub fn new(
        cluster: Arc<str>,
        config: PatroniConfig,
        topology: TopologyHandle,
        members: Arc<watch::Sender<Vec<MemberAddress>>>,
    ) -> Result<Self, ClientError> {
        let client = Client::new(&config)?;
        Ok(Self {
            cluster,
            config,
            client,
            topology,
            members,
            roster: Roster::default(),
            learnt: Vec::new(),
            last_good: None,
            view: PatroniView::default(),
        })
    }

    /// Reads until `stop`.
    pub async fn run(mut self, stop: CancellationToken) {
        let role_changed = self.topology.role_changed.clone();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.read() => {}
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.config.interval) => {}
                _ = role_changed.notified() => {
                    tracing::debug!(cluster = %self.cluster, "a check saw a role change: reading Patroni now");
                }
            }
        }
    }

    async fn read(&mut self) {
        let fetched = self.fetch().await;
        let table = self.topology.table.load_full();
        let primary = table
            .backends
            .iter()
            .find(|b| b.role == ObservedRole::Primary && b.serving())
            .map(|b| b.config.name.clone());
        let cluster = self.cluster.to_string();
        let mut view = match fetched {
            Ok((answer, url)) => {
                metrics::counter!("pglb_patroni_reads_total", "cluster" => cluster.clone(), "result" => "ok")
                    .increment(1);
                let unix = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
                metrics::gauge!("pglb_patroni_last_answer_timestamp_seconds", "cluster" => cluster.clone())
                    .set(unix.as_secs_f64());
                let changes =
                    self.roster.answer(&answer.members, Instant::now(), self.config.remove_after, primary.as_deref());
                self.log(&changes);
                self.learn(&answer);
                let (trust, leader) = self.judge(&answer).await;
                PatroniView {
                    trust,
                    leader,
                    standby_leader: answer.standby_leader().map(|m| m.name.clone()),
                    paused: answer.pause,
                    members: Default::default(),
                    answered_by: Some(url.to_string()),
                    answered_at: Some(SystemTime::now()),
                    error: None,
                }
            }
            Err(failure) => {
                // `/cluster` reads the DCS (and waits on it); `/patroni` does
                // not: an API that answers it is alive, its DCS is not.
                let trust = match self.member_status().await {
                    None => Trust::Unreachable,
                    Some(true) => Trust::Failsafe,
                    Some(false) => Trust::DcsUnavailable,
                };
                let result = if trust == Trust::Unreachable { "unreachable" } else { "error" };
                metrics::counter!("pglb_patroni_reads_total", "cluster" => cluster.clone(), "result" => result)
                    .increment(1);
                tracing::debug!(cluster = %self.cluster, errors = failure.errors.join("; "), "no Patroni REST API gave the cluster");
                PatroniView { trust, error: Some(failure.errors.join("; ")), ..self.view.clone() }
            }
        };
        // Departed members whose sessions ended go for good.
        let idle =
            |name: &str| table.backends.iter().find(|b| b.config.name == name).is_none_or(|b| b.load.active() == 0);
        for name in self.roster.drop_idle(idle) {
            tracing::info!(cluster = %self.cluster, member = name, "Patroni member removed: it left Patroni's list and its sessions ended");
        }
        view.members = self
            .roster
            .members()
            .map(|(m, departed)| {
                let view = MemberView {
                    role: m.role.clone(),
                    state: m.state.clone(),
                    timeline: m.timeline,
                    lag: m.lag,
                    tags: m.tags.clone(),
                    departed,
                };
                (m.name.clone(), view)
            })
            .collect();
        if view != self.view {
            self.view = view.clone();
            if self.topology.commands.send(Command::Patroni { view }).await.is_err() {
                return;
            }
        }
        let addresses = self.roster.addresses();
        self.members.send_if_modified(|current| {
            let changed = *current != addresses && !(addresses.is_empty() && self.view.trust == Trust::NotRead);
            if changed {
                *current = addresses;
            }
            changed
        });
    }

    /// `GET /cluster` from the first API that gives it: the one that
    /// answered last, the config's, then those the members publish.
    async fn fetch(&mut self) -> Result<(ClusterAnswer, PatroniUrl), Failure> {
        let mut order: Vec<PatroniUrl> = self.last_good.iter().cloned().collect();
        for url in self.config.urls.iter().chain(&self.learnt) {
            if !order.contains(url) {
                order.push(url.clone());
            }
        }
        let mut failure = Failure { errors: Vec::new() };
        for url in order {
            match self.client.get(&url, "/cluster").await {
                Ok((200, body)) => match ClusterAnswer::parse(&body) {
                    Ok(answer) => {
                        self.last_good = Some(url.clone());
                        return Ok((answer, url));
                    }
                    Err(e) => failure.errors.push(format!("{url}/cluster: {e}")),
                },
                Ok((status, body)) => {
                    let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
                    failure.errors.push(format!("{url}/cluster: HTTP {status} {text}"));
                }
                Err(e) => failure.errors.push(e.to_string()),
            }
        }
        Err(failure)
    }

    /// Whether the lock is used: the leader (or standby leader) must be
    /// running and confirm the lock on its own `/leader`, since `/cluster`
    /// may be read from a member with a stale view.
    async fn judge(&self, answer: &ClusterAnswer) -> (Trust, Option<String>) {
        let holder = answer.standby_leader().or_else(|| answer.leader());
        let name = holder.map(|m| m.name.clone());
        if answer.pause {
            return (Trust::Paused, name);
        }
        let Some(holder) = holder else { return (Trust::NoLeader, None) };
        if holder.state != "running" && holder.state != "streaming" {
            return (Trust::LeaderNotRunning, name);
        }
        if self.confirms(holder).await {
            (Trust::Lock, name)
        } else {
            (Trust::Unconfirmed, name)
        }
    }

    async fn confirms(&self, leader: &Member) -> bool {
        let Some(api) = leader.api_url.as_deref().and_then(api_address) else { return false };
        match self.client.get(&api, "/leader").await {
            Ok((200, _)) => true,
            Ok((status, _)) => {
                tracing::debug!(cluster = %self.cluster, leader = leader.name, status, "the leader does not confirm the lock");
                false
            }
            Err(e) => {
                tracing::debug!(cluster = %self.cluster, leader = leader.name, error = %e, "the leader's API does not answer");
                false
            }
        }
    }

    /// `GET /patroni` of the members: `None` when none answers, else
    /// whether one says failsafe mode is active.
    async fn member_status(&self) -> Option<bool> {
        let mut order: Vec<&PatroniUrl> = self.last_good.iter().collect();
        order.extend(self.config.urls.iter().chain(&self.learnt));
        let mut answered = false;
        for url in order {
            if let Ok((200, body)) = self.client.get(url, "/patroni").await {
                answered = true;
                let status: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                if status.get("failsafe_mode_is_active").and_then(|v| v.as_bool()) == Some(true) {
                    return Some(true);
                }
            }
        }
        answered.then_some(false)
    }

    fn learn(&mut self, answer: &ClusterAnswer) {
        for api in answer.members.iter().filter_map(|m| m.api_url.as_deref().and_then(api_address)) {
            if !self.config.urls.contains(&api) && !self.learnt.contains(&api) {
                self.learnt.push(api);
            }
        }
    }

    fn log(&self, changes: &Changes) {
        let cluster = &*self.cluster;
        for name in &changes.joined {
            tracing::info!(cluster, member = name, "Patroni member joined: checked, then routed to as its checks say");
        }
        for name in &changes.returned {
            tracing::info!(cluster, member = name, "Patroni member listed again: back in service as its checks say");
        }
        for name in &changes.departed {
            tracing::warn!(
                cluster,
                member = name,
                remove_after = %pglb_config::format_duration(self.config.remove_after),
                "Patroni member left the list: drained (no new sessions; its sessions finish), removed once they end"
            );
        }
        if !changes.over_limit.is_empty() {
            tracing::error!(
                cluster,
                left_out = changes.over_limit.join(", "),
                limit = crate::roster::MAX_MEMBERS,
                "Patroni lists more members than pglb serves for one cluster: the rest are left out (a DCS shared by several clusters under one scope?)"
            );
        }
        for name in &changes.unaddressed {
            tracing::warn!(
                cluster,
                member = name,
                "Patroni lists a member without a PostgreSQL address (postgresql.connect_address): not served"
            );
        }
    }
}
