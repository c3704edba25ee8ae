//! The simulated model: a deterministic reply that quotes the first 100
//! characters of the user's message, streamed word by word with a per-token
//! delay. Deterministic means tests and benchmarks can compare replies byte
//! for byte, and the delays are reproducible too (seeded by the message).
//!
//! A message starting with `/fail` makes the model fail after a few tokens,
//! so the `failed` path can be tried by hand and tested end to end.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use confab_core::provider::{
    ChatProvider, ChatRequest, Chunk, ChunkStream, ProviderError, ReportedUsage,
};
use futures::StreamExt;
use sha2::{Digest, Sha256};

/// How many characters of the user's message the reply quotes verbatim.
pub const QUOTED_CHARS: usize = 100;
/// The marker that makes the simulated model fail mid-reply.
pub const FAIL_MARKER: &str = "/fail";
/// Tokens produced before a `/fail` message errors.
const TOKENS_BEFORE_FAILURE: usize = 3;
/// Mixed into the message's seed for the per-token delays.
const DELAY_SEED: u64 = 0x5EED;

/// Per-token delay: a fixed value or an inclusive range in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenDelay {
    pub min_ms: u64,
    pub max_ms: u64,
}

impl TokenDelay {
    pub const ZERO: TokenDelay = TokenDelay {
        min_ms: 0,
        max_ms: 0,
    };
}

impl FromStr for TokenDelay {
    type Err = String;
    /// `"15"` or `"10-30"`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parse = |v: &str| {
            v.trim()
                .parse::<u64>()
                .map_err(|_| format!("expected milliseconds like 20 or 10-30, got {s:?}"))
        };
        let (min_ms, max_ms) = match s.split_once('-') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => {
                let v = parse(s)?;
                (v, v)
            }
        };
        if min_ms > max_ms {
            return Err(format!("range {s:?} has its minimum above its maximum"));
        }
        if max_ms > 60_000 {
            return Err(format!("{s:?} is longer than a minute per token"));
        }
        Ok(TokenDelay { min_ms, max_ms })
    }
}

#[derive(Clone, Debug)]
pub struct SimulatedModel {
    delay: TokenDelay,
    /// Pad replies to at least this many words (for long-stream benchmarks).
    min_words: usize,
}

impl SimulatedModel {
    pub fn new(delay: TokenDelay, min_words: usize) -> Self {
        Self { delay, min_words }
    }

