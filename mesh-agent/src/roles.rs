//! Node roles: admins accept commands and write the cluster's objects; workers run tasks and
//! write only their own records.
//!
//! Swarm tells managers from workers by certificates from its CA, kept by a Raft quorum. mesh
//! has neither, so a role is a **grant**: "node N, known by key K, is an admin (or a worker),
//! as of serial S", signed with the cluster's **admin key**. `mesh-agent init` makes the admin
//! key; its public half is on every node (`admin.pub`), its secret half only on admins that
//! were made by `init` or joined with an admin token (`admin.key`, 0600). A grant proves
//! itself, so any node may carry one: a node carries its own in its node record, admins
//! republish every grant they know under `role:<node>`, and every node keeps the newest grant
//! of each name in its state dir, so a demotion is not forgotten when its writer is gone.
//!
//! A node is an admin when the newest grant for its name names its current key and says
//! admin. Anything else — no grant, a grant for another key — is a worker. Replicated objects
//! (`obj:*`: services, networks, secrets, configs, node settings, removals, key rotations) are
//! taken only from admins; a worker's are dropped and counted before they reach the view. A
//! cluster without an admin key (made before roles, or run by hand without one) has no roles:
//! every node is an admin, as before.

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use base64::{Engine, engine::general_purpose::STANDARD_NO_PAD as B64};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

pub use mesh_planner::Role;

use crate::identity::{NodeIdentity, PublicKey, SIGNATURE_LEN};

/// The admin key's public half: on every node of a cluster with roles.
pub const ADMIN_PUB_FILE: &str = "admin.pub";
/// The admin key's secret half: only on admins that can grant roles.
pub const ADMIN_KEY_FILE: &str = "admin.key";
/// The newest grant of each name this node knows (state dir).
pub const GRANTS_FILE: &str = "roles.json";
/// Keeps grant signatures from being valid for anything else the admin key signs.
const DOMAIN: &[u8] = b"mesh role grant v1\0";

/// A role given to one node's key, signed with the admin key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub node: String,
    pub key: PublicKey,
    pub role: Role,
    /// Newer grants of a name replace older ones: the issuing admin's clock in ms, past the
    /// serial of the grant it replaces.
    pub serial: u64,
    pub signature: String,
}

fn message(node: &str, key: &PublicKey, role: Role, serial: u64) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + node.len() + 56);
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(&(node.len() as u32).to_be_bytes());
    m.extend_from_slice(node.as_bytes());
    m.extend_from_slice(&key.0);
    m.push(match role {
        Role::Admin => 1,
        Role::Worker => 2,
    });
    m.extend_from_slice(&serial.to_be_bytes());
    m
}

impl Grant {
    pub fn sign(admin: &NodeIdentity, node: &str, key: PublicKey, role: Role, serial: u64) -> Self {
        let sig = admin.sign(&message(node, &key, role, serial));
        Self {
            node: node.to_owned(),
            key,
            role,
            serial,
            signature: B64.encode(sig),
        }
    }

    /// Whether the admin key signed exactly this grant.
    pub fn verify(&self, admin: &PublicKey) -> bool {
        let Some(sig) = B64
            .decode(&self.signature)
            .ok()
            .and_then(|s| <[u8; SIGNATURE_LEN]>::try_from(s).ok())
        else {
            return false;
        };
        admin.verify(
            &message(&self.node, &self.key, self.role, self.serial),
            &sig,
        )
    }

    /// Whether this grant replaces `other` (a grant of the same name). On equal serials the
    /// demotion wins, so two admins acting at once end the same on every node.
    fn newer_than(&self, other: &Grant) -> bool {
        (self.serial, self.role == Role::Worker) > (other.serial, other.role == Role::Worker)
    }
}

/// The cluster's admin key as this node holds it.
pub struct AdminKey {
    pub public: PublicKey,
    secret: Option<NodeIdentity>,
}

impl std::fmt::Debug for AdminKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "AdminKey({}, secret: {})",
            self.public,
            self.secret.is_some()
        )
    }
}

impl AdminKey {
    /// A new admin key (`init`).
    pub fn generate() -> Result<Self> {
        let secret = NodeIdentity::generate()?;
        Ok(Self {
            public: secret.public(),
            secret: Some(secret),
        })
    }

    pub fn from_secret(secret: NodeIdentity) -> Self {
        Self {
            public: secret.public(),
            secret: Some(secret),
        }
    }

    pub fn public_only(public: PublicKey) -> Self {
        Self {
            public,
            secret: None,
        }
    }

    /// The secret half, on admins that can grant roles.
    pub fn secret(&self) -> Option<&NodeIdentity> {
        self.secret.as_ref()
    }

