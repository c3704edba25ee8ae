"""Drives confab's OpenAI-compatible API with the official `openai` SDK
(pinned by scripts/services.sh) and prints one JSON object with what it saw.

Run by tests/it/openai_sdk.rs, which compares the figures with confab's
ledger and stored chats. What only the SDK can tell (which exception it
raised, how long it waited between its own retries) is asserted here; a
failed assertion exits non-zero with its message.

Environment: CONFAB_BASE (…/v1), CONFAB_KEY (a valid key), CONFAB_LIMITED_KEY
(a key of an org whose rate limit is 1 request per 2 s), LLMOCK_CONTROL
(llmock's /_llmock base), MODELS (comma-separated names to run turns on),
STREAM_MODEL (the llmock-backed model whose stream is closed early).
"""

import json
import os
import sys
import time

import httpx
import openai
from openai import OpenAI

BASE = os.environ["CONFAB_BASE"]
KEY = os.environ["CONFAB_KEY"]
LIMITED_KEY = os.environ["CONFAB_LIMITED_KEY"]
LLMOCK = os.environ["LLMOCK_CONTROL"]
MODELS = os.environ["MODELS"].split(",")
STREAM_MODEL = os.environ["STREAM_MODEL"]

out = {"sdk_version": openai.__version__, "turns": []}


def check(cond, message):
    if not cond:
        print(json.dumps(out), flush=True)
        sys.exit(f"check failed: {message}")


client = OpenAI(base_url=BASE, api_key=KEY, max_retries=0, timeout=30)

# 1. The org's models, and one of them.
out["models"] = sorted(m.id for m in client.models.list())
check(client.models.retrieve(MODELS[0]).id == MODELS[0], "models.retrieve")
try:
    client.models.retrieve("no-such-model")
    check(False, "an unknown model was found")
except openai.NotFoundError as e:
    check(e.code == "model_not_found", f"code {e.code}")

