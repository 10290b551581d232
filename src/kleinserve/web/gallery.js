// The result cards: one per job, shown at once as a placeholder that takes the step previews, then the image
// with its seed and parameters (and the mask it was painted through), a download link and "use as reference".

const element = (tag, properties = {}) => Object.assign(document.createElement(tag), properties);

// 1 -> "1.0", 3.75 -> "3.75": guidance reads as a scale, never as a count.
export const decimal = (value) => (Number.isInteger(value) ? value.toFixed(1) : String(value));

export class Gallery {
  constructor(container, emptyNote) {
    this.container = container;
    this.emptyNote = emptyNote;
    this.last = null; // the newest batch's last card: the next card of the batch goes after it
  }

  // Each Generate's cards go first, in seed order: call startBatch(), then add() once per image.
  startBatch() {
    this.last = null;
  }

  // `aspect`: width / height of the coming image, so that its placeholder (and previews) take its shape.
  add(prompt, aspect = 1) {
    const card = element("figure", { className: "card" });
    const pending = element("div", { className: "pending", textContent: "Waiting…" });
    pending.style.aspectRatio = String(aspect); // CSSOM, which the page's CSP allows (style attributes not)
    card.append(pending, element("figcaption", { textContent: prompt }));
    if (this.last) this.last.after(card);
    else this.container.prepend(card);
    this.last = card;
    this.emptyNote.hidden = true;
    return card;
  }
}

export function showPreview(card, src) {
  const pending = card.querySelector(".pending");
  if (!pending) return;
  const preview = pending.querySelector("img") ?? element("img", { alt: "preview" });
  preview.src = src;
  pending.replaceChildren(preview);
}

export function showFailure(card, message) {
  card.classList.add("failed");
  card.querySelector(".pending")?.replaceChildren(document.createTextNode("No image"));
  card.querySelector("figcaption").textContent = message;
}

// `job` is GET /v1/jobs/{id}'s answer (its wire model: JobBody in api/jobs.py); `blob` its image, shown from
// an object URL that lives as long as the page (the signed media URL expires). The fourth argument is what
// the page sent: the prompt and the mask (mask.js's mask(): {white, strength}, or null). `onReuse(file)` adds
// the image to the references.
export async function showResult(card, blob, job, { prompt, mask }, onReuse) {
  const { width, height, steps, guidance } = job.result;
  const seed = job.result.images[0].seed;
  const references = job.params?.reference_sizes?.length ?? 0;
  const adapters = job.params?.loras ?? []; // [{name, scale}] as applied
  const url = URL.createObjectURL(blob);
  const image = element("img", { src: url, alt: prompt, width, height });
  await image.decode().catch(() => {}); // swapped in once loaded, so the card never flashes empty
  const name = `kleinserve-${seed}.png`;
  const reuse = element("button", { type: "button", textContent: "Use as reference" });
  reuse.addEventListener("click", () => onReuse(new File([blob], name, { type: blob.type })));
  const links = element("span", { className: "links" });
  links.append(element("a", { href: url, download: name, textContent: "Download" }), reuse);
  if (mask) {
    const title = "Mask: white was repainted";
    links.append(element("img", { className: "mask-thumb", src: mask.white, alt: "Mask", title }));
  }
  const parts = [`seed ${seed}`, `${width}×${height}`, `${steps} steps`, `guidance ${decimal(guidance)}`];
  if (references) parts.push(`${references} reference${references > 1 ? "s" : ""}`);
  if (mask) parts.push(`masked, strength ${(mask.strength ?? 1).toFixed(2)}`);
  if (adapters.length) {
    parts.push(`LoRA ${adapters.map((lora) => `${lora.name} ×${decimal(lora.scale)}`).join(", ")}`);
  }
  card.querySelector(".pending").replaceWith(image);
  card
    .querySelector("figcaption")
    .replaceChildren(
      element("span", { className: "details", textContent: parts.join(" · ") }),
      element("span", { className: "muted prompt", textContent: prompt, title: prompt }),
      links,
    );
  card.dataset.seed = seed;
}
