//! Secrets and configs: `/v1/secrets`, `/v1/configs`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::KeyId;

/// `meshctl secret create` / `config create`: the data travels base64 in the request (the
/// agent seals a secret before it is written anywhere).
#[derive(Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileObjectCreate {
    pub name: String,
    pub data: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl std::fmt::Debug for FileObjectCreate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FileObjectCreate({})", self.name)
    }
}

/// A secret as `secret ls/inspect` show it: never its data.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SecretInfo {
    pub id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub size: usize,
    /// The cluster key it is sealed with; none when it is sealed to the admin key (a
    /// cluster with roles), which only admins open.
    #[serde(default)]
    pub key: Option<KeyId>,
    pub created_ms: u64,
    pub created_by: String,
    /// Services whose tasks get it.
    pub services: Vec<String>,
}

/// A config, with its data (base64) as `docker config inspect` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConfigInfo {
    pub id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub size: usize,
    pub data: String,
    pub created_ms: u64,
    pub created_by: String,
    pub services: Vec<String>,
}
