import logging as _logging
import warnings as _warnings

__version__ = "0.1.0"

# bitsandbytes (imported by PEFT) logs at import that an optional CPU kernel, fetched from a model hub,
# is absent; peftlab never fetches it, so the message is noise in every command's output.
_logging.getLogger("bitsandbytes").setLevel(_logging.ERROR)
# transformers warns of a deprecated alias whenever a library lists a model's attributes (not peftlab's call).
_warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def quiet_libraries() -> None:
    """Our own progress bars and tables only: no load reports or per-file progress from libraries."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


_API = ("FIGURES", "analyse", "figure", "load_runs", "load_study", "make_plan", "run", "run_study", "verdicts",
        "write_report")


def __getattr__(name: str):
    """`peftlab.run_study`, `peftlab.analyse`, ...: the names of `peftlab.api`, imported when first used (importing
    peftlab stays light)."""
    if name in _API:
        import importlib

        return getattr(importlib.import_module("peftlab.api"), name)
    raise AttributeError(f"module 'peftlab' has no attribute {name!r}")
