//! The planner before indexing (2c14c36), for `tests/equivalence.rs`.
#![allow(dead_code)]

pub mod job;
pub mod plan;
pub mod resources;

use std::collections::BTreeMap;

use mesh_planner::{Cluster, Plan, Resources, Service, SlotPlacement};

/// The plans of every service, as one orchestration pass carries them out: in name order,
/// each placed beside the reservations of the tasks the services before it start. Planned
/// one by one from the same view, two services could each take the last room on a node;
/// every node plans them in the same order from the same view, so every node agrees which
/// one got it. Plans come back in the order of `services`.
pub fn plan_all(cluster: &Cluster, services: &[Service]) -> Vec<Plan> {
    let mut order: Vec<usize> = (0..services.len()).collect();
    order.sort_by_key(|&i| (services[i].name, i));
    let mut starting: BTreeMap<String, Resources> = BTreeMap::new();
    let mut plans: Vec<Option<Plan>> = vec![None; services.len()];
    for i in order {
        let service = &services[i];
        let plan = plan_beside(cluster, service, &starting);
        if !service.reservation.is_zero() {
            for s in &plan.slots {
                if let SlotPlacement::Start { node } = &s.placement {
                    let r = starting.entry(node.clone()).or_default();
                    *r = r.saturating_add(service.reservation);
                }
            }
        }
        plans[i] = Some(plan);
    }
    plans
        .into_iter()
        .map(|p| p.expect("every service planned"))
        .collect()
}

/// [`plan`] with `starting` reserved on top of the view's live tasks.
fn plan_beside(
    cluster: &Cluster,
    service: &Service,
    starting: &BTreeMap<String, Resources>,
) -> Plan {
    if service.mode.is_job() {
        job::plan(cluster, service, starting)
    } else {
        plan::plan_service(cluster, service, starting)
    }
}