    /// The whole reply to `message`; the stream yields exactly this text.
    pub fn reply_to(&self, message: &str) -> String {
        let quoted: String = message.chars().take(QUOTED_CHARS).collect();
        let seed = seed_of(message);
        let mut rng = SplitMix64(seed);
        const OPENERS: [&str; 4] = [
            "Thanks for your message.",
            "Good question.",
            "Here is a simulated answer.",
            "Let me think about that.",
        ];
        const FILLERS: [&str; 8] = [
            "This reply comes from confab's simulated model, streamed one word at a time.",
            "No real language model was asked, so the answer is deterministic.",
            "Every token you see is stored as it arrives, so nothing is lost if you leave.",
            "Real providers plug in behind the same interface.",
            "The same message always produces the same reply.",
            "Try the Stop button to see a partial answer kept as cancelled.",
            "Rate limits, tenancy and persistence all apply to this reply.",
            "Streaming uses Server-Sent Events with one event per token.",
        ];
        let mut text = format!(
            "{} You said: \"{quoted}\"",
            OPENERS[rng.below(OPENERS.len())]
        );
        // Distinct sentences, in a message-dependent order.
        let mut order: Vec<usize> = (0..FILLERS.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let sentences = 2 + rng.below(3);
        for &i in &order[..sentences] {
            text.push(' ');
            text.push_str(FILLERS[i]);
        }
        let mut words = text.split_whitespace().count();
        while words < self.min_words {
            let filler = FILLERS[rng.below(FILLERS.len())];
            text.push(' ');
            text.push_str(filler);
            words += filler.split_whitespace().count();
        }
        text
    }

    /// The delay the stream of `message` waits before each of its tokens, in
    /// order: what an ideal consumer would wait in total (benchmarks compare
    /// measured stream durations with their sum).
    pub fn planned_delays(&self, message: &str) -> Vec<Duration> {
        let mut rng = SplitMix64(seed_of(message) ^ DELAY_SEED);
        let tokens = token_count(&self.reply_to(message));
        (0..tokens).map(|_| self.delay_for(&mut rng)).collect()
    }

    fn delay_for(&self, rng: &mut SplitMix64) -> Duration {
        let span = self.delay.max_ms - self.delay.min_ms;
        let extra = if span == 0 {
            0
        } else {
            rng.next() % (span + 1)
        };
        Duration::from_millis(self.delay.min_ms + extra)
    }
}

/// Split into tokens that concatenate back to `text` exactly: each token is
/// a word with the whitespace that follows it (leading whitespace joins the
/// first token).
pub fn tokenize(text: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut at = 0;
    while let Some(end) = token_end(text, at) {
        tokens.push(text[at..end].to_owned());
        at = end;
    }
    tokens
}

/// How many tokens [`tokenize`] makes of `text`, without making them.
fn token_count(text: &str) -> usize {
    std::iter::successors(token_end(text, 0), |&at| token_end(text, at)).count()
}

/// Where the token starting at byte `from` of `text` ends (the rule of
/// [`tokenize`]: whitespace, a word, whitespace); `None` past the end.
fn token_end(text: &str, from: usize) -> Option<usize> {
    let rest = text.get(from..).filter(|rest| !rest.is_empty())?;
    let word = rest.trim_start();
    let after_word = word.trim_start_matches(|c: char| !c.is_whitespace());
    let next = after_word.trim_start();
    Some(text.len() - next.len())
}

fn seed_of(message: &str) -> u64 {
    let digest = Sha256::digest(message.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(bytes)
}

/// A tiny deterministic PRNG (SplitMix64): enough for picking sentences and
/// delays reproducibly; not for anything secret.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn last_user_message(request: &ChatRequest) -> Result<&str, ProviderError> {
    request
        .messages
        .last()
        .map(|m| m.content.as_str())
        .ok_or_else(|| ProviderError::BadRequest {
            status: 400,
            reason: "empty prompt".into(),
        })
}

fn simulated_failure() -> ProviderError {
    ProviderError::Upstream {
        kind: "simulated_failure".into(),
    }
}

#[async_trait]
impl ChatProvider for SimulatedModel {
    fn kind(&self) -> &'static str {
        "simulated"
    }

    fn wants_history(&self) -> bool {
        false
    }

    async fn stream(&self, request: &ChatRequest) -> Result<ChunkStream, ProviderError> {
        let message = last_user_message(request)?;
        let fail = message.trim_start().starts_with(FAIL_MARKER);
        let reply = self.reply_to(message);
        // The simulated model reports its own usage, in its own unit (words).
        let usage = Chunk::Usage(ReportedUsage {
            prompt_tokens: words(message),
            completion_tokens: words(&reply),
        });
        if !request.interactive {
            // Nobody watches (POST /chat): the whole reply at once, no pacing.
            let chunks: Vec<Result<Chunk, ProviderError>> = if fail {
                let partial: String = tokenize(&reply)
                    .into_iter()
                    .take(TOKENS_BEFORE_FAILURE)
                    .collect();
                vec![Ok(Chunk::Delta(partial)), Err(simulated_failure())]
            } else {
                vec![
                    Ok(Chunk::Delta(reply)),
                    Ok(Chunk::Finish("stop".into())),
                    Ok(usage),
                ]
            };
            return Ok(futures::stream::iter(chunks).boxed());
        }
        let rng = SplitMix64(seed_of(message) ^ DELAY_SEED);
        let fail_at =
            fail.then(|| TOKENS_BEFORE_FAILURE.min(token_count(&reply).saturating_sub(1)));
        Ok(Paced {
            reply,
            at: 0,
            index: 0,
            fail_at,
            model: self.clone(),
            rng,
            due: None,
            timer: None,
            next: None,
            usage: Some(usage),
        }
        .boxed())
    }
}

