//! Stacks: `POST /v1/stacks` takes a compose file already parsed into services.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::ServiceCreate;

/// What `stack deploy` asks the agent for: every object already named and labelled.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StackDeploy {
    pub name: String,
    pub networks: Vec<StackNetwork>,
    /// base64 data, like `secret create`.
    pub secrets: Vec<StackFile>,
    pub configs: Vec<StackFile>,
    pub services: Vec<ServiceCreate>,
    /// Remove the stack's services that the file no longer has.
    #[serde(default)]
    pub prune: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StackNetwork {
    pub name: String,
    pub subnet: Option<String>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StackFile {
    pub name: String,
    pub data: String,
    pub labels: BTreeMap<String, String>,
}

impl std::fmt::Debug for StackFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StackFile({})", self.name)
    }
}

/// What a deploy did, per service.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct StackReport {
    pub created: Vec<String>,
    pub updated: Vec<String>,
    pub unchanged: Vec<String>,
    pub removed: Vec<String>,
}
