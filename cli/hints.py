"""One-line hints on stderr that the commands share."""

import os
import platform
import sys

SILENCE = "DHARA_NO_BLAS_HINT"
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
BLAS_HINT = (
    "hint: MLX's CPU backend runs far faster (diffusion about 12x) with OpenBLAS: "
    f"apt-get install libopenblas0-pthread, then run with LD_PRELOAD={OPENBLAS} "
    f"({SILENCE}=1 hides this)"
)

_shown = False


def openblas_loaded(maps: str = "/proc/self/maps") -> bool:
    """Whether an OpenBLAS library is mapped into this process."""
    try:
        with open(maps) as f:
            return any("libopenblas" in line for line in f)
    except OSError:
        return True  # cannot tell: say nothing


def needs_blas_hint() -> bool:
    """Linux, MLX on the CPU, no OpenBLAS loaded, and the hint not silenced."""
    if os.environ.get(SILENCE) or platform.system() != "Linux":
        return False
    import mlx.core as mx

    return mx.default_device().type == mx.DeviceType.cpu and not openblas_loaded()


def blas_hint() -> None:
    """Print the fast-BLAS hint on stderr, once per process, where it applies."""
    global _shown
    if _shown:
        return
    _shown = True
    if needs_blas_hint():
        print(BLAS_HINT, file=sys.stderr)
