"""Activation functions by the names config.json files use (`hidden_act`).

Every name of transformers' activation table is accepted, with the same arithmetic (a config may
name any of them). Most are plain functions; `prelu` and `xielu` carry learnable parameters, so
they are modules, and a model that assigns one as an attribute (`act_fn`) gets their weights under
the same state-dict names as the reference.
"""

import math

import torch
from torch import nn


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.gelu(x, approximate="tanh")


def _gelu_tanh_python(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_python(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _gelu_accurate(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _gelu_10(x: torch.Tensor) -> torch.Tensor:
    # gelu clipped to [-10, 10] (a quantization-friendly range).
    return torch.clip(nn.functional.gelu(x), -10, 10)


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _laplace(x: torch.Tensor, mu: float = 0.707107, sigma: float = 0.282095) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf((x - mu).div(sigma * math.sqrt(2.0))))


def _relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.square(nn.functional.relu(x))


def _sqrtsoftplus(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.softplus(x).sqrt()


def _leaky_relu(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.leaky_relu(x, 0.01)


def _linear(x: torch.Tensor) -> torch.Tensor:
    return x


class PReLU(nn.Module):
    """max(0, x) + weight * min(0, x) with one learnable slope (initially 0.25), named `weight`."""

    def __init__(self, init: float = 0.25):
        super().__init__()
        self.weight = nn.Parameter(torch.full((1,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.prelu(x, self.weight)


class XIELU(nn.Module):
    """xIELU (arXiv 2411.13010): quadratic for x > 0, an expm1 curve below, learnable slopes.

    The parameters hold the softplus-inverses of the slopes and are bfloat16, as in the reference.
    """

    def __init__(self, alpha_p_init=0.8, alpha_n_init=0.8, beta=0.5, eps=-1e-6, dtype=torch.bfloat16):
        super().__init__()
        inverse_softplus = lambda value: torch.log(torch.expm1(torch.tensor(value, dtype=dtype))).unsqueeze(0)  # noqa: E731
        self.alpha_p = nn.Parameter(inverse_softplus(alpha_p_init))
        self.alpha_n = nn.Parameter(inverse_softplus(alpha_n_init - beta))
        self.register_buffer("beta", torch.tensor(beta, dtype=dtype))
        self.register_buffer("eps", torch.tensor(eps, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha_p = nn.functional.softplus(self.alpha_p)
        alpha_n = self.beta + nn.functional.softplus(self.alpha_n)
        return torch.where(
            x > 0,
            alpha_p * x * x + self.beta * x,
            (torch.expm1(torch.min(x, self.eps)) - x) * alpha_n + self.beta * x,
        )


ACTIVATIONS = {
    "silu": nn.functional.silu,
    "swish": nn.functional.silu,
    "gelu": nn.functional.gelu,
    "gelu_python": _gelu_python,
    "gelu_10": _gelu_10,
    "gelu_fast": _gelu_fast,
    "gelu_new": _gelu_new,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh_python,
    "gelu_accurate": _gelu_accurate,
    "quick_gelu": _quick_gelu,
    "hardswish": nn.functional.hardswish,
    "laplace": _laplace,
    "leaky_relu": _leaky_relu,
    "linear": _linear,
    "mish": nn.functional.mish,
    "relu": nn.functional.relu,
    "relu2": _relu2,
    "relu6": nn.functional.relu6,
    "sigmoid": torch.sigmoid,
    "sqrtsoftplus": _sqrtsoftplus,
    "tanh": torch.tanh,
}
# Activations with learnable parameters: a fresh module per call.
MODULE_ACTIVATIONS = {"prelu": PReLU, "xielu": XIELU}


def get_activation(name: str):
    if name in MODULE_ACTIVATIONS:
        return MODULE_ACTIVATIONS[name]()
    try:
        return ACTIVATIONS[name]
    except KeyError:
        known = ", ".join(sorted([*ACTIVATIONS, *MODULE_ACTIVATIONS]))
        raise ValueError(f"unknown hidden_act {name!r}; known: {known}") from None
