/*
 * sse.js — incremental Server-Sent Events parser for the confab playground.
 *
 * Implements the "event stream interpretation" of the WHATWG HTML standard
 * (§9.2.6) for text that arrives in arbitrary pieces:
 *   - lines end in "\r\n", "\n" or "\r", and a "\r" at the end of one chunk
 *     followed by "\n" at the start of the next is ONE line ending;
 *   - an empty line dispatches the event; a final event that is not followed
 *     by an empty line is never dispatched (end() discards it);
 *   - lines starting with ":" are comments (e.g. ": ping" keep-alives);
 *   - "field: value" (one optional space after the colon is removed),
 *     "field" alone means an empty value; unknown fields are ignored;
 *   - several "data" lines are joined with "\n";
 *   - "id" persists across events (and is ignored if it contains NUL);
 *     "event" sets the type of the next event only (default "message");
 *     "retry" takes ASCII digits only;
 *   - a U+FEFF byte-order mark at the very start of the stream is skipped.
 *
 * The parser works on TEXT. Decode bytes with `new TextDecoder('utf-8')` and
 * `decoder.decode(bytes, { stream: true })` so that a multi-byte character
 * split across network chunks is decoded correctly, and call
 * `parser.push(decoder.decode())` + `parser.end()` when the body ends.
 *
 * Usage:
 *   const p = new SseParser(ev => console.log(ev.id, ev.event, ev.data),
 *                           { onComment: text => {}, onRetry: ms => {} });
 *   p.push(textChunk);   // returns the array of events dispatched by this chunk
 *   p.end();             // end of stream: drops any incomplete event
 *
 *   ev = { id, event, data }
 *     id    — the last event id seen so far in the stream ('' if none)
 *     event — the event type ('message' unless an "event:" field said otherwise)
 *     data  — the data lines joined with "\n"
 *
 * Works as a classic <script> in the browser (defines the global SseParser)
 * and under Node (module.exports = { SseParser }). No dependencies.
 */
'use strict';

class SseParser {
  /**
   * @param {(ev: {id: string, event: string, data: string}) => void} [onEvent]
   * @param {{onComment?: (text: string) => void, onRetry?: (ms: number) => void}} [options]
   */
  constructor(onEvent, options) {
    if (onEvent != null && typeof onEvent !== 'function') {
      throw new TypeError('SseParser: onEvent must be a function');
    }
    const opts = options || {};
    this._onEvent = onEvent || null;
    this._onComment = typeof opts.onComment === 'function' ? opts.onComment : null;
    this._onRetry = typeof opts.onRetry === 'function' ? opts.onRetry : null;
    /** Last event id of the stream (spec: "last event ID string"). */
    this.lastEventId = '';
    /** Reconnection time in ms from the last valid "retry:" field, or null. */
    this.retry = null;
    this._idBuffer = '';
    this._resetStream();
  }

  _resetStream() {
    this._partial = '';     // incomplete line carried over to the next chunk
    this._skipLF = false;   // previous chunk ended in "\r": drop a leading "\n"
    this._started = false;  // BOM check done
    this._data = '';        // data buffer (each line + "\n")
    this._type = '';        // event type buffer
  }

  /** True when an event has been started but not yet dispatched. */
  get pending() {
    return this._partial !== '' || this._data !== '' || this._type !== '';
  }

  /**
   * Feed the next piece of decoded text.
   * @param {string} chunk
   * @returns {Array<{id: string, event: string, data: string}>} events dispatched
   */
  push(chunk) {
    if (typeof chunk !== 'string') {
      throw new TypeError('SseParser.push expects a string (decode bytes with TextDecoder first)');
    }
    const out = [];
    const n = chunk.length;
    let pos = 0;
    if (n === 0) return [];

    if (this._skipLF) {
      this._skipLF = false;
      if (chunk.charCodeAt(0) === 10) pos = 1;
    }
    if (!this._started && pos < n) {
      this._started = true;
      if (this._partial === '' && chunk.charCodeAt(pos) === 0xfeff) pos += 1;
    }

    // Next known positions of "\r" and "\n" (-2: unknown, -1: none left).
    let cr = -2;
    let lf = -2;
    while (pos < n) {
      if (cr !== -1 && cr < pos) cr = chunk.indexOf('\r', pos);
      if (lf !== -1 && lf < pos) lf = chunk.indexOf('\n', pos);
      let eol;
      if (cr === -1) eol = lf;
      else if (lf === -1) eol = cr;
      else eol = cr < lf ? cr : lf;
      if (eol === -1) break;

      let line = chunk.slice(pos, eol);
      if (this._partial !== '') {
        line = this._partial + line;
        this._partial = '';
      }
      this._line(line, out);

      if (chunk.charCodeAt(eol) === 13) {
        if (eol + 1 < n) {
          pos = chunk.charCodeAt(eol + 1) === 10 ? eol + 2 : eol + 1;
        } else {
          pos = eol + 1;
          this._skipLF = true; // the "\n" of a "\r\n" may start the next chunk
        }
      } else {
        pos = eol + 1;
      }
    }
    if (pos < n) this._partial += chunk.slice(pos);

    // Callbacks run after the whole chunk is parsed, so the parser's state is
    // consistent even if a callback throws.
    const events = [];
    for (const item of out) {
      if (item.kind === 'event') {
        events.push(item.value);
        if (this._onEvent) this._onEvent(item.value);
      } else if (item.kind === 'comment') {
        if (this._onComment) this._onComment(item.value);
      } else if (this._onRetry) {
        this._onRetry(item.value);
      }
    }
    return events;
  }

  /**
   * End of stream. Per the spec, an event that was not terminated by an empty
   * line is discarded, as is an incomplete last line. The last event id is kept
   * (it is what a client would send as Last-Event-ID when reconnecting); the
   * parser may be reused for a new stream.
   */
  end() {
    this._resetStream();
  }

  _line(line, out) {
    if (line === '') {
      this._dispatch(out);
      return;
    }
    const colon = line.indexOf(':');
    if (colon === 0) {
      let text = line.slice(1);
      if (text.charCodeAt(0) === 32) text = text.slice(1);
      out.push({ kind: 'comment', value: text });
      return;
    }
    let field;
    let value;
    if (colon === -1) {
      field = line;
      value = '';
    } else {
      field = line.slice(0, colon);
      value = line.slice(colon + 1);
      if (value.charCodeAt(0) === 32) value = value.slice(1);
    }
    switch (field) {
      case 'data':
        this._data += value + '\n';
        break;
      case 'event':
        this._type = value;
        break;
      case 'id':
        if (value.indexOf('\u0000') === -1) this._idBuffer = value;
        break;
      case 'retry':
        if (/^[0-9]+$/.test(value)) {
          this.retry = parseInt(value, 10);
          out.push({ kind: 'retry', value: this.retry });
        }
        break;
      default:
        // Unknown fields are ignored.
        break;
    }
  }

  _dispatch(out) {
    this.lastEventId = this._idBuffer;
    if (this._data === '') {
      this._type = '';
      return;
    }
    let data = this._data;
    if (data.charCodeAt(data.length - 1) === 10) data = data.slice(0, -1);
    const ev = { id: this.lastEventId, event: this._type || 'message', data };
    this._data = '';
    this._type = '';
    out.push({ kind: 'event', value: ev });
  }
}

if (typeof module !== 'undefined' && module.exports) {
  module.exports = { SseParser };
} else if (typeof globalThis !== 'undefined') {
  globalThis.SseParser = SseParser;
}
