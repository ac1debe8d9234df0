"""XLA settings for the CPU backend, applied before JAX starts its backends.

Recent XLA CPU compilers hand fused element-wise and reduction ops to the YNNPACK library, not
only matrix products. On this model's shapes those fusions are pathologically slow: a multiply
and sum over the 2048 hidden units of 16 experts for 512 tokens (one SARS statistic) took 385 ms
where the plain loop fusion takes a few, and the SiLU backward fused with a transpose took 290 ms.
Keeping YNNPACK for matrix products only roughly halves the default training step on CPU
(``bench/xla_flags.py`` times both settings side by side). Only the CPU backend reads the flag;
GPU and TPU runs are unaffected.

``configure_xla_cpu()`` is called by the command-line programs, the benchmarks and the tests.
Library users call it themselves before their first JAX computation. It never overrides a value
the user put in ``XLA_FLAGS``, and ``TINYONN_XLA_CPU_TUNING=0`` switches it off.
"""

from __future__ import annotations

import glob
import mmap
import os
import warnings

YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"
CPU_FLAGS = (f"--{YNN_FLAG}=dot",)  # YNNPACK for matrix products only
OPT_OUT = "TINYONN_XLA_CPU_TUNING"


def flag_supported(name: str = YNN_FLAG) -> bool:
    """Whether the installed jaxlib knows ``name`` (XLA aborts on unknown XLA_FLAGS entries)."""
    try:
        import jaxlib
    except ImportError:
        return False
    needle = name.encode()
    for path in glob.glob(os.path.join(os.path.dirname(jaxlib.__file__), "*.so")):
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                continue
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
                if m.find(needle) >= 0:
                    return True
    return False


def tuned_xla_flags(current: str, supported: bool) -> str:
    """``current`` XLA_FLAGS plus CPU_FLAGS, leaving any flag the user already set alone."""
    if not supported or YNN_FLAG in current:
        return current
    return " ".join([current.strip(), *CPU_FLAGS]).strip()


def configure_xla_cpu(environ=None) -> bool:
    """Add ``CPU_FLAGS`` to ``XLA_FLAGS`` before JAX initialises its backends.

    Returns True when the flags are (now) part of ``XLA_FLAGS``. Too late (a backend already
    exists) or switched off: a warning or nothing, and the flags stay as they were.
    """
    environ = os.environ if environ is None else environ
    if environ.get(OPT_OUT, "1") == "0":
        return False
    current = environ.get("XLA_FLAGS", "")
    new = tuned_xla_flags(current, flag_supported())
    if new == current:
        return YNN_FLAG in current
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        warnings.warn("tinyonn_jax.runtime.configure_xla_cpu() called after JAX started its "
                      "backends; CPU flags not applied", RuntimeWarning, stacklevel=2)
        return False
    environ["XLA_FLAGS"] = new
    return True
