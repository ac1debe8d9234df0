"""``tinyonn-train``: parse the command line, then hand over to ``tinyonn_jax.trainer.run``.

Exit codes: 0 done; 2 a user error (config, data, workdir, checkpoints), printed as one line
``tinyonn-train: <what> (<field or path>)`` (``--debug`` adds the traceback); 130 / 143 stopped
by SIGINT / SIGTERM after saving a checkpoint. Any other failure is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from tinyonn_jax.config import apply_overrides
from tinyonn_jax.errors import Interrupted, user_error_message
from tinyonn_jax.runtime import (
    configure_compile_cache,
    configure_deterministic,
    configure_xla_cpu,
)

PROG = "tinyonn-train"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="configs/<name>.py exposing get_config()")
    p.add_argument("--workdir", required=True, help="checkpoints, logs and dashboards go here")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true",
                   help="print the config (file plus --set) as JSON and exit")
    p.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    p.add_argument("--profile", default=None, metavar="START:STOP",
                   help="jax.profiler trace of steps START to STOP into WORKDIR/profile")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="persistent XLA compilation cache directory (default: the "
                        "TINYONN_COMPILE_CACHE environment variable; none without it)")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="bitwise reproducible GPU steps (--xla_gpu_deterministic_ops; slower); "
                        "also TINYONN_DETERMINISTIC=1")
    p.add_argument("--distributed", choices=("auto", "on", "off"), default=None,
                   help="start jax.distributed: auto (when a multi-process launcher is "
                        "detected), on (always), off (never); overrides train.distributed")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_xla_cpu()  # before JAX starts its backends
    configure_deterministic(args.deterministic)
    from tinyonn_jax import trainer  # imported late so --help does not start JAX
    from tinyonn_jax.observe.profile import parse_step_range

    try:
        profile = parse_step_range(args.profile) if args.profile is not None else None
        configure_compile_cache(args.compile_cache)  # before the first compilation
        overrides = args.overrides + ([f"train.distributed={args.distributed}"]
                                      if args.distributed else [])
        cfg = apply_overrides(trainer.load_config(args.config), overrides)
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=2, default=str))
            return 0
        print(trainer.config_summary(cfg), flush=True)
        final = trainer.run(cfg, args.workdir, resume=args.resume, quiet=args.quiet,
                            profile=profile)
    except Interrupted as e:
        print(f"{PROG}: {e.signal_name}: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except Exception as e:
        message = user_error_message(e)
        if message is None or args.debug:
            raise
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)
        return 2
    keys = ("train/main_loss", "train/token_acc", "train/exact_acc", "eval/token_acc",
            "perf/tokens_per_s")
    shown = ", ".join(f"{k}={final[k]:.4g}" for k in keys if k in final)
    if shown:
        print(f"final: {shown}", flush=True)
    print(f"logs, dashboards: {args.workdir}/logs  checkpoints: {args.workdir}/checkpoints")
    return 0


if __name__ == "__main__":
    sys.exit(main())
