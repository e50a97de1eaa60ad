//! `--with-registry-auth`: the credentials the creating node's user has for the image's
//! registry travel with the service, sealed like a secret, and each node opens them only to
//! pull the service's image — never for another registry, never into a task.
//!
//! In a cluster with roles they are sealed to the admin key, and a node opens only its own
//! copy, which an admin seals to it while it runs or is about to start a task of the service
//! (see `secrets`): a worker that runs none of the service's tasks cannot open them.

use tracing::{info, warn};
use zeroize::Zeroizing;

use super::{Agent, Error, Result};
use crate::{
    cluster::{Sealed, View, key},
    gossip::sealed,
};
use mesh_api::{
    spec::{SealedRegistryAuth, ServiceSpec, registry_of, same_registry},
    v1::{KeyId, RegistryAuth},
};

/// What the seal is bound to: a service's credentials cannot be moved to another service.
pub(crate) fn sealed_name(service: &str) -> String {
    format!("registry-auth:{service}")
}

impl Agent {
    /// Seals `auth` for `service`: to the admin key in a cluster with roles, else under the
    /// cluster key. Refused without a cluster key (they would travel in the clear) and for
    /// credentials of another registry than the image's.
    pub(crate) fn seal_registry_auth(
        &self,
        spec: &ServiceSpec,
        auth: &RegistryAuth,
    ) -> Result<SealedRegistryAuth> {
        let Some(image) = super::services::image_of(spec) else {
            return Err(Error::Invalid(
                "--with-registry-auth: the service runs no image (a process service pulls \
                 nothing)"
                    .into(),
            ));
        };
        let registry = registry_of(image);
        if !same_registry(&auth.server_address, registry) {
            return Err(Error::Invalid(format!(
                "--with-registry-auth: the credentials are for {}, but image {image} is pulled \
                 from {registry}",
                auth.server_address
            )));
        }
        let (ring, cluster) = self.keyring().map_err(|_| {
            Error::Invalid(
                "--with-registry-auth needs a cluster key: this agent's gossip is not sealed, so \
                 the credentials would travel in the clear"
                    .into(),
            )
        })?;
        let plain = Zeroizing::new(serde_json::to_vec(auth).expect("credentials serialise"));
        let name = sealed_name(&spec.name);
        if let Some((admin, _)) = self.gossip.admin_key() {
            let admins =
                sealed::seal_for_admins(&admin, &cluster, &name, &plain).map_err(Error::Invalid)?;
            return Ok(SealedRegistryAuth {
                registry: registry.to_owned(),
                key: 0,
                data: String::new(),
                admins: Some(admins),
                sealed_at: Some(self.tick()),
            });
        }
        let s = sealed::seal(&ring, &cluster, &name, &plain);
        Ok(SealedRegistryAuth {
            registry: registry.to_owned(),
            key: s.key.0,
            data: s.data,
            admins: None,
            sealed_at: None,
        })
    }

    /// The credentials `spec` carries for pulling `image`, opened; None when it carries none
    /// for that image's registry, or this node cannot open them (said in the log: the pull
    /// then goes without, and the registry's refusal is the task's error).
    pub(crate) fn registry_credentials(
        &self,
        spec: &ServiceSpec,
        image: &str,
    ) -> Option<RegistryAuth> {
        let sealed_auth = spec.registry_auth.as_ref()?;
        if sealed_auth.registry != registry_of(image) {
            return None;
        }
        let opened = self
            .open_registry_auth(spec, sealed_auth)
            .and_then(|plain| serde_json::from_slice(&plain).map_err(|e| e.to_string()));
        match opened {
            Ok(auth) => Some(auth),
            Err(e) => {
                warn!(
                    service = spec.name,
                    "cannot open its registry credentials: {e}"
                );
                None
            }
        }
    }

