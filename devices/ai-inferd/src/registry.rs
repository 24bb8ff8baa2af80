//! The loaded models, by id, and which of them each tenant may use.

use std::collections::BTreeMap;
use std::sync::Arc;

use ai_infer_protocol::{ModelInfo, ProtocolError};
use thiserror::Error;

use crate::backend::Backend;
use crate::config::AllowedModels;

/// Why the set of loaded models cannot be served.
#[derive(Debug, Error)]
pub enum RegistryError {
    /// A backend reports an invalid signature.
    #[error("model {name:?} (id {id}) has an invalid signature: {source}")]
    InvalidModel {
        /// Model name.
        name: String,
        /// Model id.
        id: u32,
        /// What is wrong.
        source: ProtocolError,
    },
    /// Two backends report the same id.
    #[error("model id {0} is used by two models")]
    DuplicateId(u32),
    /// Two backends report the same name.
    #[error("model name {0:?} is used by two models")]
    DuplicateName(String),
    /// A tenant's `allowed_models` names a model that is not loaded.
    #[error("tenant {tenant:?} allows model {model:?}, which the manifest does not define")]
    UnknownAllowedModel {
        /// The tenant.
        tenant: String,
        /// The model name.
        model: String,
    },
}

/// Every loaded model, by id (ids are looked up, never used as indices).
pub struct ModelRegistry {
    by_id: BTreeMap<u32, Arc<dyn Backend>>,
}

impl ModelRegistry {
    /// Checks the backends' signatures and that ids and names are unique.
    pub fn new(backends: Vec<Arc<dyn Backend>>) -> Result<Self, RegistryError> {
        let mut by_id = BTreeMap::new();
        let mut names = std::collections::HashSet::new();
        for backend in backends {
            let info = backend.info();
            info.validate()
                .map_err(|source| RegistryError::InvalidModel {
                    name: info.name.clone(),
                    id: info.id,
                    source,
                })?;
            if !names.insert(info.name.clone()) {
                return Err(RegistryError::DuplicateName(info.name.clone()));
            }
            let id = info.id;
            if by_id.insert(id, backend).is_some() {
                return Err(RegistryError::DuplicateId(id));
            }
        }
        Ok(ModelRegistry { by_id })
    }

    /// The backend serving model `id`.
    pub fn get(&self, id: u32) -> Option<&Arc<dyn Backend>> {
        self.by_id.get(&id)
    }

    /// Every backend, by ascending id.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Backend>> {
        self.by_id.values()
    }

    /// The ids a tenant may use, checking that every named model exists.
    pub fn allowed_ids(
        &self,
        tenant: &str,
        allowed: &AllowedModels,
    ) -> Result<Vec<u32>, RegistryError> {
        if let AllowedModels::Named(names) = allowed {
            for name in names {
                if !self.by_id.values().any(|b| &b.info().name == name) {
                    return Err(RegistryError::UnknownAllowedModel {
                        tenant: tenant.to_owned(),
                        model: name.clone(),
                    });
                }
            }
        }
        Ok(self
            .by_id
            .values()
            .map(|b| b.info())
            .filter(|info| allowed.allows(&info.name))
            .map(|info| info.id)
            .collect())
    }

    /// The MODELS entries for a tenant allowed `ids`.
    pub fn infos(&self, ids: &[u32]) -> Vec<ModelInfo> {
        ids.iter()
            .filter_map(|id| self.get(*id))
            .map(|b| b.info().clone())
            .collect()
    }
}