# 2. Non-streamed and streamed turns (with the usage chunk) on every model.
for model in MODELS:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": f"Say something about {model}, please."},
    ]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=64)
    check(r.object == "chat.completion", f"object {r.object}")
    check(r.choices[0].message.role == "assistant", "role")
    check(r.choices[0].finish_reason in ("stop", "length"), r.choices[0].finish_reason)
    check(r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, "total")
    out["turns"].append({
        "model": model, "stream": False, "id": r.id,
        "text": r.choices[0].message.content,
        "prompt_tokens": r.usage.prompt_tokens,
        "completion_tokens": r.usage.completion_tokens,
    })

    stream = client.chat.completions.create(
        model=model, messages=messages, stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, ids, finish, chunks = "", None, set(), None, 0
    for chunk in stream:
        chunks += 1
        check(chunk.object == "chat.completion.chunk", f"chunk object {chunk.object}")
        ids.add(chunk.id)
        if chunk.choices:
            delta = chunk.choices[0].delta
            text += delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        else:
            usage = chunk.usage
    check(len(ids) == 1, f"one id per stream, got {ids}")
    check(usage is not None, "the usage chunk came last")
    check(finish in ("stop", "length"), f"finish_reason {finish}")
    out["turns"].append({
        "model": model, "stream": True, "id": ids.pop(), "text": text,
        "chunks": chunks,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
    })

# 3. A wrong key: the SDK's AuthenticationError.
bad = OpenAI(base_url=BASE, api_key="cfb_" + "x" * 32, max_retries=0)
for call in (
    lambda: bad.models.list(),
    lambda: bad.chat.completions.create(
        model=MODELS[0], messages=[{"role": "user", "content": "hi"}]),
):
    try:
        call()
        check(False, "a wrong key was accepted")
    except openai.AuthenticationError as e:
        check(e.status_code == 401, f"status {e.status_code}")
        check(e.code == "invalid_api_key", f"code {e.code}")
out["wrong_key"] = "AuthenticationError"

# 4. An unknown model: NotFoundError with model_not_found.
try:
    client.chat.completions.create(
        model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    check(False, "an unknown model was accepted")
except openai.NotFoundError as e:
    check(e.code == "model_not_found", f"code {e.code}")

# 5. Stored in a confab chat: X-Confab-Chat-Id: new.
raw = client.chat.completions.with_raw_response.create(
    model=MODELS[0],
    messages=[{"role": "user", "content": "Please remember this conversation."}],
    extra_headers={"X-Confab-Chat-Id": "new"},
)
stored = raw.parse()
out["stored"] = {
    "chat_id": raw.headers.get("x-confab-chat-id"),
    "id": stored.id,
    "text": stored.choices[0].message.content,
    "prompt_tokens": stored.usage.prompt_tokens,
    "completion_tokens": stored.usage.completion_tokens,
}
check(out["stored"]["chat_id"], "the response names the chat")

# 6. Closing the SDK's stream after 2 chunks cancels the upstream request:
#    llmock's journal shows it `completed: false` within 1 s — also for a
#    turn stored in a chat, on a server where native streams detach (an
#    OpenAI client cannot resume).
httpx.post(f"{LLMOCK}/reset")
stream = client.chat.completions.create(
    model=STREAM_MODEL, stream=True,
    messages=[{"role": "user", "content": " ".join(["word"] * 30)}],
    extra_headers={"X-Confab-Chat-Id": "new"},
)
seen = 0
for _ in stream:
    seen += 1
    if seen == 2:
        break
stream.close()
closed = time.monotonic()
abandoned = None
while time.monotonic() - closed < 3:
    journal = httpx.get(f"{LLMOCK}/requests", timeout=5).json()["requests"]
    if any(not r["completed"] for r in journal):
        abandoned = time.monotonic() - closed
        break
    time.sleep(0.02)
check(abandoned is not None, "the upstream request was never abandoned")
out["close_to_abandoned_s"] = abandoned

# 7. An exhausted rate limit: the SDK retries, honouring Retry-After, then
#    raises RateLimitError. Right before each of its attempts, a hook spends
#    whatever the org's bucket holds (1 request per 2 s), so every attempt
#    finds it empty, however long the SDK waited.
attempts = []
drainer = httpx.Client(headers={"authorization": f"Bearer {LIMITED_KEY}"})


def drain(request):
    if request.url.path.endswith("/chat/completions"):
        while drainer.get(f"{BASE}/models").status_code != 429:
            pass


def record(response):
    if response.request.url.path.endswith("/chat/completions"):
        attempts.append((time.monotonic(), response.status_code,
                         response.headers.get("retry-after")))


limited = OpenAI(
    base_url=BASE, api_key=LIMITED_KEY, max_retries=2,
    http_client=httpx.Client(event_hooks={"request": [drain], "response": [record]}),
)
try:
    limited.chat.completions.create(
        model=MODELS[0], messages=[{"role": "user", "content": "hi"}])
    check(False, "the rate limit let a turn through")
except openai.RateLimitError as e:
    check(e.status_code == 429, f"status {e.status_code}")
    check(e.code == "rate_limit_exceeded", f"code {e.code}")
check(len(attempts) == 3, f"three attempts (1 + 2 retries), saw {attempts}")
waits = [round(b[0] - a[0], 3) for a, b in zip(attempts, attempts[1:])]
retry_after = [int(a[2]) for a in attempts]
check(all(s == 429 for _, s, _ in attempts), f"statuses {attempts}")
check(all(ra >= 1 for ra in retry_after), f"Retry-After {retry_after}")
check(all(w >= ra - 0.05 for w, ra in zip(waits, retry_after)),
      f"the SDK waited {waits} s for Retry-After {retry_after}")
out["rate_limit"] = {"waits_s": waits, "retry_after": retry_after}

print(json.dumps(out), flush=True)
