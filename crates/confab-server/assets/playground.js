/*
 * confab playground — the app behind GET /playground.
 *
 * Plain browser JavaScript: no build step, no dependencies except the SSE
 * parser in /playground/sse.js (loaded first, defines the global SseParser),
 * no external network. Talks to the same origin it was served from.
 *
 * Stable data-testid attributes (for automated browser tests):
 *
 *   user-alice, user-bob, user-charlie
 *                      demo-user picker buttons; the active one has aria-pressed="true"
 *   org-id-input, user-id-input, use-ids
 *                      paste org / user ids (header auth: x-org-id / x-user-id)
 *   api-key-input, use-api-key
 *                      paste an API key (Authorization: Bearer <key>)
 *   sign-out           forget the saved credentials
 *   whoami             who the page acts as (data-state="ok" once the server accepted it)
 *   chat-list          chat list container (<ul>)
 *   chat-item          one chat in the list (<button>), with data-chat-id="<uuid>";
 *                      aria-current="true" on the open chat
 *   chat-list-empty    "no chats" note under the list
 *   load-more-chats    "Load more" under the list (next_cursor → ?cursor=)
 *   refresh-chats      reload the chat list
 *   new-chat           start a new chat (the next message creates it)
 *   open-chat-id, open-chat
 *                      open a chat by pasting its id
 *   chat-title, chat-meta
 *                      title / details of the open chat
 *   load-older         "Load older messages" (older_cursor → ?before=)
 *   messages           the conversation (<ol>)
 *   message            one message (<li>) with data-role, data-status, data-message-id
 *   message-status     the status badge inside a message (its text is the status)
 *   assistant-reply    the text element of the streaming / last assistant message:
 *                      textContent is the reply so far; data-status is
 *                      streaming | complete | cancelled | failed | interrupted;
 *                      data-message-id is the message id (once known). Only one
 *                      element carries it at a time.
 *   message-input      the message textarea (Enter sends, Shift+Enter new line)
 *   send, stop         send a message / stop the streaming reply
 *   status             status line (role="status", aria-live); data-state is
 *                      info | busy | ok | warn | error
 *   request-id         X-Request-ID of the last response
 *   rate-limit         "<remaining> / <limit> left" from X-RateLimit-* headers
 *   ttft               time to first token of the last reply
 *   tokens-per-second  throughput and token count of the last reply
 */
