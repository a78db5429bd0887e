"""Member architectures of a zoo as plain `torch.nn.Module`s, rebuilt from a resolved, JSON-able arch dict.

Every custom layer subclasses the torch.nn class whose role it plays and keeps its parameter layout (names, shapes,
gate order), so state-dict keys of a zoo member are those of the familiar torch modules:

- `MemberConv2d(nn.Conv2d)`: with `batched_forward = True` (set by the population engine) it computes the convolution
  with matrix products that vmap turns into large batched GEMMs instead of a grouped convolution;
- `MemberGRU(nn.GRU)`: an explicit time loop (nn.GRU has no vmap rule), gate order r, z, n like torch, optional mask;
- `MemberAttention(nn.MultiheadAttention)`, `MemberEncoderLayer(nn.TransformerEncoderLayer)`: explicit pre-norm math;
- `MemberDropout(nn.Dropout)`: a per-member rate and counter-based noise when the engine asks for it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.zoo.tasks import Task

__all__ = [
    "ARCH_NAMES",
    "ACTIVATIONS",
    "ARCH_DEFAULTS",
    "resolve_arch",
    "build_member",
    "WIDTH_FIELDS",
    "with_width",
    "pad_to_shapes",
    "crop_to_shapes",
    "small_cnn_zoo_arch",
    "make_activation",
    "counter_uniform",
    "CNNMember",
    "MLPMember",
    "GRUSeq2Seq",
    "TransformerMember",
    "MemberConv2d",
    "MemberGRU",
    "MemberAttention",
    "MemberEncoderLayer",
    "MemberDropout",
]

ARCH_NAMES: tuple[str, ...] = ("cnn", "mlp", "gru_seq2seq", "transformer")

_ACTIVATION_MODULES: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
}
ACTIVATIONS: tuple[str, ...] = tuple(_ACTIVATION_MODULES)

# Per architecture: recipe-settable fields with defaults, then fields taken from the task.
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "cnn": {"activation": "relu", "channels": [16, 16, 16], "kernel_size": 3, "stride": 2, "padding": 1},
    "mlp": {"activation": "relu", "hidden": [32, 32]},
    "gru_seq2seq": {"activation": "tanh", "embed_dim": 16, "hidden_size": 32},
    "transformer": {"activation": "gelu", "d_model": 32, "n_heads": 4, "n_layers": 1, "d_ff": 64},
}
_TASK_FIELDS: dict[str, tuple[str, ...]] = {
    "cnn": ("in_channels", "num_classes"),
    "mlp": ("in_features", "num_classes"),
    "gru_seq2seq": ("vocab_size", "pad_id", "bos_id"),
    "transformer": ("vocab_size", "seq_len", "num_classes"),
}
# Activations an architecture can use (a GRU's candidate nonlinearity is tanh by definition).
_ALLOWED_ACTIVATIONS: dict[str, tuple[str, ...]] = {
    "cnn": ACTIVATIONS,
    "mlp": ACTIVATIONS,
    "gru_seq2seq": ("tanh",),
    "transformer": ACTIVATIONS,
}


# ------------------------------------------------------------------------------------------------ arch dicts


def resolve_arch(arch: Mapping[str, Any], task: Task) -> dict[str, Any]:
    """Fill `arch` with defaults and task-derived dims, validate it, and return a new JSON-able dict.

    Idempotent: resolving a resolved arch returns an equal dict. Raises ConfigError naming the offending field.
    """
    name = _arch_name(arch)
    _check_task_fits(name, task)
    derived = _task_dims(name, task)
    for key, value in derived.items():
        if key in arch and arch[key] != value:
            raise ConfigError(
                f"arch field {key!r} is {arch[key]!r} but task {task.name!r} needs {value!r}; leave it out "
                "(it is derived from the task)"
            )
    return _validated(name, {**ARCH_DEFAULTS[name], **dict(arch), **derived})


def build_member(arch: Mapping[str, Any]) -> nn.Module:
    """Build the member described by a resolved arch dict (see resolve_arch; missing recipe fields take their
    defaults, task-derived ones are required). Parameters use torch's default init."""
    name = _arch_name(arch)
    missing = [k for k in _TASK_FIELDS[name] if k not in arch]
    if missing:
        raise ConfigError(
            f"arch {name!r} is not resolved: field {missing[0]!r} is missing; call resolve_arch(arch, task) first"
        )
    a = _validated(name, {**ARCH_DEFAULTS[name], **dict(arch)})
    if name == "cnn":
        return CNNMember(a["in_channels"], a["channels"], a["num_classes"], a["kernel_size"], a["stride"], a["padding"], a["activation"])
    if name == "mlp":
        return MLPMember(a["in_features"], a["hidden"], a["num_classes"], a["activation"])
    if name == "gru_seq2seq":
        return GRUSeq2Seq(a["vocab_size"], a["embed_dim"], a["hidden_size"], a["pad_id"], a["bos_id"])
    return TransformerMember(
        a["vocab_size"], a["seq_len"], a["num_classes"], a["d_model"], a["n_heads"], a["n_layers"], a["d_ff"], a["activation"]
    )


