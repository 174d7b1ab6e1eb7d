// The layers x steps heatmap of log10 gradient norm: input side at the top, one row per layer in
// graddiag's order, findings marked, click a column to see that step's gradient flow.

import {
  KIND_COLOURS, SPECIAL_COLOURS, abbreviate, classify, describe, el, fmt, logRange,
  nearestIndex, viridis,
} from "./util.js";

const AXIS_HEIGHT = 22;

function rowHeight(layers) {
  const budget = Math.max(160, Math.min(420, window.innerHeight * 0.4));
  return Math.max(4, Math.min(22, Math.floor(budget / Math.max(1, layers))));
}

function niceTicks(steps, width) {
  if (!steps.length) return [];
  const want = Math.max(2, Math.floor(width / 90));
  const every = Math.max(1, Math.ceil(steps.length / want));
  const ticks = [];
  for (let i = 0; i < steps.length; i += every) ticks.push(i);
  if (ticks[ticks.length - 1] !== steps.length - 1) ticks.push(steps.length - 1);
  return ticks;
}

/** Where each finding sits on the heatmap: {index, row (may be fractional), col, site}. */
export function findingMarks(data) {
  const rowOf = new Map(data.layers.map((name, i) => [name, i]));
  const siteAt = new Map(data.sites.filter((s) => s.x !== null).map((s) => [s.site, s.x]));
  const marks = [];
  data.findings.forEach((f, index) => {
    if (f.step === null || !data.steps.length) return;
    const col = nearestIndex(data.steps, f.step);
    if (rowOf.has(f.layer)) marks.push({ index, row: rowOf.get(f.layer), col, site: false });
    else if (siteAt.has(f.layer)) marks.push({ index, row: siteAt.get(f.layer) + 0.5, col, site: true });
  });
  return marks;
}

function cellColour(value, range) {
  const c = classify(value);
  if (c.kind === "finite") return viridis((c.log - range[0]) / (range[1] - range[0]));
  if (c.kind === "zero") return SPECIAL_COLOURS.zero;
  if (c.kind === "none") return null;
  return SPECIAL_COLOURS.nonfinite;
}

function drawCells(ctx, data, geo, range) {
  const { cw, rh } = geo;
  ctx.fillStyle = "#f2f2f2";
  ctx.fillRect(0, 0, geo.width, geo.rows * rh);
  data.norms.forEach((row, r) => {
    row.forEach((value, c) => {
      const x0 = Math.floor(c * cw);
      const x1 = Math.max(x0 + 1, Math.floor((c + 1) * cw));
      const colour = cellColour(value, range);
      if (colour === null) {  // no gradient: white with a grey hatch when there is room
        ctx.fillStyle = SPECIAL_COLOURS.none;
        ctx.fillRect(x0, r * rh, x1 - x0, rh);
        if (x1 - x0 >= 4 && rh >= 4) {
          ctx.strokeStyle = "#9e9e9e";
          ctx.beginPath();
          ctx.moveTo(x0, (r + 1) * rh);
          ctx.lineTo(x1, r * rh);
          ctx.stroke();
        }
      } else {
        ctx.fillStyle = colour;
        ctx.fillRect(x0, r * rh, x1 - x0, rh);
      }
    });
  });
}

function drawMarks(ctx, data, marks, geo) {
  const radius = Math.max(3, Math.min(6, geo.rh / 2.5));
  for (const m of marks) {
    const x = (m.col + 0.5) * geo.cw;
    const y = m.site ? m.row * geo.rh : (m.row + 0.5) * geo.rh;
    ctx.beginPath();
    if (m.site) {
      ctx.moveTo(x, y - radius);
      ctx.lineTo(x + radius, y + radius);
      ctx.lineTo(x - radius, y + radius);
      ctx.closePath();
    } else {
      ctx.arc(x, y, radius, 0, 2 * Math.PI);
    }
    ctx.fillStyle = "#ffffff";
    ctx.fill();
    ctx.lineWidth = 2;
    ctx.strokeStyle = KIND_COLOURS[data.findings[m.index].kind] || "#000000";
    ctx.stroke();
    ctx.lineWidth = 1;
  }
}

function drawAxis(ctx, data, geo) {
  const y = geo.rows * geo.rh;
  ctx.fillStyle = "#333333";
  ctx.font = "11px sans-serif";
  ctx.textBaseline = "top";
  for (const i of niceTicks(data.steps, geo.width)) {
    const x = (i + 0.5) * geo.cw;
    ctx.fillRect(Math.round(x), y, 1, 4);
    ctx.textAlign = i === 0 ? "left" : i === data.steps.length - 1 ? "right" : "center";
    ctx.fillText(String(data.steps[i]), Math.min(geo.width, Math.max(0, x)), y + 6);
  }
}

function colourbar(range) {
  const bar = el("canvas", { class: "hm-colourbar", width: 160, height: 12 });
  const ctx = bar.getContext("2d");
  for (let x = 0; x < 160; x++) {
    ctx.fillStyle = viridis(x / 159);
    ctx.fillRect(x, 0, 1, 12);
  }
  const box = el("span", { class: "legend-item" });
  box.append(el("span", {}, "1e" + range[0] + " "), bar, el("span", {}, " 1e" + range[1]));
  return box;
}

