"""Pure-PyTorch core of FGD distillation: loss, detectors, data, training and evaluation.

Imports torch, torchvision, numpy and pycocotools only; never Ray, MLflow or FastAPI.
"""

__version__ = "0.1.0"
