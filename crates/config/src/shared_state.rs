//! `shared_state:`: the etcd a fleet of pglb instances shares its
//! operators' decisions and fencing evidence through.

use std::time::Duration;

use crate::model::{EtcdConfig, PatroniUrl, SharedStateConfig};
use crate::raw::{OneOrMany, RawSharedState, ETCD_KEYS, SHARED_STATE_KEYS};
use crate::validate::Validator;

impl Validator<'_> {
    pub(crate) fn shared_state(&mut self, raw: RawSharedState) -> Option<SharedStateConfig> {
        self.unknown_keys("shared_state", &raw.other, SHARED_STATE_KEYS);
        let instance_id = match raw.instance_id {
            Some(text) => {
                let id = text.0.trim().to_owned();
                if id.is_empty() || id.contains('/') || id.chars().any(char::is_control) {
                    self.problem(
                        "shared_state.instance_id",
                        format!("`{}` is not an instance name", text.0),
                        "write a short name without `/`, e.g. the host name (the default)",
                    );
                }
                id
            }
            None => host_name(),
        };
        let sync_interval = self.duration("shared_state.sync_interval", raw.sync_interval, Duration::from_secs(5));
        if sync_interval < Duration::from_millis(100) {
            self.problem(
                "shared_state.sync_interval",
                "sync_interval is below 100ms: every instance would read the whole prefix that often".into(),
                "use the default 5s; the watch carries changes within a second anyway",
            );
        }
        let Some(etcd) = raw.etcd else {
            self.problem(
                "shared_state",
                "shared_state names no store".into(),
                "add shared_state.etcd.endpoints (the etcd your Patroni uses), or remove shared_state",
            );
            return None;
        };
        let item = "shared_state.etcd";
        self.unknown_keys(item, &etcd.other, ETCD_KEYS);
        let mut endpoints: Vec<PatroniUrl> = Vec::new();
        for (i, text) in etcd.endpoints.map(OneOrMany::into_vec).unwrap_or_default().into_iter().enumerate() {
            let at = format!("{item}.endpoints[{i}]");
            let with_port =
                text.0.trim().trim_end_matches('/').rsplit(':').next().is_some_and(|p| p.parse::<u16>().is_ok());
            match PatroniUrl::parse(&text.0) {
                Some(url) if with_port && !endpoints.contains(&url) => endpoints.push(url),
                Some(_) if with_port => self.problem(&at, format!("`{}` is listed twice", text.0), "list every etcd member once"),
                _ => self.problem(
                    &at,
                    format!("`{}` is not an etcd client URL", text.0),
                    "write http://host:2379 or https://host:2379 (etcd's --advertise-client-urls), with the port and without a path",
                ),
            }
        }
        if endpoints.is_empty() {
            self.problem(
                &format!("{item}.endpoints"),
                "no etcd endpoint".into(),
                "list the etcd members' client URLs, e.g. endpoints: [https://10.0.0.21:2379, https://10.0.0.22:2379, https://10.0.0.23:2379]",
            );
        }
        let prefix = etcd.prefix.map_or_else(|| "/pglb/".to_owned(), |t| t.0.trim().to_owned());
        if !prefix.starts_with('/') || !prefix.ends_with('/') || prefix.len() < 2 {
            self.problem(
                &format!("{item}.prefix"),
                format!("prefix `{prefix}` must start and end with `/` and name something"),
                "write e.g. prefix: /pglb/ (the default); give the fleet's etcd role access to this prefix only",
            );
        }
        let (cafile, certfile, keyfile) = self.tls_files(item, etcd.cafile, etcd.certfile, etcd.keyfile);
        if (cafile.is_some() || certfile.is_some()) && !endpoints.iter().any(|u| u.tls) && !endpoints.is_empty() {
            self.warning(
                item,
                "cafile/certfile are set but every endpoint is http://: they are not used".into(),
                "write https:// endpoints if etcd serves TLS (--cert-file)",
            );
        }
        if endpoints.iter().any(|u| u.tls) && cafile.is_none() {
            self.problem(
                &format!("{item}.cafile"),
                "an https:// endpoint needs cafile".into(),
                "point cafile at the CA that signed etcd's certificate (etcd's --trusted-ca-file)",
            );
        }
        let password = self.secret(&format!("{item}.password"), etcd.password, etcd.password_env, etcd.password_file);
        let user = etcd.user.map(|t| t.0.trim().to_owned()).filter(|u| !u.is_empty());
        if user.is_some() != password.is_some() {
            self.problem(
                item,
                "user and password go together".into(),
                "give the etcd user pglb logs in as and its password (password_file or password_env), or neither",
            );
        }
        if user.is_none() && !endpoints.is_empty() {
            self.warning(
                item,
                "no etcd user: anyone who reaches etcd can change what every pglb routes to".into(),
                "enable etcd authentication and give pglb a role limited to the prefix (not Patroni's user)",
            );
        }
        let timeout = self.duration(&format!("{item}.timeout"), etcd.timeout, Duration::from_secs(2));
        Some(SharedStateConfig {
            etcd: EtcdConfig { endpoints, prefix, cafile, certfile, keyfile, user, password, timeout },
            instance_id,
            sync_interval,
        })
    }
}

/// The host name (`/proc/sys/kernel/hostname`), or `pglb` if unreadable.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "pglb".into())
}
