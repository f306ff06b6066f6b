"""What the console shows: alignloop's own lines and progress bars; third-party noise only with `--verbose`.

Without `--verbose` (or `ALIGNLOOP_VERBOSE=1`), before any third-party library is imported:
- transformers' load reports ("... LOAD REPORT", MISSING/UNEXPECTED keys: alignloop initialises a reward head
  itself and says so when it matters) and advisory messages are off (`TRANSFORMERS_VERBOSITY=error`);
- Hugging Face progress bars ("Loading weights", "Writing model shards", dataset maps) are off
  (`HF_HUB_DISABLE_PROGRESS_BARS`, `HF_DATASETS_DISABLE_PROGRESS_BARS`): each stage keeps one bar, alignloop's own;
- INFO and WARNING logs of third-party libraries (matplotlib's font cache, accelerate, peft, ...) are off;
- FutureWarning / DeprecationWarning (meant for developers, not users) and UserWarnings raised inside third-party
  libraries are hidden; alignloop's own warnings stay.
The settings are environment variables too, so processes started by `accelerate launch` inherit them.
"""
from __future__ import annotations

import logging
import os
import warnings

# libraries whose INFO/WARNING logs and UserWarnings are noise on a user's console
THIRD_PARTY = ("transformers", "torch", "peft", "accelerate", "datasets", "huggingface_hub", "tokenizers",
               "matplotlib", "PIL", "alembic", "urllib3", "httpx", "filelock", "fsspec", "safetensors")
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
             "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
VERBOSE_HELP = "Also show third-party load reports, weight-loading bars, library logs and deprecation warnings."


def wants_verbose(argv: list[str]) -> bool:
    """`--verbose` anywhere among the options (before a `--`), or ALIGNLOOP_VERBOSE=1 in the environment."""
    args = argv[:argv.index("--")] if "--" in argv else argv
    return "--verbose" in args or os.environ.get("ALIGNLOOP_VERBOSE", "").lower() in ("1", "true", "yes")


def configure_console(verbose: bool) -> None:
    """Quiet third-party output unless `verbose` (see the module docstring). Call before importing transformers."""
    if verbose:
        os.environ["ALIGNLOOP_VERBOSE"] = "1"
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    pattern = "|".join(THIRD_PARTY)
    warnings.filterwarnings("ignore", category=UserWarning, module=rf"({pattern})(\.|$)")
