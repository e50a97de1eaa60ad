//! A service's networks and aliases: how an update changes them, and what every spec must
//! satisfy — aliases are DNS names, unique on their network among services' names and
//! aliases, so a name on a network always means one service.

use mesh_api::{
    spec::{NetworkAttachment, ServiceSpec, validate_name},
    v1::ServiceUpdate,
};

use super::{Error, Result};
use crate::cluster::View;

/// Aliases are names DNS answers: the rules of a service name, each once per network.
pub(super) fn check_aliases(spec: &ServiceSpec) -> Result<()> {
    for a in spec.attachments() {
        for (i, alias) in a.aliases.iter().enumerate() {
            validate_name("network alias", alias).map_err(Error::Invalid)?;
            if a.aliases[..i].contains(alias) {
                return Err(Error::Invalid(format!(
                    "network alias {alias} is given twice on network {}: list it once",
                    a.target
                )));
            }
        }
    }
    Ok(())
}

/// A name on a network must mean one service: none of `spec`'s names (its own and its
/// aliases) may be another service's name or alias on the same network.
pub(super) fn check_alias_conflicts(view: &View, spec: &ServiceSpec) -> Result<()> {
    check_names_free(view.services.values().map(|o| &o.spec), spec)
}

/// [`check_alias_conflicts`] against the services `others` (a stack deploy checks against
/// the services as they will be).
pub(super) fn check_names_free<'a>(
    others: impl Iterator<Item = &'a ServiceSpec>,
    spec: &ServiceSpec,
) -> Result<()> {
    let mine = spec.attachments();
    for other in others.filter(|o| o.name != spec.name) {
        for mine in &mine {
            for theirs in other
                .attachments()
                .into_iter()
                .filter(|t| t.target == mine.target)
            {
                let Some(taken) = mine
                    .names(&spec.name)
                    .find(|n| theirs.names(&other.name).any(|t| t == *n))
                else {
                    continue;
                };
                let what = if taken == other.name {
                    "the name of"
                } else {
                    "an alias of"
                };
                return Err(Error::Conflict(format!(
                    "{taken} is already {what} service {} on network {}: pick another alias",
                    other.name, mine.target
                )));
            }
        }
    }
    Ok(())
}

/// Every network the spec names exists.
pub(super) fn check_networks_exist(view: &View, spec: &ServiceSpec) -> Result<()> {
    for a in spec.attachments() {
        if !view.networks.contains_key(&a.target) {
            return Err(Error::NotFound(format!(
                "network {0} not found: create it with `meshctl network create {0}`",
                a.target
            )));
        }
    }
    Ok(())
}

/// `--network-rm` then `--network-add`, as Docker applies them: removing a network and adding
/// it back with other aliases changes its aliases.
pub(super) fn change_networks(spec: &mut ServiceSpec, req: &ServiceUpdate) -> Result<()> {
    if req.network_add.is_empty() && req.network_rm.is_empty() {
        return Ok(());
    }
    let mut networks = spec.attachments();
    for rm in &req.network_rm {
        let before = networks.len();
        networks.retain(|a| a.target != *rm);
        if networks.len() == before {
            return Err(Error::Invalid(format!(
                "service {} is not on network {rm} (see `meshctl service inspect {}`)",
                spec.name, spec.name
            )));
        }
    }
    for add in &req.network_add {
        let add = NetworkAttachment {
            // The agent gives the VIP.
            vip: None,
            ..add.clone()
        };
        if networks.iter().any(|a| a.target == add.target) {
            // Docker's words.
            return Err(Error::Invalid(format!(
                "service is already attached to network {0}: to change its aliases, pass \
                 --network-rm {0} as well",
                add.target
            )));
        }
        networks.push(add);
    }
    set_networks(spec, networks)
}

/// Puts `networks` in the spec: the first is the tasks' first network (eth0), the one
/// published ports and egress use, and cannot change (the VIP published ports balance to
/// and the tasks' first address belong to it).
fn set_networks(spec: &mut ServiceSpec, networks: Vec<NetworkAttachment>) -> Result<()> {
    let mut networks = networks.into_iter();
    let Some(first) = networks.next() else {
        return Err(Error::Invalid(format!(
            "service {} would be on no network: a service needs one (add one with \
             --network-add)",
            spec.name
        )));
    };
    if first.target != spec.network {
        return Err(Error::Invalid(format!(
            "service {} would leave its first network {}: the first network carries its \
             published ports and cannot change (remove and create the service)",
            spec.name, spec.network
        )));
    }
    spec.aliases = first.aliases;
    spec.networks = networks.collect();
    Ok(())
}

/// A network listed twice would give a task two interfaces on one subnet.
pub(super) fn check_networks_once(spec: &ServiceSpec) -> Result<()> {
    let names: Vec<&str> = spec.attachments_names().collect();
    for (i, n) in names.iter().enumerate() {
        if names[..i].contains(n) {
            return Err(Error::Invalid(format!(
                "service {} lists network {n} twice: list it once (with all its aliases)",
                spec.name
            )));
        }
    }
    Ok(())
}

