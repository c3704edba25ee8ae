//! The models file and the environment shortcuts (SPEC §11), read into a
//! [`Catalog`] at start-up, then built into the core's `ModelRegistry` with
//! one provider instance per model.
//!
//! A bad file stops start-up with one line naming the file, the model and the
//! field ([`CatalogError`]). Keys are read from the variable the file names
//! (`api_key_env`), never from the file itself, and are held so that `Debug`
//! never shows them.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use confab_core::models::{Model, ModelRegistry, Prices, valid_model_name};
use confab_core::provider::ChatProvider;
use serde::Deserialize;

use crate::HttpProviderConfig;
use crate::anthropic::AnthropicProvider;
use crate::openai::OpenAiProvider;
use crate::simulated::SimulatedModel;
use crate::tokenizer::tokenizer_for;

/// The model every installation has when nothing else is configured.
pub const SIMULATED: &str = "simulated";
const DEFAULT_OPENAI_MODEL: &str = "gpt-4o-mini";
const DEFAULT_ANTHROPIC_MODEL: &str = "claude-sonnet-4-5";
const DEFAULT_OPENAI_BASE_URL: &str = "https://api.openai.com/v1";
const DEFAULT_ANTHROPIC_BASE_URL: &str = "https://api.anthropic.com";
/// Defaults for models that do not say (a shortcut, or a file entry without them).
const DEFAULT_CONTEXT_TOKENS: u32 = 128_000;
const DEFAULT_MAX_OUTPUT_TOKENS: u32 = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Openai,
    Anthropic,
    Simulated,
}

/// A provider key, read from the environment; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

/// One model as configured.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    pub provider: ProviderKind,
    pub base_url: Option<String>,
    pub api_key: Option<ApiKey>,
    pub upstream_model: String,
    pub context_tokens: u32,
    pub max_output_tokens: u32,
    pub prices: Prices,
}

/// Every configured model and the default's name.
#[derive(Clone, Debug, PartialEq)]
pub struct Catalog {
    pub models: Vec<ModelSpec>,
    pub default: String,
    /// The file the models came from, for messages.
    pub source: Option<PathBuf>,
}

/// A configuration problem, as one line: where, which model, which field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CatalogError(pub String);

/// The file's shape. Unknown fields are refused (a typo must not silently
/// fall back to a default).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileShape {
    default: Option<String>,
    #[serde(default)]
    model: Vec<FileModel>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileModel {
    name: String,
    provider: ProviderKind,
    base_url: Option<String>,
    api_key_env: Option<String>,
    upstream_model: Option<String>,
    context_tokens: Option<u32>,
    max_output_tokens: Option<u32>,
    input_price_per_mtok: Option<f64>,
    output_price_per_mtok: Option<f64>,
}

