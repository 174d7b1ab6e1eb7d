"""Print the package layout for the README: one line per file, from each module docstring."""

import ast
import pathlib

root = pathlib.Path("graddiag")
order = ["data", "measure", "measure/activations", "measure/replay", "rules", "reporters", "pipeline", "lightning", "tensorboard_plugin", "demos"]
titles = {"data": "1. data (plain data; no torch)", "measure": "2. measure (torch; no rules, no reporters)",
          "rules": "3. rules (numpy only; no torch)", "reporters": "4. reporters (receive snapshots)",
          "pipeline": "5. pipeline (framework-free GradientMonitor)", "lightning": "6. adapter (Lightning)",
          "tensorboard_plugin": "6. the graddiag tab in TensorBoard (reads logs; no torch, no Lightning)",
          "demos": "apart from the library: demos"}
def doc(p):
    d = ast.get_docstring(ast.parse(p.read_text())) or ""
    return d.strip().split("\n\n")[0].replace("\n", " ")
out = ["```"]
out.append(f"graddiag/__init__.py{'':<30} {doc(root/'__init__.py')}")
out.append(f"graddiag/cli.py{'':<35} {doc(root/'cli.py')}")
for sub in order:
    d = root / sub
    if not d.is_dir():
        continue
    if sub in titles:
        out.append(f"# {titles[sub]}")
    for p in sorted(d.glob("*.py")):
        rel = str(p)
        out.append(f"{rel:<50} {doc(p)}")
out.append("```")
print("\n".join(out))