# The arch field a `width` hyperparameter sets (every hidden layer gets that width).
WIDTH_FIELDS: dict[str, str] = {"cnn": "channels", "mlp": "hidden"}


def with_width(arch: Mapping[str, Any], width: int | None) -> dict[str, Any]:
    """`arch` with every hidden layer `width` wide (cnn: channels, mlp: hidden); None leaves it unchanged."""
    out = dict(arch)
    if width is None:
        return out
    name = _arch_name(arch)
    if name not in WIDTH_FIELDS:
        raise ConfigError(f"arch {name!r} has no width choice; 'width' applies to {', '.join(WIDTH_FIELDS)}")
    key = WIDTH_FIELDS[name]
    layers = out.get(key, ARCH_DEFAULTS[name][key])
    n = len(layers) if isinstance(layers, (list, tuple)) else 1
    out[key] = [_positive_int(name, "width", width)] * n
    return out


def pad_to_shapes(weights: Mapping[str, Any], shapes: Mapping[str, Sequence[int]]) -> dict[str, Any]:
    """Zero-pad each array (..., *shape) at the end of its trailing dims to `shapes[key]`, for storing a narrower
    member in a wider zoo: the extra units get zero weights in and out (and zero bias), so the padded network
    computes exactly the narrow one's function. Rows (leading index tuples) holding any NaN stay all NaN."""
    import numpy as np

    out = {}
    for key, w in weights.items():
        w = np.asarray(w)
        target = tuple(shapes[key])
        lead = w.ndim - len(target)
        if tuple(w.shape[lead:]) == target:
            out[key] = w
            continue
        if any(a > b for a, b in zip(w.shape[lead:], target)):
            raise ConfigError(f"weight {key!r} of shape {w.shape[lead:]} does not fit in {target}")
        pad = [(0, 0)] * lead + [(0, b - a) for a, b in zip(w.shape[lead:], target)]
        padded = np.pad(w, pad)
        bad = np.isnan(w.reshape(*w.shape[:lead], -1)).any(-1)  # lead-shaped: rows of a diverged member
        padded[bad] = np.nan
        out[key] = padded
    return out


def crop_to_shapes(weights: Mapping[str, Any], shapes: Mapping[str, Sequence[int]]) -> dict[str, Any]:
    """Undo `pad_to_shapes`: keep the first shapes[key] entries of each array's trailing dims. The shapes of a
    member of width w: `build_member(resolve_arch(with_width(zoo.arch, w), task)).state_dict()` shapes."""
    out = {}
    for key, w in weights.items():
        target = tuple(shapes[key])
        out[key] = w[(..., *(slice(0, n) for n in target))]
    return out


