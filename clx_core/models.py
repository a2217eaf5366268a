"""Networks with a leading *models* dimension.

Every layer here holds the parameters of K independent models (weight ``(K, out, in)``) and
maps ``(K, B, ...)`` to ``(K, B, ...)``. A single model is simply K = 1; K > 1 trains many
seeds or settings in one process with batched matmuls, which pays off for small,
overhead-bound models (see ``make bench``). Because the optimizers used here (SGD, Adam,
complex synapses) act element-wise, one optimizer over the stacked parameters is exactly K
independent optimizers.

Initial weights are drawn per model from that model's own generator (PyTorch's default
U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases), so model k of a K-model network
starts exactly where a one-model network with the same seed starts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

Generators = Sequence[torch.Generator]


def _uniform_(param: torch.Tensor, bound: float, gens: Generators) -> None:
    """Fill slice k of ``param`` from generator k (drawn on the CPU: device-independent)."""
    if len(gens) != param.shape[0]:
        raise ValueError(f"{len(gens)} generators for {param.shape[0]} models")
    with torch.no_grad():
        for k, g in enumerate(gens):
            w = torch.empty(param.shape[1:]).uniform_(-bound, bound, generator=g)
            param[k].copy_(w)


class Linear(nn.Module):
    """``y = x W + b`` for K models at once: (K, B, in) -> (K, B, out).

    The weight is stored as (K, in, out), the layout ``bmm`` wants: its gradient then comes out
    contiguous and is accumulated without a copy (measured: the transposed layout spent a third
    of a 16-model step copying gradients).
    """

    def __init__(self, in_features: int, out_features: int, gens: Generators, bias: bool = True):
        super().__init__()
        k = len(gens)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(k, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(k, out_features)) if bias else None
        bound = 1.0 / math.sqrt(in_features)
        _uniform_(self.weight, bound, gens)
        if self.bias is not None:
            _uniform_(self.bias, bound, gens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return torch.bmm(x, self.weight)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)

    def extra_repr(self) -> str:
        return f"models={self.weight.shape[0]}, {self.in_features} -> {self.out_features}"


class Conv2d(nn.Module):
    """2-d convolution for K models: (K, B, C, H, W) -> (K, B, C', H', W').

    The K models run as one grouped convolution over ``K * C`` channels.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        gens: Generators,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
    ):
        super().__init__()
        k = len(gens)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.weight = nn.Parameter(torch.empty(k, out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(k, out_channels)) if bias else None
        bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        _uniform_(self.weight, bound, gens)
        if self.bias is not None:
            _uniform_(self.bias, bound, gens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, b = x.shape[:2]
        w = self.weight.reshape(k * self.out_channels, *self.weight.shape[2:])
        bias = None if self.bias is None else self.bias.reshape(-1)
        if k == 1:
            y = F.conv2d(x[0], w, bias, self.stride, self.padding)
            return y.unsqueeze(0)
        xg = x.transpose(0, 1).reshape(b, k * self.in_channels, *x.shape[3:])
        y = F.conv2d(xg, w, bias, self.stride, self.padding, groups=k)
        return y.view(b, k, self.out_channels, *y.shape[2:]).transpose(0, 1)

    def extra_repr(self) -> str:
        k = self.weight.shape[0]
        return (
            f"models={k}, {self.in_channels} -> {self.out_channels}, kernel={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}"
        )


class BatchNorm(nn.Module):
    """Batch normalisation per model over all but the channel axis (dim 2).

    ``track_running_stats=False`` uses batch statistics also in evaluation (as the DST source
    does); ``affine=False`` has no learned scale and shift.
    """

    def __init__(
        self,
        channels: int,
        n_models: int,
        affine: bool = True,
        track_running_stats: bool = True,
        momentum: float = 0.1,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.momentum, self.eps, self.track = momentum, eps, track_running_stats
        self.weight = nn.Parameter(torch.ones(n_models, channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(n_models, channels)) if affine else None
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(n_models, channels))
            self.register_buffer("running_var", torch.ones(n_models, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # K models' C channels are K*C channels of one ordinary batch norm over (B, K*C, ...):
        # a view of a grouped convolution's output, and torch's fused kernel (running statistics
        # updated in place with the unbiased variance, as nn.BatchNorm does).
        k, b, c = x.shape[:3]
        xt = x.transpose(0, 1).reshape(b, k * c, *x.shape[3:])
        track = self.track
        y = F.batch_norm(
            xt,
            self.running_mean.view(-1) if track else None,
            self.running_var.view(-1) if track else None,
            None if self.weight is None else self.weight.view(-1),
            None if self.bias is None else self.bias.view(-1),
            training=self.training or not track,
            momentum=self.momentum,
            eps=self.eps,
        )
        return y.view(b, k, c, *x.shape[3:]).transpose(0, 1)


class Dropout(nn.Module):
    """Dropout whose masks come from each model's own generator (``method`` stream).

    Drawing per model keeps model k of a K-model run identical to a one-model run. The masks
    are drawn on the CPU and moved, so they are the same on every device (at some speed cost;
    the networks that use dropout here are large, so it is small next to the matmuls).
    """

    def __init__(self, p: float, gens: Generators | None = None):
        super().__init__()
        self.p = p
        self.gens = gens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.gens is None:
            return F.dropout(x, self.p, True)
        keep = torch.stack([torch.rand(x.shape[1:], generator=g) >= self.p for g in self.gens])
        return x * keep.to(x.device) / (1 - self.p)


class Flatten(nn.Module):
    """(K, B, ...) -> (K, B, features)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2)


class MaxPool2d(nn.Module):
    """Max pooling of (K, B, C, H, W) maps (the K models are folded into the batch)."""

    def __init__(self, kernel_size: int, stride: int | None = None):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride or kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, b, c = x.shape[:3]
        xt = x.transpose(0, 1)
        if k > 1 and xt.is_contiguous():  # a grouped convolution's output: pool it in place, no copy
            y = F.max_pool2d(xt.view(b, k * c, *x.shape[3:]), self.kernel_size, self.stride)
            return y.view(b, k, c, *y.shape[2:]).transpose(0, 1)
        y = F.max_pool2d(x.flatten(0, 1), self.kernel_size, self.stride)
        return y.view(*x.shape[:3], *y.shape[2:])


class MLP(nn.Module):
    """Fully connected classifier: [Linear -> activation (-> dropout)] x L -> Linear head.

    ``activation`` builds the non-linearity for a layer width (``nn.ReLU`` by default; the
    sparse notebook passes k-winners), ``layer`` the hidden linear layers from
    ``(in, out, gens)`` (:class:`Linear` by default; e.g. sparse weights). ``hidden`` is the
    feature extractor, ``head`` the output layer (one output unit per class of every task;
    heads are slices of it).
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        n_outputs: int,
        gens: Generators,
        activation=None,
        dropout: float = 0.0,
        dropout_gens: Generators | None = None,
        layer=None,
    ):
        super().__init__()
        layers: list[nn.Module] = [Flatten()]
        width = in_features
        make = layer or Linear
        for h in hidden:
            layers.append(make(width, h, gens))
            layers.append(activation(h) if activation is not None else nn.ReLU())
            if dropout > 0:
                layers.append(Dropout(dropout, dropout_gens))
            width = h
        self.hidden = nn.Sequential(*layers)
        self.head = Linear(width, n_outputs, gens)
        self.n_models = len(gens)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(x))


def n_models(model: nn.Module) -> int:
    """The K of a many-models network (leading dimension of its first parameter)."""
    return next(model.parameters()).shape[0]


def shared_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters outside the output layer (the ones regularisers protect)."""
    return [(n, p) for n, p in model.named_parameters() if not n.startswith("head.")]
