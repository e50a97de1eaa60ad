//! Where a plan starts: services and jobs are planned by their own rules, and one pass plans
//! every service so reservations are shared out the same way on every node.

use crate::{
    index::Index,
    job,
    plan::{Cluster, Plan, Service, Usage, plan_service},
};

/// The plan of one service, from the view alone.
pub fn plan(cluster: &Cluster, service: &Service) -> Plan {
    let index = Index::new(cluster.nodes, cluster.tasks);
    let mut usage = Usage::new(index.reserved(cluster.tasks));
    plan_beside(cluster, &index, service, &mut usage)
}

/// The plans of every service, as one orchestration pass carries them out: in name order,
/// each placed beside the reservations of the tasks the services before it start. Planned
/// one by one from the same view, two services could each take the last room on a node;
/// every node plans them in the same order from the same view, so every node agrees which
/// one got it. Plans come back in the order of `services`.
pub fn plan_all(cluster: &Cluster, services: &[Service]) -> Vec<Plan> {
    let mut order: Vec<usize> = (0..services.len()).collect();
    order.sort_by_key(|&i| (services[i].name, i));
    // Indexed once for every service: each service's starts are added to the usage as they
    // are placed, so the next is placed beside them.
    let index = Index::new(cluster.nodes, cluster.tasks);
    let mut usage = Usage::new(index.reserved(cluster.tasks));
    let mut plans: Vec<Option<Plan>> = vec![None; services.len()];
    for i in order {
        plans[i] = Some(plan_beside(cluster, &index, &services[i], &mut usage));
    }
    plans
        .into_iter()
        .map(|p| p.expect("every service planned"))
        .collect()
}

/// [`plan`] beside `usage` (the view's live tasks and what this pass started so far),
/// adding the service's starts to it.
fn plan_beside(cluster: &Cluster, index: &Index, service: &Service, usage: &mut Usage) -> Plan {
    if service.mode.is_job() {
        job::plan(cluster, index, service, usage)
    } else {
        plan_service(cluster, index, service, usage)
    }
}
