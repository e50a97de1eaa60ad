//! The whole cluster at a glance, as this node's view has it: nodes, services and the tasks
//! on each node. One derivation for the UI page and for /metrics, so the wall screen and
//! the dashboards never disagree. Read-only: nothing here writes to gossip.

use crate::{
    agent::Agent,
    answers::{node_info, service_info, service_tasks},
    cluster::View,
};
use mesh_api::v1::Overview;
use mesh_api::v1::ServiceSummary;
use mesh_api::v1::TaskCard;
use mesh_api::v1::UpdateProgress;

pub fn overview(agent: &Agent, view: &View) -> Overview {
    let nodes = view
        .nodes
        .keys()
        .filter_map(|n| node_info(agent, view, n))
        .collect();
    let mut services = Vec::new();
    let mut tasks = Vec::new();
    for name in view.services.keys() {
        let Some(info) = service_info(view, name) else {
            continue;
        };
        let spec_version = info.spec.template_version;
        let scheduled = info.desired.is_some();
        let rows = if scheduled {
            service_tasks(view, name)
        } else {
            Vec::new()
        };
        let (mut updated, mut outdated) = (0, 0);
        for r in rows.iter().filter(|r| !r.history && r.desired == "Running") {
            let Some(node) = &r.node else { continue };
            if r.state == "Orphaned" {
                continue;
            }
            if r.updated {
                updated += 1;
            } else {
                outdated += 1;
            }
            let backend = view
                .backends(name)
                .find(|e| e.node == *node && e.record.task.ends_with(&format!(".{}", r.id)))
                .map(|e| if e.active { "active" } else { "draining" }.to_owned());
            tasks.push(card(name, node, r, backend));
        }
        // Orphaned and stopping tasks are shown too (a node failure must be visible), but
        // count toward no update progress.
        for r in rows.iter().filter(|r| !r.history) {
            let Some(node) = &r.node else { continue };
            if r.desired == "Running" && r.state != "Orphaned" {
                continue;
            }
            tasks.push(card(name, node, r, None));
        }
        if !scheduled {
            for e in view.backends(name) {
                tasks.push(TaskCard {
                    id: String::new(),
                    name: e.record.task.clone(),
                    service: name.clone(),
                    slot: e.record.task.clone(),
                    node: e.node.clone(),
                    state: "Running".into(),
                    desired: "Running".into(),
                    since_ms: 0,
                    spec_version,
                    error: None,
                    health: None,
                    backend: Some(if e.active { "active" } else { "draining" }.into()),
                });
            }
        }
        let update = info.spec.update_status.clone();
        services.push(ServiceSummary {
            name: name.clone(),
            id: info.id,
            mode: info.mode.name().to_ascii_lowercase(),
            running: info.running,
            desired: info.desired,
            ports: info.ports.iter().map(ToString::to_string).collect(),
            vip: info.vip,
            network: info.network,
            spec_version,
            update: update.map(|u| UpdateProgress {
                state: u.state,
                message: u.message,
                updated,
                outdated,
            }),
            pending: info.pending,
        });
    }
    tasks.sort_by(|a, b| (&a.node, &a.service, &a.slot).cmp(&(&b.node, &b.service, &b.slot)));
    Overview {
        cluster: agent.config.cluster.clone(),
        node: agent.node_name().to_owned(),
        time_ms: crate::cluster::Clock::now_ms(),
        nodes,
        services,
        tasks,
    }
}

fn card(
    service: &str,
    node: &str,
    r: &mesh_api::v1::ServiceTaskInfo,
    backend: Option<String>,
) -> TaskCard {
    TaskCard {
        id: r.id.clone(),
        name: r.name.clone(),
        service: service.to_owned(),
        slot: r.slot.clone(),
        node: node.to_owned(),
        state: r.state.clone(),
        desired: r.desired.clone(),
        since_ms: r.since_ms,
        spec_version: r.spec_version,
        error: r.error.clone(),
        health: None,
        backend,
    }
}
