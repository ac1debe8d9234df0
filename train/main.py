"""``tinyonn-train``: parse the command line, then hand over to ``tinyonn_jax.trainer.run``."""

from __future__ import annotations

import argparse
import sys

from tinyonn_jax.config import apply_overrides
from tinyonn_jax.runtime import configure_xla_cpu


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tinyonn-train", description=__doc__)
    p.add_argument("--config", required=True, help="configs/<name>.py exposing get_config()")
    p.add_argument("--workdir", required=True, help="checkpoints, logs and dashboards go here")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_xla_cpu()  # before JAX starts its backends
    from tinyonn_jax import trainer  # imported late so --help does not start JAX

    try:
        cfg = apply_overrides(trainer.load_config(args.config), args.overrides)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"tinyonn-train: {e}", file=sys.stderr)
        return 2
    print(trainer.config_summary(cfg), flush=True)
    final = trainer.run(cfg, args.workdir, resume=args.resume, quiet=args.quiet)
    keys = ("train/main_loss", "train/token_acc", "train/exact_acc", "eval/token_acc",
            "perf/tokens_per_s")
    print("final: " + ", ".join(f"{k}={final[k]:.4g}" for k in keys if k in final), flush=True)
    print(f"logs, dashboards: {args.workdir}/logs  checkpoints: {args.workdir}/checkpoints")
    return 0


if __name__ == "__main__":
    sys.exit(main())