(function () {
  'use strict';

  // ------------------------------------------------------------------ config

  const DEMO_USERS = {
    alice: {
      name: 'Alice Admin', email: 'admin@acme.com', role: 'admin', org: 'Acme Corp',
      orgId: '00000000-0000-0000-0000-000000000001', userId: '00000000-0000-0000-0001-000000000001',
    },
    bob: {
      name: 'Bob User', email: 'user@acme.com', role: 'member', org: 'Acme Corp',
      orgId: '00000000-0000-0000-0000-000000000001', userId: '00000000-0000-0000-0001-000000000002',
    },
    charlie: {
      name: 'Charlie Founder', email: 'founder@techstartup.com', role: 'owner', org: 'Tech Startup Inc',
      orgId: '00000000-0000-0000-0000-000000000002', userId: '00000000-0000-0000-0002-000000000001',
    },
  };

  const STORAGE_KEY = 'confab.playground.identity.v1';
  const CHAT_PAGE = 20;          // GET /chats?limit=
  const MESSAGE_PAGE = 50;       // GET /chat/{id}?limit=
  const MAX_MESSAGE_CHARS = 10000;
  const STOP_RECHECK_MS = 500;   // delay before re-reading a stopped chat
  const RESUME_ATTEMPTS = 6;     // a broken stream is resumed this many times in a row
  const RESUME_DELAY_MS = 300;   // first pause before a resume (grows per attempt)
  const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
  const KNOWN_STATUSES = ['complete', 'streaming', 'cancelled', 'failed', 'interrupted', 'pending'];

  // --------------------------------------------------------------- elements

  const $ = (id) => document.getElementById(id);
  const el = {
    whoami: $('whoami'),
    userButtons: Array.from(document.querySelectorAll('.user-option')),
    customAuth: $('custom-auth'),
    idsForm: $('ids-form'),
    orgId: $('org-id'),
    userId: $('user-id'),
    keyForm: $('key-form'),
    apiKey: $('api-key'),
    forget: $('forget'),
    chatList: $('chat-list'),
    chatListEmpty: $('chat-list-empty'),
    loadMore: $('load-more'),
    refreshChats: $('refresh-chats'),
    newChat: $('new-chat'),
    openForm: $('open-form'),
    openChatId: $('open-chat-id'),
    chatTitle: $('chat-title'),
    chatMeta: $('chat-meta'),
    scroller: $('messages-scroll'),
    loadOlder: $('load-older'),
    messages: $('messages'),
    welcome: $('welcome'),
    status: $('status'),
    composer: $('composer'),
    input: $('message-input'),
    send: $('send'),
    stop: $('stop'),
    charCount: $('char-count'),
    requestId: $('request-id'),
    requestRoute: $('request-route'),
    copyRid: $('copy-rid'),
    rateLimit: $('rate-limit'),
    rateMeter: $('rate-meter'),
    ttft: $('ttft'),
    tps: $('tps'),
    tokenBudget: $('token-budget'),
    replyTokens: $('reply-tokens'),
  };

  // ------------------------------------------------------------------ state

  const state = {
    identity: null,      // {mode:'demo', user} | {mode:'headers', orgId, userId} | {mode:'apikey', apiKey}
    epoch: 0,            // bumps on identity change: late responses for an old identity are dropped
    chatSeq: 0,          // bumps whenever another chat is shown
    chats: [],
    nextCursor: null,
    chat: null,          // {id, title, createdAt, updatedAt, messageCount, olderCursor}
    stream: null,        // the reply being streamed (see send())
    cooldownTimer: null,
    chatsSeq: 0,
    loadingMore: false,
    loadingOlder: false,
  };

  // ---------------------------------------------------------------- helpers

  /** Create an element: h('li', {class: 'x', 'data-a': 1}, child, 'text'). */
  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    if (attrs) {
      for (const [k, v] of Object.entries(attrs)) {
        if (v == null || v === false) continue;
        if (k === 'class') node.className = v;
        else node.setAttribute(k, v === true ? '' : String(v));
      }
    }
    for (const c of children.flat()) {
      if (c == null || c === false) continue;
      node.append(c instanceof Node ? c : String(c));
    }
    return node;
  }

  function uuid4() {
    const c = window.crypto;
    if (c && typeof c.randomUUID === 'function') return c.randomUUID(); // secure contexts only
    const b = new Uint8Array(16);
    if (c && c.getRandomValues) c.getRandomValues(b);
    else for (let i = 0; i < 16; i++) b[i] = Math.floor(Math.random() * 256);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const x = Array.from(b, (v) => v.toString(16).padStart(2, '0')).join('');
    return `${x.slice(0, 8)}-${x.slice(8, 12)}-${x.slice(12, 16)}-${x.slice(16, 20)}-${x.slice(20)}`;
  }

  const newRequestId = () => 'pg-' + uuid4();

  function shortId(id) {
    return typeof id === 'string' && id.length > 13 ? '…' + id.slice(-8) : String(id || '');
  }

  function plural(n, word) {
    return `${n.toLocaleString()} ${word}${n === 1 ? '' : 's'}`;
  }

  function parseDate(iso) {
    const d = iso ? new Date(iso) : null;
    return d && !isNaN(d.getTime()) ? d : null;
  }

  const relFmt = typeof Intl !== 'undefined' && Intl.RelativeTimeFormat
    ? new Intl.RelativeTimeFormat(undefined, { numeric: 'auto', style: 'short' }) : null;

  function relativeTime(iso) {
    const d = parseDate(iso);
    if (!d) return '';
    const sec = Math.round((d.getTime() - Date.now()) / 1000);
    const abs = Math.abs(sec);
    if (abs < 45) return 'just now';
    if (!relFmt) return d.toLocaleString();
    if (abs < 3600) return relFmt.format(Math.round(sec / 60), 'minute');
    if (abs < 86400) return relFmt.format(Math.round(sec / 3600), 'hour');
    if (abs < 86400 * 7) return relFmt.format(Math.round(sec / 86400), 'day');
    return d.toLocaleDateString(undefined, { day: 'numeric', month: 'short', year: 'numeric' });
  }

  function clockTime(iso) {
    const d = parseDate(iso);
    if (!d) return '';
    const today = new Date().toDateString() === d.toDateString();
    return today
      ? d.toLocaleTimeString(undefined, { hour: '2-digit', minute: '2-digit' })
      : d.toLocaleString(undefined, { day: 'numeric', month: 'short', hour: '2-digit', minute: '2-digit' });
  }

  /** Server message without a trailing full stop, so it can sit inside a sentence. */
  function clean(msg) {
    return String(msg || '').trim().replace(/[.\s]+$/, '');
  }

  function isNarrow() {
    return window.matchMedia && window.matchMedia('(max-width: 700px)').matches;
  }

  // ---------------------------------------------------------------- storage

  function validIdentity(v) {
    if (!v || typeof v !== 'object') return false;
    if (v.mode === 'demo') return Object.prototype.hasOwnProperty.call(DEMO_USERS, v.user);
    if (v.mode === 'headers') return typeof v.orgId === 'string' && typeof v.userId === 'string';
    if (v.mode === 'apikey') return typeof v.apiKey === 'string' && v.apiKey.length > 0;
    return false;
  }

  const storage = {
    load() {
      try {
        const v = JSON.parse(window.localStorage.getItem(STORAGE_KEY) || 'null');
        return validIdentity(v) ? v : null;
      } catch (_) {
        return null;
      }
    },
    save(v) {
      try { window.localStorage.setItem(STORAGE_KEY, JSON.stringify(v)); } catch (_) { /* private mode */ }
    },
    clear() {
      try { window.localStorage.removeItem(STORAGE_KEY); } catch (_) { /* private mode */ }
    },
  };

  // -------------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(status, body, headers) {
      const msg = body && typeof body.message === 'string' ? body.message : '';
      super(msg || `HTTP ${status}`);
      this.name = 'ApiError';
      this.status = status;
      this.error = body && typeof body.error === 'string' ? body.error : '';
      this.serverMessage = msg;
      this.retryAfter = parseRetryAfter(headers && headers.get('Retry-After'));
    }
  }

  class NetworkError extends Error {
    constructor(cause) {
      super(cause && cause.message ? cause.message : 'network error');
      this.name = 'NetworkError';
    }
  }

  function parseRetryAfter(v) {
    if (!v) return null;
    if (/^\s*\d+\s*$/.test(v)) return Math.max(1, parseInt(v, 10));
    const d = Date.parse(v);
    return isNaN(d) ? null : Math.max(1, Math.ceil((d - Date.now()) / 1000));
  }

  function authHeaders(identity) {
    if (!identity) return {};
    if (identity.mode === 'demo') {
      const u = DEMO_USERS[identity.user];
      return { 'x-org-id': u.orgId, 'x-user-id': u.userId };
    }
    if (identity.mode === 'headers') return { 'x-org-id': identity.orgId, 'x-user-id': identity.userId };
    if (identity.mode === 'apikey') return { Authorization: 'Bearer ' + identity.apiKey };
    return {};
  }

  /** fetch() with auth, a fresh X-Request-ID, and bookkeeping of the response headers. */
  async function request(method, path, opts) {
    const o = opts || {};
    const rid = newRequestId();
    const headers = Object.assign(
      { Accept: o.accept || 'application/json', 'X-Request-ID': rid },
      authHeaders(o.identity === undefined ? state.identity : o.identity),
      o.headers || {}
    );
    const init = { method, headers, cache: 'no-store', signal: o.signal };
    if (o.body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(o.body);
    }
    let res;
    try {
      res = await fetch(path, init);
    } catch (e) {
      if (e && e.name === 'AbortError') throw e;
      showRequestId(rid, false, `${method} ${routeOf(path)} — no response`);
      throw new NetworkError(e);
    }
    noteResponse(res, rid, `${method} ${routeOf(path)} → ${res.status}`);
    return res;
  }

  /** "/chat/<uuid>?limit=50" → "/chat/{id}" (short label for the stats bar). */
  function routeOf(path) {
    return path.split('?')[0].replace(/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/gi, '{id}');
  }

  async function readJson(res) {
    const text = await res.text().catch(() => '');
    if (!text) return null;
    try { return JSON.parse(text); } catch (_) { return null; }
  }

  async function requestJson(method, path, opts) {
    const res = await request(method, path, opts);
    const data = await readJson(res);
    if (!res.ok) throw new ApiError(res.status, data, res.headers);
    return data || {};
  }

  function noteResponse(res, sentId, route) {
    const rid = res.headers.get('X-Request-ID');
    showRequestId(rid || sentId, !!rid, route);
    const limit = res.headers.get('X-RateLimit-Limit');
    const remaining = res.headers.get('X-RateLimit-Remaining');
    if (limit !== null && remaining !== null) {
      showRateLimit(Number(limit), Number(remaining), res.headers.get('X-RateLimit-Reset'));
    }
    const tokLimit = res.headers.get('X-TokenLimit-Limit');
    const tokLeft = res.headers.get('X-TokenLimit-Remaining');
    if (tokLimit !== null && tokLeft !== null && el.tokenBudget) {
      el.tokenBudget.textContent = `${tokLeft} / ${tokLimit} tokens left`;
      const reset = res.headers.get('X-TokenLimit-Reset');
      if (reset) el.tokenBudget.title = `Window resets at ${new Date(reset).toLocaleString()}`;
    }
  }

  /** The reply's usage from its done event (`usage` may be absent on old servers). */
  function showReplyUsage(usage) {
    if (!el.replyTokens) return;
    if (!usage || typeof usage !== 'object') { el.replyTokens.textContent = '—'; return; }
    const est = usage.source === 'estimated' ? ' (estimated)' : '';
    el.replyTokens.textContent = `${usage.prompt_tokens} in / ${usage.completion_tokens} out${est}`;
  }

  // -------------------------------------------------------------- error text

  function describeError(err, context) {
    if (err instanceof NetworkError) {
      return `Can't reach the server — is it running? (${clean(err.message)})`;
    }
    if (!(err instanceof ApiError)) {
      return `Something went wrong: ${clean(err && err.message) || 'unknown error'}.`;
    }
    const m = clean(err.serverMessage);
    switch (err.status) {
      case 400:
        return `The server rejected the request: ${m || 'bad request'}.`;
      case 401:
        return `Not signed in — the server did not accept these credentials${m ? ` (${m})` : ''}. ` +
          'Pick a demo user, or check the ids or the API key.';
      case 403:
        if (m) return `Not allowed — ${m}.`;
        return context === 'send'
          ? 'Not allowed — you can read this chat, but only its author can write to it.'
          : 'Not allowed — you do not have permission to do that.';
      case 404:
        if (context === 'chat' || context === 'send') {
          return 'Chat not found — it does not exist, was deleted, or belongs to someone else.';
        }
        return `Not found${m ? ` — ${m}` : ''}.`;
      case 405:
        return `The server does not allow that method here${m ? ` (${m})` : ''}.`;
      case 413:
        return 'Too large — the message is bigger than the server accepts. Shorten it and try again.';
      case 429:
        return `Rate limit reached — try again in ${err.retryAfter || 1} s.`;
      case 503:
        return `The service is unavailable right now${m ? ` (${m})` : ''}. Try again shortly.`;
      default:
        if (err.status >= 500) {
          return `Server error ${err.status}${m ? `: ${m}` : ''}. The request id below identifies it in the server logs.`;
        }
        return `Request failed (${err.status})${m ? `: ${m}` : ''}.`;
    }
  }

  // ------------------------------------------------------------ status line

  function writeStatus(text, kind) {
    el.status.textContent = text;
    el.status.dataset.state = kind || 'info';
  }

  function setStatus(text, kind) {
    if (state.cooldownTimer) {
      clearInterval(state.cooldownTimer);
      state.cooldownTimer = null;
    }
    writeStatus(text, kind);
  }

  function showError(err, context) {
    if (err instanceof ApiError && err.status === 429) {
      startCooldown(err.retryAfter || 1);
      return;
    }
    setStatus(describeError(err, context), 'error');
  }

  /** 429: "Rate limit reached — try again in N s.", counting down. */
  function startCooldown(seconds) {
    setStatus('', 'error');
    let left = Math.max(1, Math.ceil(seconds));
    const tick = () => {
      if (left <= 0) {
        clearInterval(state.cooldownTimer);
        state.cooldownTimer = null;
        writeStatus('The rate limit has refilled — you can send again.', 'info');
        return;
      }
      writeStatus(`Rate limit reached — try again in ${left} s.`, 'error');
      left -= 1;
    };
    tick();
    state.cooldownTimer = setInterval(tick, 1000);
  }

  // ----------------------------------------------------------------- stats

  function showRequestId(rid, fromServer, route) {
    el.requestId.textContent = rid || '—';
    el.requestId.title = !rid ? '' : fromServer
      ? `X-Request-ID of the last response (${route})`
      : `X-Request-ID this page sent (${route || 'no response'})`;
    el.requestRoute.textContent = route || '';
    el.copyRid.hidden = !rid || !(navigator.clipboard && window.isSecureContext);
  }

  function showRateLimit(limit, remaining, resetAt) {
    if (!isFinite(limit) || !isFinite(remaining) || limit <= 0) return;
    el.rateLimit.textContent = `${remaining} / ${limit} left`;
    const reset = parseDate(resetAt);
    el.rateLimit.title = reset ? `Bucket full again at ${reset.toLocaleTimeString()}` : '';
    const pct = Math.max(0, Math.min(100, (remaining / limit) * 100));
    el.rateMeter.style.width = pct + '%';
    el.rateMeter.dataset.level = remaining <= 0 ? 'empty' : pct < 25 ? 'low' : 'ok';
  }

  function resetReplyStats() {
    el.ttft.textContent = '…';
    el.tps.textContent = '…';
  }

  function showReplyStats(s, final) {
    if (s.tFirst != null) el.ttft.textContent = `${Math.round(s.tFirst - s.t0)} ms`;
    else if (final) el.ttft.textContent = '—';
    const end = s.tEnd != null ? s.tEnd : performance.now();
    if (s.tFirst != null && s.tokens > 1 && end - s.tFirst >= 1) {
      const rate = (s.tokens - 1) / ((end - s.tFirst) / 1000); // tokens after the first, per second
      el.tps.textContent = `${rate.toFixed(rate < 10 ? 1 : 0)} tok/s · ${plural(s.tokens, 'token')}`;
    } else {
      el.tps.textContent = s.tokens ? plural(s.tokens, 'token') : final ? '—' : '…';
    }
  }

  // --------------------------------------------------------------- identity

  function identityLabel(identity) {
    if (!identity) return 'Not signed in';
    if (identity.mode === 'demo') return DEMO_USERS[identity.user].name;
    if (identity.mode === 'headers') return `user ${shortId(identity.userId)}`;
    return `API key ${identity.apiKey.slice(0, 6)}…`;
  }

  function renderIdentityPicker() {
    const id = state.identity;
    for (const b of el.userButtons) {
      b.setAttribute('aria-pressed', String(!!id && id.mode === 'demo' && id.user === b.dataset.user));
    }
    if (id && id.mode === 'headers') {
      el.orgId.value = id.orgId;
      el.userId.value = id.userId;
    }
    if (id && id.mode === 'apikey') el.apiKey.value = id.apiKey;
    if (id && id.mode !== 'demo') el.customAuth.open = true;
  }

  function renderWhoAmI(info, ok) {
    const id = state.identity;
    el.whoami.textContent = '';
    el.whoami.dataset.state = ok === true ? 'ok' : ok === false ? 'error' : 'info';
    el.whoami.append(h('span', { class: 'dot', 'aria-hidden': 'true' }));
    if (!id) {
      el.whoami.append('Not signed in');
      return;
    }
    const parts = [];
    const user = info && info.user && typeof info.user === 'object' ? info.user : null;
    const orgInfo = info ? info.org : null;
    if (id.mode === 'demo') {
      const u = DEMO_USERS[id.user];
      parts.push(u.role, u.org);
    } else {
      if (user && user.email) parts.push(user.email);
      if (user && user.role) parts.push(user.role);
      const org = orgInfo && typeof orgInfo === 'object' ? (orgInfo.name || orgInfo.slug || orgInfo.id) : orgInfo;
      if (org) parts.push(`org ${shortId(org)}`);
    }
    el.whoami.append(h('span', { class: 'whoami-prefix' }, 'Acting as '), h('strong', null, identityLabel(id)));
    if (parts.length) el.whoami.append(h('span', { class: 'whoami-extra' }, ' · ' + parts.join(' · ')));
  }

  async function setIdentity(identity, options) {
    const opts = options || {};
    stopStream('switch');
    state.identity = identity;
    state.epoch += 1;
    const epoch = state.epoch;
    if (opts.persist !== false) storage.save(identity);
    renderIdentityPicker();
    renderWhoAmI(null);
    showNewChat({ keepHash: !!opts.openChat });
    state.chats = [];
    state.nextCursor = null;
    renderChats();
    el.chatListEmpty.textContent = 'Loading chats…';
    setStatus(`Checking ${identityLabel(identity)}…`, 'busy');

    // GET / validates the credentials and reports the bucket without taking a token.
    let info;
    try {
      info = await requestJson('GET', '/');
    } catch (err) {
      if (epoch !== state.epoch) return;
      renderWhoAmI(null, false);
      el.chatListEmpty.textContent = 'Could not load chats.';
      showError(err, 'auth');
      return;
    }
    if (epoch !== state.epoch) return;
    renderWhoAmI(info, true);
    const rl = info && info.rateLimit;
    if (rl && typeof rl === 'object') showRateLimit(Number(rl.limit), Number(rl.remaining), rl.resetAt);
    setStatus(`Acting as ${identityLabel(identity)}. Type a message to start a chat.`, 'ok');

    await loadChats(true);
    if (epoch !== state.epoch) return;
    if (opts.openChat) openChat(opts.openChat);
  }

  function clearIdentity() {
    stopStream('switch');
    storage.clear();
    state.identity = null;
    state.epoch += 1;
    el.orgId.value = '';
    el.userId.value = '';
    el.apiKey.value = '';
    renderIdentityPicker();
    renderWhoAmI(null);
    showNewChat({});
    state.chats = [];
    state.nextCursor = null;
    renderChats();
    el.chatListEmpty.textContent = 'Pick a user to see their chats.';
    setStatus('Saved credentials forgotten. Pick a user to start.', 'info');
  }

  // -------------------------------------------------------------- chat list

  /** GET /chats: reset=true reloads the first page, false appends the next page. */
  async function loadChats(reset) {
    if (!state.identity) return;
    if (!reset && (state.loadingMore || !state.nextCursor)) return;
    const epoch = state.epoch;
    const seq = ++state.chatsSeq; // only the newest list request is applied
    const params = new URLSearchParams({ limit: String(CHAT_PAGE) });
    if (!reset) {
      params.set('cursor', state.nextCursor);
      state.loadingMore = true;
    }
    const before = state.chats.length;
    el.chatList.setAttribute('aria-busy', 'true');
    try {
      const data = await requestJson('GET', '/chats?' + params.toString());
      if (epoch !== state.epoch || seq !== state.chatsSeq) return;
      const page = Array.isArray(data.chats) ? data.chats.filter((c) => c && typeof c.id === 'string') : [];
      if (reset) {
        state.chats = page;
      } else {
        const seen = new Set(state.chats.map((c) => c.id));
        state.chats = state.chats.concat(page.filter((c) => !seen.has(c.id)));
      }
      state.nextCursor = typeof data.next_cursor === 'string' && data.next_cursor ? data.next_cursor : null;
      if (state.chat) {
        const listed = state.chats.find((c) => c.id === state.chat.id);
        if (listed && listed.title && listed.title !== state.chat.title) {
          state.chat.title = listed.title;
          renderChatHeader();
        }
      }
      const moreHadFocus = document.activeElement === el.loadMore;
      renderChats();
      if (!reset && moreHadFocus && el.loadMore.hidden) {
        // "Load more" disappeared on the last page: keep keyboard users in the list.
        const items = el.chatList.querySelectorAll('.chat-item');
        const target = items[before] || items[items.length - 1];
        if (target) target.focus();
      }
    } catch (err) {
      if (epoch !== state.epoch || seq !== state.chatsSeq) return;
      el.chatListEmpty.textContent = 'Could not load chats.';
      el.chatListEmpty.hidden = state.chats.length > 0;
      showError(err, 'chats');
    } finally {
      if (!reset) state.loadingMore = false;
      if (seq === state.chatsSeq) el.chatList.removeAttribute('aria-busy');
    }
  }

  function renderChats() {
    const focusedId = document.activeElement && document.activeElement.dataset
      ? document.activeElement.dataset.chatId : undefined;
    const openId = state.chat ? state.chat.id : null;
    const frag = document.createDocumentFragment();
    for (const c of state.chats) {
      const title = c.title && String(c.title).trim() ? String(c.title) : 'Untitled chat';
      const when = c.updated_at || c.created_at;
      const btn = h('button', {
        type: 'button',
        class: 'chat-item',
        'data-testid': 'chat-item',
        'data-chat-id': c.id,
        'aria-current': c.id === openId ? 'true' : null,
        title,
      },
      h('span', { class: 'chat-title' }, title),
      h('time', { class: 'chat-time', datetime: when || null, title: when ? new Date(when).toLocaleString() : null },
        relativeTime(when)));
      frag.append(h('li', null, btn));
    }
    el.chatList.replaceChildren(frag);
    if (focusedId) {
      const again = el.chatList.querySelector(`[data-chat-id="${CSS.escape(focusedId)}"]`);
      if (again) again.focus();
    }
    el.chatListEmpty.hidden = state.chats.length > 0;
    if (!state.chats.length) {
      el.chatListEmpty.textContent = state.identity ? 'No chats yet — send a message to start one.' : 'Pick a user to see their chats.';
    }
    el.loadMore.hidden = !state.nextCursor;
  }

  function markActiveChat() {
    const openId = state.chat ? state.chat.id : null;
    for (const b of el.chatList.querySelectorAll('.chat-item')) {
      if (b.dataset.chatId === openId) b.setAttribute('aria-current', 'true');
      else b.removeAttribute('aria-current');
    }
  }

  // ----------------------------------------------------------- conversation

  function setHash(chatId) {
    const url = location.pathname + location.search + (chatId ? '#chat=' + chatId : '');
    try { history.replaceState(null, '', url); } catch (_) { /* sandboxed */ }
  }

  function hashChatId() {
    const m = /^#chat=([0-9a-fA-F-]{36})$/.exec(location.hash);
    return m ? m[1] : null;
  }

  function renderChatHeader() {
    const c = state.chat;
    el.chatMeta.textContent = '';
    if (!c) {
      el.chatTitle.textContent = 'New chat';
      el.chatMeta.textContent = state.identity
        ? 'Your first message starts a new chat.'
        : 'Pick a user on the left to start.';
      return;
    }
    el.chatTitle.textContent = c.title && String(c.title).trim() ? c.title : 'Untitled chat';
    el.chatTitle.title = el.chatTitle.textContent;
    const parts = [];
    if (typeof c.messageCount === 'number') parts.push(plural(c.messageCount, 'message'));
    if (c.updatedAt) parts.push('updated ' + relativeTime(c.updatedAt));
    if (parts.length) el.chatMeta.append(parts.join(' · ') + ' · ');
    el.chatMeta.append('id ', h('code', { 'data-testid': 'chat-id' }, c.id));
  }

  function showNewChat(opts) {
    state.chatSeq += 1;
    state.chat = null;
    el.messages.replaceChildren();
    el.loadOlder.hidden = true;
    el.welcome.hidden = false;
    renderChatHeader();
    markActiveChat();
    if (!opts || !opts.keepHash) setHash(null);
  }

  function statusOf(m) {
    return typeof m.status === 'string' && m.status ? m.status : 'complete';
  }

  function badge(status) {
    const cls = KNOWN_STATUSES.includes(status) ? status : 'pending';
    return h('span', { class: `badge badge--${cls}`, 'data-testid': 'message-status' }, status === 'pending' ? 'sending' : status);
  }

  function roleLabel(role) {
    return role === 'user' ? 'You' : role === 'assistant' ? 'Assistant' : role === 'system' ? 'System' : String(role);
  }

  /** One message <li>. m = {id, role, content, status, created_at}. */
  function messageEl(m) {
    const role = ['user', 'assistant', 'system'].includes(m.role) ? m.role : 'system';
    const status = statusOf(m);
    const when = m.created_at || null;
    return h('li', {
      class: `msg msg--${role}`,
      'data-testid': 'message',
      'data-role': role,
      'data-status': status,
      'data-message-id': m.id || '',
    },
    h('div', { class: 'msg-meta' },
      h('span', { class: 'msg-role' }, roleLabel(m.role)),
      badge(status),
      when ? h('time', { datetime: when, title: new Date(when).toLocaleString() }, clockTime(when)) : null),
    h('div', { class: 'msg-body', 'data-status': status }, typeof m.content === 'string' ? m.content : ''));
  }

  function setMessageStatus(li, status) {
    li.dataset.status = status;
    const body = li.querySelector('.msg-body');
    if (body) body.dataset.status = status;
    const old = li.querySelector('.badge');
    if (old) old.replaceWith(badge(status));
  }

  function setMessageId(li, id) {
    li.dataset.messageId = id || '';
    const body = li.querySelector('.msg-body');
    if (body && body.dataset.testid === 'assistant-reply') body.dataset.messageId = id || '';
  }

  /** Exactly one element carries data-testid="assistant-reply": the last assistant message's text. */
  function markAssistantReply() {
    for (const b of el.messages.querySelectorAll('[data-testid="assistant-reply"]')) {
      b.removeAttribute('data-testid');
      b.removeAttribute('data-message-id');
    }
    const all = el.messages.querySelectorAll('li[data-role="assistant"]');
    const last = all[all.length - 1];
    if (!last) return;
    const body = last.querySelector('.msg-body');
    body.dataset.testid = 'assistant-reply';
    body.dataset.status = last.dataset.status;
    body.dataset.messageId = last.dataset.messageId || '';
  }

  function nearBottom() {
    const s = el.scroller;
    return s.scrollHeight - s.scrollTop - s.clientHeight < 80;
  }

  function scrollToBottom() {
    el.scroller.scrollTop = el.scroller.scrollHeight;
  }

  /** Replace the whole view with a GET /chat/{id} response. */
  function applyChat(data, fallbackId) {
    const msgs = Array.isArray(data.messages) ? data.messages : [];
    state.chat = {
      id: typeof data.chat_id === 'string' ? data.chat_id : fallbackId,
      title: data.title,
      createdAt: data.created_at,
      updatedAt: data.updated_at,
      messageCount: typeof data.message_count === 'number' ? data.message_count : msgs.length,
      olderCursor: typeof data.older_cursor === 'string' && data.older_cursor ? data.older_cursor : null,
    };
    // Don't make screen readers read the whole history out as "new" log entries.
    el.messages.setAttribute('aria-live', 'off');
    el.messages.replaceChildren(...msgs.map(messageEl));
    setTimeout(() => el.messages.setAttribute('aria-live', 'polite'), 0);
    el.welcome.hidden = msgs.length > 0;
    el.loadOlder.hidden = !state.chat.olderCursor;
    markAssistantReply();
    renderChatHeader();
    markActiveChat();
    scrollToBottom();
  }

  async function openChat(id, options) {
    const opts = options || {};
    if (!state.identity) {
      setStatus('Pick a user first.', 'error');
      return;
    }
    if (state.stream) stopStream('switch');
    state.chatSeq += 1;
    const seq = state.chatSeq;
    const epoch = state.epoch;
    state.chat = { id, title: 'Loading…', messageCount: null, olderCursor: null };
    el.messages.replaceChildren();
    el.loadOlder.hidden = true;
    el.welcome.hidden = true;
    renderChatHeader();
    markActiveChat();
    setHash(id);
    setStatus('Opening chat…', 'busy');
    try {
      const params = new URLSearchParams({ limit: String(MESSAGE_PAGE) });
      const data = await requestJson('GET', `/chat/${encodeURIComponent(id)}?${params}`);
      if (seq !== state.chatSeq || epoch !== state.epoch) return;
      applyChat(data, id);
      const n = Array.isArray(data.messages) ? data.messages.length : 0;
      const total = state.chat.messageCount;
      setStatus(n < total
        ? `Opened “${el.chatTitle.textContent}” — showing the latest ${n} of ${plural(total, 'message')}.`
        : `Opened “${el.chatTitle.textContent}” — ${plural(total, 'message')}.`, 'ok');
      if (opts.reveal && isNarrow()) el.chatTitle.scrollIntoView({ block: 'start' });
    } catch (err) {
      if (seq !== state.chatSeq || epoch !== state.epoch) return;
      showNewChat({});
      showError(err, 'chat');
    }
  }

  async function loadOlder() {
    const c = state.chat;
    if (!c || !c.olderCursor) return;
    if (state.loadingOlder) return;
    state.loadingOlder = true;
    const seq = state.chatSeq;
    try {
      const params = new URLSearchParams({ limit: String(MESSAGE_PAGE), before: c.olderCursor });
      const data = await requestJson('GET', `/chat/${encodeURIComponent(c.id)}?${params}`);
      if (seq !== state.chatSeq) return;
      const shown = new Set(Array.from(el.messages.children, (li) => li.dataset.messageId).filter(Boolean));
      const older = (Array.isArray(data.messages) ? data.messages : []).filter((m) => !shown.has(m.id));
      const prevHeight = el.scroller.scrollHeight;
      const prevTop = el.scroller.scrollTop;
      el.messages.setAttribute('aria-live', 'off');
      el.messages.prepend(...older.map(messageEl));
      setTimeout(() => el.messages.setAttribute('aria-live', 'polite'), 0);
      el.scroller.scrollTop = el.scroller.scrollHeight - prevHeight + prevTop; // keep the view still
      c.olderCursor = typeof data.older_cursor === 'string' && data.older_cursor ? data.older_cursor : null;
      if (typeof data.message_count === 'number') c.messageCount = data.message_count;
      renderChatHeader();
      markAssistantReply();
      el.loadOlder.hidden = !c.olderCursor;
      setStatus(`Loaded ${plural(older.length, 'older message')}${c.olderCursor ? '' : ' — this is the start of the chat'}.`, 'ok');
      if (!c.olderCursor && document.activeElement === el.loadOlder) {
        const first = el.messages.firstElementChild;
        if (first) {
          first.tabIndex = -1;
          first.focus();
        }
      }
    } catch (err) {
      if (seq === state.chatSeq) showError(err, 'chat');
    } finally {
      state.loadingOlder = false;
    }
  }

  // -------------------------------------------------------------- streaming

  function setStreamingUi(on) {
    el.send.disabled = on;
    el.stop.disabled = !on;
    el.composer.setAttribute('aria-busy', String(on));
    if (!on && document.activeElement === el.stop) el.input.focus({ preventScroll: true });
  }

  function updateCharCount() {
    const v = el.input.value;
    const n = v.length > MAX_MESSAGE_CHARS * 0.8 ? Array.from(v).length : v.length; // code points
    if (n > MAX_MESSAGE_CHARS * 0.8) {
      el.charCount.textContent = `${n.toLocaleString()} / ${MAX_MESSAGE_CHARS.toLocaleString()}`;
      el.charCount.dataset.over = String(n > MAX_MESSAGE_CHARS);
    } else {
      el.charCount.textContent = '';
      el.charCount.dataset.over = 'false';
    }
  }

  function autosize() {
    el.input.style.height = 'auto';
    el.input.style.height = Math.min(el.input.scrollHeight + 2, 192) + 'px';
  }

  async function send() {
    if (!state.identity) {
      setStatus('Pick a user first (or paste ids or an API key).', 'error');
      const first = el.userButtons[0];
      if (first) first.focus();
      return;
    }
    if (state.stream) {
      setStatus('A reply is still streaming — wait for it or press Stop.', 'warn');
      return;
    }
    const text = el.input.value;
    if (!text.trim()) {
      setStatus('Type a message first.', 'warn');
      el.input.focus();
      return;
    }
    // Length and NUL characters are left to the server to judge (it answers
    // 400 / 413): the playground shows the API's real behaviour. The counter
    // under the box warns before the limit.
    const existingChat = state.chat ? state.chat.id : null;
    const body = { message: text };
    if (existingChat) body.chat_id = existingChat;

    // Optimistic UI: the user's message and an empty assistant bubble.
    const nowIso = new Date().toISOString();
    const userLi = messageEl({ role: 'user', content: text, status: 'pending', created_at: nowIso });
    const replyLi = messageEl({ role: 'assistant', content: '', status: 'streaming', created_at: nowIso });
    replyLi.setAttribute('aria-busy', 'true');
    const replyBody = replyLi.querySelector('.msg-body');
    const textNode = document.createTextNode('');
    replyBody.replaceChildren(textNode);
    el.welcome.hidden = true;
    el.messages.append(userLi, replyLi);
    markAssistantReply();
    scrollToBottom();

    el.input.value = '';
    autosize();
    updateCharCount();

    const s = {
      controller: new AbortController(),
      epoch: state.epoch,
      chatSeq: state.chatSeq,
      chatId: existingChat,
      messageId: null,
      userLi,
      li: replyLi,
      textNode,
      sentText: text,
      text: '',
      tokens: 0,
      pings: 0,
      t0: performance.now(),
      tFirst: null,
      tEnd: null,
      lastStatsAt: 0,
      finished: false,   // done or error event handled
      stopped: false,    // aborted by Stop / switching away
      lastId: 0,         // id of the last event shown (SSE id: 1, 2, …)
      resumes: 0,        // resumes in a row without a new event
      responded: false,  // response headers arrived
      counted: false,    // the chat header's message count includes this exchange
    };
    state.stream = s;
    setStreamingUi(true);
    resetReplyStats();
    setStatus('Sending…', 'busy');

    let res;
    try {
      res = await request('POST', '/chat/stream', { body, signal: s.controller.signal, accept: 'text/event-stream' });
    } catch (err) {
      if (s.stopped) return; // stopStream() already reported it
      rollback(s);
      showError(err, 'send');
      return;
    }
    s.responded = true;

    if (!res.ok) {
      const data = await readJson(res);
      if (s.stopped) return;
      rollback(s);
      showError(new ApiError(res.status, data, res.headers), 'send');
      return;
    }
    const ctype = res.headers.get('Content-Type') || '';
    if (!/text\/event-stream/i.test(ctype) || !res.body) {
      rollback(s);
      setStatus(`Unexpected response from the server (${ctype || 'no content type'}) — expected an event stream.`, 'error');
      return;
    }

    // Headers tell the chat and the reply's message id before the first token.
    const chatId = res.headers.get('X-Chat-Id');
    const messageId = res.headers.get('X-Message-Id');
    if (chatId) s.chatId = chatId;
    if (messageId) {
      s.messageId = messageId;
      setMessageId(replyLi, messageId);
    }
    setMessageStatus(userLi, 'complete');
    adoptChat(s, true);
    if (!s.stopped && !s.finished) setStatus('Waiting for the first token…', 'busy');

    let broken = await readStream(s, res);
    // A broken stream resumes by itself where it stopped (SPEC §14): the
    // server sends the events after the last id shown, each exactly once.
    while (broken && !s.finished && !s.stopped && s.chatId && s.messageId && s.resumes < RESUME_ATTEMPTS) {
      s.resumes += 1;
      setStatus(`The connection broke (${broken}) — resuming the reply…`, 'warn');
      await new Promise((r) => setTimeout(r, RESUME_DELAY_MS * s.resumes));
      if (s.finished || s.stopped) return;
      let again;
      try {
        again = await request('GET', `/chat/${encodeURIComponent(s.chatId)}/messages/${encodeURIComponent(s.messageId)}/stream`, {
          signal: s.controller.signal,
          accept: 'text/event-stream',
          headers: { 'Last-Event-ID': String(s.lastId) },
        });
      } catch (err) {
        if (s.stopped) return;
        broken = clean(err && err.message) || 'network error';
        continue;
      }
      if (!again.ok || !again.body || !/text\/event-stream/i.test(again.headers.get('Content-Type') || '')) {
        await readJson(again);
        broken = `the server answered ${again.status}`;
        continue;
      }
      broken = await readStream(s, again);
    }
    if (s.stopped || s.finished) return;
    finishLocally(s, 'failed');
    setStatus(`The connection broke before the reply finished (${broken || 'stream ended'}). Checking what the server stored…`, 'warn');
    scheduleRecheck(s);
  }

  /**
   * Read one SSE response into the reply. Returns '' when the stream ended
   * with its final event (or was stopped), else why it broke.
   */
  async function readStream(s, res) {
    const parser = new SseParser((ev) => onSseEvent(s, ev), { onComment: () => { s.pings += 1; } });
    const reader = res.body.getReader();
    const decoder = new TextDecoder('utf-8');
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) {
          parser.push(decoder.decode());
          parser.end();
          break;
        }
        parser.push(decoder.decode(value, { stream: true }));
      }
    } catch (err) {
      if (s.stopped || s.finished) return '';
      return clean(err && err.message) || 'network error';
    }
    if (s.finished || s.stopped) return '';
    return 'the stream ended early';
  }

  /**
   * The view follows the chat the reply belongs to: a new chat gets its id
   * (X-Chat-Id header, or chat_id of the done event), and the header's count
   * grows by the user message and the reply (both exist once streaming starts).
   */
  function adoptChat(s, atStart) {
    if (!s.chatId || s.chatSeq !== state.chatSeq) return;
    const now = new Date().toISOString();
    if (!state.chat || state.chat.id !== s.chatId) {
      state.chat = {
        id: s.chatId,
        title: s.sentText.trim().slice(0, 50),
        createdAt: now,
        updatedAt: now,
        messageCount: 2,
        olderCursor: null,
      };
      s.counted = true;
      setHash(s.chatId);
      markActiveChat();
    } else if (!s.counted) {
      s.counted = true;
      if (typeof state.chat.messageCount === 'number') state.chat.messageCount += 2;
    }
    if (!atStart) state.chat.updatedAt = now;
    renderChatHeader();
  }

  /** Remove the optimistic bubbles after a request that stored nothing; give the text back. */
  function rollback(s) {
    s.userLi.remove();
    s.li.remove();
    markAssistantReply();
    if (!el.input.value) {
      el.input.value = s.sentText;
      autosize();
      updateCharCount();
    }
    el.welcome.hidden = el.messages.children.length > 0 || !!state.chat;
    s.finished = true;
    if (state.stream === s) state.stream = null;
    setStreamingUi(false);
    el.ttft.textContent = '—';
    el.tps.textContent = '—';
  }

  function onSseEvent(s, ev) {
    if (s.finished || s.stopped) return;
    let msg;
    try {
      msg = JSON.parse(ev.data);
    } catch (_) {
      console.warn('confab playground: ignoring a non-JSON SSE event', ev);
      return;
    }
    if (!msg || typeof msg !== 'object') return;
    // Events carry their id; one already shown (never sent twice by the
    // server, but cheap to guard) is skipped.
    const id = /^[0-9]+$/.test(ev.id) ? parseInt(ev.id, 10) : null;
    if (id !== null) {
      if (id <= s.lastId) return;
      s.lastId = id;
      s.resumes = 0;
    }

    if (typeof msg.error === 'string') {
      s.tEnd = performance.now();
      finishLocally(s, 'failed');
      showReplyStats(s, true);
      setStatus(`The reply failed: ${clean(msg.message) || clean(msg.error)}. Checking what the server stored…`, 'error');
      scheduleRecheck(s, true);
      return;
    }

    if (typeof msg.token === 'string' && msg.token !== '') {
      const stick = nearBottom();
      if (s.tFirst == null) {
        s.tFirst = performance.now();
        setStatus('Streaming the reply…', 'busy');
      }
      s.tokens += 1;
      s.text += msg.token;
      s.textNode.appendData(msg.token);
      if (stick) scrollToBottom();
      const now = performance.now();
      if (now - s.lastStatsAt > 150) {
        s.lastStatsAt = now;
        showReplyStats(s, false);
      }
    }

    if (msg.done === true) {
      s.tEnd = performance.now();
      if (typeof msg.fullText === 'string' && msg.fullText !== s.text) {
        console.warn('confab playground: fullText differs from the streamed tokens; showing fullText');
        s.text = msg.fullText;
        s.textNode.data = msg.fullText;
      }
      if (typeof msg.message_id === 'string' && msg.message_id) {
        s.messageId = msg.message_id;
        setMessageId(s.li, msg.message_id);
      }
      if (typeof msg.chat_id === 'string' && msg.chat_id) s.chatId = msg.chat_id;
      finishLocally(s, 'complete');
      showReplyStats(s, true);
      showReplyUsage(msg.usage);
      adoptChat(s, false);
      const secs = ((s.tEnd - s.t0) / 1000).toFixed(1);
      setStatus(`Reply complete — ${plural(s.tokens, 'token')} in ${secs} s.`, 'ok');
      if (s.epoch === state.epoch) loadChats(true);
    }
  }

  /** Mark the reply finished in the page (final status may be corrected by a re-read). */
  function finishLocally(s, status) {
    s.finished = true;
    setMessageStatus(s.li, status);
    s.li.removeAttribute('aria-busy');
    markAssistantReply();
    if (state.stream === s) {
      state.stream = null;
      setStreamingUi(false);
    }
  }

  /**
   * Stop the streaming reply: ask the server to cancel it (wherever it is
   * generated; it stores the partial reply as cancelled), and stop reading.
   */
  function stopStream(reason) {
    const s = state.stream;
    if (!s) return;
    s.stopped = true;
    s.tEnd = performance.now();
    if (s.chatId && s.messageId) {
      const path = `/chat/${encodeURIComponent(s.chatId)}/messages/${encodeURIComponent(s.messageId)}/cancel`;
      request('POST', path).then(readJson).catch(() => {});
    }
    s.controller.abort();
    state.stream = null;
    setMessageStatus(s.li, 'cancelled');
    s.li.removeAttribute('aria-busy');
    if (!s.responded && !s.text) setMessageStatus(s.userLi, 'cancelled');
    markAssistantReply();
    setStreamingUi(false);
    showReplyStats(s, true);
    if (reason === 'switch') return; // the view is about to change; nothing more to show
    setStatus('Stopped. Checking what the server stored…', 'busy');
    scheduleRecheck(s);
  }

  function scheduleRecheck(s, failed) {
    setTimeout(() => recheck(s, 0, failed), STOP_RECHECK_MS);
  }

  /**
   * After Stop (or a broken stream), re-read the chat and show the status the
   * server stored. The server may need a moment to notice the disconnect, so a
   * reply still "streaming" is re-read a few times.
   */
  async function recheck(s, attempt, failed) {
    if (s.epoch !== state.epoch) return;
    if (!s.chatId) {
      // Stopped before the response headers: we don't know whether a chat was created.
      setStatus('Stopped before the server answered — nothing to show yet.', 'info');
      loadChats(true);
      return;
    }
    const viewing = s.chatSeq === state.chatSeq || (state.chat && state.chat.id === s.chatId);
    if (!viewing) {
      loadChats(true);
      return;
    }
    let data;
    try {
      const params = new URLSearchParams({ limit: String(MESSAGE_PAGE) });
      data = await requestJson('GET', `/chat/${encodeURIComponent(s.chatId)}?${params}`);
    } catch (err) {
      if (s.epoch === state.epoch) showError(err, 'chat');
      return;
    }
    if (s.epoch !== state.epoch || !(s.chatSeq === state.chatSeq || (state.chat && state.chat.id === s.chatId))) return;
    const msgs = Array.isArray(data.messages) ? data.messages : [];
    let stored = s.messageId ? msgs.find((m) => m.id === s.messageId) : null;
    if (!stored && !s.messageId) {
      const assistants = msgs.filter((m) => m.role === 'assistant');
      stored = assistants[assistants.length - 1] || null;
    }
    if (stored && stored.status === 'streaming' && attempt < 4) {
      setTimeout(() => recheck(s, attempt + 1, failed), STOP_RECHECK_MS * (attempt + 1));
      return;
    }
    if (!s.responded && !s.messageId) {
      // Stopped before the response headers: show the chat as the server has it.
      if (!state.stream) {
        state.chatSeq += 1;
        applyChat(data, s.chatId);
      }
      setStatus('Stopped before the reply started — the chat is shown as the server stored it.', 'info');
      loadChats(true);
      return;
    }
    if (state.stream) {
      // A new reply is streaming in this view: update the stopped message in place.
      if (stored) {
        setMessageStatus(s.li, statusOf(stored));
        if (typeof stored.content === 'string') s.textNode.data = stored.content;
        markAssistantReply();
      }
    } else {
      state.chatSeq += 1;
      applyChat(data, s.chatId);
    }
    if (!stored) {
      setStatus('Stopped — the server kept no reply for this message.', 'info');
    } else {
      const st = statusOf(stored);
      const len = typeof stored.content === 'string' ? Array.from(stored.content).length : 0;
      const what = failed || st === 'failed' || st === 'interrupted' ? 'The reply' : s.stopped ? 'Stopped — the partial reply' : 'The reply';
      setStatus(`${what} is stored as “${st}” (${plural(len, 'character')}).`, st === 'complete' || st === 'cancelled' ? 'ok' : 'warn');
    }
    loadChats(true);
  }

  // ----------------------------------------------------------------- events

  for (const b of el.userButtons) {
    b.addEventListener('click', () => {
      setIdentity({ mode: 'demo', user: b.dataset.user });
    });
  }

  el.idsForm.addEventListener('submit', (e) => {
    e.preventDefault();
    const orgId = el.orgId.value.trim();
    const userId = el.userId.value.trim();
    el.orgId.setAttribute('aria-invalid', String(!UUID_RE.test(orgId)));
    el.userId.setAttribute('aria-invalid', String(!UUID_RE.test(userId)));
    if (!orgId || !userId) {
      setStatus('Enter both an org id and a user id.', 'error');
      (orgId ? el.userId : el.orgId).focus();
      return;
    }
    if (!UUID_RE.test(orgId) || !UUID_RE.test(userId)) {
      setStatus('Those do not look like UUIDs — sending them anyway; the server will say if they are wrong.', 'warn');
    }
    setIdentity({ mode: 'headers', orgId, userId });
  });

  el.keyForm.addEventListener('submit', (e) => {
    e.preventDefault();
    const apiKey = el.apiKey.value.trim();
    if (!apiKey) {
      setStatus('Paste an API key first.', 'error');
      el.apiKey.focus();
      return;
    }
    setIdentity({ mode: 'apikey', apiKey });
  });

  el.forget.addEventListener('click', clearIdentity);

  el.chatList.addEventListener('click', (e) => {
    const item = e.target.closest('.chat-item');
    if (!item) return;
    openChat(item.dataset.chatId, { reveal: true });
  });

  el.loadMore.addEventListener('click', () => loadChats(false));
  el.refreshChats.addEventListener('click', () => {
    if (!state.identity) {
      setStatus('Pick a user first.', 'error');
      return;
    }
    loadChats(true);
  });

  el.newChat.addEventListener('click', () => {
    stopStream('switch');
    showNewChat({});
    setStatus(state.identity ? 'New chat — your next message starts it.' : 'Pick a user to start.', 'info');
    el.input.focus();
  });

  el.openForm.addEventListener('submit', (e) => {
    e.preventDefault();
    const id = el.openChatId.value.trim();
    if (!UUID_RE.test(id)) {
      el.openChatId.setAttribute('aria-invalid', 'true');
      setStatus('A chat id is a UUID, like 0b8c…-…-…-…-…; check what you pasted.', 'error');
      el.openChatId.focus();
      return;
    }
    el.openChatId.setAttribute('aria-invalid', 'false');
    openChat(id, { reveal: true });
  });

  el.loadOlder.addEventListener('click', loadOlder);

  el.composer.addEventListener('submit', (e) => {
    e.preventDefault();
    send();
    // The Send button is disabled while streaming; keep focus in the message box.
    if (state.stream) el.input.focus({ preventScroll: true });
  });

  el.input.addEventListener('keydown', (e) => {
    if (e.key !== 'Enter' || e.shiftKey || e.altKey) return;
    if (e.isComposing || e.keyCode === 229) return; // IME composition in progress
    e.preventDefault();
    send();
  });
  el.input.addEventListener('input', () => {
    autosize();
    updateCharCount();
  });

  el.stop.addEventListener('click', () => {
    stopStream('user');
    el.input.focus({ preventScroll: true });
  });

  document.addEventListener('keydown', (e) => {
    if (e.key === 'Escape' && state.stream && !e.defaultPrevented) {
      e.preventDefault();
      stopStream('user');
    }
  });

  el.copyRid.addEventListener('click', async () => {
    const rid = el.requestId.textContent;
    try {
      await navigator.clipboard.writeText(rid);
      setStatus(`Copied request id ${rid}.`, 'ok');
    } catch (_) {
      setStatus('Could not copy — select the request id and copy it by hand.', 'warn');
    }
  });

  window.addEventListener('hashchange', () => {
    const id = hashChatId();
    if (id && state.identity && (!state.chat || state.chat.id !== id)) openChat(id);
  });

  // ------------------------------------------------------------------- boot

  if (typeof SseParser !== 'function') {
    setStatus('Could not load /playground/sse.js — reload the page.', 'error');
    el.send.disabled = true;
    return;
  }
  renderChatHeader();
  renderChats();
  showRequestId(null, false);
  const saved = storage.load();
  if (saved) {
    setIdentity(saved, { persist: false, openChat: hashChatId() });
  } else {
    renderWhoAmI(null);
    setStatus('Pick a user to start.', 'info');
  }
})();