def small_cnn_zoo_arch(
    convs: Sequence[Sequence[int]], denses: Sequence[Sequence[int]]
) -> dict[str, Any] | None:
    """The resolved `cnn` arch whose parameter shapes match a Small CNN Zoo network, or None if `cnn` cannot express it.

    `convs` are TF kernel shapes (H, W, in, out), `denses` dense kernel shapes (in, out). Names and shapes match; the
    function is ours (stride 2, padding 1, global average pooling), which approximates TF's 'same' padding.
    """
    if not convs or len(denses) != 1:
        return None
    convs = [tuple(int(d) for d in c) for c in convs]
    k = convs[0][0]
    if any(len(c) != 4 or c[0] != k or c[1] != k for c in convs):
        return None
    if any(convs[i][3] != convs[i + 1][2] for i in range(len(convs) - 1)):
        return None
    d_in, d_out = (int(d) for d in denses[0])
    if d_in != convs[-1][3]:
        return None
    return _validated(
        "cnn",
        {
            "name": "cnn",
            "activation": "relu",
            "channels": [c[3] for c in convs],
            "kernel_size": k,
            "stride": 2,
            "padding": k // 2,
            "in_channels": convs[0][2],
            "num_classes": d_out,
        },
    )


def _arch_name(arch: Mapping[str, Any]) -> str:
    if not isinstance(arch, Mapping):
        raise ConfigError(f"an arch must be a mapping with a 'name'; got {arch!r}")
    name = arch.get("name")
    if name not in ARCH_NAMES:
        raise ConfigError(f"arch field 'name' is {name!r}; allowed: {', '.join(ARCH_NAMES)}")
    return name


def _check_task_fits(name: str, task: Task) -> None:
    info = task.info
    ok = {
        "cnn": task.kind == "classification" and info.get("input") == "real" and len(info["input_shape"]) == 3,
        "mlp": task.kind == "classification" and info.get("input") == "real",
        "gru_seq2seq": task.kind == "seq2seq",
        "transformer": task.kind == "classification" and info.get("input") == "tokens",
    }[name]
    if not ok:
        fits = {
            "cnn": "image classification (digits, fashion8)",
            "mlp": "real-valued classification (digits, mnist1d, fashion8)",
            "gru_seq2seq": "sequence-to-sequence tasks (arith)",
            "transformer": "token classification (modadd)",
        }[name]
        raise ConfigError(f"arch {name!r} does not fit task {task.name!r}; it needs {fits}")


def _task_dims(name: str, task: Task) -> dict[str, Any]:
    info = task.info
    if name == "cnn":
        return {"in_channels": int(info["input_shape"][0]), "num_classes": int(info["num_classes"])}
    if name == "mlp":
        return {"in_features": int(math.prod(info["input_shape"])), "num_classes": int(info["num_classes"])}
    if name == "gru_seq2seq":
        return {"vocab_size": int(info["vocab_size"]), "pad_id": int(info["pad_id"]), "bos_id": int(info["bos_id"])}
    return {"vocab_size": int(info["vocab_size"]), "seq_len": int(info["seq_len"]), "num_classes": int(info["num_classes"])}


def _positive_int(name: str, key: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"arch {name!r} field {key!r} must be an integer >= {minimum}; got {value!r}")
    return value


def _int_list(name: str, key: str, value: Any, allow_empty: bool) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or (not value and not allow_empty):
        raise ConfigError(f"arch {name!r} field {key!r} must be a list of positive integers; got {value!r}")
    return [_positive_int(name, key, v) for v in value]


