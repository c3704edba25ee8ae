// Tests for the playground's incremental SSE parser (sse.js).
// Run: node --test crates/confab-server/assets/
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const { SseParser } = require('./sse.js');

const enc = new TextEncoder();

/**
 * Feed byte chunks through TextDecoder (stream mode) into a parser, exactly
 * as the playground page does with response.body.getReader().
 */
function run(byteChunks) {
  const events = [];
  const comments = [];
  const p = new SseParser((ev) => events.push(ev), { onComment: (c) => comments.push(c) });
  const decoder = new TextDecoder('utf-8');
  for (const chunk of byteChunks) p.push(decoder.decode(chunk, { stream: true }));
  p.push(decoder.decode());
  p.end();
  return { events, comments, parser: p };
}

function runText(...textChunks) {
  return run(textChunks.map((t) => enc.encode(t)));
}

/** All data of a sample stream as confab's POST /chat/stream sends it. */
const FULL = 'héllo wörld 👋 — ça va? 日本語';
const TOKENS = ['héllo', ' wörld', ' 👋', ' —', ' ça', ' va?', ' 日本語'];

function sampleStream(eol) {
  const L = (s) => s + eol;
  const parts = [];
  parts.push(L(': connected'));
  parts.push(L('id: 1'), L(`data: ${JSON.stringify({ token: TOKENS[0], done: false })}`), L(''));
  parts.push(L(`data: ${JSON.stringify({ token: TOKENS[1], done: false })}`), L('')); // id persists (1)
  parts.push(L(': ping'), L(''));
  // multi-line data: one JSON object split over two data lines (joined with \n)
  parts.push(L('id: 3'), L(`data: {"token":${JSON.stringify(TOKENS[2])},`), L('data: "done":false}'), L(''));
  parts.push(L('event: message'), L(`data:${JSON.stringify({ token: TOKENS[3], done: false })}`), L('')); // no space after colon
  parts.push(L('id: 5'), L('retry: 1500'), L(`data: ${JSON.stringify({ token: TOKENS[4], done: false })}`), L(''));
  parts.push(L('unknown-field: ignored'), L(`data: ${JSON.stringify({ token: TOKENS[5], done: false })}`), L(''));
  parts.push(L(': ping'));
  parts.push(L(`data: ${JSON.stringify({ token: TOKENS[6], done: false })}`), L(''));
  parts.push(L('id: 8'), L(`data: ${JSON.stringify({ token: '', done: true, fullText: FULL, chat_id: 'c-1', message_id: 'm-1' })}`), L(''));
  return parts.join('');
}

const EXPECTED = [
  { id: '1', event: 'message', data: JSON.stringify({ token: TOKENS[0], done: false }) },
  { id: '1', event: 'message', data: JSON.stringify({ token: TOKENS[1], done: false }) },
  { id: '3', event: 'message', data: `{"token":${JSON.stringify(TOKENS[2])},\n"done":false}` },
  { id: '3', event: 'message', data: JSON.stringify({ token: TOKENS[3], done: false }) },
  { id: '5', event: 'message', data: JSON.stringify({ token: TOKENS[4], done: false }) },
  { id: '5', event: 'message', data: JSON.stringify({ token: TOKENS[5], done: false }) },
  { id: '5', event: 'message', data: JSON.stringify({ token: TOKENS[6], done: false }) },
  { id: '8', event: 'message', data: JSON.stringify({ token: '', done: true, fullText: FULL, chat_id: 'c-1', message_id: 'm-1' }) },
];
const EXPECTED_COMMENTS = ['connected', 'ping', 'ping'];

/** What the page does with the events: append every token, stop at done. */
function replyOf(events) {
  let text = '';
  let done = null;
  for (const ev of events) {
    const msg = JSON.parse(ev.data);
    if (typeof msg.token === 'string') text += msg.token;
    if (msg.done) done = msg;
  }
  return { text, done };
}

function checkSample(result, label) {
  assert.deepEqual(result.events, EXPECTED, label);
  assert.deepEqual(result.comments, EXPECTED_COMMENTS, label);
  const { text, done } = replyOf(result.events);
  assert.equal(text, FULL, label);
  assert.ok(done, label);
  assert.equal(done.fullText, FULL, label);
  assert.equal(result.parser.lastEventId, '8', label);
  assert.equal(result.parser.retry, 1500, label);
}

