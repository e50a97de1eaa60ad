//! Roles at the API: only admins change the cluster; `node promote`/`demote`; which join
//! token a node may print (see `crate::roles` for the model).

use mesh_api::spec::NodeStatus;

use super::{Agent, Error, Result};
use crate::cluster::{NodeView, View};
use crate::gossip::token::{JoinToken, TokenRole};
use crate::roles::Role;

impl Agent {
    /// This node's role (an admin in a cluster without roles).
    pub fn role(&self) -> Role {
        self.gossip.own_role()
    }

    /// Refuses what changes the cluster on a worker, naming the admins to use instead.
    pub fn require_admin(&self) -> Result<()> {
        if self.role() == Role::Admin {
            return Ok(());
        }
        let me = self.node_name();
        let view = self.view();
        let admins: Vec<String> = ready_admins(&view)
            .map(|n| match n.record.as_ref() {
                Some(r) => format!("{} ({})", n.name, r.address),
                None => n.name.clone(),
            })
            .collect();
        let where_to = if admins.is_empty() {
            "No admin is up: the cluster keeps running as it is, and changes wait until an \
             admin is back"
                .to_owned()
        } else {
            format!("Run the command on an admin: {}", admins.join(", "))
        };
        Err(Error::Forbidden(format!(
            "node {me} is a worker: only admins change the cluster. {where_to} (or promote this \
             node there with `meshctl node promote {me}`)"
        )))
    }

    /// `node promote`/`demote`, `node update --role`: a new grant signed with the admin key.
    /// Demoting the last admin that is up is refused, as Docker refuses to demote its last
    /// manager: nothing could change the cluster afterwards.
    pub async fn set_role(&self, node: &str, role: Role) -> Result<()> {
        self.require_admin()?;
        let view = self.refresh().await;
        let Some(n) = view.nodes.get(node) else {
            return Err(Error::NotFound(format!(
                "node {node} not found (see `meshctl node ls`)"
            )));
        };
        // Docker's `node update` sends the whole spec back, role included: no change.
        if n.role == role {
            return Ok(());
        }
        if !self.gossip.has_roles() {
            return Err(Error::Invalid(
                "this cluster has no roles (no admin key): every node is an admin. Clusters \
                 made by `mesh-agent init` have roles"
                    .into(),
            ));
        }
        let Some(key) = n.record.as_ref().and_then(|r| r.key) else {
            return Err(Error::Conflict(format!(
                "node {node} has published no node key yet (it is down, or runs an agent older \
                 than roles): a role is granted to a key; try again once it is up"
            )));
        };
        if role == Role::Worker {
            let others = ready_admins(&view).filter(|o| o.name != node).count();
            if others == 0 {
                return Err(Error::Conflict(format!(
                    "node {node} is the last admin that is up: promote another node first \
                     (`meshctl node promote NODE`). A cluster without an admin keeps running \
                     but accepts no changes"
                )));
            }
        }
        self.gossip
            .grant_role(node, key, role)
            .await
            .map_err(|e| Error::Forbidden(format!("{e:#}")))?;
        tracing::info!(node, %role, "role granted");
        Ok(())
    }

    /// The token that joins a host as `role`: a worker token carries the admin key's public
    /// half, an admin token its secret (only an admin holding it can print one).
    pub fn join_token_for(&self, role: Role) -> Result<JoinToken> {
        self.require_admin()?;
        let token = self.join_token()?;
        let Some((public, secret)) = self.gossip.admin_key() else {
            // No roles: one token, and every node it joins is an admin.
            return Ok(token);
        };
        Ok(match (role, secret) {
            (Role::Worker, _) => token.with_role(TokenRole::Worker(public)),
            (Role::Admin, Some(seed)) => token.with_role(TokenRole::Admin(seed)),
            (Role::Admin, None) => {
                return Err(Error::Forbidden(format!(
                    "node {} was promoted and holds no admin key, so it cannot print an admin \
                     token: run `meshctl join-token admin` on an admin that holds {} (made by \
                     `mesh-agent init` or joined with an admin token)",
                    self.node_name(),
                    crate::roles::ADMIN_KEY_FILE
                )));
            }
        })
    }
}

/// Every admin that is up: who accepts writes now.
fn ready_admins(view: &View) -> impl Iterator<Item = &NodeView> {
    view.nodes
        .values()
        .filter(|n| n.role == Role::Admin && n.status == NodeStatus::Ready)
}
