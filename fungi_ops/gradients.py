"""Per-sample gradients of one ``nn.Linear`` in closed form, from a forward hook.

For ``y = x W^T + b`` applied to tokens, the gradient of a loss with respect to
``[W | b]`` is ``sum_t dy_t^T [x_t | 1]``. The hook keeps ``x`` and replaces ``y`` by a
detached leaf, so autograd starts at the target layer: nothing before it builds a graph
(all parameters are frozen) and the backward pass covers only what follows it.
Summing ``dy_t^T x_t`` over the tokens of all views of a sample gives that sample's
gradient with one batched matmul. The model may run in several forward chunks (one hook
call each); a sample whose views straddle two chunks gets its gradient in two parts.
Dense features keep the terms apart: token ``t``'s own gradient is the rank-one
``dy_t^T [x_t | 1]`` (:func:`token_linear_gradients`).
"""
from __future__ import annotations

import torch
from torch import nn


class LinearGradientTap:
    """Forward hook on the target layer; armed only while features are being computed."""

    def __init__(self, layer: nn.Linear) -> None:
        self.layer = layer
        self.armed = False
        # one entry per forward call (chunk) since the tap was last cleared, in call order
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self._handle = layer.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
        if not self.armed:
            return None
        self.inputs.append(inputs[0].detach())
        leaf = output.detach().requires_grad_(True)
        self.outputs.append(leaf)
        return leaf

    def clear(self) -> None:
        """Drop the inputs and output leaves kept from past forward calls (frees their memory)."""
        self.inputs = []
        self.outputs = []

    def remove(self) -> None:
        """Detach the forward hook from the layer for good."""
        self._handle.remove()

    @property
    def has_bias(self) -> bool:
        """Whether the layer has a bias, whose gradient then joins the weight's in the feature."""
        return self.layer.bias is not None

    @property
    def gradient_dim(self) -> int:
        """Length of a flattened per-sample gradient: ``out * (in + has_bias)``."""
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
    if inputs.ndim == 3:
        # Tokens whose output gradient is zero in every row add nothing: when the model
        # pools one token (a ViT's class token) that is all but one of them, so the
        # matmul shrinks ~200x. A NaN makes its token's sum NaN, hence live: it still
        # reaches the feature.
        live = output_grads.abs().sum(dim=(0, 2)) != 0
        if not bool(live.all()):
            inputs, output_grads = inputs[:, live], output_grads[:, live]
    x = inputs.reshape(samples, -1, in_features)
    g = output_grads.reshape(samples, -1, out_features).to(x.dtype)
    weight = torch.bmm(g.transpose(1, 2), x)  # [samples, out, in]
    if with_bias:
        weight = torch.cat([weight, g.sum(dim=1, keepdim=True).transpose(1, 2)], dim=2)
    return weight.reshape(samples, -1)


def accumulate_linear_gradients(
    total: torch.Tensor,
    inputs: torch.Tensor,
    output_grads: torch.Tensor,
    first_row: int,
    views_per_sample: int,
    with_bias: bool,
) -> None:
    """Add a slice of rows' gradients to their samples' rows of ``total`` ``[samples, out * (in + bias)]``.

    Row ``r`` of the slice is view ``(first_row + r) % V`` of sample ``(first_row + r) // V``.
    Whole samples go through one batched matmul; a sample cut by the slice's ends (its
    other views are in a neighbouring forward chunk) gets its own.
    """
    rows, start = inputs.shape[0], 0
    while start < rows:
        sample, view = divmod(first_row + start, views_per_sample)
        if view == 0 and rows - start >= views_per_sample:
            count = (rows - start) // views_per_sample
            stop = start + count * views_per_sample
        else:
            count, stop = 1, min(rows, start + views_per_sample - view)
        total[sample : sample + count] += grouped_linear_gradients(
            inputs[start:stop], output_grads[start:stop], count, with_bias
        )
        start = stop


def token_linear_gradients(
    inputs: torch.Tensor, output_grads: torch.Tensor, with_bias: bool, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Flattened ``[n, out * (in + bias)]`` rank-one gradients ``dy_t^T [x_t | 1]``, one per token row.

    ``inputs``: ``[n, in]``, ``output_grads``: ``[n, out]``. Same layout as
    :func:`grouped_linear_gradients` (row ``o`` of ``W`` followed by ``b_o``). ``out``: an
    ``[>= n, out, in + bias]`` buffer to write into (its dtype is used), so that a caller
    projecting many chunks reuses one allocation.
    """
    rows, in_features = inputs.shape
    out_features = output_grads.shape[1]
    width = in_features + int(with_bias)
    if out is None:
        out = torch.empty((rows, out_features, width), dtype=inputs.dtype, device=inputs.device)
    target = out[:rows]
    grads = output_grads.to(target.dtype)
    torch.mul(grads[:, :, None], inputs.to(target.dtype)[:, None, :], out=target[:, :, :in_features])
    if with_bias:
        target[:, :, in_features] = grads
    return target.reshape(rows, out_features * width)
