//! Server-side assignors. Both are sticky: a partition stays with its current
//! target owner while that keeps the group balanced, so a rebalance moves only
//! what it must.

use std::collections::{BTreeMap, BTreeSet};

use super::state::TopicPartition;

/// The assignor a group uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Assignor {
    /// Every subscribed partition of every topic, spread evenly over the members
    /// subscribed to it (round-robin counts, sticky).
    Uniform,
    /// Per topic: members (ordered by id) get contiguous ranges of partitions of
    /// balanced size; sticky where the balance allows.
    Range,
}

impl Assignor {
    /// Parses an assignor name; empty means uniform.
    pub fn parse(name: &str) -> Result<Assignor, String> {
        match name {
            "" | "uniform" => Ok(Assignor::Uniform),
            "range" => Ok(Assignor::Range),
            other => Err(format!(
                "unknown assignor {other:?}; the broker has \"uniform\" and \"range\""
            )),
        }
    }

    /// Its name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Assignor::Uniform => "uniform",
            Assignor::Range => "range",
        }
    }
}

/// What an assignor sees of a member.
pub struct MemberSubscription<'a> {
    /// Member id.
    pub id: &'a str,
    /// Subscribed topics.
    pub topics: &'a [String],
}

/// Computes a target assignment. `partitions` gives each existing topic's
/// partition count; `previous` is the last target (for stickiness). Every member
/// appears in the result (possibly with nothing).
pub fn assign(
    assignor: Assignor,
    members: &[MemberSubscription<'_>],
    partitions: &BTreeMap<String, u32>,
    previous: &BTreeMap<String, BTreeSet<TopicPartition>>,
) -> BTreeMap<String, BTreeSet<TopicPartition>> {
    let mut result: BTreeMap<String, BTreeSet<TopicPartition>> = members
        .iter()
        .map(|member| (member.id.to_owned(), BTreeSet::new()))
        .collect();
    if members.is_empty() {
        return result;
    }
    let owner_before: BTreeMap<&TopicPartition, &str> = previous
        .iter()
        .flat_map(|(member, set)| set.iter().map(move |tp| (tp, member.as_str())))
        .collect();
    match assignor {
        Assignor::Uniform => uniform(members, partitions, &owner_before, &mut result),
        Assignor::Range => range(members, partitions, &owner_before, &mut result),
    }
    result
}

fn subscribed(member: &MemberSubscription<'_>, topic: &str) -> bool {
    member.topics.iter().any(|t| t == topic)
}

fn uniform(
    members: &[MemberSubscription<'_>],
    partitions: &BTreeMap<String, u32>,
    owner_before: &BTreeMap<&TopicPartition, &str>,
    result: &mut BTreeMap<String, BTreeSet<TopicPartition>>,
) {
    let all: Vec<TopicPartition> = partitions
        .iter()
        .filter(|(topic, _)| members.iter().any(|m| subscribed(m, topic)))
        .flat_map(|(topic, count)| (0..*count).map(move |p| (topic.clone(), p)))
        .collect();
    let total = all.len();
    let base = total / members.len();
    let mut extra = total % members.len();
    let mut counts: BTreeMap<&str, usize> = members.iter().map(|m| (m.id, 0)).collect();
    let eligible = |tp: &TopicPartition, id: &str| {
        members
            .iter()
            .any(|member| member.id == id && subscribed(member, &tp.0))
    };
    let mut unassigned = Vec::new();
    // Keep what each member had, up to its fair share (base, or base + 1 for as
    // many members as there are leftover partitions).
    for tp in &all {
        let kept = owner_before.get(tp).copied().filter(|owner| {
            let Some(count) = counts.get(owner) else {
                return false;
            };
            eligible(tp, owner) && (*count < base || (*count == base && extra > 0))
        });
        match kept {
            Some(owner) => {
                let count = counts.get_mut(owner).expect("counted member");
                if *count == base {
                    extra -= 1;
                }
                *count += 1;
                result
                    .get_mut(owner)
                    .expect("every member has a set")
                    .insert(tp.clone());
            }
            None => unassigned.push(tp.clone()),
        }
    }
    // Give the rest to the least loaded member subscribed to the topic.
    for tp in unassigned {
        let chosen = members
            .iter()
            .filter(|member| subscribed(member, &tp.0))
            .min_by_key(|member| (counts[member.id], member.id))
            .map(|member| member.id);
        if let Some(id) = chosen {
            *counts.get_mut(id).expect("counted member") += 1;
            result
                .get_mut(id)
                .expect("every member has a set")
                .insert(tp);
        }
    }
}

fn range(
    members: &[MemberSubscription<'_>],
    partitions: &BTreeMap<String, u32>,
    owner_before: &BTreeMap<&TopicPartition, &str>,
    result: &mut BTreeMap<String, BTreeSet<TopicPartition>>,
) {
    for (topic, count) in partitions {
        let mut subscribers: Vec<&str> = members
            .iter()
            .filter(|member| subscribed(member, topic))
            .map(|member| member.id)
            .collect();
        if subscribers.is_empty() {
            continue;
        }
        subscribers.sort_unstable();
        let n = *count as usize;
        let quota: BTreeMap<&str, usize> = subscribers
            .iter()
            .enumerate()
            .map(|(i, id)| {
                (
                    *id,
                    n / subscribers.len() + usize::from(i < n % subscribers.len()),
                )
            })
            .collect();
        let mut counts: BTreeMap<&str, usize> = subscribers.iter().map(|id| (*id, 0)).collect();
        let mut unassigned = Vec::new();
        for p in 0..*count {
            let tp = (topic.clone(), p);
            let kept = owner_before
                .get(&tp)
                .copied()
                .filter(|owner| counts.get(owner).is_some_and(|c| *c < quota[owner]));
            match kept {
                Some(owner) => {
                    *counts.get_mut(owner).expect("counted") += 1;
                    result.get_mut(owner).expect("member set").insert(tp);
                }
                None => unassigned.push(tp),
            }
        }
        // Fill in partition order, members in id order: with no history this gives
        // each member one contiguous range.
        let mut members_in_order = subscribers.iter();
        let mut current = members_in_order.next();
        for tp in unassigned {
            while let Some(id) = current {
                if counts[id] < quota[id] {
                    break;
                }
                current = members_in_order.next();
            }
            let Some(id) = current else { break };
            *counts.get_mut(id).expect("counted") += 1;
            result.get_mut(*id).expect("member set").insert(tp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subs<'a>(ids: &'a [&'a str], topics: &'a [String]) -> Vec<MemberSubscription<'a>> {
        ids.iter()
            .map(|id| MemberSubscription { id, topics })
            .collect()
    }

    fn owners(
        target: &BTreeMap<String, BTreeSet<TopicPartition>>,
    ) -> BTreeMap<TopicPartition, String> {
        let mut owners = BTreeMap::new();
        for (member, set) in target {
            for tp in set {
                assert!(
                    owners.insert(tp.clone(), member.clone()).is_none(),
                    "{tp:?} assigned twice"
                );
            }
        }
        owners
    }

    #[test]
    fn both_assignors_cover_every_partition_once_and_balance() {
        let topics = vec!["orders".to_string()];
        let partitions = BTreeMap::from([("orders".to_string(), 6)]);
        for assignor in [Assignor::Uniform, Assignor::Range] {
            let target = assign(
                assignor,
                &subs(&["a", "b", "c"], &topics),
                &partitions,
                &BTreeMap::new(),
            );
            assert_eq!(owners(&target).len(), 6);
            assert!(target.values().all(|set| set.len() == 2), "{target:?}");
        }
    }

    #[test]
    fn a_joining_member_takes_only_what_balance_requires() {
        let topics = vec!["orders".to_string()];
        let partitions = BTreeMap::from([("orders".to_string(), 6)]);
        for assignor in [Assignor::Uniform, Assignor::Range] {
            let before = assign(
                assignor,
                &subs(&["a", "b", "c"], &topics),
                &partitions,
                &BTreeMap::new(),
            );
            let after = assign(
                assignor,
                &subs(&["a", "b", "c", "d"], &topics),
                &partitions,
                &before,
            );
            let (old, new) = (owners(&before), owners(&after));
            assert_eq!(new.len(), 6);
            let moved = old.iter().filter(|(tp, owner)| new[*tp] != **owner).count();
            assert!(
                moved <= 2,
                "{assignor:?} moved {moved}: {before:?} -> {after:?}"
            );
            let sizes: Vec<usize> = after.values().map(BTreeSet::len).collect();
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
        }
    }

    #[test]
    fn members_get_only_topics_they_subscribe_to() {
        let a_topics = vec!["x".to_string()];
        let b_topics = vec!["x".to_string(), "y".to_string()];
        let members = vec![
            MemberSubscription {
                id: "a",
                topics: &a_topics,
            },
            MemberSubscription {
                id: "b",
                topics: &b_topics,
            },
        ];
        let partitions = BTreeMap::from([("x".to_string(), 2), ("y".to_string(), 2)]);
        for assignor in [Assignor::Uniform, Assignor::Range] {
            let target = assign(assignor, &members, &partitions, &BTreeMap::new());
            assert!(target["a"].iter().all(|(topic, _)| topic == "x"));
            assert_eq!(owners(&target).len(), 4);
        }
    }

    #[test]
    fn range_gives_contiguous_ranges_without_history() {
        let topics = vec!["t".to_string()];
        let partitions = BTreeMap::from([("t".to_string(), 5)]);
        let target = assign(
            Assignor::Range,
            &subs(&["a", "b"], &topics),
            &partitions,
            &BTreeMap::new(),
        );
        let a: Vec<u32> = target["a"].iter().map(|tp| tp.1).collect();
        let b: Vec<u32> = target["b"].iter().map(|tp| tp.1).collect();
        assert_eq!((a, b), (vec![0, 1, 2], vec![3, 4]));
    }
}
