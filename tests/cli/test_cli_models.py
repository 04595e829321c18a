"""Models of the ``curvfun`` command: forward shapes, the GPT's causal mask, tied heads, residual adds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvfun.cli.config import CliError
from curvfun.cli.models import GPT, MODELS, BasicBlock, ResNet, build_model

DIGITS = {"task": "classification", "input_shape": (1, 8, 8), "num_classes": 10}
CIFAR = {"task": "classification", "input_shape": (3, 32, 32), "num_classes": 10}
LM = {"task": "lm", "vocab_size": 50, "seq_len": 12}


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet"])
@pytest.mark.parametrize("info", [DIGITS, CIFAR], ids=["digits", "cifar"])
def test_image_models_map_images_to_class_logits(name, info):
    torch.manual_seed(0)
    model = build_model(name, info)
    x = torch.randn(5, *info["input_shape"])
    y = model(x)
    assert y.shape == (5, 10) and torch.isfinite(y).all()
    y.sum().backward()  # every parameter takes part
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # per-sample independence in eval mode (BatchNorm uses running stats)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x)[2:3], model(x[2:3]))


def test_default_mlp_is_64_128_10():
    model = build_model("mlp", DIGITS)
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(128, 64), (128,), (10, 128), (10,)]
    assert [tuple(p.shape) for p in build_model("mlp", DIGITS, {"hidden": [32, 16]}).parameters()][::2] == [
        (32, 64), (16, 32), (10, 16)]


def test_resnet_has_batchnorm_and_residual_adds():
    model = ResNet((3, 16, 16), 10, widths=(8, 16), blocks=(2, 1))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) >= 5
    block = BasicBlock(4, 4, stride=1)
    with torch.no_grad():  # zero residual branch: block(x) = relu(0 + x)
        block.bn2.weight.zero_()
        block.bn2.bias.zero_()
    x = torch.randn(2, 4, 6, 6)
    assert torch.allclose(block(x), torch.relu(x))
    down = BasicBlock(4, 8, stride=2)
    assert down(x).shape == (2, 8, 3, 3) and isinstance(down.shortcut, nn.Sequential)
    assert not any(getattr(m, "inplace", False) for m in model.modules())  # out-of-place only


def test_gpt_output_shape_and_tied_or_untied_head():
    torch.manual_seed(0)
    tied = build_model("gpt", LM, {"d_model": 16, "n_head": 2, "n_layer": 2})
    untied = build_model("gpt", LM, {"d_model": 16, "n_head": 2, "n_layer": 2, "tie_weights": False})
    idx = torch.randint(0, 50, (3, 12))
    assert tied(idx).shape == (3, 12, 50) and untied(idx[:, :7]).shape == (3, 7, 50)
    assert tied.head.weight is tied.tok_emb.weight
    assert untied.head.weight is not untied.tok_emb.weight
    n_tied = sum(p.numel() for p in tied.parameters())
    assert sum(p.numel() for p in untied.parameters()) - n_tied == 50 * 16
    assert sum(isinstance(m, nn.LayerNorm) for m in tied.modules()) == 2 * 2 + 1
    with pytest.raises(ValueError, match="exceeds the model's max_len 12"):
        tied(torch.randint(0, 50, (1, 13)))


@pytest.mark.parametrize("pos", [0, 4, 11])
def test_gpt_causal_mask_future_tokens_do_not_change_earlier_logits(pos):
    torch.manual_seed(1)
    model = GPT(vocab_size=30, seq_len=12, d_model=16, n_layer=2, n_head=4).eval()
    idx = torch.randint(0, 30, (2, 12))
    changed = idx.clone()
    changed[:, pos] = (idx[:, pos] + 7) % 30
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a[:, :pos], b[:, :pos])  # exactly: no information flows backwards
    assert not torch.allclose(a[:, pos], b[:, pos])  # the changed position itself does change
    if pos + 1 < 12:
        assert not torch.allclose(a[:, pos + 1:], b[:, pos + 1:])  # and later ones attend to it


def test_build_model_errors_list_the_valid_choices():
    with pytest.raises(CliError, match="unknown model 'vit'; valid models: mlp, cnn, resnet, gpt"):
        build_model("vit", DIGITS)
    with pytest.raises(CliError, match=r"unknown model_args \['width'\] for model 'cnn'; valid: channels"):
        build_model("cnn", DIGITS, {"width": 3})
    with pytest.raises(CliError, match="needs a language-modelling data set"):
        build_model("gpt", DIGITS)
    with pytest.raises(CliError, match="needs an image data set"):
        build_model("resnet", LM)
    with pytest.raises(CliError, match="d_model 10 must be divisible by n_head 4"):
        build_model("gpt", LM, {"d_model": 10})
    assert set(MODELS) == {"mlp", "cnn", "resnet", "gpt"}