function legend(range) {
  const row = el("div", { class: "legend" });
  row.append(el("span", { class: "legend-title" }, "gradient norm (log scale)"), colourbar(range));
  for (const [label, colour] of [["0 (exactly zero)", SPECIAL_COLOURS.zero],
    ["none (no gradient)", SPECIAL_COLOURS.none], ["NaN / inf", SPECIAL_COLOURS.nonfinite]]) {
    const item = el("span", { class: "legend-item" });
    item.append(el("span", { class: "swatch", style: "background:" + colour }), el("span", {}, label));
    row.append(item);
  }
  row.append(el("span", { class: "legend-item" }, "○ finding on a layer  △ finding on an activation site"));
  return row;
}

/** Draws the heatmap into `root`; returns {setStep(index)} to move the step cursor. */
export function drawHeatmap(root, data, state, handlers) {
  root.replaceChildren();
  if (!data.layers.length || !data.steps.length) {
    root.append(el("p", { class: "empty" }, "No gradient norms logged for this run yet."));
    return { setStep() {} };
  }
  const range = logRange(data.norms);
  const marks = findingMarks(data);
  const rh = rowHeight(data.layers.length);
  const grid = el("div", { class: "hm", "data-rows": data.layers.length,
    "data-cols": data.steps.length, "data-marks": marks.length });
  const labels = el("div", { class: "hm-labels", style: "padding-bottom:" + AXIS_HEIGHT + "px" });
  const flagged = new Set(data.findings.map((f) => f.layer));
  data.layers.forEach((name) => {
    const label = el("div", { class: "hm-row" + (flagged.has(name) ? " flagged" : ""),
      title: name, "data-layer": name, style: "height:" + rh + "px;line-height:" + rh + "px;"
        + "font-size:" + Math.max(6, Math.min(12, rh - 2)) + "px" }, abbreviate(name, 28));
    labels.append(label);
  });
  const plot = el("div", { class: "hm-plot" });
  grid.append(labels, plot);
  root.append(el("div", { class: "hm-caption" },
    "Rows: layers in forward order, input side at the top" + (data.order_known ? "" :
      " (order unknown for these logs: sorted by name)") + ". Columns: logged steps. Click a "
      + "column or a marker to see that step's gradient flow."), grid, legend(range));

  const width = Math.max(200, plot.clientWidth || root.clientWidth - 220);
  const height = data.layers.length * rh + AXIS_HEIGHT;
  const dpr = window.devicePixelRatio || 1;
  const base = el("canvas", { class: "hm-cells", width: Math.round(width * dpr),
    height: Math.round(height * dpr), style: "width:" + width + "px;height:" + height + "px" });
  const overlay = el("canvas", { class: "hm-overlay", width: Math.round(width * dpr),
    height: Math.round(height * dpr), style: "width:" + width + "px;height:" + height + "px" });
  const tooltip = el("div", { class: "tooltip", hidden: "" });
  plot.append(base, overlay, tooltip);
  const geo = { width, rows: data.layers.length, rh, cw: width / data.steps.length };
  const ctx = base.getContext("2d");
  ctx.scale(dpr, dpr);
  drawCells(ctx, data, geo, range);
  drawMarks(ctx, data, marks, geo);
  drawAxis(ctx, data, geo);

  const octx = overlay.getContext("2d");
  octx.scale(dpr, dpr);
  function setStep(index) {
    octx.clearRect(0, 0, width, height);
    if (index < 0) return;
    octx.strokeStyle = "#212121";
    octx.lineWidth = 2;
    octx.strokeRect(index * geo.cw, 0.5, Math.max(2, geo.cw), geo.rows * rh - 1);
  }
  function hit(event) {
    const box = overlay.getBoundingClientRect();
    const x = event.clientX - box.left;
    const y = event.clientY - box.top;
    const col = Math.min(data.steps.length - 1, Math.max(0, Math.floor(x / geo.cw)));
    const row = Math.floor(y / rh);
    const near = marks.find((m) => Math.abs((m.col + 0.5) * geo.cw - x) <= Math.max(6, geo.cw / 2)
      && Math.abs((m.site ? m.row * rh : (m.row + 0.5) * rh) - y) <= Math.max(6, rh / 2));
    return { x, y, col, row, mark: near };
  }
  overlay.addEventListener("mousemove", (event) => {
    const h = hit(event);
    if (h.row < 0 || h.row >= geo.rows) { tooltip.hidden = true; return; }
    const lines = [data.layers[h.row], "step " + data.steps[h.col] + ": "
      + describe(data.norms[h.row][h.col])];
    if (h.mark) {
      const f = data.findings[h.mark.index];
      lines.push(f.kind + " in " + f.layer + " at step " + f.step + " (value " + fmt(f.value) + ")");
    }
    tooltip.textContent = lines.join("\n");
    tooltip.hidden = false;
    tooltip.style.left = Math.min(h.x + 12, width - 260) + "px";
    tooltip.style.top = (h.y + 12) + "px";
  });
  overlay.addEventListener("mouseleave", () => { tooltip.hidden = true; });
  overlay.addEventListener("click", (event) => {
    const h = hit(event);
    if (h.mark) handlers.onFinding(h.mark.index);
    else handlers.onStep(h.col);
  });
  setStep(state.stepIndex);
  return { setStep };
}
