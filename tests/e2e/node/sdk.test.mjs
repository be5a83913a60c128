// The official `openai` npm package against a real DriftSched gateway process.
// Run by tests/e2e/test_node_sdk.py, which starts the gateway and a stub engine and passes:
//   GATEWAY_URL  the gateway's base URL
//   KEY          a tenant key with high limits
//   RL_KEY       a tenant key limited to RL_RPM requests per minute
//   MODEL        the model the stub serves
import assert from "node:assert/strict";
import { test } from "node:test";
import OpenAI from "openai";

const { GATEWAY_URL, KEY, RL_KEY, MODEL } = process.env;
const RL_RPM = Number(process.env.RL_RPM);
const baseURL = `${GATEWAY_URL}/v1`;
const messages = [{ role: "user", content: "Hello from Node." }];

function client(apiKey, options = {}) {
  return new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 20_000, ...options });
}

test("chat completion: content, usage and the gateway's headers", async () => {
  const { data, response } = await client(KEY)
    .chat.completions.create({ model: MODEL, messages, max_tokens: 8 })
    .withResponse();
  assert.equal(data.object, "chat.completion");
  assert.ok(data.choices[0].message.content.length > 0);
  assert.ok(data.usage.completion_tokens > 0);
  assert.equal(data.usage.total_tokens, data.usage.prompt_tokens + data.usage.completion_tokens);
  assert.match(response.headers.get("x-request-id"), /\S+/);
  assert.ok(Number(response.headers.get("x-ratelimit-remaining-requests")) >= 0);
});

test("stream with stream_options.include_usage: chunks, then one usage chunk", async () => {
  const stream = await client(KEY).chat.completions.create({
    model: MODEL, messages, max_tokens: 8, stream: true, stream_options: { include_usage: true },
  });
  let text = "";
  const usage = [];
  for await (const chunk of stream) {
    if (chunk.usage) usage.push(chunk);
    else text += chunk.choices[0]?.delta?.content ?? "";
  }
  assert.ok(text.length > 0);
  assert.equal(usage.length, 1);
  assert.deepEqual(usage[0].choices, []);
  assert.ok(usage[0].usage.completion_tokens > 0);
});

test("stream without include_usage: no usage chunk reaches the client", async () => {
  const stream = await client(KEY).chat.completions.create({
    model: MODEL, messages, max_tokens: 8, stream: true,
  });
  let chunks = 0;
  for await (const chunk of stream) {
    chunks += 1;
    assert.ok(!chunk.usage, "the gateway asked the engine for usage and must strip it");
  }
  assert.ok(chunks > 1);
});

test("errors arrive as the SDK's own classes", async () => {
  await assert.rejects(
    client("dsk-nosuchkey-" + "x".repeat(40)).chat.completions.create({ model: MODEL, messages }),
    (e) => e instanceof OpenAI.AuthenticationError && e.status === 401 && e.code === "invalid_api_key",
  );
  await assert.rejects(
    client(KEY).chat.completions.create({ model: "no-such-model", messages }),
    (e) => e instanceof OpenAI.NotFoundError && e.status === 404,
  );
  await assert.rejects(
    client(KEY).chat.completions.create({ model: MODEL, messages: "not a list" }),
    (e) => e instanceof OpenAI.BadRequestError && e.status === 400 && e.param === "messages",
  );
});

// Spend the RL tenant's RPM bucket (capacity RL_RPM) until the gateway answers 429.
async function spend() {
  const c = client(RL_KEY);
  for (let i = 0; i <= RL_RPM + 2; i++) {
    try {
      await c.chat.completions.create({ model: MODEL, messages, max_tokens: 1 });
    } catch (e) {
      return e;
    }
  }
  assert.fail(`no 429 after ${RL_RPM + 2} requests at ${RL_RPM} rpm`);
}

test("429 is a RateLimitError carrying retry-after", async () => {
  const e = await spend();
  assert.ok(e instanceof OpenAI.RateLimitError, `got ${e}`);
  assert.equal(e.status, 429);
  assert.equal(e.code, "rate_limit_exceeded");
  assert.ok(Number(e.headers.get("retry-after")) >= 1);
  assert.ok(Number(e.headers.get("retry-after-ms")) > 0);
});

test("the SDK's retries wait what retry-after-ms says, then succeed", async () => {
  await spend();
  const attempts = []; // [start ms, end ms, status, retry-after-ms]
  const recording = async (url, init) => {
    const start = performance.now();
    const r = await fetch(url, init);
    attempts.push([start, performance.now(), r.status, Number(r.headers.get("retry-after-ms"))]);
    return r;
  };
  const t0 = performance.now();
  const c = client(RL_KEY, { maxRetries: 3, fetch: recording });
  const r = await c.chat.completions.create({ model: MODEL, messages, max_tokens: 1 });
  assert.ok(r.choices.length === 1);
  const last = attempts.at(-1);
  assert.equal(last[2], 200);
  assert.ok(attempts.length >= 2 && attempts[0][2] === 429, JSON.stringify(attempts));
  // one refill is 60 / RL_RPM s: a wait that long is clearly not the SDK's own 0.5 s backoff
  assert.ok(attempts[0][3] > 1000, `retry-after-ms ${attempts[0][3]}`);
  for (let i = 1; i < attempts.length; i++) {
    const waited = attempts[i][0] - attempts[i - 1][1];
    const asked = attempts[i - 1][3];
    assert.ok(waited >= asked - 5, `attempt ${i}: waited ${waited} ms, asked ${asked} ms`);
    assert.ok(waited < asked + 1000, `attempt ${i}: waited ${waited} ms, asked ${asked} ms`);
  }
  console.log(`# retried ${attempts.length - 1}x, ${Math.round(performance.now() - t0)} ms in all`);
});
