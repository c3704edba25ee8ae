//! Model providers behind `confab_core::provider::ChatProvider`.
//!
//! Only the simulated model exists so far; real providers (OpenAI-compatible
//! servers, Anthropic) are meant to be added as sibling modules.

pub mod simulated;

pub use simulated::{SimulatedModel, TokenDelay};
