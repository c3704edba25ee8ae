//! Token counting for context fitting and estimated usage (SPEC §11): the
//! model family's own BPE where one ships offline (OpenAI's, through
//! `tiktoken-rs`, whose BPE files are compiled in), a documented estimate for
//! everything else (Anthropic, Llama, Mistral, unknown ids).
//!
//! Each BPE is loaded lazily, once per process: loading o200k parses ~200k
//! ranks and costs far more than any count (figures in the tests below), so
//! it is paid on first use, or at start-up through [`preload`].

use std::sync::{Arc, OnceLock};

use confab_core::provider::TokenCounter;
use tiktoken_rs::CoreBPE;

/// Which counter a model gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    O200k,
    Cl100k,
    Estimate,
}

/// The counter for a model of `provider_kind` called `upstream_model`
/// upstream. OpenAI families are recognised by id whatever server serves
/// them (a LiteLLM or OpenRouter id such as `openai/gpt-4o` too); an
/// `anthropic` model is always estimated (Claude's tokenizer is not public).
pub fn tokenizer_for(provider_kind: &str, upstream_model: &str) -> Arc<dyn TokenCounter> {
    match family(provider_kind, upstream_model) {
        Family::O200k => Arc::new(Bpe::O200k),
        Family::Cl100k => Arc::new(Bpe::Cl100k),
        Family::Estimate => Arc::new(Estimate),
    }
}

/// Load the BPE `tokenizer_for` would use for this model now, so that the
/// first turn does not pay for it (blocking: call it from
/// `spawn_blocking` or before serving). A no-op for estimated models.
pub fn preload(provider_kind: &str, upstream_model: &str) {
    match family(provider_kind, upstream_model) {
        Family::O200k => {
            Bpe::O200k.get();
        }
        Family::Cl100k => {
            Bpe::Cl100k.get();
        }
        Family::Estimate => {}
    }
}

fn family(provider_kind: &str, upstream_model: &str) -> Family {
    if provider_kind == "anthropic" {
        return Family::Estimate;
    }
    let model = upstream_model.trim().to_ascii_lowercase();
    // `openai/gpt-4o`, `azure/gpt-4.1`: the last path segment names the model.
    let model = model.rsplit('/').next().unwrap_or("");
    // A prefix, or a bare id followed by a version (`o1`, `o1-mini`,
    // `o3-2025-04-16`) but not `o1x`.
    let is = |family: &str| {
        model == family
            || model
                .strip_prefix(family)
                .is_some_and(|rest| rest.starts_with(['-', '.', ':']))
    };
    let o200k = ["gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4"];
    if o200k.iter().any(|f| is(f)) || model.starts_with("chatgpt-") || is("gpt-oss") {
        // gpt-oss uses o200k_harmony: o200k plus special tokens, which
        // `encode_ordinary` never produces anyway.
        return Family::O200k;
    }
    let cl100k = [
        "gpt-4",
        "gpt-3.5",
        "text-embedding-3",
        "text-embedding-ada-002",
    ];
    if cl100k.iter().any(|f| is(f)) || model.starts_with("gpt-3.5") {
        return Family::Cl100k;
    }
    Family::Estimate
}

#[derive(Clone, Copy, Debug)]
enum Bpe {
    O200k,
    Cl100k,
}

static O200K: OnceLock<Option<CoreBPE>> = OnceLock::new();
static CL100K: OnceLock<Option<CoreBPE>> = OnceLock::new();

impl Bpe {
    /// The loaded BPE; `None` if it failed to load (its data is compiled
    /// in, so only a broken build would), and the estimate is used instead.
    fn get(self) -> Option<&'static CoreBPE> {
        let cell = match self {
            Bpe::O200k => &O200K,
            Bpe::Cl100k => &CL100K,
        };
        cell.get_or_init(|| {
            let loaded = match self {
                Bpe::O200k => tiktoken_rs::o200k_base(),
                Bpe::Cl100k => tiktoken_rs::cl100k_base(),
            };
            loaded
                .map_err(|err| {
                    let tokenizer = self.name();
                    tracing::warn!(tokenizer, %err, "tokenizer failed to load; estimating");
                })
                .ok()
        })
        .as_ref()
    }
}