pin_project_lite::pin_project! {
    /// A streamed reply: each token is due on a schedule (start + the sum of
    /// the delays so far) rather than after a fresh sleep each, so timer
    /// rounding does not pile up over a long reply. Lazy: a token's delay runs
    /// only while the consumer polls, so dropping the stream stops the
    /// "generation" at once. One timer per reply, reset per token (this runs
    /// once per token of every simulated stream). Each token is cut from the
    /// reply when it is due, into a fresh allocation: tokens split up front
    /// (one `String` each) were cold by their time, a cache miss or two per
    /// token for the engine that reads them.
    ///
    /// The timer is held in the stream itself, not boxed beside it: the timer
    /// wheel and this stream touch it at every token, and a separate allocation
    /// was one more cold cache line each time.
    struct Paced {
        reply: String,
        // Where the next token starts in `reply`, and its index.
        at: usize,
        index: usize,
        // The index of the token at which a `/fail` message errors.
        fail_at: Option<usize>,
        model: SimulatedModel,
        rng: SplitMix64,
        due: Option<tokio::time::Instant>,
        // Created on the first delayed token.
        #[pin]
        timer: Option<tokio::time::Sleep>,
        // The token waiting for its time: its index and bytes in `reply`.
        next: Option<(usize, std::ops::Range<usize>)>,
        // Sent after the last token, then the end.
        usage: Option<Chunk>,
    }
}

impl futures::Stream for Paced {
    type Item = Result<Chunk, ProviderError>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let mut this = self.project();
        if this.next.is_none() {
            let Some(end) = token_end(this.reply, *this.at) else {
                return Poll::Ready(this.usage.take().map(Ok));
            };
            let (i, token) = (*this.index, *this.at..end);
            *this.at = end;
            *this.index += 1;
            let delay = this.model.delay_for(this.rng);
            let at = this.due.unwrap_or_else(tokio::time::Instant::now) + delay;
            *this.due = Some(at);
            if !delay.is_zero() {
                match this.timer.as_mut().as_pin_mut() {
                    Some(timer) => timer.reset(at),
                    None => this.timer.set(Some(tokio::time::sleep_until(at))),
                }
            }
            *this.next = Some((i, token));
        }
        // A timer left from an earlier token (this one had no delay) has
        // elapsed already: it does not wait.
        if let Some(timer) = this.timer.as_pin_mut()
            && timer.poll(cx).is_pending()
        {
            return Poll::Pending;
        }
        let Some((i, token)) = this.next.take() else {
            return Poll::Ready(None);
        };
        if *this.fail_at == Some(i) {
            *this.usage = None;
            *this.at = this.reply.len();
            return Poll::Ready(Some(Err(simulated_failure())));
        }
        let text = this.reply.get(token).unwrap_or_default().to_owned();
        Poll::Ready(Some(Ok(Chunk::Delta(text))))
    }
}

