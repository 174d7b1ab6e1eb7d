// Small helpers shared by the graddiag tab. Every text from the logs goes through textContent
// or an attribute value, never through HTML parsing.

export const SVG_NS = "http://www.w3.org/2000/svg";

export const KIND_COLOURS = {
  vanishing: "#2166ac",
  exploding: "#d6604d",
  nonfinite: "#c51b7d",
  no_gradient: "#4d4d4d",
  saturated: "#e08214",
  dead_relu: "#8c510a",
  stalled: "#1b7837",
  unstable_update: "#762a83",
  not_in_optimizer: "#878787",
};

export const SPECIAL_COLOURS = { zero: "#000000", none: "#ffffff", nonfinite: "#ff1f8e" };

const VIRIDIS = [
  [68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
  [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37],
];

/** An HTML element with attributes and (optionally) text, set as text. */
export function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value !== undefined && value !== null) node.setAttribute(key, String(value));
  }
  if (text !== undefined) node.textContent = String(text);
  return node;
}

/** An SVG element with attributes and (optionally) text, set as text. */
export function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value !== undefined && value !== null) node.setAttribute(key, String(value));
  }
  if (text !== undefined) node.textContent = String(text);
  return node;
}

/** A dotted name cut to `max` characters by dropping middle parts, words before numbers, so
 * that layers stay told apart: "bert.encoder.layer.10.attention.self.query" -> "bert…10.attention.self.query". */
export function abbreviate(name, max = 28) {
  name = String(name);
  if (name.length <= max) return name;
  const parts = name.split(".");
  const keep = parts.map(() => true);
  const text = () => {
    let out = "";
    let gap = false;
    parts.forEach((part, i) => {
      if (!keep[i]) { gap = true; return; }
      out += out ? (gap ? "…" : ".") + part : part;
      gap = false;
    });
    return out;
  };
  const middle = parts.map((_, i) => i).slice(1, -1);
  const order = middle.filter((i) => !/\d/.test(parts[i])).concat(middle.filter((i) => /\d/.test(parts[i])));
  for (const i of order) {
    if (text().length <= max) break;
    keep[i] = false;
  }
  const short = text();
  if (short.length <= max) return short;
  const half = Math.floor((max - 1) / 2);
  return name.slice(0, half) + "…" + name.slice(name.length - (max - 1 - half));
}

/** `text` cut to `max` characters with an ellipsis. */
export function truncate(text, max) {
  text = String(text);
  return text.length <= max ? text : text.slice(0, max - 1) + "…";
}

/** What a logged gradient norm is: finite (with log10), zero, none (not logged), nan or inf. */
export function classify(value) {
  if (value === null || value === undefined) return { kind: "none", log: null };
  if (value === "nan") return { kind: "nan", log: null };
  if (value === "inf" || value === "-inf") return { kind: "inf", log: null };
  if (typeof value !== "number" || !Number.isFinite(value)) return { kind: "nan", log: null };
  if (value === 0) return { kind: "zero", log: null };
  return { kind: "finite", log: Math.log10(Math.abs(value)) };
}

/** A number for people: 3 significant digits, exponent when far from 1. */
export function fmt(value) {
  if (value === null || value === undefined) return "—";
  if (typeof value === "string") return value;
  if (value === 0) return "0";
  const magnitude = Math.abs(value);
  if (magnitude >= 1e4 || magnitude < 1e-3) return value.toExponential(2);
  return String(Number(value.toPrecision(3)));
}

/** Text for a classified norm. */
export function describe(value) {
  const c = classify(value);
  if (c.kind === "none") return "none (no gradient logged)";
  if (c.kind === "zero") return "0 (exactly zero)";
  if (c.kind === "nan") return "NaN";
  if (c.kind === "inf") return "inf";
  return fmt(value) + " (log10 " + c.log.toFixed(2) + ")";
}

/** Viridis colour for t in [0, 1]. */
export function viridis(t) {
  const x = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
  const f = x - i;
  const c = VIRIDIS[i].map((v, k) => Math.round(v + f * (VIRIDIS[i + 1][k] - v)));
  return "rgb(" + c.join(",") + ")";
}

/** Index of the step in the sorted `steps` nearest to `step` (ties: the earlier one). */
export function nearestIndex(steps, step) {
  if (!steps.length) return -1;
  let lo = 0;
  let hi = steps.length - 1;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (steps[mid] < step) lo = mid + 1;
    else hi = mid;
  }
  if (lo > 0 && Math.abs(steps[lo - 1] - step) <= Math.abs(steps[lo] - step)) return lo - 1;
  return lo;
}

/** The range of log10 norms over the whole run, widened to whole decades that include 1e0, so
 * that vanishing and exploding runs both read against the scale of an ordinary gradient. */
export function logRange(norms) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const row of norms) {
    for (const value of row) {
      const c = classify(value);
      if (c.kind === "finite") {
        lo = Math.min(lo, c.log);
        hi = Math.max(hi, c.log);
      }
    }
  }
  if (!Number.isFinite(lo)) return [-1, 1];
  lo = Math.min(0, Math.floor(lo));
  hi = Math.max(0, Math.ceil(hi));
  if (hi - lo < 1) lo = hi - 1;
  return [lo, hi];
}
