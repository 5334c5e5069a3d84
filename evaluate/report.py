"""Writing and printing evaluation results."""

import json
import os
from pathlib import Path


def _plain(value):
    """JSON for what lm-eval leaves in its results (numpy scalars, sets, callables)."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def write_json(data: dict, path: Path) -> None:
    """``data`` as indented JSON at ``path``, written atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_plain))
    os.replace(tmp, path)


def divergence_table(report: dict) -> str:
    """The text-file report of ``evaluate.divergence`` as aligned lines, one per mode."""
    lines = [
        f"{report['file']}: {report['rows']} rows x {report['seq_len']} tokens",
        f"{'mode':<10} {'positions':>9} {'mean KL':>10} {'top-1':>7} "
        f"{'ppl':>10} {'ref ppl':>10} {'ppl ratio':>9}",
    ]
    for mode, m in report.items():
        if isinstance(m, dict):
            lines.append(
                f"{mode:<10} {m['positions']:>9} {m['mean_kl']:>10.6f} {m['top1_agreement']:>7.4f} "
                f"{m['perplexity']:>10.4g} {m['reference_perplexity']:>10.4g} "
                f"{m['perplexity_ratio']:>9.4f}"
            )
    return "\n".join(lines)