/// The simulated model's token unit: whitespace-separated words.
pub fn words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use confab_core::model::MessageRole;
    use confab_core::provider::PromptMessage;

    fn prompt(text: &str) -> ChatRequest {
        ChatRequest {
            upstream_model: "simulated".into(),
            system: None,
            messages: vec![PromptMessage {
                role: MessageRole::User,
                content: text.into(),
            }],
            max_output_tokens: 1024,
            interactive: true,
            sampling: Default::default(),
        }
    }

    #[test]
    fn reply_is_deterministic_and_quotes_the_message() {
        let model = SimulatedModel::new(TokenDelay::ZERO, 0);
        let msg = "x".repeat(150);
        let a = model.reply_to(&msg);
        assert_eq!(a, model.reply_to(&msg));
        assert!(a.contains(&format!("\"{}\"", "x".repeat(100))));
        assert!(!a.contains(&"x".repeat(101)));
    }

    #[test]
    fn tokens_concatenate_to_the_text() {
        for text in [
            "a b  c",
            "  lead",
            "trail  ",
            "one",
            "",
            "multi\nline\n\nend",
        ] {
            assert_eq!(tokenize(text).concat(), text);
        }
        assert_eq!(tokenize("a b c").len(), 3);
        for text in ["a b  c", "  lead", "", " ", "multi\nline\n\nend"] {
            assert_eq!(token_count(text), tokenize(text).len(), "{text:?}");
        }
        // A word with the whitespace after it; leading whitespace joins the
        // first word; text of whitespace only is one token.
        assert_eq!(tokenize("  lead  a\tb\n"), ["  lead  ", "a\t", "b\n"]);
        assert_eq!(tokenize("x, y."), ["x, ", "y."]);
        assert_eq!(tokenize(" \n "), [" \n "]);
        assert!(tokenize("").is_empty());
    }

    #[tokio::test]
    async fn the_stream_yields_the_tokens_of_the_reply() {
        let model = SimulatedModel::new(TokenDelay::ZERO, 0);
        let request = prompt("what are tokens?");
        let mut stream = model.stream(&request).await.expect("stream");
        let mut got = Vec::new();
        while let Some(chunk) = stream.next().await {
            if let Ok(Chunk::Delta(text)) = chunk {
                got.push(text);
            }
        }
        assert_eq!(got, tokenize(&model.reply_to("what are tokens?")));
    }

    #[test]
    fn min_words_pads_the_reply() {
        let model = SimulatedModel::new(TokenDelay::ZERO, 300);
        assert!(model.reply_to("hi").split_whitespace().count() >= 300);
    }

    #[test]
    fn planned_delays_cover_every_token_within_the_range() {
        let delay = TokenDelay {
            min_ms: 10,
            max_ms: 30,
        };
        let model = SimulatedModel::new(delay, 0);
        let planned = model.planned_delays("hello there");
        assert_eq!(planned, model.planned_delays("hello there"));
        assert_eq!(
            planned.len(),
            tokenize(&model.reply_to("hello there")).len()
        );
        assert!(planned.iter().all(|d| (10..=30).contains(&d.as_millis())));
        assert_ne!(planned, model.planned_delays("something else entirely"));
    }

    #[test]
    fn delay_parses() {
        assert_eq!(
            "10-30".parse(),
            Ok(TokenDelay {
                min_ms: 10,
                max_ms: 30
            })
        );
        assert_eq!("0".parse(), Ok(TokenDelay::ZERO));
        assert!("30-10".parse::<TokenDelay>().is_err());
        assert!("fast".parse::<TokenDelay>().is_err());
    }

    #[tokio::test]
    async fn stream_yields_the_reply_then_finishes() {
        let model = SimulatedModel::new(TokenDelay::ZERO, 0);
        let mut stream = model.stream(&prompt("hello")).await.unwrap();
        let mut text = String::new();
        let mut usage = None;
        while let Some(chunk) = stream.next().await {
            match chunk.unwrap() {
                Chunk::Delta(d) => text.push_str(&d),
                Chunk::Finish(_) => {}
                Chunk::Usage(u) => usage = Some(u),
            }
        }
        assert_eq!(usage.unwrap().completion_tokens, words(&text));
        assert_eq!(text, model.reply_to("hello"));
    }

    #[tokio::test]
    async fn fail_marker_fails_mid_stream() {
        let model = SimulatedModel::new(TokenDelay::ZERO, 0);
        let chunks: Vec<_> = model
            .stream(&prompt("/fail now"))
            .await
            .unwrap()
            .collect()
            .await;
        assert!(chunks.iter().any(|c| c.is_err()));
        assert!(chunks.iter().any(|c| matches!(c, Ok(Chunk::Delta(_)))));
    }
}
