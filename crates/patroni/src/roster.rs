//! Which members pglb serves, from Patroni's answers over time: a member
//! appears at once; one that leaves every answer is marked departed only
//! after `remove_after` (one odd answer removes nothing), never while it is
//! the primary; no answer changes nothing.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::answer::Member;

/// Most members one cluster may have: a REST API that lists more (a bug, or
/// a DCS shared by mistake) cannot make pglb start a checker per entry.
pub const MAX_MEMBERS: usize = 256;

/// Where a member's PostgreSQL answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberAddress {
    pub name: String,
    pub host: String,
    pub port: u16,
}

#[derive(Debug, Clone)]
struct Entry {
    member: Member,
    address: MemberAddress,
    /// The first answer that did not list it (since then, none did).
    missing_since: Option<Instant>,
    departed: bool,
}

/// The members over time.
#[derive(Debug, Clone, Default)]
pub struct Roster {
    entries: BTreeMap<String, Entry>,
}

/// What one update changed, for the log.
#[derive(Debug, Default, PartialEq)]
pub struct Changes {
    pub joined: Vec<String>,
    pub departed: Vec<String>,
    pub returned: Vec<String>,
    /// Members listed without a PostgreSQL address (`host`/`port`).
    pub unaddressed: Vec<String>,
    /// New members left out: the cluster already has [`MAX_MEMBERS`].
    pub over_limit: Vec<String>,
}

impl Roster {
    /// Applies one answer seen at `now`; `primary` is the node pglb's
    /// checks see as primary now (never departed for missing an answer).
    pub fn answer(
        &mut self,
        members: &[Member],
        now: Instant,
        remove_after: Duration,
        primary: Option<&str>,
    ) -> Changes {
        let mut changes = Changes::default();
        for m in members {
            let (Some(host), Some(port)) = (m.host.clone(), m.port) else {
                changes.unaddressed.push(m.name.clone());
                continue;
            };
            let address = MemberAddress { name: m.name.clone(), host, port };
            let full = self.entries.len() >= MAX_MEMBERS;
            match self.entries.get_mut(&m.name) {
                Some(e) => {
                    if e.departed {
                        changes.returned.push(m.name.clone());
                    }
                    *e = Entry { member: m.clone(), address, missing_since: None, departed: false };
                }
                None if full => changes.over_limit.push(m.name.clone()),
                None => {
                    changes.joined.push(m.name.clone());
                    self.entries.insert(
                        m.name.clone(),
                        Entry { member: m.clone(), address, missing_since: None, departed: false },
                    );
                }
            }
        }
        for (name, e) in &mut self.entries {
            if members.iter().any(|m| &m.name == name) {
                continue;
            }
            let since = *e.missing_since.get_or_insert(now);
            let missing = now.saturating_duration_since(since) >= remove_after;
            if !e.departed && missing && primary != Some(name.as_str()) {
                e.departed = true;
                changes.departed.push(name.clone());
            }
        }
        changes
    }

    /// Drops departed members that `idle` says have no sessions left.
    pub fn drop_idle(&mut self, idle: impl Fn(&str) -> bool) -> Vec<String> {
        let gone: Vec<String> =
            self.entries.iter().filter(|(n, e)| e.departed && idle(n)).map(|(n, _)| n.clone()).collect();
        for name in &gone {
            self.entries.remove(name);
        }
        gone
    }

    /// Every member pglb serves (departed ones still draining included).
    pub fn addresses(&self) -> Vec<MemberAddress> {
        self.entries.values().map(|e| e.address.clone()).collect()
    }

    /// Each member, its last listing and whether it departed.
    pub fn members(&self) -> impl Iterator<Item = (&Member, bool)> {
        self.entries.values().map(|e| (&e.member, e.departed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, port: u16) -> Member {
        Member {
            name: name.into(),
            role: "replica".into(),
            state: "streaming".into(),
            api_url: None,
            host: Some("127.0.0.1".into()),
            port: Some(port),
            timeline: Some(1),
            lag: Some(0),
            tags: Default::default(),
        }
    }

    #[test]
    fn no_more_than_max_members_are_taken() {
        let mut roster = Roster::default();
        let many: Vec<Member> = (0..MAX_MEMBERS + 3).map(|i| member(&format!("m{i:04}"), 1000 + i as u16)).collect();
        let changes = roster.answer(&many, Instant::now(), Duration::from_secs(10), None);
        assert_eq!((changes.joined.len(), changes.over_limit.len()), (MAX_MEMBERS, 3));
        assert_eq!(roster.addresses().len(), MAX_MEMBERS);
    }

    #[test]
    fn a_member_missing_from_answers_departs_only_after_remove_after_and_never_as_primary() {
        let mut roster = Roster::default();
        let start = Instant::now();
        let after = Duration::from_secs(10);
        let all = [member("pg1", 5432), member("pg2", 5433)];
        assert_eq!(roster.answer(&all, start, after, Some("pg1")).joined, ["pg1", "pg2"]);
        // One answer without either, however late (the API was down for
        // long): nothing departs yet.
        let t = start + Duration::from_secs(300);
        assert!(roster.answer(&[], t, after, Some("pg1")).departed.is_empty());
        // Missing for remove_after: the replica departs, the primary stays.
        let t = start + Duration::from_secs(310);
        assert_eq!(roster.answer(&[], t, after, Some("pg1")).departed, ["pg2"]);
        assert_eq!(roster.addresses().len(), 2, "a departed member drains before it goes");
        // Back in the list: returned, not departed.
        let t = start + Duration::from_secs(312);
        assert_eq!(roster.answer(&all[1..], t, after, Some("pg1")).returned, ["pg2"]);
        assert!(roster.drop_idle(|_| true).is_empty(), "nothing departed now");
        let t = start + Duration::from_secs(320);
        roster.answer(&all[..1], t, after, Some("pg1"));
        let t = start + Duration::from_secs(330);
        roster.answer(&all[..1], t, after, Some("pg1"));
        assert_eq!(roster.drop_idle(|n| n == "pg2"), ["pg2"]);
        assert_eq!(roster.addresses().iter().map(|a| a.name.as_str()).collect::<Vec<_>>(), ["pg1"]);
    }
}
