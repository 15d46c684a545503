//! The listeners of one listening address: usually one; several when they
//! are told apart by TLS server name (`sni`). Settings that act before the
//! name is known — `allow`, `freebind`, `startup_timeout`, accept metrics —
//! are the first listener's (config order); the config requires them to
//! agree across the address.

use std::net::SocketAddr;
use std::sync::Arc;

use pglb_config::sni_matches;

use crate::listener::ListenerContext;

/// One address's listeners and the names each takes.
pub struct AddressGroup {
    pub listen: SocketAddr,
    members: Vec<(Arc<ListenerContext>, Vec<String>)>,
}

impl AddressGroup {
    /// `members`: each listener's context and `sni` names, in config order.
    pub fn new(listen: SocketAddr, members: Vec<(Arc<ListenerContext>, Vec<String>)>) -> Self {
        Self { listen, members }
    }

    /// The listener that stands for the address before routing.
    pub fn first(&self) -> Option<&Arc<ListenerContext>> {
        self.members.first().map(|(ctx, _)| ctx)
    }

    pub fn contexts(&self) -> impl Iterator<Item = &Arc<ListenerContext>> {
        self.members.iter().map(|(ctx, _)| ctx)
    }

    /// Whether clients are routed by TLS server name here.
    pub fn by_name(&self) -> bool {
        self.members.iter().any(|(_, names)| !names.is_empty())
    }

    /// The listener without `sni`: unmatched names and plaintext clients.
    pub fn default_listener(&self) -> Option<&Arc<ListenerContext>> {
        self.members.iter().find(|(_, names)| names.is_empty()).map(|(ctx, _)| ctx)
    }

    /// The listener for server name `name`: an exact name first, then the
    /// longest matching wildcard, then the default.
    pub fn for_name(&self, name: Option<&str>) -> Option<&Arc<ListenerContext>> {
        let named = name.and_then(|name| {
            let exact = self
                .members
                .iter()
                .find(|(_, names)| names.iter().any(|n| !n.starts_with("*.") && sni_matches(n, name)));
            exact.or_else(|| {
                self.members
                    .iter()
                    .filter_map(|m| {
                        let best =
                            m.1.iter()
                                .filter(|p| p.starts_with("*.") && sni_matches(p, name))
                                .map(|p| p.len())
                                .max()?;
                        Some((best, m))
                    })
                    .max_by_key(|(len, _)| *len)
                    .map(|(_, m)| m)
            })
        });
        named.map(|(ctx, _)| ctx).or_else(|| self.default_listener())
    }
}
