// Calls kleinserve through the Vercel AI SDK's `generateImage`, as an application would, and prints what the
// SDK returned (plus what it sent) as one JSON object on stdout. tests/api/test_vercel.py and test_bfl.py run it.
//
//   node generate.mjs <provider> <base-url> <call-json> [<call-json> ...]
//
// <provider>  "openai-compatible": createOpenAICompatible({name: "kleinserve", baseURL: <base-url>/v1})
//             "gateway":           createGateway({baseURL: <base-url>})  (POST <base-url>/image-model)
//             "bfl":               createBlackForestLabs({baseURL: <base-url>/v1}): the SDK submits, polls
//                                  polling_url and downloads result.sample itself
// <call-json> {"prompt": "...", "images"?: ["<PNG path>" | "http(s)://..."], "n"?, "size"?, "aspectRatio"?,
//              "seed"?, "providerOptions"?, "model"?, "mask"?: "<PNG path>" | "http(s)://..."}. With "images"
//              the prompt becomes {text, images: [Uint8Array | URL string], mask?}, the SDK's way of asking for
//              an edit (a masked one with "mask").
// The API key comes from KLEINSERVE_API_KEY (default "unused": the test server has no keys).
//
// Output: {"results": [<per call>]}, each {"images": [{"base64", "mediaType"}], "warnings", "providerMetadata",
// "requests": [{url, method, headers, bodyType, json? | form?}]} or {"error": {name, message, statusCode, ...}}.
// Calls run one after another in this one process (a Node start costs about half a second).

import { readFileSync } from "node:fs";

import { createBlackForestLabs } from "@ai-sdk/black-forest-labs";
import { createGateway } from "@ai-sdk/gateway";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import * as ai from "ai";

// ai 5+ calls it generateImage; older releases only had experimental_generateImage.
const generateImage = ai.generateImage ?? ai.experimental_generateImage;
globalThis.AI_SDK_LOG_WARNINGS = false; // warnings are returned in the JSON instead

const [providerName, baseURL, ...calls] = process.argv.slice(2);
if (!providerName || !baseURL || calls.length === 0) {
  console.error("usage: node generate.mjs <openai-compatible|gateway|bfl> <base-url> <call-json> ...");
  process.exit(2);
}
const apiKey = process.env.KLEINSERVE_API_KEY ?? "unused";

// What the SDK puts on the wire, recorded on the way to the real fetch.
let requests = [];
async function recordingFetch(input, init = {}) {
  const body = init.body;
  const entry = {
    url: String(input instanceof Request ? input.url : input),
    method: init.method ?? "GET",
    headers: Object.fromEntries(new Headers(init.headers).entries()),
    bodyType: body == null ? null : body instanceof FormData ? "FormData" : typeof body,
  };
  if (body instanceof FormData) {
    entry.form = [...body.entries()].map(([name, value]) =>
      typeof value === "string"
        ? { name, value }
        : { name, file: { size: value.size, type: value.type, filename: value.name ?? null } },
    );
  } else if (typeof body === "string") {
    try {
      entry.json = JSON.parse(body);
    } catch {
      entry.text = body;
    }
  }
  requests.push(entry);
  return fetch(input, init);
}

function imageModel(modelId) {
  if (providerName === "openai-compatible") {
    const provider = createOpenAICompatible({
      name: "kleinserve",
      baseURL: `${baseURL}/v1`,
      apiKey,
      fetch: recordingFetch,
    });
    return provider.imageModel(modelId ?? "flux-2-klein-4b");
  }
  if (providerName === "gateway") {
    const provider = createGateway({ baseURL, apiKey, fetch: recordingFetch });
    return provider.imageModel(modelId ?? "bfl/flux-2-klein-4b");
  }
  if (providerName === "bfl") {
    const provider = createBlackForestLabs({ baseURL: `${baseURL}/v1`, apiKey, fetch: recordingFetch });
    return provider.image(modelId ?? "flux-2-klein-4b");
  }
  throw new Error(`unknown provider ${providerName}`);
}

function fileOf(image) {
  return /^https?:\/\//.test(image) ? image : new Uint8Array(readFileSync(image));
}

function promptOf(call) {
  if (!call.images) return call.prompt;
  const images = call.images.map(fileOf);
  return { text: call.prompt, images, ...(call.mask !== undefined && { mask: fileOf(call.mask) }) };
}

function describeError(error) {
  const described = { name: error?.name ?? typeof error, message: String(error?.message ?? error) };
  for (const key of ["statusCode", "url", "responseBody", "type", "modelId", "isRetryable"]) {
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
      model: imageModel(call.model),
      prompt: promptOf(call),
      ...(call.n !== undefined && { n: call.n }),
      ...(call.size !== undefined && { size: call.size }),
      ...(call.aspectRatio !== undefined && { aspectRatio: call.aspectRatio }),
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
