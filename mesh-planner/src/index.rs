//! The cluster indexed once per planning pass: 10,000 services over 1,000 nodes must plan in
//! well under a second, so nothing a service's plan reads may cost a scan of every task or a
//! map of every node per service, nor a string lookup per node per slot.
//!
//! Nodes get positions in name order (the order every plan walks them in, so ties break the
//! same way as by name); what a pass reads per node — capacity, load, reservations — lives in
//! vectors by position, and task records are grouped by service once.

use std::{
    cell::RefCell,
    collections::{BTreeMap, HashMap},
    rc::Rc,
};

use crate::{
    spec::{Constraint, Node, Resources},
    task::Task,
};

pub(crate) struct Index<'a> {
    /// Node names in order; `nodes[i]` is the node named `names[i]` (of two with one name,
    /// the later in the cluster's list, as a map built from it keeps).
    pub(crate) names: Vec<&'a str>,
    pub(crate) nodes: Vec<&'a Node>,
    /// Live tasks on each ready node, of every service: a placement's last tie-breaker.
    pub(crate) load: Vec<usize>,
    /// How many leading bytes every node name shares (`node0` of `node0001`…`node0999`):
    /// a slot's hash of every node goes over them once.
    pub(crate) common_prefix: usize,
    /// Every task record, by service.
    by_service: HashMap<&'a str, Vec<&'a Task>>,
    /// The eligible nodes of each (driver, constraints) asked for so far.
    pub(crate) eligible: RefCell<Vec<Known>>,
}

/// A driver and constraints, and the positions of the nodes eligible under them.
pub(crate) type Known = (String, Vec<Constraint>, Rc<Vec<usize>>);

impl<'a> Index<'a> {
    pub(crate) fn new(list: &'a [Node], tasks: &'a [Task]) -> Self {
        let by_name: BTreeMap<&'a str, &'a Node> =
            list.iter().map(|n| (n.name.as_str(), n)).collect();
        let (names, nodes): (Vec<&str>, Vec<&Node>) = by_name.into_iter().unzip();
        // Sorted: what the first and the last share, all share.
        let common_prefix = match (names.first(), names.last()) {
            (Some(a), Some(b)) => a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count(),
            _ => 0,
        };
        let mut index = Self {
            load: vec![0; names.len()],
            common_prefix,
            names,
            nodes,
            by_service: HashMap::new(),
            eligible: RefCell::default(),
        };
        for t in tasks {
            index
                .by_service
                .entry(t.service.as_str())
                .or_default()
                .push(t);
            if t.is_live()
                && let Some(i) = index.ready_position(&t.node)
            {
                index.load[i] += 1;
            }
        }
        index
    }

    pub(crate) fn position(&self, name: &str) -> Option<usize> {
        self.names.binary_search(&name).ok()
    }

    pub(crate) fn node(&self, name: &str) -> Option<&'a Node> {
        self.position(name).map(|i| self.nodes[i])
    }

    /// The position of a ready node.
    pub(crate) fn ready_position(&self, name: &str) -> Option<usize> {
        self.position(name).filter(|&i| self.nodes[i].ready)
    }

    pub(crate) fn ready(&self, name: &str) -> bool {
        self.ready_position(name).is_some()
    }

    /// Every task record of the service, in the cluster's order.
    pub(crate) fn tasks_of(&self, service: &str) -> &[&'a Task] {
        self.by_service.get(service).map_or(&[], Vec::as_slice)
    }

    /// What each node's live tasks reserve, by position.
    pub(crate) fn reserved(&self, tasks: &[Task]) -> Vec<Resources> {
        let mut used = vec![Resources::default(); self.names.len()];
        for t in tasks
            .iter()
            .filter(|t| t.is_live() && !t.reservation.is_zero())
        {
            if let Some(i) = self.position(&t.node) {
                used[i] = used[i].saturating_add(t.reservation);
            }
        }
        used
    }
}
