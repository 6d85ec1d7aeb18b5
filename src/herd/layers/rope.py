"""Rotary position embeddings, every rope type of the Llama family.

`rope_parameters` is the dict transformers 5 writes in config.json (`rope_type`, `rope_theta`,
`factor`, ...). Older config.json files spell it as `rope_theta` plus a `rope_scaling` dict whose
type key may be `type` instead of `rope_type`; `standardize_rope_parameters` folds both into one
dict with every key the rope type needs, and names what is missing.

Frequencies are computed for the positions in use, never for `max_position_embeddings`
(Llama 4 configs say 10M positions). Types whose frequencies depend on the length seen so far
("dynamic", "longrope") recompute them from the largest position of the call.

Dynamic rope is stateless here, on purpose: a call's output depends on that call's positions
only. transformers instead keeps the frequencies of the longest sequence seen across calls (it
resets them only when a call is shorter than max_position_embeddings), so there a call of, say,
24 tokens after one of 40 is rotated with the 40-token frequencies. Within one generate() the two
agree (the length only grows); across unrelated calls herd gives each the same result as a fresh
model would.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

DEFAULT_ROPE_THETA = 10_000.0

# rope_type -> keys it cannot do without (after standardisation).
_REQUIRED_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
ROPE_TYPES = tuple(_REQUIRED_KEYS)


def standardize_rope_parameters(
    rope_parameters: dict[str, Any] | None,
    *,
    rope_theta: float | None = None,
    rope_scaling: dict[str, Any] | None = None,
    max_position_embeddings: int,
    original_max_position_embeddings: int | None = None,
    head_dim: int | None = None,
) -> dict[str, Any]:
    """Return one complete rope_parameters dict from the new or the legacy config keys."""
    params = dict(rope_scaling or rope_parameters or {})
    if rope_scaling and rope_theta is None and rope_parameters:
        # rope_scaling given over a transformers 5 config (from_pretrained(..., rope_scaling=...)):
        # the scaling changes, the model's theta stays.
        rope_theta = rope_parameters.get("rope_theta")
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    params.pop("type", None)
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", rope_theta if rope_theta is not None else DEFAULT_ROPE_THETA)
    rope_type = params["rope_type"]
    if rope_type not in _REQUIRED_KEYS:
        raise ValueError(f"unsupported rope_type {rope_type!r}; herd supports {', '.join(ROPE_TYPES)}")
    if rope_type in ("llama3", "yarn", "longrope"):
        # A top-level original_max_position_embeddings (Phi-3 style configs) wins, as in the reference.
        if original_max_position_embeddings is not None:
            params["original_max_position_embeddings"] = original_max_position_embeddings
        else:
            params.setdefault("original_max_position_embeddings", max_position_embeddings)
    missing = [key for key in _REQUIRED_KEYS[rope_type] if params.get(key) is None]
    if missing:
        raise ValueError(f"rope_type {rope_type!r} needs {', '.join(missing)} in rope_parameters / rope_scaling")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not used by any Llama model and is not supported")
    if rope_type == "llama3" and params["high_freq_factor"] < params["low_freq_factor"]:
        # Equal factors are fine (Llama 4 Scout ships 1.0 and 1.0): no frequency is "medium" then.
        raise ValueError("llama3 rope needs high_freq_factor >= low_freq_factor")
    if rope_type == "longrope" and head_dim is not None:
        for key in ("short_factor", "long_factor"):
            if len(params[key]) != head_dim // 2:
                raise ValueError(f"longrope {key} must have head_dim // 2 = {head_dim // 2} entries, got {len(params[key])}")
    return params


def _default_inv_freq(theta: float, head_dim: int) -> torch.Tensor:
    # (head_dim // 2,)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    return 1.0 / (theta**exponents)


def compute_inv_freq(
    params: dict[str, Any], head_dim: int, max_position_embeddings: int, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim // 2,) and the factor cos/sin are scaled by.

    `seq_len` is the length the call sees (largest position + 1); only "dynamic" and
    "longrope" use it.
    """
    rope_type = params["rope_type"]
    theta = params["rope_theta"]
    if rope_type == "default":
        return _default_inv_freq(theta, head_dim), 1.0
    if rope_type == "linear":
        return _default_inv_freq(theta, head_dim) / params["factor"], 1.0
    if rope_type == "dynamic":
        # NTK-aware: the base grows once the sequence outgrows the trained length.
        factor = params["factor"]
        if seq_len is None or seq_len <= max_position_embeddings:
            length = max_position_embeddings  # the trained length: the base stays theta (times 1.0)
        else:
            # The grown base in float32 tensor arithmetic, as the reference computes it from the call's
            # (tensor) positions: Python float64 arithmetic differs from it by an ulp at some lengths,
            # which at tens of thousands of positions is a visible angle error.
            length = torch.tensor(seq_len, dtype=torch.int64, device="cpu")
        theta = theta * ((factor * length / max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return _default_inv_freq(theta, head_dim), 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(params, head_dim), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(params, head_dim, max_position_embeddings)
    if rope_type == "longrope":
        return _longrope_inv_freq(params, head_dim, max_position_embeddings, seq_len)
    raise ValueError(f"unsupported rope_type {rope_type!r}")


def _llama3_inv_freq(params: dict[str, Any], head_dim: int) -> torch.Tensor:
    """Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth ramp between."""
    inv_freq = _default_inv_freq(params["rope_theta"], head_dim)
    factor = params["factor"]
    low_freq_factor, high_freq_factor = params["low_freq_factor"], params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(params: dict[str, Any], head_dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    theta = params["rope_theta"]
    original_len = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_position_embeddings / original_len

    def mscale(scale: float, coefficient: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * coefficient * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        if params.get("mscale") and params.get("mscale_all_dim"):
            attention_factor = mscale(factor, params["mscale"]) / mscale(factor, params["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        # The dimension whose wavelength fits `num_rotations` times into the original context.
        return head_dim * math.log(original_len / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoids a division by zero in the ramp

    pos_freqs = theta ** (torch.arange(0, head_dim, 2, device="cpu").float() / head_dim)
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep_extrapolated = 1 - ramp
    inv_freq = interpolated * (1 - keep_extrapolated) + extrapolated * keep_extrapolated
    return inv_freq, float(attention_factor)


def _longrope_inv_freq(
    params: dict[str, Any], head_dim: int, max_position_embeddings: int, seq_len: int | None
) -> tuple[torch.Tensor, float]:
    original_len = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_position_embeddings / original_len
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_len))
    use_long = seq_len is not None and seq_len > original_len
    ext_factors = torch.tensor(params["long_factor" if use_long else "short_factor"], dtype=torch.float32)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (ext_factors * params["rope_theta"] ** exponents), float(attention_factor)


def derived_from_config(compute):
    """compute() for tensors derived from the config (rotary frequencies): run on the CPU, the
    tensors then placed on the device the model is being built on (`with torch.device("cuda"):`),
    except meta: a model built on meta for loading keeps real values, moved with it later."""
    target = torch.get_default_device()
    with torch.device("cpu"):
        result = compute()
    if target.type == "meta":
        return result
    if isinstance(result, tuple):
        return tuple(value.to(target) if torch.is_tensor(value) else value for value in result)
    return result.to(target)


class RotaryEmbedding(nn.Module):
    """Turns position ids into the cos/sin tables that `apply_rotary` uses. Holds no state across
    calls: "dynamic" and "longrope" frequencies come from each call's largest position (see the
    module docstring for how that differs from transformers' dynamic rope)."""

    def __init__(self, rope_parameters: dict[str, Any], head_dim: int, max_position_embeddings: int):
        super().__init__()
        self.rope_parameters = rope_parameters
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.depends_on_length = rope_parameters["rope_type"] in ("dynamic", "longrope")
        inv_freq, self.attention_scaling = derived_from_config(
            lambda: compute_inv_freq(rope_parameters, head_dim, max_position_embeddings))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # derived, so never saved

    def _inv_freq_for(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, float]:
        if not self.depends_on_length:
            return self.inv_freq, self.attention_scaling
        seq_len = int(position_ids.max()) + 1
        if self.rope_parameters["rope_type"] == "dynamic" and seq_len <= self.max_position_embeddings:
            return self.inv_freq, self.attention_scaling
        if self.rope_parameters["rope_type"] == "longrope" and \
                seq_len <= self.rope_parameters["original_max_position_embeddings"]:
            # The short factors: the buffer, in the dtype the module was cast to (model.half()), as
            # the reference's; only the long factors are computed afresh, in float32 (there too).
            return self.inv_freq, self.attention_scaling
        inv_freq, scaling = compute_inv_freq(self.rope_parameters, self.head_dim, self.max_position_embeddings, seq_len)
        return inv_freq.to(self.inv_freq.device), scaling

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (batch, seq) -> cos, sin each (batch, seq, head_dim), computed in float32."""
        inv_freq, scaling = self._inv_freq_for(position_ids)
        freqs = position_ids[..., None].float() * inv_freq.float()  # (batch, seq, head_dim // 2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (batch, seq, head_dim)
        cos, sin = angles.cos() * scaling, angles.sin() * scaling
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """query/key (batch, heads, seq, head_dim); cos/sin (batch, seq, head_dim)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (batch, 1, seq, head_dim)
    return query * cos + rotate_half(query) * sin, key * cos + rotate_half(key) * sin


class ComplexRotaryEmbedding(RotaryEmbedding):
    """Rotary embeddings as complex numbers over adjacent pairs (Llama 4's layout).

    Llama 1-3 rotate dimension i with i + head_dim/2 (`rotate_half`); Llama 4 rotates dimension
    2i with 2i + 1, written as a multiplication by e^(i * angle) in complex float32.
    """

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """position_ids (batch, seq) -> complex64 (batch, seq, head_dim // 2)."""
        inv_freq, scaling = self._inv_freq_for(position_ids)
        angles = position_ids[..., None].float() * inv_freq.float()
        return torch.polar(torch.ones_like(angles), angles) * scaling


def apply_complex_rotary(
    query: torch.Tensor, key: torch.Tensor, freqs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """query/key (batch, seq, heads, head_dim); freqs complex (batch, seq, head_dim // 2)."""

    def rotate(x: torch.Tensor) -> torch.Tensor:
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (batch, seq, heads, head_dim // 2)
        return torch.view_as_real(pairs * freqs[:, :, None, :]).flatten(3).type_as(x)

    return rotate(query), rotate(key)
