"""Process settings applied before JAX starts its backends: XLA flags (CPU tuning, GPU
determinism) and the persistent compilation cache.

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

Two more settings of the process, both used by the command-line programs:

* ``configure_deterministic()`` (``tinyonn-train --deterministic`` or ``TINYONN_DETERMINISTIC=1``)
  adds ``--xla_gpu_deterministic_ops=true`` to ``XLA_FLAGS``: GPU scatter-adds and reductions
  then give the same bits on every run, which a resumed run needs to continue exactly (on CPU
  and TPU they already do). It costs GPU speed, so it is off by default.
* ``configure_compile_cache()`` (``--compile-cache DIR`` or ``TINYONN_COMPILE_CACHE``) turns on
  JAX's persistent compilation cache in that directory: a restarted or resumed run loads its
  compiled steps instead of compiling them again.
"""

from __future__ import annotations

import glob
import mmap
import os
import sys
import warnings

YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"
CPU_FLAGS = (f"--{YNN_FLAG}=dot",)  # YNNPACK for matrix products only
OPT_OUT = "TINYONN_XLA_CPU_TUNING"

GPU_DETERMINISTIC_FLAG = "xla_gpu_deterministic_ops"
DETERMINISTIC_ENV = "TINYONN_DETERMINISTIC"
COMPILE_CACHE_ENV = "TINYONN_COMPILE_CACHE"
# Executables that compiled faster than this are not written to the persistent cache (JAX's own
# default is 1 s; the programs' small helper functions compile in a few tenths of a second).
CACHE_MIN_COMPILE_TIME_S = 0.2
# 0: no minimum entry size, and JAX may raise it to what suits the cache's file system.
CACHE_MIN_ENTRY_SIZE_BYTES = 0


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


def backends_started() -> bool:
    """Whether JAX has created its backends (after which XLA_FLAGS is not read again).

    JAX refuses a new ``jax_num_cpu_devices`` with a ``RuntimeError`` once its backends exist;
    trying a different value and putting the old one back asks exactly that question without
    creating them.
    """
    if "jax" not in sys.modules:
        return False
    import jax

    current = jax.config.jax_num_cpu_devices
    try:
        jax.config.update("jax_num_cpu_devices", current + 1 if current >= 0 else 1)
    except RuntimeError:
        return True
    jax.config.update("jax_num_cpu_devices", current)
    return False


def _set_xla_flags(environ, new: str, what: str) -> bool:
    """Put ``new`` into ``environ['XLA_FLAGS']`` unless JAX's backends exist (then warn)."""
    if backends_started():
        warnings.warn(f"tinyonn_jax.runtime.{what}() called after JAX started its backends; "
                      "XLA flags not applied", RuntimeWarning, stacklevel=3)
        return False
    environ["XLA_FLAGS"] = new
    return True


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
    return _set_xla_flags(environ, new, "configure_xla_cpu")


def deterministic_gpu_flags(current: str) -> str:
    """``current`` XLA_FLAGS plus ``--xla_gpu_deterministic_ops=true``; a value the user gave
    that flag is kept."""
    if GPU_DETERMINISTIC_FLAG in current:
        return current
    return " ".join([current.strip(), f"--{GPU_DETERMINISTIC_FLAG}=true"]).strip()


def configure_deterministic(enabled: bool | None = None, environ=None) -> bool:
    """Make GPU results bitwise reproducible (``deterministic_gpu_flags``) before JAX starts.

    ``enabled`` None reads ``TINYONN_DETERMINISTIC`` (``1`` = on). Returns whether the flag is
    (now) in ``XLA_FLAGS``; after JAX started its backends a warning, and nothing changes.
    """
    environ = os.environ if environ is None else environ
    if enabled is None:
        enabled = environ.get(DETERMINISTIC_ENV, "0") == "1"
    current = environ.get("XLA_FLAGS", "")
    if not enabled:
        return GPU_DETERMINISTIC_FLAG in current
    new = deterministic_gpu_flags(current)
    if new == current:
        return True
    return _set_xla_flags(environ, new, "configure_deterministic")


def configure_compile_cache(directory: str | None = None, environ=None) -> str | None:
    """Use JAX's persistent compilation cache in ``directory`` (default: the
    ``TINYONN_COMPILE_CACHE`` environment variable); returns its absolute path, or None when
    neither names one. Thresholds the user set through JAX's own environment variables
    (``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``, ``..._MIN_ENTRY_SIZE_BYTES``) are kept.
    Call it before the first compilation.
    """
    environ = os.environ if environ is None else environ
    directory = directory or environ.get(COMPILE_CACHE_ENV)
    if not directory:
        return None
    path = os.path.abspath(os.path.expanduser(directory))
    os.makedirs(path, exist_ok=True)
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_TIME_S)
    if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in environ:
        jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                          CACHE_MIN_ENTRY_SIZE_BYTES)
    return path