/// A task started by hand (`meshctl run --service`) or a container attached through CNI
/// joins `service` on `network`: one of the service's networks, whichever.
/// `task` says what to do instead, up to the network: "run its tasks on".
pub(super) fn check_task_network(spec: &ServiceSpec, network: &str, task: &str) -> Result<()> {
    if spec.on_network(network) {
        return Ok(());
    }
    let networks: Vec<&str> = spec.attachments_names().collect();
    Err(Error::Invalid(format!(
        "service {} is on network{} {}, not {network}: {task} {}",
        spec.name,
        if networks.len() > 1 { "s" } else { "" },
        networks.join(", "),
        networks.join(" or "),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, network: &str, aliases: &[&str]) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            network: network.into(),
            aliases: aliases.iter().map(|a| (*a).to_owned()).collect(),
            ..Default::default()
        }
    }

    fn conflict(r: Result<()>) -> String {
        match r {
            Err(Error::Conflict(m)) => m,
            other => panic!("expected a conflict, got {other:?}"),
        }
    }

    #[test]
    fn an_alias_is_unique_among_names_and_aliases_on_its_network_only() {
        let others = [
            service("worker", "backend", &["jobs"]),
            service("db", "backend", &[]),
            service("web", "frontend", &["www"]),
        ];
        let free = |s: &ServiceSpec| check_names_free(others.iter(), s);
        assert!(free(&service("api", "backend", &["queue"])).is_ok());
        // Another network's names do not count.
        assert!(free(&service("api", "backend", &["www"])).is_ok());
        assert!(free(&service("api", "frontend", &["jobs", "db"])).is_ok());
        let e = conflict(free(&service("api", "backend", &["queue", "jobs"])));
        assert_eq!(
            e,
            "jobs is already an alias of service worker on network backend: pick another alias"
        );
        let e = conflict(free(&service("api", "backend", &["db"])));
        assert!(e.contains("db is already the name of service db"), "{e}");
        // A new service named like another's alias would make the name ambiguous too.
        let e = conflict(free(&service("jobs", "backend", &[])));
        assert!(e.contains("an alias of service worker"), "{e}");
        // A service's own spec (an update) does not conflict with itself.
        assert!(free(&service("worker", "backend", &["jobs", "tasks-queue"])).is_ok());
    }

    #[test]
    fn aliases_are_dns_names_given_once() {
        assert!(check_aliases(&service("a", "n", &["jobs", "q-1"])).is_ok());
        for (bad, want) in [
            ("bad alias", "invalid network alias name"),
            ("tasks", "reserved for DNS"),
            ("-x", "invalid network alias name"),
        ] {
            match check_aliases(&service("a", "n", &[bad])) {
                Err(Error::Invalid(m)) => assert!(m.contains(want), "{bad}: {m}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        match check_aliases(&service("a", "n", &["j", "j"])) {
            Err(Error::Invalid(m)) => assert!(m.contains("given twice"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    fn update(add: &[NetworkAttachment], rm: &[&str]) -> ServiceUpdate {
        ServiceUpdate {
            network_add: add.to_vec(),
            network_rm: rm.iter().map(|r| (*r).to_owned()).collect(),
            ..Default::default()
        }
    }

    fn invalid(r: Result<()>) -> String {
        match r {
            Err(Error::Invalid(m)) => m,
            other => panic!("expected invalid input, got {other:?}"),
        }
    }

    #[test]
    fn network_rm_then_add_changes_the_aliases_as_docker_does() {
        let mut s = service("worker", "backend", &["jobs"]);
        let with = NetworkAttachment {
            target: "backend".into(),
            aliases: vec!["queue".into()],
            vip: None,
        };
        change_networks(&mut s, &update(std::slice::from_ref(&with), &["backend"])).unwrap();
        assert_eq!(s.attachments(), vec![with.clone()]);
        // Adding a network the service is on, without removing it: Docker's refusal.
        let e = invalid(change_networks(&mut s.clone(), &update(&[with], &[])));
        assert!(e.contains("already attached to network backend"), "{e}");
        let e = invalid(change_networks(&mut s.clone(), &update(&[], &["nope"])));
        assert!(e.contains("not on network nope"), "{e}");
        let e = invalid(change_networks(&mut s.clone(), &update(&[], &["backend"])));
        assert!(e.contains("would be on no network"), "{e}");
        // Another network joins after the first; the first cannot be left.
        let mut two = s.clone();
        let front = NetworkAttachment {
            target: "frontend".into(),
            aliases: vec!["web".into()],
            // What a request says of the VIP is the agent's to decide.
            vip: Some("10.0.0.9".parse().unwrap()),
        };
        change_networks(&mut two, &update(std::slice::from_ref(&front), &[])).unwrap();
        assert_eq!(two.network, "backend");
        assert_eq!(two.networks[0].target, "frontend");
        assert_eq!(two.networks[0].vip, None);
        assert_ne!(
            two.template_id(),
            s.template_id(),
            "a new network rolls the tasks"
        );
        let e = invalid(change_networks(
            &mut two.clone(),
            &update(&[], &["backend"]),
        ));
        assert!(e.contains("would leave its first network backend"), "{e}");
        change_networks(&mut two, &update(&[], &["frontend"])).unwrap();
        assert!(two.networks.is_empty());
        assert_eq!(two.template_id(), s.template_id());
        // Nothing asked, nothing changed.
        let before = s.clone();
        change_networks(&mut s, &ServiceUpdate::default()).unwrap();
        assert_eq!(s, before);
    }

    #[test]
    fn a_hand_started_task_joins_any_of_its_services_networks_and_no_other() {
        let mut worker = service("worker", "frontend", &[]);
        worker.networks = vec![NetworkAttachment::new("backend")];
        assert!(check_task_network(&worker, "frontend", "run its tasks on").is_ok());
        assert!(check_task_network(&worker, "backend", "run its tasks on").is_ok());
        let e = invalid(check_task_network(
            &worker,
            "other",
            "attach its containers to",
        ));
        assert_eq!(
            e,
            "service worker is on networks frontend, backend, not other: attach its \
             containers to frontend or backend"
        );
        let e = invalid(check_task_network(
            &service("web", "app", &[]),
            "x",
            "run its tasks on",
        ));
        assert_eq!(
            e,
            "service web is on network app, not x: run its tasks on app"
        );
    }
}