impl TokenCounter for Bpe {
    fn name(&self) -> &'static str {
        match self {
            Bpe::O200k => "o200k_base",
            Bpe::Cl100k => "cl100k_base",
        }
    }

    fn count(&self, text: &str) -> u64 {
        if text.is_empty() {
            return 0;
        }
        match self.get() {
            // Ordinary: text that looks like `<|endoftext|>` is text here,
            // as the API counts a user's message.
            Some(bpe) => pieces(text)
                .map(|piece| bpe.encode_ordinary(piece).len() as u64)
                .sum(),
            None => estimate(text),
        }
    }
}

/// The longest whitespace run the BPE is given in one piece.
///
/// tiktoken's pre-tokenizer regex has a lookahead (`\s+(?!\S)`), so
/// `fancy-regex` runs it on its backtracking machine, which keeps one stack
/// entry per character of a whitespace run and fails at a million; tiktoken-rs
/// unwraps that failure. Client text is up to 1 MiB, so a message of spaces
/// would panic the request (the connection closes without an answer). Runs
/// are cut into pieces of this many characters and each piece is encoded on
/// its own: the count of text without such runs is exactly tiktoken's, and
/// a cut run counts within a token or two per cut of its whole.
const WHITESPACE_RUN: usize = 4096;

/// `text` in the pieces the BPE encodes one by one: cut only inside
/// whitespace runs longer than [`WHITESPACE_RUN`] characters.
fn pieces(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut run = 0;
        for (at, c) in rest.char_indices() {
            if !c.is_whitespace() {
                run = 0;
            } else if run == WHITESPACE_RUN {
                let (piece, tail) = rest.split_at(at);
                rest = tail;
                return Some(piece);
            } else {
                run += 1;
            }
        }
        Some(std::mem::take(&mut rest))
    })
}

/// The estimate for families without a tokenizer here.
#[derive(Clone, Copy, Debug)]
struct Estimate;

impl TokenCounter for Estimate {
    fn name(&self) -> &'static str {
        "estimate"
    }

    fn count(&self, text: &str) -> u64 {
        estimate(text)
    }
}

