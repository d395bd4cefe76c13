"""Where a run's metrics go: <out_dir>/metrics.jsonl always, mirrored to TensorBoard and/or Weights & Biases.

`--report_to=tensorboard,wandb` (a comma-separated list; "" = metrics.jsonl only). Every row of metrics.jsonl is
mirrored at its own step: numbers as scalars under their key, a dict of numbers (eval_pass_at_k) as `key/sub`;
lists (the per-group records of a study probe) and text stay in metrics.jsonl only. Written by rank 0.

- tensorboard: event files in <out_dir>/tensorboard (`tensorboard --logdir runs`); needs the `tensorboard` package.
  A resumed run purges its own events from the resumed step on, as metrics.jsonl is cut there.
- wandb: needs the `wandb` package; offline without an account with `WANDB_MODE=offline` (then
  `wandb sync <out_dir>/wandb/offline-run-*`). The run id is kept in <out_dir>/wandb_id, so a resume continues the
  same W&B run.
"""

import dataclasses
import math
import os
import uuid

import checkpoint


def scalars(row: dict) -> dict:
    """The finite numbers of a metrics row, nested dicts flattened to `key/sub`; step, lists and text left out."""
    out = {}
    for k, v in row.items():
        if k == "step":
            continue
        if isinstance(v, dict):
            out.update({f"{k}/{kk}": vv for kk, vv in scalars(v).items()})
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    return out


class Reporter:
    """metrics.jsonl and its mirrors for one run; `start_step`: the step a resumed run continues from."""

    def __init__(self, cfg, start_step: int = 0):
        self.path = os.path.join(cfg.out_dir, "metrics.jsonl")
        self.tb = self.wandb = None
        names = cfg.report_to.split(",")  # checked by config.check_config
        if "tensorboard" in names:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise SystemExit(f"report_to=tensorboard needs the tensorboard package (pip install tensorboard): {e}") from None
            self.tb = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"), purge_step=start_step or None)
        if "wandb" in names:
            try:
                import wandb
            except ImportError:
                raise SystemExit("report_to=wandb needs the wandb package (pip install wandb); WANDB_MODE=offline "
                                 "runs it without an account") from None
            id_path = os.path.join(cfg.out_dir, "wandb_id")
            if not os.path.exists(id_path):
                with open(id_path, "w") as f:
                    f.write(uuid.uuid4().hex[:12])
            with open(id_path) as f:
                run_id = f.read().strip()
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "paced-rl"), dir=cfg.out_dir, id=run_id,
                                    name=os.path.basename(os.path.normpath(cfg.out_dir)), resume="allow",
                                    config=dataclasses.asdict(cfg))

    def log(self, row: dict):
        checkpoint.append_metrics(self.path, row)
        if self.tb is not None or self.wandb is not None:
            values, step = scalars(row), int(row["step"])
            if self.tb is not None:
                for k, v in values.items():
                    self.tb.add_scalar(k, v, step)
                self.tb.flush()
            if self.wandb is not None:
                self.wandb.log(values, step=step)

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
