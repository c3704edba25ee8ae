//! Reading confab's SSE responses in tests, with the crate's own parser.

use std::collections::VecDeque;

use confab_server::sse_client::{SseEvent, SseParser};
use futures::StreamExt;
use serde_json::Value;

pub struct SseReader {
    body: futures::stream::BoxStream<'static, reqwest::Result<axum::body::Bytes>>,
    parser: SseParser,
    pending: VecDeque<SseEvent>,
}

impl SseReader {
    pub fn new(res: reqwest::Response) -> Self {
        Self {
            body: res.bytes_stream().boxed(),
            parser: SseParser::new(),
            pending: VecDeque::new(),
        }
    }

    /// The next event's data as JSON; `None` at the end of the stream.
    pub async fn next_json(&mut self) -> Option<Value> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Some(
                    serde_json::from_str(&ev.data)
                        .unwrap_or_else(|e| panic!("data is not JSON ({e}): {:?}", ev.data)),
                );
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.pending.extend(self.parser.push(&chunk)),
                Some(Err(e)) => panic!("stream error: {e}"),
                None => return None,
            }
        }
    }

    /// The next event as `(id, data as JSON)`; `None` at the end of the stream.
    pub async fn next_event(&mut self) -> Option<(u64, Value)> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                let id = ev
                    .id
                    .as_deref()
                    .and_then(|i| i.parse().ok())
                    .unwrap_or_else(|| panic!("event without a numeric id: {ev:?}"));
                let data = serde_json::from_str(&ev.data)
                    .unwrap_or_else(|e| panic!("data is not JSON ({e}): {:?}", ev.data));
                return Some((id, data));
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.pending.extend(self.parser.push(&chunk)),
                Some(Err(e)) => panic!("stream error: {e}"),
                None => return None,
            }
        }
    }

    /// Every remaining event with its id.
    pub async fn rest(mut self) -> Vec<(u64, Value)> {
        let mut out = Vec::new();
        while let Some(ev) = self.next_event().await {
            out.push(ev);
        }
        out
    }

    /// Every remaining event.
    pub async fn all(mut self) -> (Vec<Value>, usize) {
        let mut out = Vec::new();
        while let Some(v) = self.next_json().await {
            out.push(v);
        }
        (out, self.parser.comments)
    }

    pub fn comments(&self) -> usize {
        self.parser.comments
    }
}