def _validated(name: str, a: dict[str, Any]) -> dict[str, Any]:
    """Check every field of a (filled) arch dict; returns it with canonical JSON-able values."""
    allowed = {"name", *ARCH_DEFAULTS[name], *_TASK_FIELDS[name]}
    unknown = sorted(set(a) - allowed)
    if unknown:
        raise ConfigError(f"arch {name!r} has no field {unknown[0]!r}; allowed fields: {', '.join(sorted(allowed))}")
    act = a.get("activation")
    if act not in _ALLOWED_ACTIVATIONS[name]:
        raise ConfigError(
            f"arch {name!r} field 'activation' is {act!r}; allowed: {', '.join(_ALLOWED_ACTIVATIONS[name])}"
        )
    out: dict[str, Any] = {"name": name, "activation": act}
    for key in a:
        if key in ("name", "activation"):
            continue
        if key == "channels":
            out[key] = _int_list(name, key, a[key], allow_empty=False)
        elif key == "hidden":
            out[key] = _int_list(name, key, a[key], allow_empty=True)
        elif key in ("padding", "pad_id", "bos_id"):
            out[key] = _positive_int(name, key, a[key], minimum=0)
        else:
            out[key] = _positive_int(name, key, a[key])
    if name == "transformer" and "d_model" in out and "n_heads" in out and out["d_model"] % out["n_heads"]:
        raise ConfigError(
            f"arch 'transformer' field 'd_model' ({out['d_model']}) must be divisible by 'n_heads' ({out['n_heads']})"
        )
    if name == "gru_seq2seq" and "vocab_size" in out:
        for key in ("pad_id", "bos_id"):
            if key in out and out[key] >= out["vocab_size"]:
                raise ConfigError(f"arch 'gru_seq2seq' field {key!r} must be < vocab_size ({out['vocab_size']})")
    return out


def make_activation(name: str) -> nn.Module:
    """The activation module for `name` (one of ACTIVATIONS)."""
    try:
        return _ACTIVATION_MODULES[name]()
    except KeyError as err:
        raise ConfigError(f"activation {name!r} is unknown; allowed: {', '.join(ACTIVATIONS)}") from err


# --------------------------------------------------------------------------------------------- vmappable layers

def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int32 tensors. Products wrap modulo 2^32 (two's
    complement, as on every torch backend); logical right shifts are emulated by masking the sign extension."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x7FEB352D
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * 0x2C1B3C6D
    return x ^ ((x >> 16) & 0xFFFF)


_GOLDEN = 0x9E3779B1 - (1 << 32)  # 2^32 / golden ratio as a signed int32
_M31 = 0x7FFFFFFF  # keeps a hash seed a non-negative int32


def _counter_bits(key: torch.Tensor, salt: int, shape: Sequence[int]) -> torch.Tensor:
    """24 random bits per element (int32 in [0, 2^24)), a pure function of (key, salt, element index)."""
    base = _mix32(key ^ (salt * 0x2545F491 & 0x7FFFFFFF))  # () int32
    idx = torch.arange(math.prod(shape), device=key.device, dtype=torch.int32).view(*shape)
    return (_mix32(idx * _GOLDEN ^ base) >> 8) & 0xFFFFFF


def counter_uniform(key: torch.Tensor, salt: int, shape: Sequence[int]) -> torch.Tensor:
    """Uniform [0, 1) float32 noise of `shape` from an int32 `key`: vmappable, a pure function of its inputs."""
    return _counter_bits(key, salt, shape).to(torch.float32) * (1.0 / (1 << 24))