/// ASCII at 3.5 characters per token, rounded up, plus one token per
/// non-ASCII character; at least 1 for non-empty text.
///
/// 3.5 is what Anthropic documents for English with Claude; Llama 3 and
/// Mistral BPEs give ~4, so English errs high by up to ~15%, the safe side
/// when the count decides what fits in the context window. Non-ASCII is
/// counted per character because bytes/4 would under-count CJK (one to two
/// tokens a character in every BPE here) by half or more; accented Latin is
/// then over-counted, again on the safe side. Rejected: plain chars/4 (the
/// common rule of thumb), which under-counts Claude and every non-Latin script.
fn estimate(text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    let ascii = text.bytes().filter(u8::is_ascii).count() as u64;
    let other = text.chars().filter(|c| !c.is_ascii()).count() as u64;
    ((ascii * 2).div_ceil(7) + other).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn families_are_recognised() {
        let cases = [
            ("openai", "gpt-4o-mini", "o200k_base"),
            ("openai", "gpt-4o", "o200k_base"),
            ("openai", "GPT-4.1-nano", "o200k_base"),
            ("openai", "gpt-5", "o200k_base"),
            ("openai", "gpt-5-mini-2025-08-07", "o200k_base"),
            ("openai", "o1", "o200k_base"),
            ("openai", "o3-mini", "o200k_base"),
            ("openai", "o4-mini", "o200k_base"),
            ("openai", "chatgpt-4o-latest", "o200k_base"),
            ("openai", "openai/gpt-4o", "o200k_base"),
            ("openai", "gpt-oss-20b", "o200k_base"),
            ("openai", "gpt-4", "cl100k_base"),
            ("openai", "gpt-4-turbo", "cl100k_base"),
            ("openai", "gpt-3.5-turbo", "cl100k_base"),
            ("openai", "text-embedding-3-small", "cl100k_base"),
            ("openai", "llama3.1:8b", "estimate"),
            ("openai", "o1x", "estimate"),
            ("openai", "mistral-7b-instruct", "estimate"),
            ("openai", "gpt-4o-mini", "o200k_base"),
            ("anthropic", "claude-sonnet-4-5", "estimate"),
            ("anthropic", "gpt-4o", "estimate"),
            ("simulated", "simulated", "estimate"),
        ];
        for (kind, model, name) in cases {
            assert_eq!(tokenizer_for(kind, model).name(), name, "{kind} {model}");
        }
    }

    #[test]
    fn estimate_rounds_up_and_is_never_zero() {
        let e = tokenizer_for("anthropic", "claude");
        assert_eq!(e.count(""), 0);
        assert_eq!(e.count(" "), 1);
        assert_eq!(e.count("a"), 1);
        assert_eq!(e.count("abcdefg"), 2);
        assert_eq!(e.count("abcdefgh"), 3);
        assert_eq!(e.count("日本語"), 3);
        assert_eq!(e.count("café"), 1 + 1);
        assert_eq!(e.count(&"x".repeat(3500)), 1000);
    }

    #[test]
    fn bpe_counts_match_tiktoken() {
        let o200k = tokenizer_for("openai", "gpt-4o");
        let cl100k = tokenizer_for("openai", "gpt-4");
        // Reference figures from OpenAI's tiktoken.
        assert_eq!(o200k.count("hello world"), 2);
        assert_eq!(cl100k.count("hello world"), 2);
        assert_eq!(o200k.count(""), 0);
        // Special-token text counts as ordinary text, never as one token.
        assert!(o200k.count("<|endoftext|>") > 1);
        assert!(cl100k.count("<|endoftext|>") > 1);
    }

    /// Client text can be anything up to the body limit (1 MiB on `/v1`).
    /// The BPE's pre-tokenizer regex backtracks once per character of a
    /// whitespace run and gives up near a million; tiktoken-rs then panics
    /// inside the request. Every shape here must count, and close to what
    /// the same text in small pieces counts.
    #[test]
    fn pathological_text_counts_without_panicking() {
        let big = 1_000_100;
        let texts = [
            format!("{}x", " ".repeat(big)),
            format!("a{}b", "\n".repeat(big)),
            format!("{}x", "\t \r\n".repeat(big / 4)),
            format!("{}\u{3000}x", "\u{3000}".repeat(big / 3)),
            "!".repeat(big),
            "a".repeat(big),
            "9".repeat(big),
            format!("{}x", " ".repeat(WHITESPACE_RUN + 1)),
        ];
        for model in ["gpt-4o", "gpt-4"] {
            let counter = tokenizer_for("openai", model);
            for text in &texts {
                let tokens = counter.count(text);
                let head: String = text.chars().take(3).collect();
                assert!(tokens > 0, "{model}: {head:?}… counted nothing");
                assert!(
                    tokens <= text.len() as u64,
                    "{model}: {head:?}… {tokens} tokens for {} bytes",
                    text.len()
                );
            }
        }
        // Ordinary text is never cut: the count is tiktoken's own.
        let spaced = format!("a{}b", " ".repeat(WHITESPACE_RUN));
        let whole = Bpe::O200k
            .get()
            .map(|bpe| bpe.encode_ordinary(&spaced).len() as u64);
        assert_eq!(Some(Bpe::O200k.count(&spaced)), whole);
    }

    /// Figures for the report: run with `--nocapture` to see them.
    #[test]
    fn o200k_load_and_count_costs() {
        let started = Instant::now();
        preload("openai", "gpt-4o");
        let load = started.elapsed();
        let counter = tokenizer_for("openai", "gpt-4o");
        let sentence = "The quick brown fox jumps over the lazy dog, café ☕ 日本語. ";
        let text: String = sentence.repeat(10 * 1024 / sentence.len() + 1);
        let text = &text[..text.floor_char_boundary(10 * 1024)];
        let runs = 20;
        let started = Instant::now();
        let mut tokens = 0;
        for _ in 0..runs {
            tokens = counter.count(text);
        }
        let per_call = started.elapsed() / runs;
        let started = Instant::now();
        let estimated = estimate(text);
        let estimate_cost = started.elapsed();
        eprintln!(
            "o200k load {load:?}; count of {} bytes: {tokens} tokens in {per_call:?} per call \
             (estimate: {estimated} tokens in {estimate_cost:?})",
            text.len()
        );
        assert!(tokens > 1000);
    }
}
