"""Our own versions of ASDL's three published example training loops (``examples/train_cpu.py``,
``examples/train.py`` and ``examples/arxiv_results/train.py`` of kazukiosawa/asdl), written from
their behaviour: the same models (narrower), optimizer options, configs, clipping and schedules,
with scikit-learn's digits (8 x 8) standing in for MNIST and a fixed number of steps.

Every runner takes ``asdl``, the namespace a script imports (``import asdl``, or
``from curvfun import precondition as asdl``), and returns the training losses.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from digits_helper import digits_data

TRAIN_CPU_OPTIONS = ["kfac", "smw_ngd", "full_psgd", "kron_psgd", "kbfgs", "seng", "shampoo"]
TRAIN_OPTIONS = ["sgd", "adam", "kfac", "smw_ngd", "full_psgd", "kron_psgd", "kbfgs", "seng"]
ARXIV_OPTIONS = ["kfac_mc", "shampoo", "smw_ngd", "full_psgd", "psgd", "newton", "abs_newton", "kbfgs",
                 "curve_ball", "seng", "sgd", "adamw", "noisy_kfac_mc"]


def _loop(asdl_step, optimizer, batches, after_backward=None, scheduler_per_step=None):
    losses = []
    for x, t in batches:
        optimizer.zero_grad(set_to_none=True)
        y, loss = asdl_step(x, t)
        if after_backward is not None:
            after_backward()
        optimizer.step()
        if scheduler_per_step is not None:
            scheduler_per_step.step()
        losses.append(float(loss))
    return losses


def _digits_batches(steps: int, batch_size: int, seed: int, image: bool = False):
    x, y, _, _ = digits_data(torch.float32)
    if image:
        x = x.reshape(-1, 1, 8, 8)
    g = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < steps:
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y) - batch_size + 1, batch_size):  # drop_last
            idx = perm[i:i + batch_size]
            out.append((x[idx], y[idx]))
            if len(out) == steps:
                break
    return out


def _mnist_makers(asdl, model, config, fisher_type):
    """The options train_cpu.py and train.py share (``fisher_type`` overrides K-FAC's default)."""
    kw = {} if fisher_type is None else {"fisher_type": fisher_type}
    return {"kfac": lambda: asdl.KfacGradientMaker(model, config, **kw),
            "smw_ngd": lambda: asdl.SmwEmpNaturalGradientMaker(model, config),
            "full_psgd": lambda: asdl.PsgdGradientMaker(model, config),
            "kron_psgd": lambda: asdl.KronPsgdGradientMaker(model, config),
            "kbfgs": lambda: asdl.KronBfgsGradientMaker(model, config),
            "seng": lambda: asdl.SengGradientMaker(model, config)}


def run_train_cpu(asdl, optim: str, epochs: int = 2, seed: int = 0, fisher_type: str | None = None):
    """``train_cpu.py``: MLP 5-4-4-3 on Gaussian inputs with all-zero labels, batch 32, 10 steps per
    epoch, SGD (lr 0.1, weight decay 5e-4), ``PreconditioningConfig(data_size=32, damping=1.)``."""
    torch.manual_seed(seed)
    in_dim, hid_dim, out_dim, batch_size, num_iters = 5, 4, 3, 32, 10
    model = nn.Sequential(nn.Linear(in_dim, hid_dim), nn.ReLU(), nn.Linear(hid_dim, hid_dim), nn.ReLU(),
                          nn.Linear(hid_dim, out_dim))
    xs = torch.randn(batch_size * num_iters, in_dim)
    ts = torch.zeros(batch_size * num_iters, dtype=torch.long)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=5e-4)
    config = asdl.PreconditioningConfig(data_size=batch_size, damping=1.0)
    makers = _mnist_makers(asdl, model, config, fisher_type)
    makers["shampoo"] = lambda: asdl.ShampooGradientMaker(model, config)
    if optim not in makers:
        raise ValueError(f"Invalid optim: {optim}")
    grad_maker = makers[optim]()

    def step(x, t):
        dummy_y = grad_maker.setup_model_call(model, x)
        grad_maker.setup_loss_call(F.cross_entropy, dummy_y, t)
        return grad_maker.forward_and_backward()

    batches = [(xs[i:i + batch_size], ts[i:i + batch_size]) for _ in range(epochs)
               for i in range(0, len(xs), batch_size)]
    return _loop(step, optimizer, batches)


def run_train(asdl, optim: str, steps: int = 15, seed: int = 0, lr: float = 0.1, hidden_dim: int = 16,
              batch_size: int = 64, damping: float = 1e-3, fisher_type: str | None = None):
    """``train.py``: flatten + MLP (in-16-16-10), SGD or Adam (weight decay 0), the maker's gradient
    clipped to norm 1, cosine learning rate over the run stepped per batch,
    ``PreconditioningConfig(data_size=batch_size, damping=1e-3)``; unknown options train with the
    plain ``GradientMaker``. The script's learning rate is 1e-2 for both optimizers; here SGD takes
    ``lr`` (0.1, so that a few steps show progress) and Adam ``lr / 10``."""
    torch.manual_seed(seed)
    model = nn.Sequential(OrderedDict([
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(64, hidden_dim)), ("relu1", nn.ReLU()),
        ("fc2", nn.Linear(hidden_dim, hidden_dim)), ("relu2", nn.ReLU()),
        ("fc3", nn.Linear(hidden_dim, 10)),
    ]))
    if optim == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=lr / 10, weight_decay=0)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=0)
    config = asdl.PreconditioningConfig(data_size=batch_size, damping=damping)
    makers = _mnist_makers(asdl, model, config, fisher_type)
    grad_maker = makers.get(optim, lambda: asdl.GradientMaker(model))()
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)

    def step(x, t):
        dummy_y = grad_maker.setup_model_call(model, x)
        grad_maker.setup_loss_call(F.cross_entropy, dummy_y, t)
        return grad_maker.forward_and_backward()

    return _loop(step, optimizer, _digits_batches(steps, batch_size, seed),
                 after_backward=lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1),
                 scheduler_per_step=scheduler)