const ENDINGS = { LF: '\n', CRLF: '\r\n', CR: '\r' };

for (const [name, eol] of Object.entries(ENDINGS)) {
  test(`sample stream (${name}) parses in one chunk`, () => {
    checkSample(run([enc.encode(sampleStream(eol))]), name);
  });

  test(`sample stream (${name}) split into two chunks at every byte position`, () => {
    const bytes = enc.encode(sampleStream(eol));
    for (let i = 0; i <= bytes.length; i++) {
      checkSample(run([bytes.subarray(0, i), bytes.subarray(i)]), `${name} split at byte ${i}`);
    }
  });

  test(`sample stream (${name}) fed one byte at a time`, () => {
    const bytes = enc.encode(sampleStream(eol));
    const chunks = [];
    for (let i = 0; i < bytes.length; i++) chunks.push(bytes.subarray(i, i + 1));
    checkSample(run(chunks), `${name} byte by byte`);
  });
}

test('sample stream with mixed line endings, random multi-chunk splits', () => {
  // Alternate the line endings line by line.
  const lines = sampleStream('\n').split('\n').slice(0, -1);
  const eols = ['\r\n', '\n', '\r'];
  const text = lines.map((l, i) => l + eols[i % 3]).join('');
  const bytes = enc.encode(text);
  checkSample(run([bytes]), 'mixed, whole');
  let seed = 12345;
  const rnd = (n) => {
    seed = (seed * 1103515245 + 12345) % 2147483648;
    return seed % n;
  };
  for (let round = 0; round < 300; round++) {
    const cuts = new Set();
    const count = 1 + rnd(12);
    for (let k = 0; k < count; k++) cuts.add(rnd(bytes.length + 1));
    const sorted = [0, ...[...cuts].sort((a, b) => a - b), bytes.length];
    const chunks = [];
    for (let k = 0; k + 1 < sorted.length; k++) chunks.push(bytes.subarray(sorted[k], sorted[k + 1]));
    checkSample(run(chunks), `mixed, cuts ${sorted.join(',')}`);
  }
});

test('several events in one chunk', () => {
  const { events } = runText('data: a\n\ndata: b\n\ndata: c\n\n');
  assert.deepEqual(events.map((e) => e.data), ['a', 'b', 'c']);
});

test('push() returns the events of that chunk', () => {
  const p = new SseParser();
  assert.deepEqual(p.push('data: a\n\ndata: b'), [{ id: '', event: 'message', data: 'a' }]);
  assert.equal(p.pending, true);
  assert.deepEqual(p.push('\n\n'), [{ id: '', event: 'message', data: 'b' }]);
  assert.equal(p.pending, false);
});

test('CRLF endings', () => {
  const { events } = runText('id: 7\r\ndata: one\r\ndata: two\r\n\r\ndata: three\r\n\r\n');
  assert.deepEqual(events, [
    { id: '7', event: 'message', data: 'one\ntwo' },
    { id: '7', event: 'message', data: 'three' },
  ]);
});

test('CR endings', () => {
  const { events } = runText('data: one\rdata: two\r\rdata: three\r\r');
  assert.deepEqual(events.map((e) => e.data), ['one\ntwo', 'three']);
});

test('CR at the end of a chunk and LF at the start of the next are one line ending', () => {
  // If "\r" | "\n" were counted as two endings, the "\n" would be an empty
  // line and dispatch "a" on its own.
  const { events } = runText('data: a\r', '\ndata: b\r', '\n\r', '\n');
  assert.deepEqual(events.map((e) => e.data), ['a\nb']);
});

test('CR at the end of a chunk dispatches at once, without waiting for the next chunk', () => {
  const got = [];
  const p = new SseParser((ev) => got.push(ev.data));
  p.push('data: x\r\r');
  assert.deepEqual(got, ['x']);
  p.push('\ndata: y\n\n'); // the "\n" belongs to the previous "\r"
  assert.deepEqual(got, ['x', 'y']);
});

test('final event without a trailing blank line is not dispatched', () => {
  assert.deepEqual(runText('data: a\n\ndata: b\n').events.map((e) => e.data), ['a']);
  assert.deepEqual(runText('data: a\n\ndata: b').events.map((e) => e.data), ['a']);
  assert.deepEqual(runText('data: a\r\n\r\ndata: b\r\n').events.map((e) => e.data), ['a']);
  assert.deepEqual(runText('data: only\n').events, []);
  // but a CR as the very last byte does end the blank line
  assert.deepEqual(runText('data: a\n\r').events.map((e) => e.data), ['a']);
});

