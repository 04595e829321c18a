"""A GPT-style block (d_model 256, 4 heads, sequence 64, batch 32): K-FAC factors against its
forward+backward, and a K-FAC step (curvature and inverses every 10 steps) against an AdamW step.
Every Linear and the attention's packed in-projection and out_proj get Kronecker factors through
the layer registry (no fallback), in the functional route and in the maker alike."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

import curvfun
from common import median_time, setup, table
from curvfun.capture import CaptureFallbackWarning
from curvfun.precondition import KfacGradientMaker, PreconditioningConfig

VOCAB, D, HEADS, T, N = 512, 256, 4, 64, 32


class GPTBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.pos = nn.Embedding(T, D)
        self.block = nn.TransformerEncoderLayer(D, HEADS, 4 * D, dropout=0.0, batch_first=True, norm_first=True)
        self.ln = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(T))

    def forward(self, ids):
        h = self.tok(ids) + self.pos.weight[: ids.shape[1]]
        return self.head(self.ln(self.block(h, src_mask=self.mask, is_causal=True)))


def main() -> None:
    setup()
    print("== GPT block (d 256, 4 heads, seq 64, batch 32; targets: factors <= 2.5x fwd+bwd, "
          "K-FAC step at interval 10 <= 1.5x AdamW) ==")
    torch.manual_seed(0)
    model = GPTBlock()
    x, y = torch.randint(0, VOCAB, (N, T)), torch.randint(0, VOCAB, (N, T))
    params = {k: p for k, p in model.named_parameters() if k != "pos.weight"}
    loss_fn = lambda out, t: F.cross_entropy(out.reshape(-1, VOCAB), t.reshape(-1))  # noqa: E731

    def plain():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    gen = torch.Generator().manual_seed(0)
    t_plain = median_time(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CaptureFallbackWarning)
        t_fac = median_time(lambda: curvfun.kfac(model, params, x, y, fisher_type="mc", generator=gen,
                                                 on_unsupported="ignore"))
        t_auto = median_time(lambda: curvfun.kfac(model, params, x, y, fisher_type="mc", generator=gen,
                                                  on_unsupported="ignore", form="auto"))

    adamw = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def adamw_step():
        adamw.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        adamw.step()

    t_adamw = median_time(adamw_step)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-4)
    gm = KfacGradientMaker(model, PreconditioningConfig(data_size=N, damping=0.1, curvature_upd_interval=10,
                                                        preconditioner_upd_interval=10))

    def kfac_step():
        sgd.zero_grad(set_to_none=True)
        dummy_y = gm.setup_model_call(model, x)
        gm.setup_loss_call(loss_fn, dummy_y, y)
        gm.forward_and_backward()
        sgd.step()

    def twenty_steps():  # two whole intervals: the refresh steps amortised, not skipped by a median
        for _ in range(20):
            kfac_step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_k10 = median_time(twenty_steps, warmup=1, repeat=5) / 20
    table(f"GPT block (batch {N}, seq {T})", [
        ("plain forward+backward", t_plain, 1.0),
        ("kfac (MC, 1 sample): all factors", t_fac, t_fac / t_plain),
        ("  form='auto'", t_auto, t_auto / t_plain),
        ("AdamW step", t_adamw, 1.0),
        ("K-FAC step, interval 10 (SGD update; mean over 20)", t_k10, t_k10 / t_adamw),
    ])


if __name__ == "__main__":
    main()
