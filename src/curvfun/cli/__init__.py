"""The ``curvfun`` command: train and compare optimizers on digits, CIFAR-10 and WikiText-2.

Modules: :mod:`.config` (the config schema), :mod:`.data` (data sets), :mod:`.models` (MLP, CNN,
ResNet, GPT), :mod:`.optimizers` (the optimizer registry), :mod:`.train` (the training loop,
evaluation, checkpoints, measurements), :mod:`.report` (table, metrics, plots), :mod:`.main`
(argument parsing and the commands).
"""

from .main import main

__all__ = ["main"]