test('end() discards the pending event; the parser can be reused', () => {
  const got = [];
  const p = new SseParser((ev) => got.push(ev.data));
  p.push('data: lost\n');
  p.end();
  p.push('\n');
  assert.deepEqual(got, []);
  p.push('data: kept\n\n');
  assert.deepEqual(got, ['kept']);
});

test('comments are not events', () => {
  const { events, comments } = runText(': ping\n\n:\n\n: ping\ndata: x\n\n');
  assert.deepEqual(events.map((e) => e.data), ['x']);
  assert.deepEqual(comments, ['ping', '', 'ping']);
});

test('field parsing: space after the colon, no colon, unknown fields', () => {
  const { events } = runText(
    'data:no-space\n\n',
    'data:  two spaces\n\n',
    'data\n\n', // field with empty value: an event with empty data
    'data:\ndata:\n\n', // two empty data lines: "\n"
    'foo: bar\nDATA: upper\n\n', // no data field: nothing dispatched
    'data: a: b\n\n'
  );
  assert.deepEqual(events.map((e) => e.data), ['no-space', ' two spaces', '', '\n', 'a: b']);
});

test('event type applies to one event only', () => {
  const { events } = runText('event: update\ndata: 1\n\ndata: 2\n\nevent: gone\n\ndata: 3\n\n');
  assert.deepEqual(events.map((e) => [e.event, e.data]), [['update', '1'], ['message', '2'], ['message', '3']]);
});

test('id persists, empty id resets, id with NUL is ignored', () => {
  const { events, parser } = runText(
    'id: 1\ndata: a\n\n',
    'data: b\n\n',
    'id: x\u0000y\ndata: c\n\n',
    'id\ndata: d\n\n',
    'id: 9\n\n' // no data: no event, but the last event id is updated
  );
  assert.deepEqual(events.map((e) => [e.id, e.data]), [['1', 'a'], ['1', 'b'], ['1', 'c'], ['', 'd']]);
  assert.equal(parser.lastEventId, '9');
});

test('retry accepts ASCII digits only', () => {
  const seen = [];
  const p = new SseParser(null, { onRetry: (ms) => seen.push(ms) });
  p.push('retry: 10\n\nretry: 1.5\n\nretry: abc\n\nretry:\n\nretry: 2000\n\n');
  assert.deepEqual(seen, [10, 2000]);
  assert.equal(p.retry, 2000);
});

test('byte-order mark is skipped only at the start of the stream', () => {
  const { events } = runText('\uFEFFdata: a\n\n\uFEFFdata: b\n\n');
  // The second BOM is part of a field name "\uFEFFdata", which is unknown.
  assert.deepEqual(events.map((e) => e.data), ['a']);
  // TextDecoder already drops a leading BOM; the parser drops it too when
  // given text directly.
  const direct = [];
  const p = new SseParser((ev) => direct.push(ev.data));
  p.push('');
  p.push('\uFEFF');
  p.push('data: a\n\n\uFEFFdata: b\n\n');
  assert.deepEqual(direct, ['a']);
  // BOM split from the rest
  const bytes = enc.encode('\uFEFFdata: z\n\n');
  for (let i = 0; i <= bytes.length; i++) {
    assert.deepEqual(run([bytes.subarray(0, i), bytes.subarray(i)]).events.map((e) => e.data), ['z'], `split ${i}`);
  }
});

test('multi-byte characters split inside a character decode correctly', () => {
  const bytes = enc.encode('data: 👋ü\n\n');
  // 👋 is 4 bytes starting at offset 6: cut at every byte inside it.
  for (let i = 6; i <= 11; i++) {
    const { events } = run([bytes.subarray(0, i), bytes.subarray(i)]);
    assert.deepEqual(events.map((e) => e.data), ['👋ü'], `split ${i}`);
  }
});

test('push() rejects bytes', () => {
  assert.throws(() => new SseParser().push(new Uint8Array([1])), TypeError);
});

test('empty chunks are harmless', () => {
  const { events } = runText('', 'data: a', '', '\r', '', '\n', '', '\n', '');
  assert.deepEqual(events.map((e) => e.data), ['a']);
});
