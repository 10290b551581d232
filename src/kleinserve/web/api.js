// The playground's only door to the server: JSON requests with the user's API key, the server's error bodies
// turned into one message, and a job followed through its Server-Sent Events.

const KEY_STORAGE = "kleinserve.apiKey";
const TERMINAL = ["succeeded", "failed", "cancelled"];
const POLL_MS = 500;

export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.name = "ApiError";
    this.status = status; // 0: the server could not be reached
  }
}

export function apiKey() {
  return localStorage.getItem(KEY_STORAGE) ?? "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// Each dialect has its own error body: OpenAI and the jobs API {error: {message}}, BFL {detail: [{msg}]} or
// {detail: "..."}, BFL's 429 {error: "rate_limit_exceeded", message}. The message is meant for people.
export function errorMessage(body, status) {
  if (body && typeof body === "object") {
    if (body.error && typeof body.error === "object" && body.error.message) return body.error.message;
    if (typeof body.message === "string") return body.message;
    if (Array.isArray(body.detail)) return body.detail.map((item) => item.msg ?? String(item)).join("; ");
    if (typeof body.detail === "string") return body.detail;
  }
  return `the server answered with status ${status}`;
}

async function send(path, init) {
  try {
    return await fetch(path, init);
  } catch {
    throw new ApiError("the server could not be reached; is it still running?", 0);
  }
}

async function failure(response) {
  const text = await response.text();
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    // not JSON (a proxy's error page, say): the status says enough
  }
  return new ApiError(errorMessage(body, response.status), response.status);
}

// GET (or POST with a JSON body) a path of this server; the parsed JSON answer, or an ApiError.
export async function request(path, { method = "GET", json } = {}) {
  const init = { method, headers: headers(json === undefined ? {} : { "Content-Type": "application/json" }) };
  if (json !== undefined) init.body = JSON.stringify(json);
  const response = await send(path, init);
  if (!response.ok) throw await failure(response);
  return response.json();
}

// The bytes of a result image. Fetched once, at once: its signed URL expires (and the file is deleted) after
// the server's media TTL, while the page may keep showing and reusing it for longer.
export async function fetchImage(url) {
  const response = await send(url, {});
  if (!response.ok) throw await failure(response);
  return response.blob();
}

// Calls onEvent with each event of job `id` (queued, running, step with an optional base64 PNG `preview`,
// then succeeded, failed or cancelled) and returns the final one. EventSource cannot send an Authorization
// header, so the stream is read with fetch; if it breaks off early, the job is polled to its end instead.
export async function followJob(id, onEvent) {
  const path = `/v1/jobs/${encodeURIComponent(id)}/events`;
  const response = await send(path, { headers: headers({ Accept: "text/event-stream" }) });
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replaceAll("\r\n", "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart())
          .join("\n");
        if (!data) continue; // a keep-alive comment
        const event = JSON.parse(data);
        onEvent(event);
        if (TERMINAL.includes(event.type)) return event;
      }
    }
  } catch {
    // the stream broke: the job itself goes on, so poll it below
  } finally {
    reader.cancel().catch(() => {});
  }
  return waitForJob(id, onEvent);
}

async function waitForJob(id, onEvent) {
  for (;;) {
    const job = await request(`/v1/jobs/${encodeURIComponent(id)}`);
    if (TERMINAL.includes(job.status)) {
      const event = { type: job.status, ...(job.error ? { error: job.error } : {}) };
      onEvent(event);
      return event;
    }
    onEvent({ type: "running", progress: job.progress });
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}