impl Catalog {
    /// Read the models file (when given and present) and the environment
    /// shortcuts. `file_required`: the path was named explicitly, so a
    /// missing file is an error rather than "no file".
    pub fn load(
        file: Option<&Path>,
        file_required: bool,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Catalog, CatalogError> {
        let get = |var: &str| lookup(var).filter(|v| !v.trim().is_empty());
        let mut models = Vec::new();
        let mut file_default = None;
        let mut source = None;
        if let Some(path) = file {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    let (found, default) = parse_file(path, &text, lookup)?;
                    models = found;
                    file_default = default;
                    source = Some(path.to_path_buf());
                }
                Err(err) if err.kind() == std::io::ErrorKind::NotFound && !file_required => {}
                Err(err) => {
                    return Err(CatalogError(format!(
                        "{}: cannot read the models file: {err}",
                        path.display()
                    )));
                }
            }
        }
        let mut shortcut = |provider: ProviderKind,
                            key_var: &str,
                            base_var: &str,
                            model_var: &str,
                            default_model: &str,
                            default_base: &str|
         -> Result<(), CatalogError> {
            let Some(key) = get(key_var) else {
                return Ok(());
            };
            let name = get(model_var).unwrap_or_else(|| default_model.to_owned());
            let name = name.trim().to_owned();
            if !valid_model_name(&name) {
                return Err(CatalogError(format!(
                    "{model_var}: {name:?} is not a model name (1-64 of A-Z a-z 0-9 . _ : -)"
                )));
            }
            if models.iter().any(|m: &ModelSpec| m.name == name) {
                // The file already defines it; the file wins.
                return Ok(());
            }
            let base_url = get(base_var).unwrap_or_else(|| default_base.to_owned());
            check_url(&base_url).map_err(|e| CatalogError(format!("{base_var}: {e}")))?;
            models.push(ModelSpec {
                upstream_model: name.clone(),
                name,
                provider,
                base_url: Some(base_url),
                api_key: Some(ApiKey(key.trim().to_owned())),
                context_tokens: DEFAULT_CONTEXT_TOKENS,
                max_output_tokens: DEFAULT_MAX_OUTPUT_TOKENS,
                prices: Prices::default(),
            });
            Ok(())
        };
        shortcut(
            ProviderKind::Openai,
            "OPENAI_API_KEY",
            "OPENAI_BASE_URL",
            "OPENAI_MODEL",
            DEFAULT_OPENAI_MODEL,
            DEFAULT_OPENAI_BASE_URL,
        )?;
        shortcut(
            ProviderKind::Anthropic,
            "ANTHROPIC_API_KEY",
            "ANTHROPIC_BASE_URL",
            "ANTHROPIC_MODEL",
            DEFAULT_ANTHROPIC_MODEL,
            DEFAULT_ANTHROPIC_BASE_URL,
        )?;
        if models.is_empty() {
            models.push(simulated_spec(SIMULATED.to_owned()));
        }
        let default = match get("DEFAULT_MODEL").or(file_default) {
            Some(name) => {
                let name = name.trim().to_owned();
                if !models.iter().any(|m| m.name == name) {
                    return Err(CatalogError(format!(
                        "DEFAULT_MODEL / default: {name:?} is not a configured model (configured: {})",
                        names(&models)
                    )));
                }
                name
            }
            None => models[0].name.clone(),
        };
        Ok(Catalog {
            models,
            default,
            source,
        })
    }

    /// One provider instance per model, then the registry.
    pub fn build(
        &self,
        simulated: &SimulatedModel,
        connect_timeout: Duration,
    ) -> Result<ModelRegistry, CatalogError> {
        let mut built = Vec::with_capacity(self.models.len());
        for spec in &self.models {
            let where_ = |field: &str, e: &dyn fmt::Display| {
                CatalogError(format!(
                    "{}model {:?}: {field}: {e}",
                    self.source
                        .as_ref()
                        .map(|p| format!("{}: ", p.display()))
                        .unwrap_or_default(),
                    spec.name
                ))
            };
            let http = || HttpProviderConfig {
                base_url: spec.base_url.clone().unwrap_or_default(),
                api_key: spec.api_key.as_ref().map(|k| k.expose().to_owned()),
                connect_timeout,
            };
            let provider: Arc<dyn ChatProvider> = match spec.provider {
                ProviderKind::Simulated => Arc::new(simulated.clone()),
                ProviderKind::Openai => {
                    Arc::new(OpenAiProvider::new(http()).map_err(|e| where_("base_url", &e))?)
                }
                ProviderKind::Anthropic => {
                    Arc::new(AnthropicProvider::new(http()).map_err(|e| where_("base_url", &e))?)
                }
            };
            let kind = provider.kind();
            built.push(Model {
                name: spec.name.clone(),
                upstream_model: spec.upstream_model.clone(),
                context_tokens: spec.context_tokens,
                max_output_tokens: spec.max_output_tokens,
                prices: spec.prices,
                tokenizer: tokenizer_for(kind, &spec.upstream_model),
                provider,
            });
        }
        ModelRegistry::new(built, &self.default).map_err(|e| CatalogError(e.0))
    }
}

fn simulated_spec(name: String) -> ModelSpec {
    ModelSpec {
        upstream_model: name.clone(),
        name,
        provider: ProviderKind::Simulated,
        base_url: None,
        api_key: None,
        // The simulated model needs no history and has no real window.
        context_tokens: 1_000_000,
        max_output_tokens: DEFAULT_MAX_OUTPUT_TOKENS,
        prices: Prices::default(),
    }
}

