"""Per-sample gradients of one ``nn.Linear`` in closed form, from a forward hook.

For ``y = x W^T + b`` applied to tokens, the gradient of a loss with respect to
``[W | b]`` is ``sum_t dy_t^T [x_t | 1]``. The hook keeps ``x`` and replaces ``y`` by a
detached leaf, so autograd starts at the target layer: nothing before it builds a graph
(all parameters are frozen) and the backward pass covers only what follows it.
Summing ``dy_t^T x_t`` over the tokens of all views of a sample gives that sample's
gradient with one batched matmul.
"""
from __future__ import annotations

import torch
from torch import nn


class LinearGradientTap:
    """Forward hook on the target layer; armed only while features are being computed."""

    def __init__(self, layer: nn.Linear) -> None:
        self.layer = layer
        self.armed = False
        self.inputs: torch.Tensor | None = None
        self.outputs: torch.Tensor | None = None
        self._handle = layer.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
        if not self.armed:
            return None
        self.inputs = inputs[0].detach()
        leaf = output.detach().requires_grad_(True)
        self.outputs = leaf
        return leaf

    def clear(self) -> None:
        self.inputs = None
        self.outputs = None

    def remove(self) -> None:
        self._handle.remove()

    @property
    def has_bias(self) -> bool:
        return self.layer.bias is not None

    @property
    def gradient_dim(self) -> int:
        out_features, in_features = self.layer.weight.shape
        return out_features * (in_features + int(self.has_bias))


def grouped_linear_gradients(
    inputs: torch.Tensor, output_grads: torch.Tensor, samples: int, with_bias: bool
) -> torch.Tensor:
    """Flattened ``[samples, out * (in + bias)]`` gradients, summed over views and tokens.

    ``inputs``/``output_grads`` hold each sample's views as consecutive rows. The layout
    matches the reference (row ``o`` of ``W`` followed by ``b_o``), so a projection
    matrix is interchangeable with it.
    """
    in_features = inputs.shape[-1]
    out_features = output_grads.shape[-1]
    x = inputs.reshape(samples, -1, in_features)
    g = output_grads.reshape(samples, -1, out_features).to(x.dtype)
    weight = torch.bmm(g.transpose(1, 2), x)  # [samples, out, in]
    if with_bias:
        weight = torch.cat([weight, g.sum(dim=1, keepdim=True).transpose(1, 2)], dim=2)
    return weight.reshape(samples, -1)
