//! Changing what a service's tasks run: rollouts and rollbacks — the parts of `service
//! update` that decide whether and how tasks are replaced.

use mesh_planner::FailureAction;

use super::{Error, Result};
use mesh_api::spec::{ServiceSpec, UpdateState, UpdateStatus};

/// A rollback whose failure action is itself "roll back" would never end.
pub fn check_rollback_config(spec: &ServiceSpec) -> Result<()> {
    if spec.rollback.failure_action == FailureAction::Rollback {
        return Err(Error::Invalid(
            "a rollback's failure action cannot be rollback (it would roll back a rollback): \
             use pause or continue"
                .into(),
        ));
    }
    Ok(())
}

/// A template change: tasks are replaced, and what they ran is kept for a rollback.
pub fn start_rollout(spec: &mut ServiceSpec, current: &ServiceSpec, now_ms: u64) {
    let mut previous = current.clone();
    previous.previous = None;
    previous.update_status = None;
    spec.previous = Some(Box::new(previous));
    spec.template_version = current.version + 1;
    spec.update_status = Some(UpdateStatus {
        state: UpdateState::Updating,
        started_ms: now_ms,
        completed_ms: None,
        message: "update in progress".into(),
    });
}

/// The spec that goes back to `current.previous`, rolled out with `current`'s rollback config.
pub fn rolled_back(current: &ServiceSpec, message: &str, now_ms: u64) -> Option<ServiceSpec> {
    let previous = current.previous.as_ref()?;
    let mut spec = (**previous).clone();
    // Identity and addressing stay: it is the same service.
    spec.name = current.name.clone();
    spec.network = current.network.clone();
    // Aliases too: going back to old ones could take names given to others since.
    spec.aliases = current.aliases.clone();
    spec.networks = current.networks.clone();
    spec.vip = current.vip;
    spec.ports = current.ports.clone();
    spec.rollback = current.rollback;
    let mut before = current.clone();
    before.previous = None;
    before.update_status = None;
    spec.previous = Some(Box::new(before));
    spec.version = current.version;
    spec.template_version = current.version + 1;
    spec.update_status = Some(UpdateStatus {
        state: UpdateState::RollbackStarted,
        started_ms: now_ms,
        completed_ms: None,
        message: message.to_owned(),
    });
    Some(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_api::spec::TaskTemplate;

    #[test]
    fn a_rollback_goes_back_to_the_previous_template_and_replaces_every_task() {
        let v1 = ServiceSpec {
            name: "web".into(),
            version: 1,
            template_version: 1,
            task: Some(TaskTemplate {
                command: vec!["v1".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut v2 = v1.clone();
        v2.task.as_mut().unwrap().command = vec!["v2".into()];
        start_rollout(&mut v2, &v1, 100);
        v2.version = 2;
        assert_eq!(v2.template_version, 2);
        assert_eq!(
            v2.update_status.as_ref().unwrap().state,
            UpdateState::Updating
        );
        let back = rolled_back(&v2, "manually requested rollback", 200).unwrap();
        assert_eq!(back.task.as_ref().unwrap().command, vec!["v1"]);
        assert_eq!(
            back.template_id(),
            v1.template_id(),
            "v1's tasks match again"
        );
        assert_eq!(
            back.update_status.as_ref().unwrap().state,
            UpdateState::RollbackStarted
        );
        assert_eq!(
            back.previous
                .as_ref()
                .unwrap()
                .task
                .as_ref()
                .unwrap()
                .command,
            vec!["v2"]
        );
        assert!(rolled_back(&v1, "x", 0).is_none(), "nothing to go back to");
    }
}
