// The findings list: kind, layer, step, value against threshold, evidence and remedy, in full.

import { KIND_COLOURS, abbreviate, el, fmt } from "./util.js";

/** Fills `root` with the findings of the run; `onSelect(index)` is called on click or Enter. */
export function drawFindings(root, data, state, onSelect) {
  root.replaceChildren();
  const findings = data.findings;
  const title = el("h2", {}, "Findings ");
  title.append(el("span", { class: "count" }, String(findings.length)));
  root.append(title);
  if (!findings.length) {
    root.append(el("p", { class: "empty" }, "No findings: no layer's gradients crossed "
      + "graddiag's thresholds in this run (so far)."));
    return;
  }
  const list = el("ol", { class: "findings" });
  findings.forEach((f, index) => {
    const item = el("li", { class: "finding" + (index === state.findingIndex ? " selected" : ""),
      tabindex: 0, "data-index": index, "data-kind": f.kind, "data-layer": f.layer });
    const head = el("div", { class: "finding-head" });
    const badge = el("span", { class: "badge", style: "background:" + (KIND_COLOURS[f.kind] || "#555") },
      f.kind);
    const layer = el("code", { class: "finding-layer", title: f.layer }, abbreviate(f.layer, 40));
    head.append(badge, layer, el("span", { class: "finding-step" }, "step " + (f.step ?? "?")));
    if (f.value !== null) {
      head.append(el("span", { class: "finding-value" }, "value " + fmt(f.value)
        + (f.threshold !== null ? ", threshold " + fmt(f.threshold) : "")));
    }
    item.append(head, el("p", { class: "finding-evidence" }, f.message));
    if (f.remedy) {
      const remedy = el("p", { class: "finding-remedy" });
      remedy.append(el("strong", {}, "Try: "), document.createTextNode(f.remedy));
      item.append(remedy);
    }
    item.addEventListener("click", () => onSelect(index));
    item.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") { event.preventDefault(); onSelect(index); }
    });
    list.append(item);
  });
  root.append(list);
}

/** Marks finding `index` as selected and scrolls it into view. */
export function selectFinding(root, index) {
  for (const item of root.querySelectorAll(".finding")) {
    const on = Number(item.getAttribute("data-index")) === index;
    item.classList.toggle("selected", on);
    if (on) item.scrollIntoView({ block: "nearest" });
  }
}
