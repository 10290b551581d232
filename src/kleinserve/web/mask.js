// The mask painter (issue 18): over the first reference image, the image edited by a masked request, a canvas
// of that image's own pixel size (scaled to the panel for display) on which the user paints what to repaint,
// with a brush or an eraser of a chosen size, a clear button and a `strength` slider. "Paint mask" switches
// the mode on and off; off, nothing is sent (the paint is kept for when it is switched on again), so the page
// sends what it shows.
//
// Paint is drawn opaque and shown half transparent (the canvas's CSS opacity), so overlapping strokes never
// build up; a pixel is painted when its alpha is >= 128, as the server keeps a mask's grey levels >= 128.
// Requests carry the mask in two forms of the same pixels: the BFL body's `mask` (white = repaint, black =
// keep) and OpenAI's (fully transparent = repaint, opaque = keep), which "Download mask" saves for the
// copy-as code's edits call.

const BRUSH = { min: 2, max: 96, step: 1, value: 24 }; // screen pixels across, whatever the image's scale
const STRENGTH = { min: 0.05, max: 1, step: 0.05, value: 1 };
const PAINT = "#ff2d6f"; // shown at the canvas's CSS opacity over the image
const STAGE_MAX_REM = 24; // the tallest a portrait image's stage may grow

const element = (tag, properties = {}) => Object.assign(document.createElement(tag), properties);

function pngDataUrl(image) {
  const canvas = element("canvas", { width: image.width, height: image.height });
  canvas.getContext("2d").putImageData(image, 0, 0);
  return canvas.toDataURL("image/png");
}

// The mask of the paint's alpha channel (RGBA bytes of a width x height canvas) in both forms, or null when
// no pixel is painted: {white: opaque white = repaint, black = keep; transparent: transparent = repaint,
// opaque black = keep}, as PNG data URLs.
function maskForms(alpha, width, height) {
  const white = new ImageData(width, height);
  const transparent = new ImageData(width, height); // all transparent black: only kept pixels change
  let any = false;
  for (let index = 3; index < alpha.length; index += 4) {
    const on = alpha[index] >= 128;
    any ||= on;
    const grey = on ? 255 : 0;
    white.data.fill(grey, index - 3, index);
    white.data[index] = 255;
    transparent.data[index] = 255 - grey;
  }
  return any ? { white: pngDataUrl(white), transparent: pngDataUrl(transparent) } : null;
}

export class MaskPainter {
  // `fieldset` (#mask) holds the painter; `onChange()` is called whenever mask() may answer differently.
  constructor(fieldset, onChange) {
    Object.assign(this, { fieldset, onChange });
    const find = (selector) => fieldset.querySelector(selector);
    this.toggle = find("#paint-mask");
    this.editor = find("#mask-editor");
    this.stage = find("#mask-stage");
    this.image = find("#mask-image");
    this.canvas = find("#mask-canvas");
    this.eraser = find("#mask-eraser");
    this.brush = Object.assign(find("#brush-size"), BRUSH);
    this.strength = Object.assign(find("#strength"), STRENGTH);
    this.strengthRow = find("#strength-row");
    this.strengthShown = find("#strength-value");
    this.download = find("#mask-download");
    this.note = find("#mask-note");
    this.context = this.canvas.getContext("2d", { willReadFrequently: true });
    this.reference = null; // {name, dataUrl} of the image the paint belongs to
    this.painted = null; // {white, transparent}: the mask's two PNG data URLs; null while nothing is painted
    this.last = null; // the stroke's previous point in image pixels, while the pointer is down

    this.toggle.addEventListener("click", () => this.setActive(!this.active()));
    this.eraser.addEventListener("click", () => {
      this.eraser.setAttribute("aria-pressed", String(!this.erasing()));
    });
    find("#mask-clear").addEventListener("click", () => this.clear());
    this.strength.addEventListener("input", () => this.showStrength());
    this.canvas.addEventListener("pointerdown", (event) => this.strokeStart(event));
    this.canvas.addEventListener("pointermove", (event) => this.strokeMove(event));
    this.canvas.addEventListener("pointerup", () => this.strokeEnd());
    this.canvas.addEventListener("pointercancel", () => this.strokeEnd());
    this.showStrength();
  }

  active() {
    return this.toggle.getAttribute("aria-pressed") === "true";
  }

  erasing() {
    return this.eraser.getAttribute("aria-pressed") === "true";
  }

