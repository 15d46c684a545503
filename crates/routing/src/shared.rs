//! The part of a cluster's state that a fleet of pglb instances shares
//! (through etcd, see `pglb-store`): operators' admin states, timeline
//! fences and the highest primary timeline. Health, lag, sessions and
//! system-identifier fences stay local. Items are named so that they mean
//! the same node on every instance: a Patroni member by its member name,
//! any other backend by its address. No I/O here.

use std::collections::BTreeMap;

use crate::fence::{Fence, FenceKind};
use crate::table::AdminState;
use crate::topology::Topology;

/// Which node an item is about, the same on every instance.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NodeKey {
    /// A Patroni member, by its member name.
    Member(String),
    /// A configured backend, by `host:port`.
    Address(String),
}

impl NodeKey {
    /// `member/<name>` or `address/<host:port>`, `/` and `%` escaped.
    pub fn path(&self) -> String {
        let escape = |s: &str| s.replace('%', "%25").replace('/', "%2F");
        match self {
            Self::Member(name) => format!("member/{}", escape(name)),
            Self::Address(address) => format!("address/{}", escape(address)),
        }
    }

    /// The key a [`NodeKey::path`] names.
    pub fn parse(path: &str) -> Option<Self> {
        let unescape = |s: &str| s.replace("%2F", "/").replace("%25", "%");
        let (kind, rest) = path.split_once('/')?;
        if rest.is_empty() || rest.contains('/') {
            return None;
        }
        match kind {
            "member" => Some(Self::Member(unescape(rest))),
            "address" => Some(Self::Address(unescape(rest))),
            _ => None,
        }
    }
}

impl std::fmt::Display for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Member(name) => write!(f, "member {name}"),
            Self::Address(address) => write!(f, "address {address}"),
        }
    }
}

/// One shared item of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ItemKey {
    Admin(NodeKey),
    Fence(NodeKey),
    /// The highest primary timeline seen.
    Timeline,
}

impl ItemKey {
    /// The item's path below the cluster's prefix.
    pub fn path(&self) -> String {
        match self {
            Self::Admin(node) => format!("admin/{}", node.path()),
            Self::Fence(node) => format!("fence/{}", node.path()),
            Self::Timeline => "timeline".into(),
        }
    }

    pub fn parse(path: &str) -> Option<Self> {
        if path == "timeline" {
            return Some(Self::Timeline);
        }
        let (kind, rest) = path.split_once('/')?;
        match kind {
            "admin" => NodeKey::parse(rest).map(Self::Admin),
            "fence" => NodeKey::parse(rest).map(Self::Fence),
            _ => None,
        }
    }
}

impl std::fmt::Display for ItemKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.path())
    }
}

/// An item's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemValue {
    Admin(AdminState),
    /// A timeline fence (`None`: not fenced), and the reason for people.
    Fence(Option<String>),
    /// The highest primary timeline; `reset` when an operator's unfence
    /// made a lower one the reference (applied as is, not as a maximum).
    Timeline {
        timeline: u32,
        reset: bool,
    },
}

impl ItemValue {
    /// Whether `self` (this instance's change) prevails over `other` (a
    /// concurrent one already in the store), by the documented precedence:
    /// disable > drain > enable; fenced > not fenced; the higher timeline.
    /// Equal values need no write.
    pub fn prevails_over(&self, other: &ItemValue) -> bool {
        match (self, other) {
            (Self::Admin(mine), Self::Admin(theirs)) => rank(*mine) > rank(*theirs),
            (Self::Fence(mine), Self::Fence(theirs)) => mine.is_some() && theirs.is_none(),
            (Self::Timeline { timeline: mine, .. }, Self::Timeline { timeline: theirs, .. }) => mine > theirs,
            _ => false,
        }
    }

    /// Whether applying it here changes nothing.
    pub fn same_as(&self, other: &ItemValue) -> bool {
        match (self, other) {
            (Self::Fence(a), Self::Fence(b)) => a.is_some() == b.is_some(),
            (Self::Timeline { timeline: a, .. }, Self::Timeline { timeline: b, .. }) => a == b,
            _ => self == other,
        }
    }
}

