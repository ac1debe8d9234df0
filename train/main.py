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
from tinyonn_jax.runtime import configure_xla_cpu

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
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_xla_cpu()  # before JAX starts its backends
    from tinyonn_jax import trainer  # imported late so --help does not start JAX

    try:
        cfg = apply_overrides(trainer.load_config(args.config), args.overrides)
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=2, default=str))
            return 0
        print(trainer.config_summary(cfg), flush=True)
        final = trainer.run(cfg, args.workdir, resume=args.resume, quiet=args.quiet)
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
