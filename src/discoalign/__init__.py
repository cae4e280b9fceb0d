"""discoalign: preference alignment with Disco (Normal) rewards and dynamic beta."""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes (the `qlora` extra; transformers and peft import it whenever it is installed) warns on import, in
# every run, quantised or not, that an optional faster CPU kernel package (`kernels`) is missing; nothing changes.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