class MLP(nn.Module):
    """The arXiv script's MLP: ``depth`` Linear layers of width ``n_hid`` with ReLU."""

    def __init__(self, n_hid: int = 16, depth: int = 3, img_size: int = 8, num_classes: int = 10):
        super().__init__()
        self.img_size = img_size
        layers = [nn.Linear(img_size * img_size, n_hid), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Linear(n_hid, n_hid), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(n_hid, num_classes))
        self.l1 = nn.Sequential(*layers)

    def forward(self, x):
        return self.l1(x.view(-1, self.img_size * self.img_size))


class CNN(nn.Module):
    """The arXiv script's CNN (two 3x3 convolutions, max-pool, dropout, two Linear layers, log-softmax
    output), narrower and for 8 x 8 inputs."""

    def __init__(self, dropout1: float = 0.25, dropout2: float = 0.5, c1: int = 2, c2: int = 4, hidden: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, 1)
        self.conv2 = nn.Conv2d(c1, c2, 3, 1)
        self.dropout1 = nn.Dropout2d(dropout1)
        self.dropout2 = nn.Dropout2d(dropout2)
        self.fc1 = nn.Linear(c2 * 2 * 2, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        x = self.dropout1(F.max_pool2d(x, 2))
        x = self.dropout2(F.relu(self.fc1(torch.flatten(x, 1))))
        return F.log_softmax(self.fc2(x), dim=1)


def run_arxiv(asdl, optim: str, model_name: str = "mlp", steps: int = 12, seed: int = 1, lr: float = 0.01,
              batch_size: int = 64, width: int = 16, damping: float = 1e-3, label_smoothing: float = 0.1,
              dropout: bool = True,
              fisher_type: str | None = None):
    """``arxiv_results/train.py``: MLP or CNN, SGD (momentum 0.9, weight decay 1e-5) or AdamW (eps =
    damping), label smoothing 0.1, gradient clipping at norm 10, cosine schedule stepped per epoch,
    ``PreconditioningConfig(data_size, damping, ema_decay=-1, preconditioner_upd_interval=1,
    curvature_upd_interval=1, ignore_modules=[BatchNorm1d, BatchNorm2d, BatchNorm3d, LayerNorm])``;
    full PSGD is built without a config (as the script does); unknown options train with the plain
    ``GradientMaker``. Learning rate 1e-2 (the published K-FAC config's; AdamW ``lr / 10``);
    ``dropout=False`` turns the CNN's dropout off (for step-by-step comparisons)."""
    torch.manual_seed(seed)
    if model_name == "mlp":
        model = MLP(n_hid=width)
    else:
        model = CNN(*((0.25, 0.5) if dropout else (0.0, 0.0)))
    if optim == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr / 10, weight_decay=1e-5, eps=damping)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-5, nesterov=False)
    config = asdl.PreconditioningConfig(data_size=batch_size, damping=damping, ema_decay=-1,
                                        preconditioner_upd_interval=1, curvature_upd_interval=1,
                                        ignore_modules=[nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm])
    kw = {} if fisher_type is None else {"fisher_type": fisher_type}
    makers = {"kfac_mc": lambda: asdl.KfacGradientMaker(model, config, **kw),
              "shampoo": lambda: asdl.ShampooGradientMaker(model, config),
              "smw_ngd": lambda: asdl.SmwEmpNaturalGradientMaker(model, config),
              "full_psgd": lambda: asdl.PsgdGradientMaker(model),
              "psgd": lambda: asdl.KronPsgdGradientMaker(model, config),
              "newton": lambda: asdl.NewtonGradientMaker(model, config),
              "abs_newton": lambda: asdl.NewtonGradientMaker(model, config),
              "kbfgs": lambda: asdl.KronBfgsGradientMaker(model, config),
              "curve_ball": lambda: asdl.CurveBallGradientMaker(model, config),
              "seng": lambda: asdl.SengGradientMaker(model, config=config)}
    grad_maker = makers.get(optim, lambda: asdl.GradientMaker(model))()
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=2, eta_min=0)
    model.train()

    def step(x, t):
        dummy_y = grad_maker.setup_model_call(model, x)
        grad_maker.setup_loss_call(F.cross_entropy, dummy_y, t, label_smoothing=label_smoothing)
        return grad_maker.forward_and_backward()

    losses = _loop(step, optimizer, _digits_batches(steps, batch_size, seed, image=model_name == "cnn"),
                   after_backward=lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 10))
    scheduler.step()
    return losses
