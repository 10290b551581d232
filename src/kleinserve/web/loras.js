// The LoRA adapter picker: up to MAX_LORAS rows (and no more than the server lists: a request names each
// adapter once), each an adapter of the server's folder (GET /v1/loras), a
// scale slider and a remove button. Hidden while the server lists no adapters (started without --lora-dir),
// so that a page without adapters looks as it always did; chosen() is then [] and no request says `loras`.

import * as api from "./api.js";

export const MAX_LORAS = 4; // adapters per request: the server's MAX_LORAS (engine/lora.py)
const SCALE_RANGE = { min: -4, max: 4, step: 0.05 }; // the server refuses |scale| > 4
const DEFAULT_SCALE = 1;

const element = (tag, properties = {}) => Object.assign(document.createElement(tag), properties);

export class LoraPicker {
  // `fieldset` holds the whole picker, `list` the rows and `addButton` adds one; `onChange()` is called after
  // every change of the chosen adapters (after the rows' own updates, which run first).
  constructor(fieldset, list, addButton, onChange) {
    Object.assign(this, { fieldset, list, addButton, onChange });
    this.adapters = []; // GET /v1/loras's items: {name, format, rank, targets, bytes}
    this.rows = []; // {name, scale}, in the order they are sent
    addButton.addEventListener("click", () => this.add());
  }

  // The adapters as a request's `loras` sends them: [{name, scale}], [] when none is chosen.
  chosen() {
    return this.rows.map(({ name, scale }) => ({ name, scale }));
  }

  // Reads the server's list (again: the API key may have changed); chosen adapters it still lists stay.
  async load() {
    try {
      this.adapters = (await api.request("/v1/loras")).data;
    } catch {
      // No list (a key problem, which the model's card reports, or a server without the endpoint): no picker.
      this.adapters = [];
    }
    const listed = new Set(this.adapters.map((adapter) => adapter.name));
    this.rows = this.rows.filter((row) => listed.has(row.name));
    this.render();
  }

  add() {
    if (this.rows.length >= this.limit()) return;
    // The first adapter not chosen yet, so that each click adds something new.
    const taken = new Set(this.rows.map((row) => row.name));
    const next = this.adapters.find((adapter) => !taken.has(adapter.name));
    this.rows.push({ name: next.name, scale: DEFAULT_SCALE });
    this.render();
    this.list.querySelector("li:last-child select").focus();
  }

  limit() {
    return Math.min(MAX_LORAS, this.adapters.length);
  }

  // Rebuilt on add, remove and load only: a row's own inputs update it in place, so a dragged slider keeps
  // its focus.
  render() {
    this.fieldset.hidden = !this.adapters.length;
    this.list.replaceChildren(...this.rows.map((row, index) => this.row(row, index + 1)));
    this.addButton.disabled = this.rows.length >= this.limit();
    this.onChange();
  }

  row(row, number) {
    const select = element("select");
    select.setAttribute("aria-label", `Adapter ${number}`);
    for (const adapter of this.adapters) {
      const text = `${adapter.name} (rank ${adapter.rank})`;
      select.append(element("option", { value: adapter.name, textContent: text }));
    }
    select.value = row.name;
    select.addEventListener("change", () => (row.name = select.value));

    const slider = element("input", { type: "range", ...SCALE_RANGE, value: String(row.scale) });
    slider.setAttribute("aria-label", `Scale of adapter ${number}`);
    const shown = element("output", { className: "scale", textContent: row.scale.toFixed(2) });
    slider.addEventListener("input", () => {
      row.scale = slider.valueAsNumber;
      shown.textContent = row.scale.toFixed(2);
    });

    const remove = element("button", { type: "button", textContent: "×" });
    remove.setAttribute("aria-label", `Remove adapter ${number}`);
    remove.addEventListener("click", () => {
      this.rows.splice(number - 1, 1);
      this.render();
    });
    const item = element("li");
    item.append(select, slider, shown, remove);
    return item;
  }
}
