//! Roles in gossip: what this node does with the grants it sees (see `crate::roles`).
//!
//! Peers drop a worker's replicated objects, so a worker keeps its merged copies out of gossip
//! ([`Admins::local`]): they stay in its own view and its state file, which is what keeps its
//! tasks running when every admin is gone. Admins republish every grant they know, so a node
//! that joins after a promotion's writer left still learns of it.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
};

use anyhow::{Result, bail};
use serde::Deserialize;
use tracing::warn;

use crate::cluster::{SnapshotNode, key};
use crate::identity::{NodeIdentity, PublicKey};
use crate::roles::{AdminKey, Grant, Registry, Role, RolesReport};

pub struct Admins {
    pub(super) registry: Registry,
    admin: AdminKey,
    /// Where the admin key lives, so a demoted admin can drop its secret.
    key_dir: PathBuf,
    pub(super) own_role: Role,
    /// This node's replicated copies while it is a worker.
    pub(super) local: BTreeMap<String, String>,
    /// The role the gossip state was last arranged for.
    pub(super) synced: Option<Role>,
    /// Grants changed since admins last republished them.
    pub(super) grants_changed: bool,
    /// (node, generation, key, value) of workers' objects already counted, so a value is
    /// counted once however often gossip shows it.
    refused: HashSet<(String, u64, String, u64)>,
    worker_objects: u64,
    parsed: Parsed,
}

impl Admins {
    /// `own` is this node's name and key; `registry` holds what was kept from earlier runs.
    pub fn new(
        admin: AdminKey,
        key_dir: PathBuf,
        registry: Registry,
        own: (&str, PublicKey),
    ) -> Self {
        let own_role = registry.role(own.0, Some(own.1));
        Self {
            registry,
            admin,
            key_dir,
            own_role,
            local: BTreeMap::new(),
            synced: None,
            grants_changed: true,
            refused: HashSet::new(),
            worker_objects: 0,
            parsed: Parsed::default(),
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn own_role(&self) -> Role {
        self.own_role
    }

    pub fn report(&self) -> RolesReport {
        RolesReport {
            worker_objects: self.worker_objects,
            ..self.registry.report()
        }
    }

    /// The admin key's public half and, when held, its secret seed.
    pub fn admin_key(&self) -> (PublicKey, Option<zeroize::Zeroizing<[u8; 32]>>) {
        (self.admin.public, self.admin.secret().map(|s| s.seed()))
    }

    /// Whether this node can grant roles (it holds the admin key's secret).
    pub fn can_grant(&self) -> bool {
        self.admin.secret().is_some()
    }

    /// A new grant of `role` to `node` speaking with `key`, signed with the admin key and
    /// taken into this node's registry (admins republish it from there).
    pub fn grant(&mut self, node: &str, key: PublicKey, role: Role, now_ms: u64) -> Result<Grant> {
        let Some(secret) = self.admin.secret() else {
            bail!(
                "this admin holds no admin key (it was promoted, not made by `init` or an admin \
                 token), so it cannot grant roles: run the command on an admin that holds \
                 {}",
                crate::roles::ADMIN_KEY_FILE
            );
        };
        let serial = self.registry.next_serial(node, now_ms);
        let grant = Grant::sign(secret, node, key, role, serial);
        self.registry.observe(&grant);
        self.grants_changed = true;
        Ok(grant)
    }

    /// This node's role from the grants it knows (after a snapshot, or its own first grant),
    /// dropping the admin secret once demoted.
    pub fn settle_own_role(&mut self, own: (&str, PublicKey)) {
        self.own_role = self.registry.role(own.0, Some(own.1));
        if self.own_role == Role::Worker
            && self
                .registry
                .grant(own.0)
                .is_some_and(|g| g.key == own.1 && g.role == Role::Worker)
        {
            self.admin.forget_secret(&self.key_dir);
        }
    }

    /// Reads every grant the snapshot carries (node records and `role:` keys), gives each
    /// node its role, and drops the replicated objects of workers. `own` is this node: its
    /// copies are what it merged itself, so they stay in its own view. Returns whether a
    /// grant was new.
    pub(super) fn apply(
        &mut self,
        nodes: &mut [SnapshotNode],
        own: &str,
        me: &NodeIdentity,
    ) -> bool {
        let mut changed = false;
        let mut keys = Vec::with_capacity(nodes.len());
        for n in nodes.iter() {
            let record = self.parsed.record(&n.name, &n.kv);
            let grants = self.parsed.grant_keys(&n.kv);
            for grant in record.grant.iter().chain(&grants) {
                changed |= self.registry.observe(grant);
            }
            keys.push(record.key);
        }
        for (n, key) in nodes.iter_mut().zip(keys) {
            n.role = self.registry.role(&n.name, key);
            if n.role == Role::Admin || n.name == own {
                continue;
            }
            let refused: Vec<String> =
                n.kv.range(key::OBJECT.to_owned()..)
                    .take_while(|(k, _)| k.starts_with(key::OBJECT))
                    .map(|(k, _)| k.clone())
                    .collect();
            for k in refused {
                let value = n.kv.remove(&k).unwrap_or_default();
                let id = (n.name.clone(), n.generation, k.clone(), fingerprint(&value));
                if self.refused.insert(id) {
                    self.worker_objects += 1;
                    warn!(
                        node = n.name,
                        key = k,
                        "dropped a replicated object written by a worker: only admins write them"
                    );
                }
            }
        }
        self.adopt_admin_key(nodes, own, me);
        changed
    }

    /// A promoted admin takes the admin key an admin sealed to it, so it can grant roles and
    /// print admin tokens too.
    fn adopt_admin_key(&mut self, nodes: &[SnapshotNode], own: &str, me: &NodeIdentity) {
        if self.admin.secret().is_some()
            || self.registry.role(own, Some(me.public())) != Role::Admin
        {
            return;
        }
        let k = format!("{}{own}", key::ADMIN_KEY_FOR);
        let seeds = nodes
            .iter()
            .filter(|n| n.role == Role::Admin && n.name != own)
            .filter_map(|n| n.kv.get(&k))
            .filter_map(|sealed| open_admin_key(me, own, sealed));
        for seed in seeds {
            let secret = NodeIdentity::from_seed(&seed);
            if secret.public() != self.admin.public {
                continue;
            }
            let key = AdminKey::from_secret(secret);
            if let Err(e) = key.save(&self.key_dir) {
                warn!("cannot keep the admin key handed to this node: {e:#}");
                return;
            }
            tracing::info!("promoted: this admin now holds the admin key and can grant roles");
            self.admin = key;
            return;
        }
    }

    /// The admin key's secret sealed to `to` (`adminkey:<node>`), if this node holds it.
    pub(super) fn admin_key_for(&self, node: &str, to: &PublicKey) -> Option<String> {
        let seed = self.admin.secret()?.seed();
        let sealed =
            crate::identity::sealing::seal(to, &admin_key_context(node), seed.as_slice()).ok()?;
        Some(base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            sealed,
        ))
    }

    /// The `role:` keys an admin republishes.
    pub(super) fn grant_keys(&self) -> BTreeMap<String, String> {
        self.registry
            .grants()
            .iter()
            .map(|(node, g)| {
                (
                    format!("{}{node}", key::ROLE_GRANT),
                    serde_json::to_string(g).expect("plain struct"),
                )
            })
            .collect()
    }
}
/// What an admin key handed to `node` is sealed for.
fn admin_key_context(node: &str) -> Vec<u8> {
    let mut c = b"mesh admin key v1\0".to_vec();
    c.extend_from_slice(node.as_bytes());
    c
}

fn open_admin_key(me: &NodeIdentity, node: &str, sealed: &str) -> Option<[u8; 32]> {
    let bytes = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, sealed).ok()?;
    let opened = crate::identity::sealing::open(me, &admin_key_context(node), &bytes).ok()?;
    <[u8; 32]>::try_from(opened.as_slice()).ok()
}

