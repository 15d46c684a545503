//! `patroni:` and `tags:`: where a cluster's members are read from, and
//! the tags listeners select backends by.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::model::{PatroniConfig, PatroniUrl, Tags};
use crate::raw::{OneOrMany, RawPatroni, Text, PATRONI_KEYS};
use crate::validate::Validator;

impl Validator<'_> {
    /// A cluster's `patroni:` section (`item` is its path).
    pub(crate) fn patroni(&mut self, item: &str, raw: RawPatroni) -> Option<PatroniConfig> {
        self.unknown_keys(item, &raw.other, PATRONI_KEYS);
        let at = |key: &str| format!("{item}.{key}");
        let mut urls: Vec<PatroniUrl> = Vec::new();
        for (i, text) in raw.urls.map(OneOrMany::into_vec).unwrap_or_default().into_iter().enumerate() {
            match PatroniUrl::parse(&text.0) {
                Some(url) if urls.contains(&url) => self.problem(
                    &format!("{item}.urls[{i}]"),
                    format!("`{}` is listed twice", text.0),
                    "list every member's REST API once",
                ),
                Some(url) => urls.push(url),
                None => self.problem(
                    &format!("{item}.urls[{i}]"),
                    format!("`{}` is not a Patroni REST API address", text.0),
                    "write http://host:port or https://host:port (Patroni's restapi.connect_address, port 8008 by default), without a path",
                ),
            }
        }
        if urls.is_empty() {
            self.problem(
                &at("urls"),
                "no Patroni REST API address".into(),
                "list the members' REST APIs, e.g. urls: [http://10.0.0.11:8008, http://10.0.0.12:8008]",
            );
        }
        let interval = self.duration(&at("interval"), raw.interval, Duration::from_secs(2));
        let timeout = self.duration(&at("timeout"), raw.timeout, Duration::from_secs(2).min(interval));
        if timeout > interval {
            self.problem(
                &at("timeout"),
                "timeout is longer than interval: reads would overlap".into(),
                "make patroni.timeout at most patroni.interval",
            );
        }
        let remove_after = self.duration(&at("remove_after"), raw.remove_after, Duration::from_secs(30));
        if remove_after < interval * 2 {
            self.problem(
                &at("remove_after"),
                "remove_after is shorter than two reads: one answer that misses a member would remove it".into(),
                "make patroni.remove_after at least twice patroni.interval (default 30s)",
            );
        }
        let (cafile, certfile, keyfile) = self.tls_files(item, raw.cafile, raw.certfile, raw.keyfile);
        let tls_options = cafile.is_some() || certfile.is_some();
        if tls_options && !urls.iter().any(|u| u.tls) && !urls.is_empty() {
            self.warning(
                item,
                "cafile/certfile are set but every url is http://: they are not used".into(),
                "write https:// urls if Patroni's REST API has TLS (restapi.certfile)",
            );
        }
        Some(PatroniConfig { urls, interval, timeout, remove_after, cafile, certfile, keyfile })
    }

    /// `cafile`, `certfile` and `keyfile` of `item` (relative to the
    /// config's folder): each must be readable, the last two go together.
    pub(crate) fn tls_files(
        &mut self,
        item: &str,
        cafile: Option<Text>,
        certfile: Option<Text>,
        keyfile: Option<Text>,
    ) -> (Option<std::path::PathBuf>, Option<std::path::PathBuf>, Option<std::path::PathBuf>) {
        let mut file = |key: &str, raw: Option<Text>| -> Option<std::path::PathBuf> {
            let path = self.base.join(raw?.0);
            if let Err(e) = std::fs::metadata(&path) {
                self.problem(
                    &format!("{item}.{key}"),
                    format!("cannot read {}: {e}", path.display()),
                    "point it at a PEM file (relative paths start at the config file's folder)",
                );
            }
            Some(path)
        };
        let cafile = file("cafile", cafile);
        let certfile = file("certfile", certfile);
        let keyfile = file("keyfile", keyfile);
        if certfile.is_some() != keyfile.is_some() {
            self.problem(
                item,
                "certfile and keyfile go together".into(),
                "give both (the client certificate the server checks, and its key), or neither",
            );
        }
        (cafile, certfile, keyfile)
    }

    /// `tags:` of a listener or a backend: names to text values.
    pub(crate) fn tags(&mut self, item: &str, raw: Option<BTreeMap<String, Text>>) -> Tags {
        let mut out = Tags::new();
        for (key, value) in raw.unwrap_or_default() {
            if key.trim().is_empty() {
                self.problem(item, "empty tag name".into(), "write tags as name: value, e.g. tags: {dc: east}");
                continue;
            }
            out.insert(key, value.0);
        }
        out
    }
}
