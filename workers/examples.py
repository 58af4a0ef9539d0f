"""The example job spec: a small FGD sweep on the generated shapes data.

One text for every place that shows it: `fgd sweep --example` prints it, the REST API's OpenAPI
schema carries it as the ``POST /jobs`` example, and `fgd demo` submits it. Torch-free.
"""

from __future__ import annotations

from typing import Any

import yaml

SMALL_SWEEP_YAML = """\
# A small FGD sweep on the generated shapes data: a teacher is trained first, then four
# students search alpha and the temperature under ASHA. About two minutes on two CPU cores.
kind: distill
data:
  shapes: {num_train: 256, num_val: 48, image_size: 96, seed: 0}
model: {arch: retinanet, backbone: resnet18, fpn_channels: 32, min_size: 96, max_size: 96}
teacher:
  train: true
  model: {arch: retinanet, backbone: resnet34, fpn_channels: 32, min_size: 96, max_size: 96}
  training:
    batch_size: 8
    schedule: {iterations: 60, warmup_iters: 10}
fgd: {alpha: 0.001, beta: 0.0005, gamma: 0.0005, lambda: 0.000005, temp: 2.0}
train:
  batch_size: 8
  schedule: {iterations: 30, warmup_iters: 5}
  eval_every: 10
  checkpoint_every: 10
  log_every: 5
evaluate_teacher: true
sweep:
  space:
    alpha: {loguniform: [0.00001, 0.001]}
    temp: {choice: [1.0, 2.0, 4.0]}
  search: random
  scheduler: asha
  asha: {grace_period: 1, reduction_factor: 2}
  num_samples: 4
  max_concurrent_trials: 2
  resources: {cpu: 1}
  metric: bbox_AP
  mode: max
  max_failures: 1
"""


def small_sweep() -> dict[str, Any]:
    """The example spec as a plain dict (a fresh copy each call)."""
    return dict(yaml.safe_load(SMALL_SWEEP_YAML))
