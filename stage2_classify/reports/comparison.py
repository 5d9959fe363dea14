"""The "Frozen vs fine-tuned" section of a fine-tuned run's report: both on the same test images, paired."""

from __future__ import annotations

import json
from pathlib import Path

from stage2_classify.reports.html import esc, notes, table


def _with_ci(m: dict, key: str) -> str:
    value = m.get(key)
    ci = (m.get("ci95") or {}).get(key)
    if value is None:
        return "–"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}–{ci[1]:.3f}]" if ci else "")


def comparison_section(run: Path) -> tuple[str, str, str] | None:
    """(id, title, html) when ``run`` is a fine-tuned run with a ``comparison.json``, else None."""
    try:
        c = json.loads((Path(run) / "comparison.json").read_text())
    except (OSError, ValueError):
        return None
    rows = [(label, *(_with_ci(c.get(name) or {}, key) for name in ("frozen", "finetuned")))
            for key, label in (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"),
                               ("macro_f1", "macro-F1"))]
    d = c.get("accuracy_difference") or {}
    ci = d.get("ci95")
    lines = [f"The same {c.get('test_images')} test images of the frozen run {c.get('frozen_run')}, matched by content."]
    if d:
        lines.append(f"Accuracy difference (fine-tuned − frozen) {d['difference']:+.3f}"
                     + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}] (paired bootstrap 95%)" if ci else "")
                     + f"; McNemar exact p = {d['mcnemar_p']:.3g}: {d['only_finetuned_right']} images right only "
                     f"after fine-tuning, {d['only_frozen_right']} only before.")
    body = table(["test metric (95% interval)", "frozen", "fine-tuned"], rows, [False, True, True])
    return "finetune", "Frozen vs fine-tuned", f"<p>{esc(lines[0])}</p>" + body + notes(lines[1:])
