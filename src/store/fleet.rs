//! The daemons sharing one store (PostgreSQL) as each of them sees it at an
//! ownership round, and the rebalancing rule: a daemon holding more than its
//! share hands one account at a time to a live daemon that is configured
//! for it and holds less than its share (docs/postgres.md, "Which daemon
//! takes which account").

use std::collections::{BTreeMap, BTreeSet};

/// One live daemon: it renewed its registration within the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetMember {
    /// Its owner id (PostgreSQL: `outbox_account_state.lease_owner`).
    pub id: String,
    /// The accounts it is configured for.
    pub accounts: BTreeSet<String>,
    /// How many accounts it holds now (unexpired leases), plus those
    /// reserved for it by a daemon handing them over.
    pub held: usize,
}

/// The live daemons, this one (`me`) included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fleet {
    pub me: String,
    pub members: Vec<FleetMember>,
}

impl Fleet {
    /// The fair share: ceil(accounts configured by any live daemon / live
    /// daemons), at least 1.
    pub fn share(&self) -> usize {
        let accounts: BTreeSet<&String> = self
            .members
            .iter()
            .flat_map(|m| m.accounts.iter())
            .collect();
        let daemons = self.members.len().max(1);
        accounts.len().div_ceil(daemons).max(1)
    }

    /// One account of `held` (this daemon's) to hand over, and to whom:
    /// only when this daemon holds more than its share, the first account
    /// (in name order) that another live daemon is configured for while it
    /// holds less than its share; that daemon is the one holding fewest
    /// (then the lowest id). None when balanced or nobody can take one.
    pub fn one_to_give(&self, held: &BTreeSet<String>) -> Option<(String, String)> {
        let share = self.share();
        if held.len() <= share {
            return None;
        }
        let takers: BTreeMap<(usize, &str), &FleetMember> = self
            .members
            .iter()
            .filter(|m| m.id != self.me && m.held < share)
            .map(|m| ((m.held, m.id.as_str()), m))
            .collect();
        held.iter().find_map(|account| {
            takers
                .values()
                .find(|m| m.accounts.contains(account))
                .map(|m| (account.clone(), m.id.clone()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, accounts: &[&str], held: usize) -> FleetMember {
        FleetMember {
            id: id.into(),
            accounts: accounts.iter().map(|a| (*a).to_owned()).collect(),
            held,
        }
    }

    fn set(accounts: &[&str]) -> BTreeSet<String> {
        accounts.iter().map(|a| (*a).to_owned()).collect()
    }

    const FOUR: [&str; 4] = ["a", "b", "c", "d"];

    #[test]
    fn a_daemon_above_its_share_gives_one_account_to_the_emptiest_daemon_configured_for_it() {
        let fleet = Fleet {
            me: "A".into(),
            members: vec![member("A", &FOUR, 4), member("B", &FOUR, 0)],
        };
        assert_eq!(fleet.share(), 2);
        assert_eq!(
            fleet.one_to_give(&set(&FOUR)),
            Some(("a".into(), "B".into()))
        );
        // At its share: nothing.
        assert_eq!(fleet.one_to_give(&set(&["c", "d"])), None);
        // Three daemons, four accounts: share 2; 2/1/1 is balanced.
        let fleet = Fleet {
            me: "A".into(),
            members: vec![
                member("A", &FOUR, 3),
                member("B", &FOUR, 1),
                member("C", &FOUR, 0),
            ],
        };
        assert_eq!(
            fleet.one_to_give(&set(&["a", "b", "c"])),
            Some(("a".into(), "C".into()))
        );
    }

    #[test]
    fn accounts_go_only_to_a_daemon_configured_for_them_and_below_its_share() {
        // B is configured for `d` only: only `d` may go to it.
        let fleet = Fleet {
            me: "A".into(),
            members: vec![member("A", &FOUR, 4), member("B", &["d"], 0)],
        };
        assert_eq!(
            fleet.one_to_give(&set(&FOUR)),
            Some(("d".into(), "B".into()))
        );
        // B holds its share already.
        let fleet = Fleet {
            me: "A".into(),
            members: vec![member("A", &FOUR, 3), member("B", &["d"], 2)],
        };
        assert_eq!(fleet.one_to_give(&set(&["a", "b", "c"])), None);
        // Alone: the share is everything.
        let fleet = Fleet {
            me: "A".into(),
            members: vec![member("A", &FOUR, 4)],
        };
        assert_eq!(fleet.share(), 4);
        assert_eq!(fleet.one_to_give(&set(&FOUR)), None);
    }
}
