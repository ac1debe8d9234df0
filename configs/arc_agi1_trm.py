"""Full-size DynTRM on ARC-AGI-1 under the data protocol of TRM (the Tiny Recursive Model).

Training tasks: the 400 ARC-AGI-1 training tasks plus the demonstration pairs of the 400
ARC-AGI-1 evaluation tasks, as 1363 leave-one-out pseudo-tasks (``data.demonstrations_from``);
the evaluation tasks' test outputs are in no training sequence and are what held-out evaluation
and ``tinyonn-eval --split eval`` score (TRM votes over augmented views). Model, optimizer and
schedule are those of ``arc_agi1.py``, loaded from it.

One evaluation test pair is also a training pair by content: ``070dd51e``'s test pair is the test
pair of the training task ``40853293`` (``tinyonn_jax.data.protocol``); the run warns
when it is among the held-out tasks.
"""

import dataclasses
from pathlib import Path

from tinyonn_jax.config import Config


def get_config() -> Config:
    from tinyonn_jax.trainer import load_config  # the same loader the training program uses

    base = load_config(Path(__file__).with_name("arc_agi1.py"))
    return dataclasses.replace(base, data=dataclasses.replace(
        base.data, source="arc1", split="train", demonstrations_from="eval"))
