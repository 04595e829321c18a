"""Checks shared by the makers' test files (``tests/precondition/``): ASDL's README loop run verbatim with one
gradient maker, and save/resume of (model, optimizer, maker) reproducing an uninterrupted run bit
for bit."""

from __future__ import annotations

import copy
import io

import torch
import torch.nn.functional as F

README_LOOP = """
from curvfun.precondition import PreconditioningConfig, {maker}

model = Net()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
config = PreconditioningConfig(data_size=batch_size, damping=0.01)
gm = {maker}(model, config)

for x, t in data_loader:
  optimizer.zero_grad()
  dummy_y = gm.setup_model_call(model, x)
  gm.setup_loss_call(loss_fn, dummy_y, t)
  y, loss = gm.forward_and_backward()
  optimizer.step()
  losses.append(loss.item())
"""


def readme_loop(maker_cls_name: str) -> str:
    """ASDL's README training loop; only the maker's class name differs."""
    return README_LOOP.format(maker=maker_cls_name)


def run_readme_loop(maker_cls_name, net, data_loader, batch_size=16, loss_fn=F.cross_entropy):
    """Exec the README loop with ``Net = net`` over ``data_loader``; assert the maker took one step
    per batch and the last loss is below the first. Returns the namespace (``gm``, ``model``,
    ``losses``, and the last step's ``x``, ``t``, ``y``, ``loss``) for the caller's own checks."""
    data_loader = list(data_loader)
    ns = {"torch": torch, "Net": net, "batch_size": batch_size, "loss_fn": loss_fn,
          "data_loader": data_loader, "losses": []}
    exec(readme_loop(maker_cls_name), ns)
    assert ns["gm"].step == len(data_loader), (ns["gm"].step, len(data_loader))
    assert len(ns["losses"]) == len(data_loader)
    assert ns["losses"][-1] < ns["losses"][0], ns["losses"]
    return ns


def train_steps(model, opt, gm, batches, loss_fn=F.cross_entropy):
    """One optimizer step per batch through the maker's three-call protocol."""
    for x, t in batches:
        opt.zero_grad()
        model.zero_grad()
        y = gm.setup_model_call(model, x)
        gm.setup_loss_call(loss_fn, y, t)
        gm.forward_and_backward()
        opt.step()


def check_resume_bit_exact(make_model, make_optimizer, make_maker, batches, k, *,
                           keep_training=True, serialize=False, before_save=None, seed=0):
    """Train on all ``batches``; separately train on ``batches[:k]``, save model, optimizer and maker
    state, and resume fresh objects from it on ``batches[k:]``: the parameters must be equal bit for
    bit. Fresh objects are built after ``torch.manual_seed(seed)`` as model, optimizer, maker.

    ``keep_training``: the saved run trains one more batch after saving (the saved copy must not
    move with it). ``serialize``: the state goes through ``torch.save``/``torch.load(weights_only=
    True)`` instead of a deep copy. ``before_save(gm)`` runs just before saving. Returns the resumed
    maker."""
    batches = list(batches)

    def fresh():
        torch.manual_seed(seed)
        model = make_model()
        opt = make_optimizer(model)
        return model, opt, make_maker(model)

    def save(model, opt, gm):
        if not serialize:  # the maker's state_dict is taken as is: it must not alias live state
            return {**copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()}),
                    "gm": gm.state_dict()}
        state = {"model": model.state_dict(), "opt": opt.state_dict(), "gm": gm.state_dict()}
        buf = io.BytesIO()
        torch.save(state, buf)
        return buf.getvalue()

    def load(saved, model, opt, gm):
        state = torch.load(io.BytesIO(saved), weights_only=True) if serialize else saved
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gm.load_state_dict(state["gm"])

    model, opt, gm = fresh()
    train_steps(model, opt, gm, batches)
    save(model, opt, gm)  # the end state saves too
    ref = [(n, p.detach().clone()) for n, p in model.named_parameters()]

    model, opt, gm = fresh()
    train_steps(model, opt, gm, batches[:k])
    if before_save is not None:
        before_save(gm)
    saved = save(model, opt, gm)
    if keep_training:
        train_steps(model, opt, gm, batches[k:k + 1])

    model2, opt2, gm2 = fresh()
    load(saved, model2, opt2, gm2)
    train_steps(model2, opt2, gm2, batches[k:])
    resumed = list(model2.named_parameters())
    assert len(resumed) == len(ref)
    for (n, p), (m, q) in zip(ref, resumed):
        assert n == m and torch.equal(p, q), n
    return gm2