/// What roles read from a node record: its key and its own grant. Parsing a public key
/// checks the curve point (tens of µs), so each record is parsed once while it is unchanged.
#[derive(Clone, Default)]
struct RecordRoles {
    key: Option<PublicKey>,
    grant: Option<Grant>,
}

#[derive(Default)]
pub(super) struct Parsed {
    records: HashMap<String, (String, RecordRoles)>,
    grants: HashMap<String, Option<Grant>>,
}

impl Parsed {
    fn record(&mut self, node: &str, kv: &BTreeMap<String, String>) -> RecordRoles {
        #[derive(Deserialize)]
        struct Fields {
            key: Option<PublicKey>,
            grant: Option<Grant>,
        }
        let Some(text) = kv.get(key::NODE) else {
            return RecordRoles::default();
        };
        if let Some((seen, parsed)) = self.records.get(node)
            && seen == text
        {
            return parsed.clone();
        }
        let parsed = serde_json::from_str::<Fields>(text)
            .map(|f| RecordRoles {
                key: f.key,
                grant: f.grant,
            })
            .unwrap_or_default();
        self.records
            .insert(node.to_owned(), (text.clone(), parsed.clone()));
        parsed
    }

    /// The grants a node's `role:` keys carry.
    fn grant_keys(&mut self, kv: &BTreeMap<String, String>) -> Vec<Grant> {
        if self.grants.len() > 100_000 {
            self.grants.clear();
        }
        kv.range(key::ROLE_GRANT.to_owned()..)
            .take_while(|(k, _)| k.starts_with(key::ROLE_GRANT))
            .filter_map(|(_, v)| {
                self.grants
                    .entry(v.clone())
                    .or_insert_with(|| serde_json::from_str::<Grant>(v).ok())
                    .clone()
            })
            .collect()
    }
}