class MemberDropout(nn.Dropout):
    """nn.Dropout whose rate may be a per-member tensor and whose mask may come from counter-based noise.

    Two non-persistent buffers (not in the state dict): `rate` (the drop probability) and `noise_key` (int32). The
    population engine sets `counter_noise = True` and feeds both per member through functional_call, so a member's
    masks depend only on its own seed and step. Standalone use behaves like nn.Dropout(p).
    """

    def __init__(self, p: float = 0.0, salt: int = 0) -> None:
        super().__init__(p)
        self.salt = int(salt)
        self.counter_noise = False
        self.register_buffer("rate", torch.tensor(float(p)), persistent=False)
        self.register_buffer("noise_key", torch.tensor(0, dtype=torch.int32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if self.counter_noise:
            threshold = (self.rate * float(1 << 24)).to(torch.int32)  # drop where the 24 random bits fall below
            keep = _counter_bits(self.noise_key, self.salt, x.shape) >= threshold  # same shape as x
            return x * keep / (1.0 - self.rate)
        if self.p == 0.0:
            return x
        return F.dropout(x, self.p, True, self.inplace)


_GEOMETRY: dict[tuple, tuple[torch.Tensor, torch.Tensor, int, int]] = {}


def _conv_geometry(
    h: int, w: int, k: tuple[int, int], s: tuple[int, int], p: tuple[int, int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """For an (h, w) image: patch index map (kh*kw*L,) into the flat image with a zero slot appended (index h*w),
    the same map as a 0/1 tensor (kh*kw, L, h*w), and the output size (Ho, Wo); L = Ho*Wo. Cached per geometry and
    device."""
    key = (h, w, k, s, p, str(device))
    hit = _GEOMETRY.get(key)
    if hit is not None:
        return hit
    (kh, kw), (sh, sw), (ph, pw) = k, s, p
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    rows = torch.arange(ho)[None, None, :, None] * sh + torch.arange(kh)[:, None, None, None] - ph  # (kh, 1, Ho, 1)
    cols = torch.arange(wo)[None, None, None, :] * sw + torch.arange(kw)[None, :, None, None] - pw  # (1, kw, 1, Wo)
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)  # (kh, kw, Ho, Wo)
    pixel = torch.where(inside, rows * w + cols, h * w).reshape(-1)  # (kh*kw*L,), h*w = padding
    onehot = F.one_hot(pixel, h * w + 1)[:, : h * w].to(torch.float32).reshape(kh * kw, ho * wo, h * w)
    hit = (pixel.to(device), onehot.to(device), ho, wo)
    _GEOMETRY[key] = hit
    return hit


class MemberConv2d(nn.Conv2d):
    """nn.Conv2d with an optional GEMM formulation for vmapped training of many members (`batched_forward`).

    Under vmap, F.conv2d with per-member weights becomes a grouped convolution, which is slow on CPUs for tiny
    images. With `batched_forward = True` the layer instead either gathers patches (im2col, when the image has
    more than 2 * kh * kw pixels) or contracts the kernel into the dense (O*Ho*Wo, C*H*W) matrix of the layer (tiny
    images), both plain matrix products. Same result as nn.Conv2d up to float rounding.
    """

    batched_forward = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = (
            not self.batched_forward
            or self.groups != 1
            or self.dilation != (1, 1)
            or isinstance(self.padding, str)
            or self.padding_mode != "zeros"
            or x.dim() != 4
        )
        if plain:
            return super().forward(x)
        b, c, h, w = x.shape
        idx, onehot, ho, wo = _conv_geometry(h, w, self.kernel_size, self.stride, self.padding, x.device)
        kk = self.kernel_size[0] * self.kernel_size[1]
        if h * w <= 2 * kk:
            dense = torch.einsum("ock,kpq->opcq", self.weight.flatten(2), onehot.to(x.dtype))  # (O, L, C, H*W)
            out = x.flatten(1) @ dense.reshape(-1, c * h * w).T  # (B, O*L): the layer as one matrix
            out = out.view(b, self.out_channels, ho * wo)
        else:
            padded = F.pad(x.flatten(2), (0, 1))  # (B, C, H*W + 1), the last slot is the zero padding
            patches = padded[:, :, idx].view(b, c * kk, ho * wo)  # (B, C*kh*kw, L)
            patches = patches.transpose(0, 1).reshape(c * kk, b * ho * wo)  # (C*kh*kw, B*L)
            out = (self.weight.flatten(1) @ patches).view(self.out_channels, b, ho * wo).transpose(0, 1)  # (B, O, L)
        if self.bias is not None:
            out = out + self.bias[:, None]
        return out.reshape(b, self.out_channels, ho, wo)


class MemberGRU(nn.GRU):
    """One-layer, batch-first nn.GRU computed with an explicit time loop, so that it works under vmap.

    Same parameters (`weight_ih_l0` (3H, I), `weight_hh_l0` (3H, H), biases) and equations, gate order r, z, n:
    r = s(W_ir x + b_ir + W_hr h + b_hr), z = s(W_iz x + ...), n = tanh(W_in x + b_in + r * (W_hn h + b_hn)),
    h' = (1 - z) * n + z * h. `mask` (B, T) bool, when given, keeps h unchanged at False steps (padding).
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__(input_size, hidden_size, num_layers=1, batch_first=True)

    def forward(  # type: ignore[override]
        self, input: torch.Tensor, hx: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if input.dim() != 3:
            raise ValueError(f"MemberGRU expects batch-first input (B, T, {self.input_size}); got {tuple(input.shape)}")
        b, t_len, _ = input.shape
        h = input.new_zeros(b, self.hidden_size) if hx is None else hx[0]  # (B, H)
        gis = F.linear(input, self.weight_ih_l0, self.bias_ih_l0).unbind(1)  # T x (B, 3H); one stack in backward
        masks = mask.unbind(1) if mask is not None else [None] * t_len
        outs = []
        for gi, m in zip(gis, masks):
            gh = F.linear(h, self.weight_hh_l0, self.bias_hh_l0)  # (B, 3H)
            i_r, i_z, i_n = gi.chunk(3, dim=-1)
            h_r, h_z, h_n = gh.chunk(3, dim=-1)
            r = torch.sigmoid(i_r + h_r)
            z = torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            h_new = (1 - z) * n + z * h
            h = h_new if m is None else torch.where(m[:, None], h_new, h)
            outs.append(h)
        return torch.stack(outs, dim=1), h.unsqueeze(0)  # (B, T, H), (1, B, H)


class MemberAttention(nn.MultiheadAttention):
    """Batch-first nn.MultiheadAttention (packed in_proj, out_proj) computed with explicit, vmappable math.

    Masks follow torch: bool `attn_mask` (T, S) / `key_padding_mask` (B, S) mark positions NOT attended; float masks
    are added to the scores. Attention dropout is not supported (the zoo's dropout acts on the residual branches).
    """

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__(embed_dim, num_heads, dropout=0.0, bias=True, batch_first=True)

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, t_len, d = query.shape
        s_len = key.shape[1]
        heads, hd = self.num_heads, d // self.num_heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = F.linear(query, w_q, b_q).view(b, t_len, heads, hd).transpose(1, 2)  # (B, heads, T, hd)
        k = F.linear(key, w_k, b_k).view(b, s_len, heads, hd).transpose(1, 2)  # (B, heads, S, hd)
        v = F.linear(value, w_v, b_v).view(b, s_len, heads, hd).transpose(1, 2)  # (B, heads, S, hd)
        scores = q @ k.transpose(-2, -1) / math.sqrt(hd)  # (B, heads, T, S)
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(t_len, s_len, dtype=torch.bool, device=query.device).triu(1)
        for mask in (attn_mask, None if key_padding_mask is None else key_padding_mask[:, None, None, :]):
            if mask is None:
                continue
            scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        attn = scores.softmax(dim=-1)  # (B, heads, T, S)
        out = (attn @ v).transpose(1, 2).reshape(b, t_len, d)  # (B, T, D)
        weights = None
        if need_weights:
            weights = attn.mean(dim=1) if average_attn_weights else attn
        return self.out_proj(out), weights


class MemberEncoderLayer(nn.TransformerEncoderLayer):
    """Pre-norm, batch-first nn.TransformerEncoderLayer with MemberAttention / MemberDropout and explicit forward."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, activation: str, salt: int = 0) -> None:
        super().__init__(
            d_model, n_heads, d_ff, dropout=0.0, activation=make_activation(activation), batch_first=True, norm_first=True
        )
        self.self_attn = MemberAttention(d_model, n_heads)
        self.dropout = MemberDropout(salt=salt)
        self.dropout1 = MemberDropout(salt=salt + 1)
        self.dropout2 = MemberDropout(salt=salt + 2)

    def forward(  # type: ignore[override]
        self,
        src: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        h = self.norm1(src)
        attn, _ = self.self_attn(h, h, h, key_padding_mask=src_key_padding_mask, attn_mask=src_mask, is_causal=is_causal)
        x = src + self.dropout1(attn)
        ff = self.linear2(self.dropout(self.activation(self.linear1(self.norm2(x)))))
        return x + self.dropout2(ff)


# ------------------------------------------------------------------------------------------------ architectures


class CNNMember(nn.Module):
    """Small CNN Zoo shape: [conv k x k (stride, padding) -> activation -> dropout] x n, global average pool, linear."""

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        num_classes: int,
        kernel_size: int = 3,
        stride: int = 2,
        padding: int = 1,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        widths = [in_channels, *channels]
        self.convs = nn.ModuleList(
            MemberConv2d(c_in, c_out, kernel_size, stride=stride, padding=padding) for c_in, c_out in zip(widths, widths[1:])
        )
        self.act = make_activation(activation)
        self.drops = nn.ModuleList(MemberDropout(salt=i) for i in range(len(channels)))
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, C, H, W) -> logits (B, num_classes)
        for conv, drop in zip(self.convs, self.drops):
            x = drop(self.act(conv(x)))
        return self.head(x.mean(dim=(-2, -1)))


class MLPMember(nn.Module):
    """Flatten, [linear -> activation -> dropout] per hidden width, linear head."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int, activation: str = "relu") -> None:
        super().__init__()
        widths = [in_features, *hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.act = make_activation(activation)
        self.drops = nn.ModuleList(MemberDropout(salt=i) for i in range(len(hidden)))
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, *input_shape) -> logits (B, num_classes)
        x = x.flatten(1)
        for layer, drop in zip(self.layers, self.drops):
            x = drop(self.act(layer(x)))
        return self.head(x)


class GRUSeq2Seq(nn.Module):
    """Tiny RNN Zoo shape: shared embedding, GRU encoder, GRU decoder (same hidden size, started from the encoder's
    final state), dropout and a linear output projection. `forward(src, tgt)` uses teacher forcing."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_size: int, pad_id: int, bos_id: int) -> None:
        super().__init__()
        self.pad_id, self.bos_id = pad_id, bos_id
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.encoder = MemberGRU(embed_dim, hidden_size)
        self.decoder = MemberGRU(embed_dim, hidden_size)
        self.dropout = MemberDropout()
        self.head = nn.Linear(hidden_size, vocab_size)

    def encode(self, src: torch.Tensor) -> torch.Tensor:
        """Final encoder state (1, B, H) of right-padded sources (B, S); padding leaves the state unchanged."""
        _, h = self.encoder(self.embedding(src), mask=src != self.pad_id)
        return h

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) for answer tokens `tgt` (B, T), each predicted from <bos> + tgt[:, :t] (teacher forcing)."""
        h = self.encode(src)
        bos = torch.full_like(tgt[:, :1], self.bos_id)  # (B, 1)
        out, _ = self.decoder(self.embedding(torch.cat([bos, tgt[:, :-1]], dim=1)), h)  # (B, T, H)
        return self.head(self.dropout(out))

    @torch.no_grad()
    def generate(self, src: torch.Tensor, length: int) -> torch.Tensor:
        """Greedy decoding: `length` tokens (B, length) for sources (B, S)."""
        h = self.encode(src)
        tok = torch.full_like(src[:, :1], self.bos_id)  # (B, 1)
        out = []
        for _ in range(length):
            dec, h = self.decoder(self.embedding(tok), h)
            tok = self.head(dec[:, -1]).argmax(dim=-1, keepdim=True)  # (B, 1)
            out.append(tok)
        return torch.cat(out, dim=1)


class TransformerMember(nn.Module):
    """Token and position embeddings, pre-norm encoder blocks, final LayerNorm, linear head on the last position."""

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        num_classes: int,
        d_model: int = 32,
        n_heads: int = 4,
        n_layers: int = 1,
        d_ff: int = 64,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(MemberEncoderLayer(d_model, n_heads, d_ff, activation, salt=3 * i) for i in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T) token ids -> logits (B, num_classes)
        h = self.embedding(x) + self.positions.weight[: x.shape[1]]  # (B, T, D)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h[:, -1]))