  // The mask a request sends: null without one (mode off, or nothing painted), else {white} (the BFL
  // body's PNG data URL), `strength` (null: the server's 1.0) and `file`, the name the copy-as code
  // gives the downloaded OpenAI-form mask.
  mask() {
    if (!this.active() || !this.painted) return null;
    const strength = this.strength.valueAsNumber;
    const file = this.download.download;
    return { white: this.painted.white, strength: strength === 1 ? null : strength, file };
  }

  // The image (width / height) a masked request edits, for its gallery card; null before it has loaded.
  aspect() {
    return this.canvas.width && this.canvas.height ? this.canvas.width / this.canvas.height : null;
  }

  // Shows the painter over `reference` (the first reference image; null: none, so no painter). A different
  // image than the one painted on clears the paint: a mask only fits the image it was painted over.
  async setImage(reference) {
    this.fieldset.hidden = !reference;
    if (reference === this.reference) return;
    this.reference = reference;
    this.canvas.width = this.canvas.height = 0; // no painting until the new image's size is known
    this.update();
    if (!reference) return;
    this.image.src = reference.dataUrl;
    this.image.alt = `Reference ${reference.name}`;
    this.download.download = `${reference.name.replace(/\.[^.]*$/, "")}-mask.png`;
    await this.image.decode().catch(() => {}); // a broken image leaves an empty canvas: nothing to paint
    if (this.reference !== reference) return; // replaced while it loaded
    const { naturalWidth: width, naturalHeight: height } = this.image;
    Object.assign(this.canvas, { width, height });
    this.stage.style.maxWidth = `min(100%, ${(STAGE_MAX_REM * width) / height}rem)`;
    this.note.textContent = `A masked edit keeps this image's size, ${width}×${height}.`;
    this.onChange();
  }

  setActive(active) {
    this.toggle.setAttribute("aria-pressed", String(active));
    this.editor.hidden = !active;
    this.update();
  }

  clear() {
    this.context.clearRect(0, 0, this.canvas.width, this.canvas.height);
    this.update();
  }

  showStrength() {
    this.strengthShown.textContent = this.strength.valueAsNumber.toFixed(2);
  }

  // --- painting ---------------------------------------------------------------------------------------

  // The pointer's position in image pixels, and image pixels per screen pixel.
  locate(event) {
    const box = this.canvas.getBoundingClientRect();
    const scale = this.canvas.width / box.width;
    return { x: (event.clientX - box.left) * scale, y: (event.clientY - box.top) * scale, scale };
  }

  strokeStart(event) {
    if (event.button !== 0 || !this.canvas.width) return;
    this.canvas.setPointerCapture(event.pointerId); // the stroke goes on while the pointer leaves the canvas
    this.last = this.locate(event);
    this.paint(this.last, this.last);
  }

  strokeMove(event) {
    if (!this.last) return;
    const point = this.locate(event);
    this.paint(this.last, point);
    this.last = point;
  }

  strokeEnd() {
    if (!this.last) return;
    this.last = null;
    this.update();
  }

  // A round-capped segment from `from` to `to`, plus a dot at `to`: a canvas drops zero-length segments, so
  // a click alone paints through the dot.
  paint(from, to) {
    const context = this.context;
    const width = this.brush.valueAsNumber * to.scale;
    context.globalCompositeOperation = this.erasing() ? "destination-out" : "source-over";
    Object.assign(context, { strokeStyle: PAINT, fillStyle: PAINT, lineWidth: width, lineCap: "round" });
    context.beginPath();
    context.moveTo(from.x, from.y);
    context.lineTo(to.x, to.y);
    context.stroke();
    context.beginPath();
    context.arc(to.x, to.y, width / 2, 0, 2 * Math.PI);
    context.fill();
  }

  // Reads the canvas back after each change: both PNGs of the mask, or null when no pixel is painted (an
  // all-erased mask sends no mask), then the strength slider and download link that only a mask has.
  update() {
    const { width, height } = this.canvas;
    const paint = width && height ? this.context.getImageData(0, 0, width, height).data : null;
    this.painted = paint && maskForms(paint, width, height);
    this.strengthRow.hidden = !this.painted;
    this.download.hidden = !this.painted;
    if (this.painted) this.download.href = this.painted.transparent;
    else this.download.removeAttribute("href");
    this.onChange();
  }
}
