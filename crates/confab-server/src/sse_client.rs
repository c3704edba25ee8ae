//! An incremental Server-Sent-Events parser for clients of confab: the
//! integration tests and the benchmark client read streams with it. Feed it
//! bytes as they arrive, split anywhere; it yields complete events only.

/// One dispatched event (comments are counted, not returned as events).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    /// `data:` lines joined with `\n`.
    pub data: String,
}

#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of an incomplete line (kept as bytes: a chunk may end inside a
    /// multi-byte character).
    line: Vec<u8>,
    /// A `\r` ended the previous chunk: a `\n` starting the next one belongs to it.
    after_cr: bool,
    current: SseEvent,
    has_data: bool,
    /// Comment lines seen (`: ping` keep-alives).
    pub comments: usize,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feed a chunk; returns the events it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        for &b in chunk {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' => self.end_line(&mut out),
                b'\r' => {
                    self.after_cr = true;
                    self.end_line(&mut out);
                }
                _ => self.line.push(b),
            }
        }
        out
    }

    fn end_line(&mut self, out: &mut Vec<SseEvent>) {
        let line = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        if line.is_empty() {
            if self.has_data {
                out.push(std::mem::take(&mut self.current));
            } else {
                self.current = SseEvent::default();
            }
            self.has_data = false;
            return;
        }
        if line.starts_with(':') {
            self.comments += 1;
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_str(), ""),
        };
        match field {
            "data" => {
                if self.has_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(value);
                self.has_data = true;
            }
            "id" => self.current.id = Some(value.to_owned()),
            "event" => self.current.event = Some(value.to_owned()),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = ": ping\n\nid: 1\ndata: {\"token\":\"héllo \"}\n\nid: 2\r\ndata: a\r\ndata: b\r\n\r\n: ping\n\ndata: 👋\n\ndata: unterminated";

    fn parse_all(chunks: &[&[u8]]) -> (Vec<SseEvent>, usize) {
        let mut p = SseParser::new();
        let mut events = Vec::new();
        for c in chunks {
            events.extend(p.push(c));
        }
        (events, p.comments)
    }

    #[test]
    fn splits_anywhere_give_the_same_events() {
        let bytes = SAMPLE.as_bytes();
        let (whole, comments) = parse_all(&[bytes]);
        assert_eq!(whole.len(), 3);
        assert_eq!(comments, 2);
        assert_eq!(whole[0].id.as_deref(), Some("1"));
        assert_eq!(whole[0].data, "{\"token\":\"héllo \"}");
        assert_eq!(whole[1].data, "a\nb");
        assert_eq!(whole[2].data, "👋");
        for i in 0..=bytes.len() {
            let (split, _) = parse_all(&[&bytes[..i], &bytes[i..]]);
            assert_eq!(split, whole, "split at {i}");
        }
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(parse_all(&singles).0, whole);
    }
}