fn fingerprint(value: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, id: &NodeIdentity, grant: Option<&Grant>) -> SnapshotNode {
        let mut record = serde_json::json!({"name": name, "key": id.public()});
        if let Some(g) = grant {
            record["grant"] = serde_json::to_value(g).unwrap();
        }
        let mut kv = BTreeMap::new();
        kv.insert(key::NODE.to_owned(), record.to_string());
        SnapshotNode {
            name: name.to_owned(),
            generation: 1,
            live: true,
            kv,
            role: Role::Worker,
        }
    }

    #[test]
    fn workers_objects_are_dropped_admins_kept_and_a_node_keeps_its_own() {
        let admin = NodeIdentity::generate().unwrap();
        let (a, w, me) = (
            NodeIdentity::generate().unwrap(),
            NodeIdentity::generate().unwrap(),
            NodeIdentity::generate().unwrap(),
        );
        let grant = Grant::sign(&admin, "a", a.public(), Role::Admin, 1);
        // A worker that pastes the admin's grant into its own record gains nothing: the
        // grant names the admin's key.
        let mut nodes = vec![
            node("a", &a, Some(&grant)),
            node("w", &w, Some(&grant)),
            node("me", &me, None),
        ];
        for n in &mut nodes {
            n.kv.insert("obj:svc:web".into(), format!("from {}", n.name));
            n.kv.insert("ep:web.1".into(), "{}".into());
        }
        let mut r = Admins::new(
            AdminKey::public_only(admin.public()),
            PathBuf::new(),
            Registry::new(admin.public(), None),
            ("me", me.public()),
        );
        r.apply(&mut nodes, "me", &me);
        assert_eq!(nodes[0].role, Role::Admin);
        assert!(nodes[0].kv.contains_key("obj:svc:web"));
        assert_eq!(nodes[1].role, Role::Worker);
        assert!(!nodes[1].kv.contains_key("obj:svc:web"));
        assert!(nodes[1].kv.contains_key("ep:web.1"), "its own records stay");
        assert_eq!(nodes[2].role, Role::Worker);
        assert!(
            nodes[2].kv.contains_key("obj:svc:web"),
            "this node's own copy"
        );
        assert_eq!(r.report().worker_objects, 1);
        // The same state again counts nothing new.
        let mut again = vec![node("w", &w, None)];
        again[0].kv.insert("obj:svc:web".into(), "from w".into());
        r.apply(&mut again, "me", &me);
        assert_eq!(r.report().worker_objects, 1);
    }

    /// What roles add to each snapshot: grants read and workers' objects filtered for 200
    /// nodes of 40 keys (printed; `cargo test --release -p mesh-agent roles_cost --
    /// --nocapture` for optimized numbers). Unchanged grants are not verified again.
    #[test]
    fn roles_cost() {
        let admin = NodeIdentity::generate().unwrap();
        let me = NodeIdentity::generate().unwrap();
        let ids: Vec<NodeIdentity> = (0..200)
            .map(|_| NodeIdentity::generate().unwrap())
            .collect();
        let nodes = || -> Vec<SnapshotNode> {
            ids.iter()
                .enumerate()
                .map(|(i, id)| {
                    let name = format!("n{i}");
                    let grant = Grant::sign(&admin, &name, id.public(), Role::Admin, 1);
                    let mut n = node(&name, id, (i < 3).then_some(&grant));
                    for k in 0..40 {
                        n.kv.insert(format!("ep:t{k}"), "{}".into());
                    }
                    n
                })
                .collect()
        };
        let mut r = Admins::new(
            AdminKey::public_only(admin.public()),
            PathBuf::new(),
            Registry::new(admin.public(), None),
            ("me", me.public()),
        );
        let mut first = nodes();
        let start = std::time::Instant::now();
        r.apply(&mut first, "me", &me);
        let cold = start.elapsed();
        const N: u32 = 20;
        let mut total = std::time::Duration::ZERO;
        for _ in 0..N {
            let mut again = nodes();
            let start = std::time::Instant::now();
            r.apply(&mut again, "me", &me);
            total += start.elapsed();
        }
        assert_eq!(r.registry().grants().len(), 3);
        eprintln!(
            "roles on a snapshot of 200 nodes x 40 keys: first {cold:?}, then {:?} each",
            total / N
        );
    }
}