    /// The admin key in `dir`: `None` when the cluster has no roles (no `admin.pub`). A
    /// secret that does not match the public half, or that others can read, is an error.
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let public_path = dir.join(ADMIN_PUB_FILE);
        let text = match std::fs::read_to_string(&public_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", public_path.display())),
        };
        let public: PublicKey = text.trim().parse().with_context(|| {
            format!(
                "{} is not an admin public key: copy it again from an admin",
                public_path.display()
            )
        })?;
        let secret_path = dir.join(ADMIN_KEY_FILE);
        if !secret_path.exists() {
            return Ok(Some(Self::public_only(public)));
        }
        crate::identity::check_mode(&secret_path)?;
        let secret = NodeIdentity::load(&secret_path)?;
        if secret.public() != public {
            bail!(
                "{} does not belong to the admin key in {}: one of them is from another \
                 cluster; remove the wrong one",
                secret_path.display(),
                public_path.display()
            );
        }
        Ok(Some(Self::from_secret(secret)))
    }

    /// Writes the admin key into `dir` (`init`, `join`): the public half always, the secret
    /// half (0600) when held. A different admin key already there is an error.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        if let Some(existing) = Self::load(dir)? {
            if existing.public != self.public {
                bail!(
                    "{} holds another cluster's admin key: `mesh-agent leave` that cluster first",
                    dir.display()
                );
            }
            if existing.secret.is_some() || self.secret.is_none() {
                return Ok(());
            }
        } else {
            crate::state_files::write_with_backup(
                &dir.join(ADMIN_PUB_FILE),
                format!("{}\n", self.public).as_bytes(),
                0o644,
            )?;
        }
        if let Some(secret) = &self.secret {
            secret.write(&dir.join(ADMIN_KEY_FILE))?;
        }
        Ok(())
    }

    /// Drops the secret half after this node was demoted: a demoted admin keeps no power to
    /// grant roles (an honest one; a compromised one needs the admin key replaced).
    pub fn forget_secret(&mut self, dir: &Path) {
        if self.secret.take().is_some() {
            let path = dir.join(ADMIN_KEY_FILE);
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    info!(path = %path.display(), "demoted: the admin key's secret is removed")
                }
                Err(e) => {
                    warn!(path = %path.display(), "demoted, but cannot remove the admin key: {e}")
                }
            }
        }
    }
}

/// Counters for metrics and `gossip stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolesReport {
    /// Grants whose signature is not the admin key's.
    pub forged_grants: u64,
    /// Replicated objects written by workers, dropped (counted by `gossip::admins`).
    pub worker_objects: u64,
}

/// What this node knows of roles: the newest grant of each name.
pub struct Registry {
    admin: PublicKey,
    grants: BTreeMap<String, Grant>,
    path: Option<PathBuf>,
    forged_seen: HashSet<String>,
    report: RolesReport,
}

impl Registry {
    /// The grants kept in `path` (none yet when missing), checked again: the file is this
    /// node's, but a grant that does not verify is worth nothing wherever it was kept.
    pub fn new(admin: PublicKey, path: Option<PathBuf>) -> Self {
        let grants = path
            .as_deref()
            .and_then(|p| {
                crate::state_files::read_with_backup(p, |b| {
                    serde_json::from_slice::<BTreeMap<String, Grant>>(b)
                })
            })
            .unwrap_or_default()
            .into_iter()
            .filter(|(name, g)| *name == g.node && g.verify(&admin))
            .collect();
        Self {
            admin,
            grants,
            path,
            forged_seen: HashSet::new(),
            report: RolesReport::default(),
        }
    }

    pub fn admin_key(&self) -> PublicKey {
        self.admin
    }

    pub fn report(&self) -> RolesReport {
        self.report
    }

    pub fn grants(&self) -> &BTreeMap<String, Grant> {
        &self.grants
    }

    pub fn grant(&self, node: &str) -> Option<&Grant> {
        self.grants.get(node)
    }

    /// Takes a grant seen anywhere: kept when it verifies and is newer than the one known.
    /// Returns whether it changed what this node knows.
    pub fn observe(&mut self, grant: &Grant) -> bool {
        // Every admin republishes every grant: the one already kept needs no second check.
        if self.grants.get(&grant.node) == Some(grant) {
            return false;
        }
        if !grant.verify(&self.admin) {
            if self.forged_seen.insert(grant.signature.clone()) {
                self.report.forged_grants += 1;
                warn!(
                    node = grant.node,
                    role = %grant.role,
                    "dropped a role grant not signed by the cluster's admin key"
                );
            }
            return false;
        }
        if self
            .grants
            .get(&grant.node)
            .is_some_and(|known| !grant.newer_than(known))
        {
            return false;
        }
        info!(node = grant.node, role = %grant.role, serial = grant.serial, "role granted");
        self.grants.insert(grant.node.clone(), grant.clone());
        self.save();
        true
    }

    /// The role of `node` speaking with `key`.
    pub fn role(&self, node: &str, key: Option<PublicKey>) -> Role {
        match (self.grants.get(node), key) {
            (Some(g), Some(k)) if g.key == k => g.role,
            _ => Role::Worker,
        }
    }

    /// `node rm`: the name may join again under a new key, as a worker until granted.
    pub fn forget(&mut self, node: &str) {
        if self.grants.remove(node).is_some() {
            self.save();
        }
    }

