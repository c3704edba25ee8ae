//! Server-side SSE framing for `POST /chat/stream`.
//!
//! The generator encodes each event once, as bytes, and the response body
//! sends whatever is queued in one write: one event per write while the
//! client keeps up (every token leaves at once), several per write when a
//! burst of streams saturates the machine — then the syscalls per token, the
//! largest cost of a stream (the kernel's TCP send path), shrink instead of
//! queueing up. Hand-written instead of axum's `Sse` for that batching.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

/// At most this much is gathered into one write.
const MAX_BATCH_BYTES: usize = 16 * 1024;

/// `id: <id>\ndata: <json>\n\n`. `json` must be one line, which serde_json's
/// compact output always is (newlines inside strings are escaped).
pub fn data_frame(id: u64, json: &str) -> Bytes {
    let mut frame = BytesMut::with_capacity(json.len() + 32);
    frame.extend_from_slice(b"id: ");
    frame.extend_from_slice(id.to_string().as_bytes());
    frame.extend_from_slice(b"\ndata: ");
    frame.extend_from_slice(json.as_bytes());
    frame.extend_from_slice(b"\n\n");
    frame.freeze()
}

/// The keep-alive comment, `: ping`.
pub fn ping_frame() -> Bytes {
    Bytes::from_static(b": ping\n\n")
}

/// The receiving end of a stream's channel as a body: each poll yields every
/// frame already queued (up to [`MAX_BATCH_BYTES`]) as one chunk.
pub struct BatchedFrames {
    rx: mpsc::Receiver<Bytes>,
}

impl BatchedFrames {
    pub fn new(rx: mpsc::Receiver<Bytes>) -> Self {
        Self { rx }
    }
}

impl futures::Stream for BatchedFrames {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let first = match self.rx.poll_recv(cx) {
            Poll::Ready(Some(frame)) => frame,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        let mut batch: Option<BytesMut> = None;
        while batch.as_ref().map_or(first.len(), BytesMut::len) < MAX_BATCH_BYTES {
            let Ok(more) = self.rx.try_recv() else { break };
            batch
                .get_or_insert_with(|| BytesMut::from(&first[..]))
                .extend_from_slice(&more);
        }
        Poll::Ready(Some(Ok(batch.map_or(first, BytesMut::freeze))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test]
    async fn queued_frames_leave_together_and_in_order() {
        let (tx, rx) = mpsc::channel(8);
        let mut body = BatchedFrames::new(rx);
        tx.send(data_frame(1, "{\"a\":1}")).await.unwrap();
        let one = body.next().await.unwrap().unwrap();
        assert_eq!(&one[..], b"id: 1\ndata: {\"a\":1}\n\n");
        tx.send(data_frame(2, "{}")).await.unwrap();
        tx.send(ping_frame()).await.unwrap();
        tx.send(data_frame(3, "{}")).await.unwrap();
        let batch = body.next().await.unwrap().unwrap();
        assert_eq!(
            &batch[..],
            b"id: 2\ndata: {}\n\n: ping\n\nid: 3\ndata: {}\n\n"
        );
        drop(tx);
        assert!(body.next().await.is_none());
    }
}
