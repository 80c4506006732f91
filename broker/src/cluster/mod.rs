//! The cluster: which nodes exist, who leads which group, and the controller that
//! owns the cluster's metadata.
//!
//! - [`ClusterConfig`]: this node's id and every node's peer address, from the
//!   command line (`--node-id`, `--peer-listen`, `--peers`).
//! - [`ClusterView`]: shared by the node's shards. What each local replica knows of
//!   its group (leader, term, high watermark), merged with what other nodes gossip
//!   about the groups they lead, and the client address of every node. Metadata
//!   answers and `NotLeader` hints come from here; it is advice, not truth: the
//!   Raft group decides, and a client that follows a stale hint gets `NotLeader`
//!   again with a newer one.
//! - `controller`: the controller group's state machine (topics and their
//!   replicas), applied on every node in the same order.

pub mod controller;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::partition::GroupId;
use crate::types::NodeId;

/// Nodes in a cluster, at most.
pub const NODES_MAX: usize = 9;
/// A peer not heard from for this long is shown as down.
pub const PEER_ALIVE_WINDOW: Duration = Duration::from_secs(3);

/// This node's place in the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    /// This node.
    pub node: NodeId,
    /// Where this node listens for peers.
    pub peer_listen: SocketAddr,
    /// Every node's peer address (this node's included).
    pub peers: BTreeMap<NodeId, String>,
}

impl ClusterConfig {
    /// Parses `--peers 1=host:port,2=host:port,...` for node `node`.
    pub fn new(
        node: NodeId,
        peer_listen: SocketAddr,
        peers: &str,
    ) -> Result<ClusterConfig, String> {
        let mut parsed = BTreeMap::new();
        for item in peers.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (id, addr) = item
                .split_once('=')
                .ok_or_else(|| format!("--peers: '{item}' is not ID=HOST:PORT"))?;
            let id: u32 = id
                .trim()
                .parse()
                .map_err(|_| format!("--peers: node id '{id}' is not a number"))?;
            if id == 0 {
                return Err("--peers: node ids start at 1".into());
            }
            let addr = addr.trim();
            if addr
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
            {
                return Err(format!("--peers: '{addr}' is not HOST:PORT"));
            }
            if parsed.insert(NodeId(id), addr.to_string()).is_some() {
                return Err(format!("--peers: node {id} is listed twice"));
            }
        }
        if parsed.is_empty() {
            return Err("--peers lists no node".into());
        }
        if parsed.len() > NODES_MAX {
            return Err(format!(
                "--peers lists {} nodes; at most {NODES_MAX}",
                parsed.len()
            ));
        }
        if !parsed.contains_key(&node) {
            return Err(format!(
                "--peers does not list this node ({node}); list every node, this one included"
            ));
        }
        Ok(ClusterConfig {
            node,
            peer_listen,
            peers: parsed,
        })
    }

    /// The peer list in its canonical form (nodes compare it in their Hello).
    pub fn peers_string(&self) -> String {
        self.peers
            .iter()
            .map(|(id, addr)| format!("{id}={addr}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every node id, ascending.
    pub fn node_ids(&self) -> Vec<NodeId> {
        self.peers.keys().copied().collect()
    }
}

/// What is known of a group's leadership.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderInfo {
    /// The leader, if known.
    pub leader: Option<NodeId>,
    /// Its term (the leader epoch).
    pub term: u64,
    /// High watermark, as the leader last said.
    pub high_watermark: u64,
    /// Log start offset, as the leader last said.
    pub log_start: u64,
    /// Voters caught up with the commit index (as the leader last said).
    pub in_sync: u16,
    /// Which voters are in sync: bit i for the i-th voter in ascending node id
    /// order.
    pub in_sync_mask: u8,
    /// Voters.
    pub voters: u16,
    /// The shard of the reporting node that holds the replica.
    pub shard: u16,
}

/// How to reach a node's clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeAddress {
    /// Host clients connect to.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Shards (connections a shard-aware client opens).
    pub shard_count: u16,
}

/// The node's shared picture of the cluster (see the module doc).
pub struct ClusterView {
    /// Static configuration.
    pub config: ClusterConfig,
    groups: Mutex<HashMap<GroupId, LeaderInfo>>,
    nodes: Mutex<BTreeMap<NodeId, (NodeAddress, Instant)>>,
}

impl ClusterView {
    /// A view with only this node's own address known.
    pub fn new(config: ClusterConfig, own: NodeAddress) -> ClusterView {
        let mut nodes = BTreeMap::new();
        nodes.insert(config.node, (own, Instant::now()));
        ClusterView {
            config,
            groups: Mutex::new(HashMap::new()),
            nodes: Mutex::new(nodes),
        }
    }