    /// The next serial for a grant replacing `node`'s: past the clock and the known one.
    pub fn next_serial(&self, node: &str, now_ms: u64) -> u64 {
        self.grants
            .get(node)
            .map_or(now_ms, |g| now_ms.max(g.serial + 1))
    }

    fn save(&self) {
        let Some(path) = &self.path else { return };
        let bytes = serde_json::to_vec_pretty(&self.grants).expect("plain map");
        if let Err(e) = crate::state_files::write_with_backup(path, &bytes, 0o600) {
            warn!("cannot save role grants to {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_verifies_only_as_signed_and_only_under_the_admin_key() {
        let admin = NodeIdentity::generate().unwrap();
        let other = NodeIdentity::generate().unwrap();
        let n1 = NodeIdentity::generate().unwrap().public();
        let g = Grant::sign(&admin, "n1", n1, Role::Admin, 5);
        assert!(g.verify(&admin.public()));
        assert!(!g.verify(&other.public()));
        for changed in [
            Grant {
                node: "n2".into(),
                ..g.clone()
            },
            Grant {
                role: Role::Worker,
                ..g.clone()
            },
            Grant {
                serial: 6,
                ..g.clone()
            },
            Grant {
                key: other.public(),
                ..g.clone()
            },
            Grant {
                signature: "AAAA".into(),
                ..g.clone()
            },
        ] {
            assert!(!changed.verify(&admin.public()), "{changed:?}");
        }
    }

    #[test]
    fn the_newest_grant_wins_a_demotion_is_kept_and_another_key_is_a_worker() {
        let admin = NodeIdentity::generate().unwrap();
        let n1 = NodeIdentity::generate().unwrap().public();
        let mut r = Registry::new(admin.public(), None);
        assert_eq!(r.role("n1", Some(n1)), Role::Worker, "no grant: a worker");
        assert!(r.observe(&Grant::sign(&admin, "n1", n1, Role::Admin, 10)));
        assert_eq!(r.role("n1", Some(n1)), Role::Admin);
        let other = NodeIdentity::generate().unwrap().public();
        assert_eq!(
            r.role("n1", Some(other)),
            Role::Worker,
            "the grant is for n1's key, not its name"
        );
        assert!(r.observe(&Grant::sign(&admin, "n1", n1, Role::Worker, 20)));
        // The old admin grant, replayed (by n1 itself, say), changes nothing.
        assert!(!r.observe(&Grant::sign(&admin, "n1", n1, Role::Admin, 10)));
        assert_eq!(r.role("n1", Some(n1)), Role::Worker);
        // Equal serials: the demotion wins whichever comes first.
        let mut a = Registry::new(admin.public(), None);
        let mut b = Registry::new(admin.public(), None);
        let up = Grant::sign(&admin, "n2", n1, Role::Admin, 30);
        let down = Grant::sign(&admin, "n2", n1, Role::Worker, 30);
        a.observe(&up);
        a.observe(&down);
        b.observe(&down);
        b.observe(&up);
        assert_eq!(a.role("n2", Some(n1)), Role::Worker);
        assert_eq!(b.role("n2", Some(n1)), Role::Worker);
        assert_eq!(r.next_serial("n1", 5), 21);
        assert_eq!(r.next_serial("n9", 5), 5);
    }

    #[test]
    fn a_grant_signed_by_another_key_is_dropped_and_counted_once() {
        let admin = NodeIdentity::generate().unwrap();
        let mallory = NodeIdentity::generate().unwrap();
        let mut r = Registry::new(admin.public(), None);
        let forged = Grant::sign(&mallory, "m", mallory.public(), Role::Admin, 1);
        for _ in 0..3 {
            assert!(!r.observe(&forged));
        }
        assert_eq!(r.report().forged_grants, 1);
        assert_eq!(r.role("m", Some(mallory.public())), Role::Worker);
    }

    #[test]
    fn grants_and_the_admin_key_survive_a_restart() {
        let dir = std::env::temp_dir().join(format!("mesh-roles-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let admin = AdminKey::generate().unwrap();
        admin.save(&dir).unwrap();
        let back = AdminKey::load(&dir).unwrap().unwrap();
        assert_eq!(back.public, admin.public);
        assert!(back.secret().is_some());
        // Saving the public half only over it keeps the secret; another key is refused.
        AdminKey::public_only(admin.public).save(&dir).unwrap();
        assert!(AdminKey::load(&dir).unwrap().unwrap().secret().is_some());
        assert!(AdminKey::generate().unwrap().save(&dir).is_err());
        let n1 = NodeIdentity::generate().unwrap().public();
        let path = dir.join(GRANTS_FILE);
        let mut r = Registry::new(admin.public, Some(path.clone()));
        r.observe(&Grant::sign(
            admin.secret().unwrap(),
            "n1",
            n1,
            Role::Admin,
            3,
        ));
        let again = Registry::new(admin.public, Some(path));
        assert_eq!(again.role("n1", Some(n1)), Role::Admin);
        let mut back = back;
        back.forget_secret(&dir);
        let after = AdminKey::load(&dir).unwrap().unwrap();
        assert!(after.secret().is_none());
        assert!(AdminKey::load(&dir.join("none")).unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