    /// Seals again the credentials the cluster key opens, as [`Agent::reseal_secrets`] does
    /// secrets: once the cluster has roles, to the admin key (credentials given before roles,
    /// which every member could open, are taken from the workers); otherwise, after a key
    /// rotation, under the new primary, so the old key can be retired without stranding them.
    /// The previous spec's too: a rollback brings them back, and the worker could read them
    /// there. Admins only; several at once each write a valid form and the newest wins.
    pub(crate) async fn reseal_registry_auth(&self, view: &View) {
        if self.role() != crate::roles::Role::Admin {
            return;
        }
        let Ok((ring, _)) = self.keyring() else {
            return;
        };
        let to_admins = self.gossip.admin_key().is_some();
        let primary = ring.primary().id;
        let stale = |auth: &Option<SealedRegistryAuth>| {
            auth.as_ref().is_some_and(|a| {
                a.admins.is_none()
                    && ring.get(KeyId(a.key)).is_some()
                    && (to_admins || KeyId(a.key) != primary)
            })
        };
        for s in view.services.values() {
            let previous = s.spec.previous.as_deref();
            if !stale(&s.spec.registry_auth) && !previous.is_some_and(|p| stale(&p.registry_auth)) {
                continue;
            }
            let mut record = s.clone();
            let mut resealed = self.reseal_one(&mut record.spec);
            if let (Ok(()), Some(p)) = (&resealed, record.spec.previous.as_deref_mut()) {
                resealed = self.reseal_one(p);
            }
            if let Err(e) = resealed {
                warn!(
                    service = s.spec.name,
                    "cannot reseal its registry credentials: {e}"
                );
                continue;
            }
            record.updated = self.tick();
            info!(
                service = s.spec.name,
                to_admins, "resealing the service's registry credentials"
            );
            if let Err(e) = self.write_object(key::SERVICE, &s.spec.name, &record).await {
                warn!(
                    service = s.spec.name,
                    "resealing its registry credentials: {e}"
                );
            }
        }
    }

    /// Reseals `spec`'s credentials when the cluster key opens them: see
    /// [`Agent::reseal_registry_auth`].
    fn reseal_one(&self, spec: &mut ServiceSpec) -> std::result::Result<(), String> {
        let Some(auth) = &spec.registry_auth else {
            return Ok(());
        };
        if auth.admins.is_some() {
            return Ok(());
        }
        let plain = self.open_registry_auth(spec, auth)?;
        let (ring, cluster) = self.keyring().map_err(|e| e.to_string())?;
        let name = sealed_name(&spec.name);
        let resealed = match self.gossip.admin_key() {
            Some((admin, _)) => SealedRegistryAuth {
                registry: auth.registry.clone(),
                key: 0,
                data: String::new(),
                admins: Some(sealed::seal_for_admins(&admin, &cluster, &name, &plain)?),
                sealed_at: Some(self.tick()),
            },
            None => {
                let s = sealed::seal(&ring, &cluster, &name, &plain);
                SealedRegistryAuth {
                    registry: auth.registry.clone(),
                    key: s.key.0,
                    data: s.data,
                    admins: None,
                    sealed_at: None,
                }
            }
        };
        spec.registry_auth = Some(resealed);
        Ok(())
    }

    /// The sealed credentials' plaintext: under the cluster key; or, sealed to the admins,
    /// this node's own copy, else the admin form with `admin.key`.
    fn open_registry_auth(
        &self,
        spec: &ServiceSpec,
        sealed_auth: &SealedRegistryAuth,
    ) -> std::result::Result<Zeroizing<Vec<u8>>, String> {
        let name = sealed_name(&spec.name);
        let Some(admins) = &sealed_auth.admins else {
            let (ring, cluster) = self.keyring().map_err(|e| e.to_string())?;
            let s = Sealed {
                key: mesh_api::v1::KeyId(sealed_auth.key),
                data: sealed_auth.data.clone(),
            };
            return sealed::open(&ring, &cluster, &name, &s);
        };
        if let Some(of) = &sealed_auth.sealed_at
            && let Some(plain) = self.open_own_copy(&self.view(), &name, of)
        {
            return Ok(plain);
        }
        self.open_admin_form(&name, admins)
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registries_are_compared_as_docker_files_them() {
        assert!(same_registry("https://index.docker.io/v1/", "docker.io"));
        assert!(same_registry("10.0.0.1:5000", "10.0.0.1:5000"));
        assert!(same_registry("http://10.0.0.1:5000/", "10.0.0.1:5000"));
        assert!(!same_registry("10.0.0.1:5001", "10.0.0.1:5000"));
        assert!(!same_registry("quay.io", "docker.io"));
    }
}
