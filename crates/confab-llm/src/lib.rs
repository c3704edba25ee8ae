//! Model providers behind `confab_core::provider::ChatProvider`, one module
//! each, and the catalog that reads the models file into the registry.

pub mod anthropic;
pub mod catalog;
pub mod openai;
pub mod simulated;
pub mod tokenizer;

pub use simulated::{SimulatedModel, TokenDelay};

/// What an HTTP provider needs to reach its model.
#[derive(Clone)]
pub struct HttpProviderConfig {
    /// As the provider's own SDK takes it (`…/v1` for OpenAI, the host root
    /// for Anthropic).
    pub base_url: String,
    pub api_key: Option<String>,
    pub connect_timeout: std::time::Duration,
}
