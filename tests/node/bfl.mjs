// Calls kleinserve through the Vercel AI SDK's Black Forest Labs provider, as an application would:
// createBlackForestLabs({baseURL: <base-url>/v1, apiKey}) and generateImage({model: bfl.image(<model>), ...}).
// The SDK submits, polls polling_url and downloads result.sample. tests/api/test_bfl.py runs it.
//
//   node bfl.mjs <base-url> <call-json> [<call-json> ...]
//
// <call-json> {"prompt": "...", "size"?, "seed"?, "model"?, "providerOptions"?}
// The API key comes from KLEINSERVE_API_KEY (default "unused").
//
// Output: {"results": [<per call>]}, each {"images": [{"base64", "mediaType"}], "warnings", "providerMetadata",
// "requests": [{url, method, headers, json?}]} or {"error": {name, message, statusCode?, ...}, "requests"}.

import { createBlackForestLabs } from "@ai-sdk/black-forest-labs";
import * as ai from "ai";

const generateImage = ai.generateImage ?? ai.experimental_generateImage;
globalThis.AI_SDK_LOG_WARNINGS = false;

const [baseURL, ...calls] = process.argv.slice(2);
if (!baseURL || calls.length === 0) {
  console.error("usage: node bfl.mjs <base-url> <call-json> ...");
  process.exit(2);
}
const apiKey = process.env.KLEINSERVE_API_KEY ?? "unused";

let requests = [];
async function recordingFetch(input, init = {}) {
  const entry = {
    url: String(input instanceof Request ? input.url : input),
    method: init.method ?? "GET",
    headers: Object.fromEntries(new Headers(init.headers).entries()),
  };
  if (typeof init.body === "string") {
    try {
      entry.json = JSON.parse(init.body);
    } catch {
      entry.text = init.body;
    }
  }
  requests.push(entry);
  return fetch(input, init);
}

const provider = createBlackForestLabs({ baseURL: `${baseURL}/v1`, apiKey, fetch: recordingFetch });

function describeError(error) {
  const described = { name: error?.name ?? typeof error, message: String(error?.message ?? error) };
  for (const key of ["statusCode", "url", "responseBody"]) {
    if (error?.[key] !== undefined) described[key] = error[key];
  }
  if (error?.cause?.message) described.cause = String(error.cause.message);
  return described;
}

const results = [];
for (const text of calls) {
  const call = JSON.parse(text);
  requests = [];
  try {
    const result = await generateImage({
      model: provider.image(call.model ?? "flux-2-klein-4b"),
      prompt: call.prompt,
      ...(call.size !== undefined && { size: call.size }),
      ...(call.seed !== undefined && { seed: call.seed }),
      ...(call.providerOptions !== undefined && { providerOptions: call.providerOptions }),
      maxRetries: 0,
    });
    results.push({
      images: result.images.map((image) => ({ base64: image.base64, mediaType: image.mediaType })),
      warnings: result.warnings,
      providerMetadata: result.providerMetadata,
      requests,
    });
  } catch (error) {
    results.push({ error: describeError(error), requests });
  }
}
process.stdout.write(`${JSON.stringify({ results })}\n`);
