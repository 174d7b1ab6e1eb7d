// One step's gradient flow: a row per layer (input side at the top, as in the heatmap), the
// gradient norm on a log axis, zero and missing gradients in a lane of their own at the left,
// NaN/inf in a lane at the right, flagged layers in red, activation sites between the rows.

import {
  KIND_COLOURS, abbreviate, classify, el, fmt, logRange, nearestIndex, svg, truncate,
} from "./util.js";

const LABEL_W = 200;
const LANE_W = 42;
const FINDINGS_W = 100;
const SITES_W = 200;
const TOP = 44;

function fractionAt(site, step) {
  let value = null;
  let at = null;
  site.steps.forEach((s, i) => {
    if (s <= step) { value = site.values[i]; at = s; }
  });
  return { value, at };
}

// Findings that began up to the shown column (a finding belongs to its nearest logged step).
function activeKinds(data, stepIndex) {
  const kinds = new Map();
  for (const f of data.findings) {
    if (f.step === null || nearestIndex(data.steps, f.step) > stepIndex) continue;
    if (!kinds.has(f.layer)) kinds.set(f.layer, new Set());
    kinds.get(f.layer).add(f.kind);
  }
  return kinds;
}

function siteNote(site, step, kinds) {
  const { value } = fractionAt(site, step);
  const what = site.statistic === "saturated" ? "saturated" : site.statistic === "dead" ? "dead" : "";
  let text = abbreviate(site.site, 24) + (site.kind ? " " + site.kind : "");
  if (what && typeof value === "number") text += ": " + Math.round(100 * value) + " % " + what;
  const flagged = kinds.has(site.site);
  const found = flagged ? " (" + [...kinds.get(site.site)].join(", ") + ")" : "";
  const full = site.site + text.slice(abbreviate(site.site, 24).length) + found;
  return { text: text + found, full, flagged };
}

