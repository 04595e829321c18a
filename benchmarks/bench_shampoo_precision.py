"""Shampoo in float32 against float64: the first preconditioned gradient of the 784-512-512-10 MLP
(batch 128, digits-like inputs: scikit-learn's 8x8 digits scaled to 20x20, padded to 28x28 and
normalised as MNIST) at ASDL's relative damping 1e-12 ... 1e-2, as the relative distance
‖G̃_float32 − G̃_float64‖ / ‖G̃_float64‖ over all parameters, the float64 result from the same maker
on a float64 copy of the model. Columns: curvfun (``precision="auto"``: float64 statistics below
damping 1e-4), curvfun with ``precision="native"`` (float32 statistics, the computation before
``"auto"``), and ASDL 0.1 (``pip install asdfghjkl``; its float32 run against curvfun's float64
result, which ASDL's float64 run matches to 1e-8) when importable. Then the step time of the
float64 route against the float32 one and SGD (interleaved rounds, medians; see bench_others).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from bench_others import _interleaved_times, _stepper
from common import mlp, setup, table
from curvfun.precondition import PreconditioningConfig, ShampooGradientMaker

DAMPINGS = (1e-12, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2)


def digits_batch(n: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` digits as 784-vectors (MNIST-like layout and normalisation) and their labels."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    X = F.pad(F.interpolate(X, size=(20, 20), mode="bilinear", align_corners=False), (4, 4, 4, 4))
    X = ((X - 0.1307) / 0.3081).reshape(-1, 784)
    idx = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))[:n]
    return X[idx], torch.tensor(y)[idx]


def _first_step(module, model, x, t, damping: float, **kw) -> torch.Tensor:
    gm = module.ShampooGradientMaker(model, module.PreconditioningConfig(damping=damping), **kw)
    model.zero_grad(set_to_none=True)
    y = gm.setup_model_call(model, x)
    gm.setup_loss_call(F.cross_entropy, y, t)
    gm.forward_and_backward()
    return torch.cat([p.grad.flatten().double() for p in model.parameters()])


def accuracy_table(base, x, t) -> None:
    import curvfun.precondition as cp

    try:
        import asdl.precondition as ap
    except ImportError:
        ap = None
    print("\nShampoo first step, float32 vs float64 (relative distance; MLP 784-512-512-10, batch 128, digits)")
    print(f"  {'damping':>8} {'curvfun':>10} {'native f32':>11} {'ASDL 0.1':>10}")
    for d in DAMPINGS:
        ref = _first_step(cp, copy.deepcopy(base).double(), x.double(), t, d)
        err = lambda g: f"{float((g - ref).norm() / ref.norm()):.1e}"
        ours = err(_first_step(cp, copy.deepcopy(base), x, t, d))
        native = err(_first_step(cp, copy.deepcopy(base), x, t, d, precision="native"))
        theirs = "n/a"
        if ap is not None:
            torch.manual_seed(0)  # ASDL's power iteration starts from a random vector
            theirs = err(_first_step(ap, copy.deepcopy(base), x, t, d))
        print(f"  {d:>8.0e} {ours:>10} {native:>11} {theirs:>10}")
    if ap is None:
        print("  (ASDL not importable: pip install asdfghjkl)")


def speed(base, x, t) -> None:
    def shampoo(damping, interval=1, **kw):
        cfg = PreconditioningConfig(damping=damping, preconditioner_upd_interval=interval)
        return lambda m: ShampooGradientMaker(m, cfg, **kw)

    variants = [
        ("SGD step (forward, backward, step)", None, 1),
        ("Shampoo eigh interval 1, damping 1e-4 (float32)", shampoo(1e-4), 1),
        ("Shampoo eigh interval 1, damping 1e-12 (float64)", shampoo(1e-12), 1),
        ("Shampoo warm, basis every 10, damping 1e-4 (float32)", shampoo(1e-4, root_method="warm", basis_every=10), 10),
        ("Shampoo warm, basis every 10, damping 1e-12 (float64)", shampoo(1e-12, root_method="warm", basis_every=10), 10),
    ]
    steps = []
    for _, make, _ in variants:
        model = copy.deepcopy(base)
        steps.append(_stepper(model, x, t, None if make is None else make(model)))
    secs = _interleaved_times(steps, [c for _, _, c in variants], rounds=5)
    table(f"MLP (batch {x.shape[0]}, {torch.get_num_threads()} threads): float64 route vs float32",
          [(name, sec, sec / secs[0]) for (name, _, _), sec in zip(variants, secs)])


def main() -> None:
    setup()
    print("== Shampoo float32 accuracy at ASDL's damping (issue 16) ==")
    torch.manual_seed(0)
    base = mlp()
    x, t = digits_batch()
    accuracy_table(base, x, t)
    speed(base, x, t)


if __name__ == "__main__":
    main()
