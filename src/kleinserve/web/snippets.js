// "Copy as ..." code: the API call that makes what the playground's current settings make, against this
// server, in three clients (curl on the OpenAI endpoints, the openai Python SDK, the Vercel AI SDK).
//
// `settings`: {prompt, size: "WxH" | null (auto), count, seed: number | null (random), steps, guidance (null:
// the variant's default), references: [file names], loras: [{name, scale}] (none: []), mask: {file,
// strength} | null, hasKey}. The playground submits one BFL job per image with seeds seed, seed+1, ...; the
// OpenAI endpoints do the same for n images, so the snippets use n. The API key is never written out: the
// snippets read KLEINSERVE_API_KEY from the environment when the user has one. Without adapters there is no
// `loras` in any snippet. With a mask (then size is null: the edited image's), each client sends it as
// OpenAI's `mask` file beside the first image, the one edited: `mask.file`, the playground's "Download mask"
// (OpenAI's form: transparent = repaint), and its `strength` as an extra field unless it is the default.

export const MODEL = "flux-2-klein-4b";

// Fields beyond OpenAI's own: the openai SDK sends them as extra_body, the AI SDK as providerOptions.
function extras(settings) {
  const fields = {};
  if (settings.seed !== null) fields.seed = settings.seed;
  if (settings.steps !== null) fields.num_inference_steps = settings.steps;
  if (settings.guidance !== null) fields.guidance_scale = settings.guidance;
  if (settings.loras.length) fields.loras = settings.loras;
  if (settings.mask && settings.mask.strength !== null) fields.strength = settings.mask.strength;
  return fields;
}

function shellQuote(text) {
  return `'${String(text).replaceAll("'", `'\\''`)}'`;
}

// JSON string and object literals are valid Python and JavaScript literals too.
const literal = (value) => JSON.stringify(value);

// A multipart request (the edits endpoint, taken when there are references) carries `loras` as the JSON text
// of its array: the code makes that text with the client's own JSON function, `encode`.
function fieldLiteral(value, multipart, encode) {
  return multipart && typeof value === "object" ? `${encode}(${literal(value)})` : literal(value);
}

function pythonDict(fields, multipart) {
  const items = Object.entries(fields).map(
    ([name, value]) => `${literal(name)}: ${fieldLiteral(value, multipart, "json.dumps")}`,
  );
  return `{${items.join(", ")}}`;
}

function jsObject(fields, multipart) {
  const items = Object.entries(fields).map(
    ([name, value]) => `${name}: ${fieldLiteral(value, multipart, "JSON.stringify")}`,
  );
  return `{ ${items.join(", ")} }`;
}

export function curl(settings, origin) {
  const auth = settings.hasKey ? [`-H "Authorization: Bearer $KLEINSERVE_API_KEY"`] : [];
  const fields = { model: MODEL, prompt: settings.prompt };
  if (settings.size) fields.size = settings.size;
  if (settings.count > 1) fields.n = settings.count;
  Object.assign(fields, extras(settings));
  if (!settings.references.length) {
    const lines = [
      `curl -sS ${origin}/v1/images/generations`,
      ...auth,
      `-H "Content-Type: application/json"`,
      `-d ${shellQuote(JSON.stringify(fields))}`,
    ];
    return lines.join(" \\\n  ");
  }
  // --form-string, not -F: a text value starting with @ or < would otherwise name a file to upload.
  const lines = [
    `curl -sS ${origin}/v1/images/edits`,
    ...auth,
    ...Object.entries(fields).map(([name, value]) => {
      const text = typeof value === "object" ? JSON.stringify(value) : value; // loras: its JSON text
      return `--form-string ${shellQuote(`${name}=${text}`)}`;
    }),
    ...settings.references.map((name) => `-F ${shellQuote(`image[]=@${name}`)}`),
    ...(settings.mask ? [`-F ${shellQuote(`mask=@${settings.mask.file}`)}`] : []),
  ];
  return lines.join(" \\\n  ");
}

export function python(settings, origin) {
  const key = settings.hasKey
    ? `api_key=os.environ["KLEINSERVE_API_KEY"],`
    : `api_key="unused",  # this server needs no API key`;
  const args = [`model=${literal(MODEL)}`];
  const refs = settings.references;
  if (refs.length) {
    const files = refs.map((name) => `open(${literal(name)}, "rb")`);
    args.push(`image=${refs.length === 1 ? files[0] : `[${files.join(", ")}]`}`);
  }
  if (settings.mask) args.push(`mask=open(${literal(settings.mask.file)}, "rb")`);
  args.push(`prompt=${literal(settings.prompt)}`);
  if (settings.size) args.push(`size=${literal(settings.size)}`);
  if (settings.count > 1) args.push(`n=${settings.count}`);
  const more = extras(settings);
  if (Object.keys(more).length) args.push(`extra_body=${pythonDict(more, refs.length > 0)}`);
  return [
    "import base64",
    ...(refs.length && more.loras ? ["import json"] : []),
    ...(settings.hasKey ? ["import os"] : []),
    "",
    "from openai import OpenAI",
    "",
    "client = OpenAI(",
    `    base_url=${literal(`${origin}/v1`)},`,
    `    ${key}`,
    ")",
    `result = client.images.${refs.length ? "edit" : "generate"}(`,
    ...args.map((arg) => `    ${arg},`),
    ")",
    "for index, image in enumerate(result.data):",
    '    with open(f"kleinserve-{index}.png", "wb") as file:',
    "        file.write(base64.b64decode(image.b64_json))",
    "",
  ].join("\n");
}

export function javascript(settings, origin) {
  const refs = settings.references;
  const key = settings.hasKey
    ? "apiKey: process.env.KLEINSERVE_API_KEY,"
    : `apiKey: "unused", // this server needs no API key`;
  const files = refs.map((name) => `readFileSync(${literal(name)})`).join(", ");
  const text = literal(settings.prompt);
  const mask = settings.mask ? `, mask: readFileSync(${literal(settings.mask.file)})` : "";
  const prompt = refs.length ? `{ text: ${text}, images: [${files}]${mask} }` : text;
  const args = [`model: kleinserve.imageModel(${literal(MODEL)})`, `prompt: ${prompt}`];
  if (settings.count > 1) args.push(`n: ${settings.count}`);
  if (settings.size) args.push(`size: ${literal(settings.size)}`);
  // The provider sends no top-level seed; its providerOptions go into the request body as they are.
  const more = extras(settings);
  if (Object.keys(more).length) {
    args.push(`providerOptions: { kleinserve: ${jsObject(more, refs.length > 0)} }`);
  }
  return [
    `import { ${refs.length ? "readFileSync, " : ""}writeFileSync } from "node:fs";`,
    "",
    'import { createOpenAICompatible } from "@ai-sdk/openai-compatible";',
    'import { generateImage } from "ai";',
    "",
    "const kleinserve = createOpenAICompatible({",
    '  name: "kleinserve",',
    `  baseURL: ${literal(`${origin}/v1`)},`,
    `  ${key}`,
    "});",
    "const { images } = await generateImage({",
    ...args.map((arg) => `  ${arg},`),
    "});",
    "images.forEach((image, index) => writeFileSync(`kleinserve-${index}.png`, image.uint8Array));",
    "",
  ].join("\n");
}

export const SNIPPETS = { curl, python, js: javascript };