/** Draws step `stepIndex` of `data` into `root` (an empty state if there is no step). */
export function drawProfile(root, data, stepIndex, state) {
  root.replaceChildren();
  if (stepIndex < 0 || !data.layers.length) {
    root.append(el("p", { class: "empty" }, "Click a step in the heatmap or a finding to see "
      + "that step's gradient flow."));
    return;
  }
  const step = data.steps[stepIndex];
  const kinds = activeKinds(data, stepIndex);
  const selected = state.findingIndex !== null ? data.findings[state.findingIndex] : null;
  const heading = el("h3", { class: "profile-title" }, "Gradient flow at step " + step);
  if (selected && selected.step !== step) {
    heading.append(el("span", { class: "muted" }, " (the logged step nearest to the finding's step "
      + selected.step + ")"));
  }
  root.append(heading);

  const n = data.layers.length;
  const rh = n > 40 ? 14 : 20;
  const width = Math.max(760, root.clientWidth - 4);
  const plotLeft = LABEL_W + LANE_W;
  const plotRight = width - FINDINGS_W - SITES_W - LANE_W;
  const height = TOP + n * rh + 8;
  const [lo, hi] = logRange(data.norms);
  const xOf = (log) => plotLeft + ((log - lo) / (hi - lo)) * (plotRight - plotLeft);
  const yOf = (row) => TOP + row * rh + rh / 2;
  const chart = svg("svg", { class: "profile", width, height, "data-step": step, "data-rows": n,
    role: "img", "aria-label": "gradient norm per layer at step " + step });

  // axis: decades on top, the zero/none lane at the left, the NaN/inf lane at the right
  for (let d = lo; d <= hi; d++) {
    const x = xOf(d);
    chart.append(svg("line", { x1: x, x2: x, y1: TOP - 4, y2: height - 8, class: "grid" }));
    chart.append(svg("text", { x, y: TOP - 8, class: "tick", "text-anchor": "middle" }, "1e" + d));
  }
  chart.append(svg("text", { x: LABEL_W + LANE_W / 2, y: TOP - 24, class: "tick lane-title",
    "text-anchor": "middle" }, "0/none"));
  chart.append(svg("text", { x: plotRight + LANE_W / 2, y: TOP - 24, class: "tick lane-title",
    "text-anchor": "middle" }, "NaN/inf"));
  chart.append(svg("text", { x: (plotLeft + plotRight) / 2, y: TOP - 24, class: "tick lane-title",
    "text-anchor": "middle" }, "gradient norm (log axis)"));
  chart.append(svg("text", { x: plotRight + LANE_W + 8, y: TOP - 24, class: "tick lane-title" },
    "finding"));
  chart.append(svg("text", { x: plotRight + LANE_W + FINDINGS_W, y: TOP - 24,
    class: "tick lane-title" }, "activation site"));
  chart.append(svg("rect", { x: LABEL_W, y: TOP - 4, width: LANE_W, height: n * rh + 4,
    class: "lane" }));
  chart.append(svg("rect", { x: plotRight, y: TOP - 4, width: LANE_W, height: n * rh + 4,
    class: "lane" }));

  const row = selected ? data.layers.indexOf(selected.layer) : -1;
  if (row >= 0) {
    chart.append(svg("rect", { x: 0, y: yOf(row) - rh / 2, width, height: rh, class: "selected-row" }));
  }
  const points = [];
  data.layers.forEach((name, row) => {
    const y = yOf(row);
    const flagged = kinds.has(name);
    const group = svg("g", { class: "profile-row" + (flagged ? " flagged" : ""), "data-layer": name });
    const label = svg("text", { x: LABEL_W - 6, y: y + 4, "text-anchor": "end", class: "layer" },
      abbreviate(name, 28));
    label.append(svg("title", {}, name));
    group.append(label);
    const value = data.norms[row][stepIndex];
    const c = classify(value);
    const cls = "point " + c.kind + (flagged ? " flagged" : "");
    if (c.kind === "finite") {
      const x = xOf(c.log);
      points.push([x, y]);
      const dot = svg("circle", { cx: x, cy: y, r: flagged ? 5 : 3.5, class: cls });
      dot.append(svg("title", {}, name + ": " + fmt(value)));
      group.append(dot);
    } else {
      if (points.length) points.push(null);
      const x = c.kind === "zero" || c.kind === "none" ? LABEL_W + 12 : plotRight + 12;
      const text = c.kind === "zero" ? "0" : c.kind === "none" ? "none" : c.kind === "nan" ? "NaN" : "inf";
      group.append(svg("rect", { x: x - 4, y: y - 4, width: 8, height: 8, class: cls }));
      group.append(svg("text", { x: x + 7, y: y + 4, class: "special " + c.kind }, text));
    }
    if (flagged) {
      group.append(svg("text", { x: plotRight + LANE_W + 8, y: y + 4, class: "finding-kinds",
        fill: KIND_COLOURS[[...kinds.get(name)][0]] || "#b2182b" }, [...kinds.get(name)].join(", ")));
    }
    chart.append(group);
  });
  let path = "";
  let pen = false;
  for (const p of points) {
    if (p === null) { pen = false; continue; }
    path += (pen ? "L" : "M") + p[0].toFixed(1) + " " + p[1].toFixed(1);
    pen = true;
  }
  if (path) chart.insertBefore(svg("path", { d: path, class: "flow" }), chart.querySelector(".profile-row"));

  for (const site of data.sites) {
    if (site.x === null) continue;
    const y = TOP + (site.x + 0.5) * rh;
    const note = siteNote(site, step, kinds);
    const chosen = selected && selected.layer === site.site;
    const group = svg("g", { class: "site" + (note.flagged ? " flagged" : "") + (chosen ? " selected" : ""),
      "data-site": site.site });
    group.append(svg("line", { x1: LABEL_W, x2: plotRight + LANE_W, y1: y, y2: y }));
    const label = svg("text", { x: plotRight + LANE_W + FINDINGS_W, y: y + 4 }, truncate(note.text, 38));
    label.append(svg("title", {}, note.full));
    group.append(label);
    chart.append(group);
  }
  const scroller = el("div", { class: "profile-scroll" });
  scroller.append(chart);
  root.append(scroller, el("p", { class: "muted" }, "Log axis. Squares at the left: a gradient of "
    + "exactly 0, or none logged (the layer got no gradient); at the right: NaN or inf. Red: a "
    + "layer with a finding up to this step. Dashed lines: activation sites between layers, with "
    + "the fraction of saturated or dead units at the latest activation step."));
}