fn rank(state: AdminState) -> u8 {
    match state {
        AdminState::Enabled => 0,
        AdminState::Drained => 1,
        AdminState::Disabled => 2,
    }
}

impl Topology {
    /// Which node backend `i` is, for the fleet.
    fn node_key(&self, i: usize) -> NodeKey {
        let backend = &self.config().backends[i];
        if self.is_member(i) {
            NodeKey::Member(backend.name.clone())
        } else {
            NodeKey::Address(backend.address())
        }
    }

    /// The shared items as this instance holds them now.
    pub fn shared(&self) -> BTreeMap<ItemKey, ItemValue> {
        let mut items = BTreeMap::new();
        for i in 0..self.config().backends.len() {
            let node = self.node_key(i);
            items.insert(ItemKey::Admin(node.clone()), ItemValue::Admin(self.admin_state(i)));
            let fence = self.fence_of(i).filter(|f| f.kind == FenceKind::Timeline).map(|f| f.reason.clone());
            items.insert(ItemKey::Fence(node), ItemValue::Fence(fence));
        }
        items.insert(ItemKey::Timeline, ItemValue::Timeline { timeline: self.max_timeline(), reset: false });
        items
    }

    /// Applies an item another instance shared; `false` if it names no
    /// backend here. A fence is never put over a system-identifier fence,
    /// and a timeline only grows unless an operator's unfence reset it.
    pub fn apply_shared(&mut self, key: &ItemKey, value: &ItemValue) -> bool {
        let find = |node: &NodeKey| (0..self.config().backends.len()).find(|&i| self.node_key(i) == *node);
        match (key, value) {
            (ItemKey::Admin(node), ItemValue::Admin(state)) => match find(node) {
                Some(i) => {
                    self.set_admin_at(i, *state);
                    true
                }
                None => false,
            },
            // Fencing is off (`multi_primary: allow`): so are the fleet's fences.
            (ItemKey::Fence(_), _) if self.config().multi_primary == pglb_config::MultiPrimary::Allow => false,
            (ItemKey::Fence(node), ItemValue::Fence(fence)) => match find(node) {
                Some(i) => {
                    let fence = fence.clone().map(|reason| Fence { kind: FenceKind::Timeline, reason });
                    self.set_timeline_fence(i, fence);
                    true
                }
                None => false,
            },
            (ItemKey::Timeline, ItemValue::Timeline { timeline, reset }) => {
                self.shared_timeline(*timeline, *reset);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_odd_names_stay_one_segment() {
        for key in [
            ItemKey::Admin(NodeKey::Member("pg/1%".into())),
            ItemKey::Fence(NodeKey::Address("[fd00::1]:5432".into())),
            ItemKey::Timeline,
        ] {
            assert_eq!(ItemKey::parse(&key.path()), Some(key.clone()), "{}", key.path());
        }
        assert_eq!(ItemKey::Admin(NodeKey::Member("a/b".into())).path(), "admin/member/a%2Fb");
        assert_eq!(ItemKey::parse("admin/member/a/b"), None);
        assert_eq!(ItemKey::parse("lag/member/a"), None);
    }

    #[test]
    fn precedence_is_disable_drain_enable_then_fenced_then_higher_timeline() {
        let admin = ItemValue::Admin;
        assert!(admin(AdminState::Disabled).prevails_over(&admin(AdminState::Drained)));
        assert!(admin(AdminState::Drained).prevails_over(&admin(AdminState::Enabled)));
        assert!(!admin(AdminState::Enabled).prevails_over(&admin(AdminState::Drained)));
        assert!(!admin(AdminState::Drained).prevails_over(&admin(AdminState::Drained)));
        assert!(ItemValue::Fence(Some("x".into())).prevails_over(&ItemValue::Fence(None)));
        assert!(!ItemValue::Fence(None).prevails_over(&ItemValue::Fence(Some("x".into()))));
        let tl = |timeline| ItemValue::Timeline { timeline, reset: false };
        assert!(tl(3).prevails_over(&tl(2)) && !tl(2).prevails_over(&tl(3)));
    }
}
