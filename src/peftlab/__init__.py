import logging as _logging

__version__ = "0.1.0"

# bitsandbytes (imported by PEFT) logs at import that an optional CPU kernel, fetched from a model hub,
# is absent; peftlab never fetches it, so the message is noise in every command's output.
_logging.getLogger("bitsandbytes").setLevel(_logging.ERROR)


def quiet_libraries() -> None:
    """Our own progress bars and tables only: no load reports or per-file progress from libraries."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