    fn groups(&self) -> std::sync::MutexGuard<'_, HashMap<GroupId, LeaderInfo>> {
        self.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn nodes_lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<NodeId, (NodeAddress, Instant)>> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What a local replica knows of its group. A leader's own word replaces
    /// anything of its term or older.
    pub fn observe(&self, group: GroupId, info: LeaderInfo, is_leader: bool) {
        let mut groups = self.groups();
        let Some(entry) = groups.get_mut(&group) else {
            groups.insert(group, info);
            return;
        };
        if info.term > entry.term || (info.term == entry.term && is_leader) {
            *entry = info;
        } else if info.term == entry.term && entry.leader.is_none() {
            // A follower learned its term's leader; the numbers stay the leader's.
            entry.leader = info.leader;
        }
    }

    /// What another node says about a group it leads.
    pub fn hint(&self, group: GroupId, info: LeaderInfo) {
        let mut groups = self.groups();
        match groups.get_mut(&group) {
            Some(entry) if info.term < entry.term => {}
            Some(entry) => *entry = info,
            None => {
                groups.insert(group, info);
            }
        }
    }

    /// A group's leadership as known here.
    pub fn info(&self, group: GroupId) -> Option<LeaderInfo> {
        self.groups().get(&group).cloned()
    }

    /// The group's leader as known here.
    pub fn leader_of(&self, group: GroupId) -> Option<NodeId> {
        self.groups().get(&group).and_then(|i| i.leader)
    }

    /// Groups `node` leads, as known here (for gossip and status).
    pub fn led_by(&self, node: NodeId) -> Vec<(GroupId, LeaderInfo)> {
        self.groups()
            .iter()
            .filter(|(_, info)| info.leader == Some(node))
            .map(|(group, info)| (*group, info.clone()))
            .collect()
    }

    /// Forgets a group (its topic was deleted).
    pub fn forget(&self, group: GroupId) {
        self.groups().remove(&group);
    }

    /// Records a node's client address (from its Hello) and that it is alive.
    pub fn node_seen(&self, node: NodeId, address: Option<NodeAddress>) {
        let mut nodes = self.nodes_lock();
        match (nodes.get_mut(&node), address) {
            (Some(entry), Some(address)) => *entry = (address, Instant::now()),
            (Some(entry), None) => entry.1 = Instant::now(),
            (None, Some(address)) => {
                nodes.insert(node, (address, Instant::now()));
            }
            (None, None) => {}
        }
    }

    /// A node's client address, if known.
    pub fn node_address(&self, node: NodeId) -> Option<NodeAddress> {
        self.nodes_lock().get(&node).map(|(a, _)| a.clone())
    }

    /// Every node with its client address (if known) and whether it was heard
    /// from recently (this node always is).
    pub fn nodes(&self) -> Vec<(NodeId, Option<NodeAddress>, bool)> {
        let nodes = self.nodes_lock();
        self.config
            .node_ids()
            .into_iter()
            .map(|id| {
                let known = nodes.get(&id);
                let alive = id == self.config.node
                    || known.is_some_and(|(_, seen)| seen.elapsed() < PEER_ALIVE_WINDOW);
                (id, known.map(|(a, _)| a.clone()), alive)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_parsed_and_checked() {
        let listen: SocketAddr = "127.0.0.1:9500".parse().unwrap();
        let config = ClusterConfig::new(NodeId(2), listen, "1=a:1, 2=b:2,3=c:3").unwrap();
        assert_eq!(config.peers_string(), "1=a:1,2=b:2,3=c:3");
        assert!(ClusterConfig::new(NodeId(4), listen, "1=a:1").is_err());
        assert!(ClusterConfig::new(NodeId(1), listen, "1=a:1,1=b:2").is_err());
        assert!(ClusterConfig::new(NodeId(1), listen, "1=a").is_err());
        assert!(ClusterConfig::new(NodeId(1), listen, "0=a:1").is_err());
    }

    #[test]
    fn newer_terms_win_and_stale_hints_are_ignored() {
        let listen: SocketAddr = "127.0.0.1:9500".parse().unwrap();
        let config = ClusterConfig::new(NodeId(1), listen, "1=a:1,2=b:2").unwrap();
        let own = NodeAddress {
            host: "h".into(),
            port: 1,
            shard_count: 1,
        };
        let view = ClusterView::new(config, own);
        let group = GroupId::partition(1, 0);
        let info = |leader: u32, term: u64| LeaderInfo {
            leader: Some(NodeId(leader)),
            term,
            high_watermark: term * 10,
            log_start: 0,
            in_sync: 2,
            in_sync_mask: 0b11,
            voters: 2,
            shard: 0,
        };
        view.hint(group, info(2, 3));
        assert_eq!(view.leader_of(group), Some(NodeId(2)));
        view.hint(group, info(1, 2));
        assert_eq!(
            view.leader_of(group),
            Some(NodeId(2)),
            "an older term is ignored"
        );
        view.observe(group, info(1, 4), true);
        assert_eq!(view.leader_of(group), Some(NodeId(1)));
        assert_eq!(view.led_by(NodeId(1)).len(), 1);
    }
}
