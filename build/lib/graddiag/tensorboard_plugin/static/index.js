// The graddiag tab. TensorBoard loads this module in an iframe and calls render().
// Data: "runs" and "run?run=NAME" from the plugin's own routes (JSON only).

import { drawFindings, selectFinding } from "./findings.js";
import { drawHeatmap } from "./heatmap.js";
import { drawProfile } from "./profile.js";
import { el, nearestIndex } from "./util.js";

const EMPTY_TEXT = "No graddiag data in this log directory yet. Add GradientDiagnostics() to a "
  + "Lightning Trainer with a TensorBoardLogger (Lightning's default), or a TensorBoardReporter to "
  + "a GradientMonitor; this tab fills in as training logs.";

const state = { run: null, data: null, stepIndex: -1, findingIndex: null, heatmap: null };
const ui = {};

function reportError(text) {
  document.body.dataset.error = "1";
  ui.errors.hidden = false;
  ui.errors.append(el("div", {}, text));
}

async function getJson(path) {
  const response = await fetch(path, { headers: { Accept: "application/json" } });
  if (!response.ok) throw new Error(path.split("?")[0] + ": HTTP " + response.status);
  return response.json();
}

function layout() {
  const link = el("link", { rel: "stylesheet", href: "style.css" });
  document.head.append(link);
  const header = el("header", { class: "top" });
  header.append(el("h1", {}, "graddiag"));
  const label = el("label", { class: "run-picker" }, "Run ");
  ui.runs = el("select", { id: "graddiag-run", "aria-label": "run" });
  label.append(ui.runs);
  ui.reload = el("button", { type: "button", title: "read the logs again" }, "Reload");
  ui.status = el("span", { class: "status", role: "status" });
  header.append(label, ui.reload, ui.status);
  ui.errors = el("div", { id: "graddiag-errors", class: "errors", hidden: "" });
  ui.heatmap = el("section", { class: "panel heatmap-panel", "aria-label": "heatmap" });
  ui.profile = el("section", { class: "panel profile-panel", "aria-label": "gradient flow" });
  ui.findings = el("section", { class: "panel findings-panel", "aria-label": "findings" });
  const left = el("div", { class: "left" });
  left.append(ui.heatmap, ui.profile);
  const main = el("main", { class: "grid" });
  main.append(left, ui.findings);
  document.body.append(header, ui.errors, main);
  ui.runs.addEventListener("change", () => loadRun(ui.runs.value));
  ui.reload.addEventListener("click", () => start(state.run));
  return new Promise((resolve) => {
    link.addEventListener("load", resolve);
    link.addEventListener("error", resolve);
  });
}

function showStep(index) {
  state.stepIndex = index;
  if (state.heatmap) state.heatmap.setStep(index);
  drawProfile(ui.profile, state.data, index, state);
}

function onStep(index) {
  state.findingIndex = null;
  selectFinding(ui.findings, -1);
  showStep(index);
}

function onFinding(index) {
  const finding = state.data.findings[index];
  state.findingIndex = index;
  selectFinding(ui.findings, index);
  showStep(finding.step === null ? state.stepIndex : nearestIndex(state.data.steps, finding.step));
}

function draw() {
  const data = state.data;
  state.heatmap = drawHeatmap(ui.heatmap, data, state, { onStep, onFinding });
  drawFindings(ui.findings, data, state, onFinding);
  drawProfile(ui.profile, data, state.stepIndex, state);
}

async function loadRun(run) {
  state.run = run;
  ui.status.textContent = "loading…";
  const data = await getJson("run?run=" + encodeURIComponent(run));
  state.data = data;
  const params = new URLSearchParams(window.location.search);
  const wanted = params.has("step") ? Number(params.get("step")) : null;
  const first = data.findings.findIndex((f) => f.step !== null);
  state.findingIndex = wanted === null && first >= 0 ? first : null;
  const step = wanted !== null ? wanted : first >= 0 ? data.findings[first].step : Infinity;
  state.stepIndex = data.steps.length ? nearestIndex(data.steps, step) : -1;
  draw();
  ui.status.textContent = data.layers.length + " layers, " + data.steps.length + " logged steps, "
    + data.findings.length + " findings";
  document.body.dataset.run = run;
  document.body.dataset.ready = "1";
}

async function start(preferred) {
  document.body.dataset.ready = "";
  const { runs } = await getJson("runs");
  ui.runs.replaceChildren();
  if (!runs.length) {
    for (const panel of [ui.heatmap, ui.profile, ui.findings]) panel.replaceChildren();
    ui.heatmap.append(el("p", { class: "empty" }, EMPTY_TEXT));
    ui.status.textContent = "";
    document.body.dataset.ready = "1";
    return;
  }
  for (const r of runs) ui.runs.append(el("option", { value: r.run }, r.run));
  const asked = preferred || new URLSearchParams(window.location.search).get("run");
  const names = runs.map((r) => r.run);
  const withFindings = runs.find((r) => r.has_findings);
  const run = names.includes(asked) ? asked : (withFindings || runs[0]).run;
  ui.runs.value = run;
  await loadRun(run);
}

let resizeTimer = null;

/** Entry point called by TensorBoard's plugin frame. */
export async function render() {
  window.addEventListener("error", (event) => reportError("script error: " + event.message));
  window.addEventListener("unhandledrejection", (event) => reportError(
    "could not load: " + (event.reason && event.reason.message ? event.reason.message : event.reason)));
  await layout();
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => { if (state.data) draw(); }, 150);
  });
  await start(null);
}
