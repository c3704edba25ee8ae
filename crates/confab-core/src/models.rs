//! The registry of named models (SPEC §11): what clients may name in
//! `"model"`, and, for each, the provider instance that talks to it, its
//! limits, prices and tokenizer. Built once at start-up (`confab-llm` reads
//! the models file and the environment shortcuts); read-only afterwards.

use std::sync::Arc;

use crate::model::{Invalid, OrgPolicy};
use crate::provider::{ChatProvider, TokenCounter};

/// Longest model name (SPEC §11: 1-64 of `[A-Za-z0-9._:-]`).
pub const MAX_MODEL_NAME: usize = 64;

/// Check a model name's shape.
pub fn valid_model_name(name: &str) -> bool {
    (1..=MAX_MODEL_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Prices in USD per million tokens (0 when unknown).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Prices {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
}

/// One configured model.
pub struct Model {
    /// What clients send as `"model"`.
    pub name: String,
    /// The id sent upstream.
    pub upstream_model: String,
    pub context_tokens: u32,
    pub max_output_tokens: u32,
    pub prices: Prices,
    pub provider: Arc<dyn ChatProvider>,
    pub tokenizer: Arc<dyn TokenCounter>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.name)
            .field("provider", &self.provider.kind())
            .field("upstream_model", &self.upstream_model)
            .field("context_tokens", &self.context_tokens)
            .field("max_output_tokens", &self.max_output_tokens)
            .finish_non_exhaustive()
    }
}

/// Every model, and the default.
#[derive(Clone, Debug)]
pub struct ModelRegistry {
    models: Vec<Arc<Model>>,
    default: Arc<Model>,
}

impl ModelRegistry {
    /// `default` must name one of `models`; names must be unique and valid.
    pub fn new(models: Vec<Model>, default: &str) -> Result<Self, Invalid> {
        let mut seen = std::collections::HashSet::new();
        for model in &models {
            if !valid_model_name(&model.name) {
                return Err(Invalid(format!(
                    "model name {:?} must be 1-64 of A-Z a-z 0-9 . _ : -",
                    model.name
                )));
            }
            if !seen.insert(model.name.clone()) {
                return Err(Invalid(format!("model {:?} is defined twice", model.name)));
            }
            if model.max_output_tokens == 0 || model.max_output_tokens >= model.context_tokens {
                return Err(Invalid(format!(
                    "model {:?}: max_output_tokens must be at least 1 and below context_tokens",
                    model.name
                )));
            }
        }
        let models: Vec<Arc<Model>> = models.into_iter().map(Arc::new).collect();
        let default = models
            .iter()
            .find(|m| m.name == default)
            .cloned()
            .ok_or_else(|| Invalid(format!("default model {default:?} is not defined")))?;
        Ok(Self { models, default })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Model>> {
        self.models.iter().find(|m| m.name == name)
    }

    pub fn default_model(&self) -> &Arc<Model> {
        &self.default
    }

    pub fn all(&self) -> &[Arc<Model>] {
        &self.models
    }

    /// The models an org may use, in configuration order.
    pub fn allowed<'a>(&'a self, policy: &'a OrgPolicy) -> impl Iterator<Item = &'a Arc<Model>> {
        self.models.iter().filter(|m| policy.allows(&m.name))
    }
}
