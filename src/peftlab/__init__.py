import logging as _logging

__version__ = "0.1.0"

# bitsandbytes (imported by PEFT) logs at import that an optional CPU kernel, fetched from a model hub,
# is absent; peftlab never fetches it, so the message is noise in every command's output.
_logging.getLogger("bitsandbytes").setLevel(_logging.ERROR)
