"""Convert a dhara checkpoint to a KL-sensitivity 4/8-bit mix and load it with stock mlx-lm.

    python examples/mixed_precision.py [SOURCE] [TARGET_BPW] [GROUP_SIZE]

SOURCE is a local checkpoint or a Hub id (default: the small model shipped in
this repository, whose 352-wide MLP rows need group size 32).
"""

import sys
import tempfile
from collections import Counter
from pathlib import Path

import mlx.nn as nn
import mlx_lm

import optiq_dhara  # noqa: F401  (registers model_type "dhara_ar" with mlx-lm)
from optiq_dhara.convert import convert

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "dhara_tiny_trained"


def main(source: str = str(FIXTURE), target_bpw: str = "5.8", group_size: str = "32") -> None:
    with tempfile.TemporaryDirectory() as scratch:
        destination = Path(scratch) / "mixed"
        report = convert(
            source,
            destination,
            target_bpw=float(target_bpw),
            group_size=int(group_size),
            dtype="bfloat16",
            num_samples=8,
            seq_len=128,
            held_out_samples=4,
        )
        model, _ = mlx_lm.load(str(destination))
        bits = Counter(
            (module.bits, module.group_size)
            for module in model.modules()
            if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))
        )
        print(f"{report['achieved_bpw']:.3f} bits per weight (target {target_bpw})")
        for (b, group), count in sorted(bits.items()):
            print(f"  {count} modules at {b} bits, group size {group}")
        for variant in ("mix", "uniform_4", "uniform_8"):
            scores = report["held_out"][variant]
            print(
                f"  {variant}: mean KL AR {scores['ar']['mean_kl']:.4f}, "
                f"diffusion {scores['diffusion']['mean_kl']:.4f}"
            )


if __name__ == "__main__":
    main(*sys.argv[1:])