fn names(models: &[ModelSpec]) -> String {
    models
        .iter()
        .map(|m| m.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn check_url(url: &str) -> Result<(), String> {
    if url.starts_with("http://") || url.starts_with("https://") {
        Ok(())
    } else {
        Err(format!("{url:?} must start with http:// or https://"))
    }
}

fn parse_file(
    path: &Path,
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<(Vec<ModelSpec>, Option<String>), CatalogError> {
    let file = path.display();
    let shape: FileShape = toml::from_str(text).map_err(|e| {
        // toml's message names the line and the field; keep it on one line.
        let message = e.message().replace('\n', " ");
        let at = e
            .span()
            .map(|span| {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                format!(" (line {line})")
            })
            .unwrap_or_default();
        CatalogError(format!("{file}: {message}{at}"))
    })?;
    let mut models = Vec::with_capacity(shape.model.len());
    for (index, m) in shape.model.into_iter().enumerate() {
        let label = if m.name.is_empty() {
            format!("[[model]] #{}", index + 1)
        } else {
            format!("model {:?}", m.name)
        };
        let fail = |field: &str, problem: String| {
            CatalogError(format!("{file}: {label}: {field}: {problem}"))
        };
        if !valid_model_name(&m.name) {
            return Err(fail(
                "name",
                "must be 1-64 of A-Z a-z 0-9 . _ : -".to_owned(),
            ));
        }
        if models.iter().any(|s: &ModelSpec| s.name == m.name) {
            return Err(fail("name", "is defined twice".to_owned()));
        }
        let base_url = match (m.provider, m.base_url) {
            (ProviderKind::Simulated, _) => None,
            (_, Some(url)) => {
                check_url(&url).map_err(|e| fail("base_url", e))?;
                Some(url)
            }
            (ProviderKind::Openai, None) => Some(DEFAULT_OPENAI_BASE_URL.to_owned()),
            (ProviderKind::Anthropic, None) => Some(DEFAULT_ANTHROPIC_BASE_URL.to_owned()),
        };
        let api_key = match &m.api_key_env {
            None => None,
            Some(var) => match lookup(var).filter(|v| !v.trim().is_empty()) {
                Some(key) => Some(ApiKey(key.trim().to_owned())),
                None => {
                    return Err(fail(
                        "api_key_env",
                        format!("the variable {var} is not set"),
                    ));
                }
            },
        };
        if m.provider == ProviderKind::Anthropic && api_key.is_none() {
            return Err(fail(
                "api_key_env",
                "an anthropic model needs a key variable".to_owned(),
            ));
        }
        if m.provider == ProviderKind::Simulated {
            models.push(ModelSpec {
                context_tokens: m.context_tokens.unwrap_or(1_000_000),
                max_output_tokens: m.max_output_tokens.unwrap_or(DEFAULT_MAX_OUTPUT_TOKENS),
                ..simulated_spec(m.name)
            });
            continue;
        }
        let context_tokens = m.context_tokens.unwrap_or(DEFAULT_CONTEXT_TOKENS);
        let max_output_tokens = m.max_output_tokens.unwrap_or(DEFAULT_MAX_OUTPUT_TOKENS);
        if context_tokens < 2 {
            return Err(fail("context_tokens", "must be at least 2".to_owned()));
        }
        if max_output_tokens == 0 || max_output_tokens >= context_tokens {
            return Err(fail(
                "max_output_tokens",
                format!("must be at least 1 and below context_tokens ({context_tokens})"),
            ));
        }
        let price = |field: &str, v: Option<f64>| match v {
            None => Ok(0.0),
            Some(p) if p.is_finite() && p >= 0.0 => Ok(p),
            Some(_) => Err(fail(field, "must be a non-negative number".to_owned())),
        };
        models.push(ModelSpec {
            upstream_model: m.upstream_model.unwrap_or_else(|| m.name.clone()),
            name: m.name,
            provider: m.provider,
            base_url,
            api_key,
            context_tokens,
            max_output_tokens,
            prices: Prices {
                input_per_mtok: price("input_price_per_mtok", m.input_price_per_mtok)?,
                output_per_mtok: price("output_price_per_mtok", m.output_price_per_mtok)?,
            },
        });
    }
    if let Some(default) = &shape.default
        && !models.iter().any(|m| &m.name == default)
    {
        return Err(CatalogError(format!(
            "{file}: default: {default:?} is not one of the models in the file"
        )));
    }
    Ok((models, shape.default))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Catalog, CatalogError> {
        let dir = std::env::temp_dir().join(format!("confab-catalog-{}", uuid_like()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("models.toml");
        std::fs::write(&path, text).unwrap();
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let result = Catalog::load(Some(&path), true, &|k| env.get(k).cloned());
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    fn uuid_like() -> String {
        use std::time::{SystemTime, UNIX_EPOCH};
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!("{}-{nanos}", std::process::id())
    }

    #[test]
    fn nothing_configured_is_the_simulated_model() {
        let catalog = Catalog::load(None, false, &|_| None).unwrap();
        assert_eq!(catalog.default, SIMULATED);
        assert_eq!(catalog.models.len(), 1);
        assert_eq!(catalog.models[0].provider, ProviderKind::Simulated);
    }

    #[test]
    fn the_spec_example_parses() {
        let catalog = load(
            r#"
default = "fast"
[[model]]
name = "fast"
provider = "openai"
base_url = "http://127.0.0.1:8000/v1"
api_key_env = "MY_KEY"
upstream_model = "gpt-4o-mini"
context_tokens = 128000
max_output_tokens = 1024
input_price_per_mtok = 0.15
output_price_per_mtok = 0.60
[[model]]
name = "local"
provider = "openai"
base_url = "http://127.0.0.1:11434/v1"
"#,
            &[("MY_KEY", "sk-secret")],
        )
        .unwrap();
        assert_eq!(catalog.default, "fast");
        let fast = &catalog.models[0];
        assert_eq!(fast.upstream_model, "gpt-4o-mini");
        assert_eq!(fast.api_key.as_ref().unwrap().expose(), "sk-secret");
        assert!(!format!("{catalog:?}").contains("sk-secret"));
        assert_eq!(fast.prices.output_per_mtok, 0.60);
        assert!(catalog.models[1].api_key.is_none());
    }

    #[test]
    fn errors_name_the_file_the_model_and_the_field() {
        let cases = [
            (
                "[[model]]\nname = \"a\"\nprovider = \"openai\"\napi_key_env = \"NOPE\"\n",
                "model \"a\": api_key_env",
            ),
            (
                "[[model]]\nname = \"bad name\"\nprovider = \"openai\"\n",
                ": name:",
            ),
            (
                "[[model]]\nname = \"a\"\nprovider = \"openai\"\nmax_output_tokens = 10\ncontext_tokens = 5\n",
                "model \"a\": max_output_tokens",
            ),
            (
                "[[model]]\nname = \"a\"\nprovider = \"openai\"\nbase_url = \"ftp://x\"\n",
                "model \"a\": base_url",
            ),
            (
                "[[model]]\nname = \"a\"\nprovider = \"gemini\"\n",
                "models.toml",
            ),
            (
                "[[model]]\nname = \"a\"\nprovider = \"openai\"\ncontext = 5\n",
                "line",
            ),
            ("default = \"zzz\"\n", "default"),
        ];
        for (text, expected) in cases {
            let err = load(text, &[]).unwrap_err().0;
            assert!(err.contains("models.toml"), "{err}");
            assert!(err.contains(expected), "{text:?} → {err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn shortcuts_register_models_and_pick_the_default() {
        let env: HashMap<&str, &str> = [
            ("OPENAI_API_KEY", "sk-1"),
            ("ANTHROPIC_API_KEY", "ak-1"),
            ("ANTHROPIC_MODEL", "claude-x"),
            ("DEFAULT_MODEL", "claude-x"),
        ]
        .into();
        let catalog = Catalog::load(None, false, &|k| env.get(k).map(|v| v.to_string())).unwrap();
        let names: Vec<_> = catalog.models.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["gpt-4o-mini", "claude-x"]);
        assert_eq!(catalog.default, "claude-x");
        assert_eq!(
            catalog.models[0].base_url.as_deref(),
            Some(DEFAULT_OPENAI_BASE_URL)
        );
    }
}
