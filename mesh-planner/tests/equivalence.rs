//! The indexed planner against the planner before indexing (`reference/`, the code as it
//! was at 2c14c36): on random clusters of several services — replicated, global and jobs,
//! with constraints, spread, per-node limits, reservations, duplicates, outdated and
//! finished tasks — every plan is the same, slot for slot, stop for stop, word for word.
//! Indexing is a change of speed only: agents of both versions in one cluster place alike.

mod common;
mod reference;

use common::*;
use mesh_planner::{
    Cluster, DesiredState, Node, Placement, Resources, Service, ServiceMode, Slot, Task, TaskState,
    UpdateConfig, UpdateOrder, plan, plan_all,
};
use proptest::prelude::*;

const UNIT: u64 = 64 << 20;
const SERVICES: [&str; 4] = ["a", "b", "c", "d"];

fn capacity() -> impl Strategy<Value = Resources> {
    (
        prop_oneof![1 => Just(0u64), 4 => 1u64..=8],
        prop_oneof![1 => Just(0u64), 4 => 1u64..=16],
    )
        .prop_map(|(halves, units)| Resources {
            nano_cpus: halves * 500_000_000,
            memory_bytes: units * UNIT,
        })
}

fn reservation() -> impl Strategy<Value = Resources> {
    prop_oneof![
        2 => Just(Resources::default()),
        3 => (0u64..=4, 0u64..=6).prop_map(|(halves, units)| Resources {
            nano_cpus: halves * 500_000_000,
            memory_bytes: units * UNIT,
        }),
    ]
}

fn nodes() -> impl Strategy<Value = Vec<Node>> {
    prop::collection::vec(
        (
            prop::bool::weighted(0.85),
            prop::bool::weighted(0.85),
            prop::bool::weighted(0.9),
            prop::option::of(prop::sample::select(vec!["a", "b", "c"])),
            capacity(),
        ),
        1..=8,
    )
    .prop_map(|specs| {
        specs
            .into_iter()
            .enumerate()
            .map(|(i, (ready, active, driver, zone, capacity))| {
                let mut n = node(&format!("n{i}"));
                n.ready = ready;
                n.active = active;
                n.capacity = capacity;
                if !driver {
                    n.drivers = vec!["podman".into()];
                }
                if let Some(z) = zone {
                    n.labels.insert("zone".into(), z.into());
                }
                n
            })
            .collect()
    })
}

/// A service's spec, owned (a `Service` borrows its name and placement).
#[derive(Clone, Debug)]
struct Owned {
    name: &'static str,
    mode: ServiceMode,
    placement: Placement,
    template: u64,
    update: UpdateConfig,
    paused: bool,
    reservation: Resources,
}

impl Owned {
    fn service(&self) -> Service<'_> {
        Service {
            name: self.name,
            mode: self.mode,
            placement: &self.placement,
            driver: DRIVER,
            template: self.template,
            update: self.update,
            paused: self.paused,
            reservation: self.reservation,
        }
    }
}

fn services() -> impl Strategy<Value = Vec<Owned>> {
    prop::collection::vec(
        (
            prop_oneof![
                4 => (0u32..=12).prop_map(|replicas| ServiceMode::Replicated { replicas }),
                1 => Just(ServiceMode::Global),
                1 => (0u32..=6, 0u32..=3).prop_map(|(completions, max_concurrent)| {
                    ServiceMode::ReplicatedJob { completions, max_concurrent }
                }),
                1 => Just(ServiceMode::GlobalJob),
            ],
            prop::sample::subsequence(
                vec![
                    "node.labels.zone!=c",
                    "node.hostname!=n1",
                    "node.labels.zone==a",
                ],
                0..=1,
            ),
            prop::sample::subsequence(vec!["spread=node.labels.zone"], 0..=1),
            prop::option::of(0u32..=3),
            1u64..=3,
            (
                0u32..=3,
                any::<bool>(),
                0u64..3_000,
                prop::bool::weighted(0.1),
            ),
            reservation(),
        ),
        1..=4,
    )
    .prop_map(|specs| {
        specs
            .into_iter()
            .zip(SERVICES)
            .map(
                |((mode, constraints, prefs, max, template, update, reservation), name)| {
                    let (parallelism, stop_first, delay_ms, paused) = update;
                    Owned {
                        name,
                        mode,
                        placement: Placement {
                            constraints: constraints.iter().map(|c| c.parse().unwrap()).collect(),
                            preferences: prefs.iter().map(|p| p.parse().unwrap()).collect(),
                            max_replicas_per_node: max,
                        },
                        template,
                        update: UpdateConfig {
                            parallelism,
                            delay_ms,
                            order: if stop_first {
                                UpdateOrder::StopFirst
                            } else {
                                UpdateOrder::StartFirst
                            },
                            ..Default::default()
                        },
                        paused,
                        reservation,
                    }
                },
            )
            .collect()
    })
}

fn tasks() -> impl Strategy<Value = Vec<Task>> {
    prop::collection::vec(
        (
            0..=SERVICES.len(),
            0usize..10,
            prop_oneof![3 => (1u32..=6).prop_map(Some), 2 => (1u32..=14).prop_map(Some), 1 => Just(None)],
            prop::bool::weighted(0.8),
            1u64..=3,
            prop::bool::weighted(0.9),
            prop::sample::select(vec![
                TaskState::New,
                TaskState::Assigned,
                TaskState::Preparing,
                TaskState::Starting,
                TaskState::Running,
                TaskState::Running,
                TaskState::Running,
                TaskState::Complete,
                TaskState::Complete,
                TaskState::Shutdown,
                TaskState::Failed,
                TaskState::Rejected,
            ]),
            (0u64..50, prop::option::of(0u64..3_000)),
            prop::bool::weighted(0.2),
            reservation(),
        ),
        0..=40,
    )
    .prop_map(|specs| {
        specs
            .into_iter()
            .enumerate()
            .map(
                |(
                    i,
                    (service, node, replica, own_node, template, wants, state, times, holds, reserve),
                )| {
                    let node_name = format!("n{node}");
                    let slot = match replica {
                        Some(r) => Slot::Replica(r),
                        None if own_node => Slot::Node(node_name.clone()),
                        None => Slot::Node(format!("n{}", (node + 1) % 10)),
                    };
                    let (created, running) = times;
                    let mut t = task(&format!("t{i}"), slot, &node_name, created);
                    t.service = SERVICES.get(service).copied().unwrap_or("other").into();
                    t.template = template;
                    t.desired = if wants {
                        DesiredState::Running
                    } else {
                        DesiredState::Shutdown
                    };
                    t.state = state;
                    t.running_ms = running;
                    t.holds_slot = holds && state.is_terminal();
                    t.reservation = reserve;
                    t
                },
            )
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn every_plan_is_the_one_the_planner_before_indexing_made(
        nodes in nodes(),
        services in services(),
        tasks in tasks(),
        now_ms in 0u64..4_000,
    ) {
        let cluster = Cluster { nodes: &nodes, tasks: &tasks, now_ms };
        let services: Vec<Service> = services.iter().map(Owned::service).collect();
        prop_assert_eq!(
            plan_all(&cluster, &services),
            reference::plan_all(&cluster, &services)
        );
        for s in &services {
            prop_assert_eq!(
                plan(&cluster, s),
                reference::plan_all(&cluster, std::slice::from_ref(s)).remove(0)
            );
        }
    }
}
