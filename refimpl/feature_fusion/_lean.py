r"""Lean training of MS-CAM, AFF and iAFF: one attention stage with a hand-written backward.

One *stage* is Eq. (3)'s weights on a map S, and what the module makes of them:

    h  = PWConv1(S)                       saved (C/r channels: a quarter of X at r = 4)
    r  = delta(B1(h))                     recomputed in backward (quarter size)
    u  = PWConv2(r)                       not kept: backward recomputes it from r
    g  = the global branch on GAP(S)      Eq. (1); (N, C) matrices, kept
    M  = sigma(B2(u) + g)                 Eq. (3), recomputed in backward
    out = X * M                           MS-CAM, Eq. (3)
    out = f (Y + M (X - Y))               AFF Eq. (4) (f = 2 with ``factor_two``), and
                                          each of iAFF's two stages, Eqs. (4)-(5)

with S = X (MS-CAM), S = X + Y (AFF, iAFF's first stage) or S = X (+) Y (iAFF's second
stage). Saved for backward: X, and for a soft selection X + Y instead of Y (backward needs
X - Y = 2 X - (X + Y), and the sum is formed anyway for the weights; Y's gradient reaches it
through the sum), X (+) Y in iAFF's second stage, h, the global branch's (N, C)-sized
matrices and the batch norms' batch means and inverse deviations; so MS-CAM saves 1.25
bytes per byte of X, AFF 2.25 and iAFF 3.5 (issue 13's bounds: 1.5, 2.5 and 4.0).

Why by hand: :class:`refimpl._recompute.Recompute` (the general path) runs the stage's
forward again in backward with a graph and lets autograd differentiate it; that costs a
second forward (batch statistics included) and the graph's bookkeeping, and made training
steps 1.3-1.6 times slower than the popular code's. Here backward recomputes only
t = PWConv2(r) (one matrix product on the quarter-size r) and M (one ``addcmul`` and a
sigmoid), and writes the gradients of Eqs. (1)-(4) out directly, in place where a buffer is
free; the global branch (on (N, C) matrices) is part of the same Function, so its pooling
needs no full-size gradient of its own (dGAP joins dS in the same product):

    dM  = dout X  (MS-CAM)  or  dout (X - Y)  (AFF), times f
    dz  = dM M (1 - M)                                    the sigmoid
    dg  = sum over positions of dz                        g is added at every position
    du  = B2's backward of dz;  dr = PWConv2^T du;  dh = B1's backward of delta's
    dS  = PWConv1^T dh + dGAP / (H W)

(with many positions per hidden channel, B2's backward is taken apart so that du is never
formed: :func:`_apart`). The 1x1 convolutions are matrix products on the maps seen as
matrices (:class:`_Layout`): image by image on NCHW maps, over all images at once on
channels_last rows and, for NCHW maps of fewer than :data:`CNL_BELOW` positions, on (C, N L)
matrices.

What this costs, and what it cannot win back: backward has one matrix product more than
autograd's (PWConv2 again, C x C/r x N L multiply-adds), the price of not keeping M, and
recomputes M's elementwise steps. At 2x512x7x7 on one CPU thread the seven products (about
0.89 ms) still cost less than the popular code's six in its per-image convolutions (0.94
ms); what is not won back there is the recomputed elementwise work and the Python of a
hand-written backward (about 145 dispatched operations, against autograd's graph in C++):
0.71 ms outside the products against 0.44 ms. At 28x28 and 56x56 the saved passes over
full-size maps outweigh both (``benchmarks/RESULTS.md``).

The batch norms run as the layers run them, through the same ATen kernels
(``native_batch_norm``, ``batch_norm_update_stats``, ``native_batch_norm_backward``) with
the layers' own momentum rule, so parameters, running statistics and
``num_batches_tracked`` move as in the plain graph (on CPU, with 1024 values or more per
channel, the statistics come from a few vectorised passes instead of the kernels' scalar
loop: :func:`refimpl._batch_norm.batch_stats`, the same numbers to rounding). This path
is taken only where that is the whole of what the layers do: plain ``nn.BatchNorm2d``
layers in training mode, affine, without hooks, on float32 or float64 maps laid out NCHW-
or channels_last-contiguous, outside autocast (:func:`fast_layout`). Anything else
(``nn.SyncBatchNorm``, whose statistics and backward talk to the other processes; a
subclass; a hooked layer; half precision) takes the general path, which calls the batch
norms as modules, and so does double backward (``create_graph=True``): there the stage is
rerun with its graph recorded and differentiated (:func:`refimpl._recompute.rerun_and_grad`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from refimpl._batch_norm import (
    batch_norm_backward,
    batch_norm_train,
    by_hand,
    plain_batch_norm,
    relu_batch_norm,
    update_stats,
)
from refimpl._recompute import rerun_and_grad, save_autocast


def fast_layout(branches: tuple[nn.Module, ...], *maps: torch.Tensor) -> bool | None:
    """The layout the hand-written stage runs in for ``maps`` (False: NCHW, True:
    channels_last), or None where it does not apply (the general path then): ``branches``
    are the stage's context branches, whose batch norms must all be plain."""
    x = maps[0]
    if not by_hand(x):
        return None
    if not all(plain_batch_norm(b.bn1) and plain_batch_norm(b.bn2) for b in branches):
        return None
    if all(t.is_contiguous() for t in maps):
        return False
    if all(t.is_contiguous(memory_format=torch.channels_last) for t in maps):
        return True
    return None


#: NCHW maps with fewer positions per image than this are handled as (C, N, L) matrices
#: (:class:`_Layout`'s CNL mode): one matrix product over all images instead of one per
#: image. Measured, one thread, a training step of MS-CAM and AFF: 3-5% faster at
#: 2x512x7x7 (L = 49: the per-image products have 49 columns, and the weight gradients'
#: products K = 49); 5-9% slower at 14x14, 16x16 and 28x28, where the per-image products
#: are as fast and CNL's copies of the input (into the products' layout) cost.
CNL_BELOW = 100


class _Layout:
    """A map (N, C, H, W) as a stack of matrices.

    Three modes, chosen from the maps' layout and size:

    - NCHW: (N, C, L) with L = H W, a view; a 1x1 convolution is ``torch.bmm`` with the
      weight broadcast over images (no copy of the map).
    - channels_last: (N, L, C) rows, a view; a 1x1 convolution is one matrix product on the
      (N L, C) rows.
    - CNL, for NCHW maps with few positions (:data:`CNL_BELOW`): the stage's own maps are
      (C, N, L) tensors, so that a 1x1 convolution is one matrix product on (C, N L) over
      all images. The caller's NCHW maps are seen as (C, N, L) through a permuted view:
      elementwise ops read them as they lie (L is innermost in both), and only a product
      copies one (:meth:`mat`); results go back to NCHW tensors (:meth:`to_map`).
    """

    def __init__(self, last: bool, shape: torch.Size) -> None:
        self.last = last
        self.n, _, self.h, self.w = shape
        self.positions = self.h * self.w
        self.cnl = not last and self.positions < CNL_BELOW
        # per channel: over images and positions; per image and channel: over positions
        self.red = (0, 1) if last else (1, 2) if self.cnl else (0, 2)
        self.pos = 1 if last else 2

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, L), (N, L, C) or (C, N, L): a view (CNL: permuted)."""
        if self.last:  # (contiguous: reshape may keep odd strides where H or W is 1)
            rows = t.permute(0, 2, 3, 1).reshape(self.n, self.positions, t.shape[1])
            return rows.contiguous()
        if self.cnl:
            return t.view(self.n, t.shape[1], self.positions).transpose(0, 1)
        return t.view(self.n, t.shape[1], self.positions)

    def view_of(self, t: torch.Tensor) -> torch.Tensor:
        """:meth:`view` of a tensor in the maps' layout, always a view (to write into)."""
        if self.last:
            return t.permute(0, 2, 3, 1).view(self.n, self.positions, t.shape[1])
        return self.view(t)

    def channels(self, v: torch.Tensor) -> int:
        """The channel count of a viewed map."""
        return v.shape[2] if self.last else v.shape[0] if self.cnl else v.shape[1]

    def mat(self, v: torch.Tensor) -> torch.Tensor:
        """CNL: (C, N, L) -> (C, N L), copied where ``v`` is an NCHW map's permuted view."""
        return v.reshape(v.shape[0], -1)

    def unview(self, v: torch.Tensor) -> torch.Tensor:
        """Back to (N, C, H, W), in the layout ``v`` came from (CNL: a permuted view)."""
        if self.last:
            return v.view(self.n, self.h, self.w, v.shape[2]).permute(0, 3, 1, 2)
        if self.cnl:
            return v.transpose(0, 1).view(self.n, v.shape[0], self.h, self.w)
        return v.view(self.n, v.shape[1], self.h, self.w)

    def to_map(self, v: torch.Tensor, plus: torch.Tensor | None = None) -> torch.Tensor:
        """``v`` (+ ``plus``, from :meth:`img`) as a map (N, C, H, W) in the maps' layout,
        in place where ``v`` already is one, else (CNL) in one pass into an NCHW tensor."""
        if not self.cnl:
            return self.unview(v if plus is None else v.add_(plus))
        out = v.new_empty(self.n, v.shape[0], self.h, self.w)
        if plus is None:
            self.view(out).copy_(v)
        else:
            torch.add(v, plus, out=self.view(out))
        return out

    def chan(self, t: torch.Tensor) -> torch.Tensor:
        """A (C,) vector broadcast over images and positions."""
        if self.cnl:
            return t.view(-1, 1, 1)
        return t.view(1, 1, -1) if self.last else t.view(1, -1, 1)

    def img(self, t: torch.Tensor) -> torch.Tensor:
        """An (N, C) matrix broadcast over positions."""
        if self.cnl:
            return t.t().unsqueeze(2)
        return t.view(self.n, 1, -1) if self.last else t.view(self.n, -1, 1)

    def per_image(self, v: torch.Tensor, mean: bool = False) -> torch.Tensor:
        """The sum (or mean) over positions, per image and channel: (N, C), contiguous."""
        t = v.mean(self.pos) if mean else v.sum(self.pos)
        return t.t().contiguous() if self.cnl else t

    def conv(
        self, v: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The 1x1 convolution with ``weight`` (O, I): (N, I, L) -> (N, O, L), into
        ``out`` if given."""
        if self.last:
            return torch.matmul(v, weight.t(), out=out)
        if self.cnl:
            o = None if out is None else out.view(weight.shape[0], -1)
            return torch.mm(weight, self.mat(v), out=o).view(-1, self.n, self.positions)
        return torch.bmm(weight.expand(self.n, -1, -1), v, out=out)

    def conv_t(
        self, v: torch.Tensor, weight: torch.Tensor, plus: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Its transpose (the input's gradient): (N, O, L) -> (N, I, L); plus ``plus``, a
        per-image term from :meth:`img`, in the same product (CNL: a pass of its own)."""
        if self.last:
            if plus is None:
                return torch.matmul(v, weight)
            return torch.baddbmm(plus, v, weight.expand(self.n, -1, -1))
        if self.cnl:
            out = weight.t().mm(self.mat(v)).view(-1, self.n, self.positions)
            return out if plus is None else out.add_(plus)
        if plus is None:
            return torch.bmm(weight.t().expand(self.n, -1, -1), v)
        return torch.baddbmm(plus, weight.t().expand(self.n, -1, -1), v)

    def add_conv_t(self, out: torch.Tensor, v: torch.Tensor, weight: torch.Tensor) -> None:
        """``out += conv_t(v, weight)`` in place, one pass over ``out``."""
        if self.last:
            out.view(-1, out.shape[2]).addmm_(v.reshape(-1, v.shape[2]), weight)
        elif self.cnl:
            out.view(out.shape[0], -1).addmm_(weight.t(), self.mat(v))
        else:
            out.baddbmm_(weight.t().expand(self.n, -1, -1), v)

    def weight_grad(self, dout: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The weight's gradient, sum over images and positions of dout v^T: (O, I)."""
        if self.last:
            return dout.reshape(-1, dout.shape[2]).t().mm(v.reshape(-1, v.shape[2]))
        if self.cnl:
            return self.mat(dout).mm(self.mat(v).t())
        return torch.bmm(dout, v.transpose(1, 2)).sum(0)

    def dim1(self, v: torch.Tensor) -> torch.Tensor:
        """Channels in dim 1, as the batch norm kernels take them (a view; CNL: (1, C, N L))."""
        if self.cnl:
            return v.view(1, v.shape[0], -1)
        return self.unview(v) if self.last else v

    def rows_of(self, t: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`dim1`."""
        if self.cnl:
            return t.view(t.shape[1], self.n, self.positions)
        return self.view(t) if self.last else t


def _params(branch: nn.Module) -> list[torch.Tensor | None]:
    """A context branch's parameters in the order the stage takes them."""
    return [
        branch.conv1.weight,
        branch.conv1.bias,
        branch.bn1.weight,
        branch.bn1.bias,
        branch.conv2.weight,
        branch.conv2.bias,
        branch.bn2.weight,
        branch.bn2.bias,
    ]


@dataclass(frozen=True)
class Stage:
    """What one stage is: its two context branches, and what it makes of M.

    ``lerp``: out = factor (Y + M (X - Y)), else out = X M (MS-CAM). ``last``: the layout
    :func:`fast_layout` found for the module's inputs (the maps a stage makes keep it).
    """

    local: nn.Module
    glob: nn.Module
    lerp: bool
    last: bool
    factor: float = 1.0

    def plain(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None,
        s: torch.Tensor | None,
        att: torch.Tensor | None,
    ) -> torch.Tensor:
        """The stage on the plain autograd graph (batch norms called as modules), in terms
        of the maps it saves (y unused: Y = S - X): double backward differentiates this."""
        if not self.lerp:
            M = self.local.logits(x, self.glob.vector(x), gate=True)  # Eq. (3)
            return x * M
        a = s if att is None else att
        M = self.local.logits(a, self.glob.vector(a), gate=True)  # Eq. (3)
        out = torch.lerp(s - x, x, M)  # Eq. (4) with Y = S - X
        return out * self.factor if self.factor != 1 else out


def stage(
    spec: Stage,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    s: torch.Tensor | None = None,
    att: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run one stage (see the module docstring) on (N, C, H, W) maps: MS-CAM on ``x``; a
    soft selection between ``x`` and ``y`` with their sum ``s`` = X + Y given, whose weights
    come from ``s`` itself or from ``att`` (iAFF's X (+) Y)."""
    return _Stage.apply(spec, x, y, s, att, *_params(spec.local), *_params(spec.glob))


def _global_forward(
    z: torch.Tensor, params: tuple, branch: nn.Module
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """g from the pooled (N, C) descriptor z (Eq. (1)'s GAP done), and what its backward
    needs: the hidden pre-activation, PWConv2's output and both batch norms' statistics."""
    w1, b1, gamma1, beta1, w2, b2, gamma2, beta2 = params
    bn1, bn2 = branch.bn1, branch.bn2
    hg = F.linear(z, w1.flatten(1), b1)  # PWConv1, (N, C/r)
    rg, mean1, invstd1 = batch_norm_train(bn1, hg, gamma1, beta1)
    ug = F.linear(rg.relu_(), w2.flatten(1), b2)  # PWConv2, (N, C)
    g, mean2, invstd2 = batch_norm_train(bn2, ug, gamma2, beta2)
    return g, (z, hg, ug, mean1, invstd1, mean2, invstd2)


def _global_backward(dg: torch.Tensor, saved: tuple, params: tuple, eps: tuple) -> tuple:
    """The gradients of g's parameters and of z (N, C), from dg (N, C)."""
    z, hg, ug, mean1, invstd1, mean2, invstd2 = saved
    w1, b1, gamma1, beta1, w2, b2, gamma2, beta2 = params
    weight1, weight2 = w1.flatten(1), w2.flatten(1)
    rg = relu_batch_norm(hg, gamma1, beta1, mean1, invstd1, lambda v: v)
    dug, dgamma2, dbeta2 = batch_norm_backward(dg, ug, gamma2, mean2, invstd2, eps[1])
    drg = torch.ops.aten.threshold_backward(dug.mm(weight2), rg, 0)
    dhg, dgamma1, dbeta1 = batch_norm_backward(drg, hg, gamma1, mean1, invstd1, eps[0])
    grads = (
        dhg.t().mm(z).view_as(w1),
        None if b1 is None else dhg.sum(0),
        dgamma1,
        dbeta1,
        dug.t().mm(rg).view_as(w2),
        None if b2 is None else dug.sum(0),
        dgamma2,
        dbeta2,
    )
    return grads, dhg.mm(weight1)  # and dz


#: B2's backward is taken apart (see :class:`_Stage`) where (C/r)^2 (N L + C) is below this
#: many times N L C.
APART_BELOW = 100


def _apart(hidden: int, count: int, channels: int) -> bool:
    """Whether to take B2's backward apart: with many positions per hidden channel it is
    linear in dz and r, and du need not be formed: fewer passes over (N, C, L) maps for
    (C/r)^2 (N L + C) more multiply-adds, which pays where that is below
    ``APART_BELOW`` N L C (measured, one thread: (8, 256, 28, 28) and (32, 64, 56, 56) yes,
    (2, 512, 7, 7) no)."""
    return hidden * hidden * (count + channels) < APART_BELOW * count * channels


class _Stage(torch.autograd.Function):
    """One stage with the hand-written backward of the module docstring."""

    @staticmethod
    def forward(ctx, spec, x, y, s, att, *params):  # noqa: ANN001, ANN205
        w1, b1, gamma1, beta1, w2, b2, gamma2, beta2 = params[:8]  # the local branch's
        last = spec.last  # found once by the module (fast_layout)
        lay = _Layout(last, x.shape)
        xv = lay.view(x)
        yv = None if y is None else lay.view(y)
        # the map the weights are computed on: X (MS-CAM), X + Y, or X (+) Y
        sv = lay.view(x if s is None else s if att is None else att)
        bn1, bn2 = spec.local.bn1, spec.local.bn2

        # g(S): the global branch on the pooled (N, C) descriptor, Eq. (1)
        g, kept_global = _global_forward(lay.per_image(sv, mean=True), params[8:], spec.glob)
        # L(S): PWConv1, B1 (the layer's kernel), delta, PWConv2
        h = lay.conv(sv, w1.flatten(1))  # (N, C/r, L)
        if b1 is not None:
            h.add_(lay.chan(b1))
        r, mean1, invstd1 = batch_norm_train(bn1, lay.dim1(h), gamma1, beta1)
        r = lay.rows_of(r).relu_()  # delta(B1(h))
        # The output is a tensor of its own (N, C, H, W) (a view made inside a Function could
        # not be changed in place by the caller); PWConv2 writes into it through a matrix
        # view, and the rest of Eqs. (3)-(4) happens there in place: no other buffer (CNL: u
        # is a (C, N, L) buffer, and Eq. (3)/(4)'s last pass writes the NCHW output).
        out = torch.empty_like(
            x, memory_format=torch.channels_last if last else torch.contiguous_format
        )
        final = lay.view_of(out)
        u = lay.conv(r, w2.flatten(1), out=None if lay.cnl else final)  # (N, C, L)
        if b2 is not None:
            u.add_(lay.chan(b2))
        # B2's statistics (its kernel again); then B2, + g and the sigmoid in two passes
        mean2, var2 = update_stats(bn2, lay.dim1(u))  # in passes or by the layer's kernel
        invstd2 = torch.rsqrt(var2 + bn2.eps)
        a2 = gamma2 * invstd2
        # B2's shift plus g(S), (N, C): B2 as a2 u + shift, the form backward recomputes M in
        # (and the one the kernel applies)
        shift = (beta2 - mean2 * a2) + g
        M = torch.addcmul(lay.img(shift), u, lay.chan(a2), out=u).sigmoid_()  # Eq. (3)
        if spec.lerp:
            torch.lerp(yv, xv, M, out=final)  # Eq. (4): Y + M (X - Y)
            if spec.factor != 1:
                final.mul_(spec.factor)
        else:
            torch.mul(M, xv, out=final)  # Eq. (3): X M
        del M, u, final

        ctx.spec, ctx.last = spec, last
        ctx.eps = (bn1.eps, bn2.eps, spec.glob.bn1.eps, spec.glob.bn2.eps)
        ctx.params = params  # leaves: used, not saved
        save_autocast(ctx, x.device.type)
        # Y is not kept: backward needs X - Y = 2 X - S, and S (X + Y, formed by the caller
        # for both branches' input) is kept instead
        ctx.save_for_backward(x, s, att, g, h, mean1, invstd1, mean2, invstd2, *kept_global)
        return out

    @staticmethod
    def backward(ctx, dout):  # noqa: ANN001, ANN205
        x, s, att, g, h, mean1, invstd1, mean2, invstd2, *kept_global = ctx.saved_tensors
        spec: Stage = ctx.spec
        if torch.is_grad_enabled():  # double backward: differentiate the plain graph
            modules = (spec.local, spec.glob)
            inputs = (x, None, s, att)  # Y's gradient reaches it through S = X + Y
            grads = rerun_and_grad(ctx, spec.plain, modules, inputs, ctx.params, 1, dout)
            return (None, *grads)
        w1, b1, gamma1, beta1, w2, b2, gamma2, beta2 = ctx.params[:8]
        lay = _Layout(ctx.last, x.shape)
        fmt = torch.channels_last if ctx.last else torch.contiguous_format
        dv = lay.view(dout.contiguous(memory_format=fmt))  # as the forward's output was
        if spec.factor != 1:
            dv = dv * spec.factor
        xv = lay.view(x)
        sv = None if s is None else lay.view(s)
        weight1, weight2 = w1.flatten(1), w2.flatten(1)  # (C/r, C), (C, C/r)

        # Recompute r = delta(B1(h)), then M from it: z = B2(PWConv2(r)) + g, with
        # k2 = gamma2 / sigma2, is one product with k2 folded into the weight (or, when
        # B2's input t = W2 r is kept for its backward, t and one addcmul) and a sigmoid.
        r = relu_batch_norm(h, gamma1, beta1, mean1, invstd1, lay.chan)
        k2 = gamma2 * invstd2
        shift2 = -mean2 if b2 is None else b2 - mean2  # B2's input minus its mean: t + shift2
        count = lay.n * lay.positions  # N L, B2's sample count
        hidden = lay.channels(r)
        apart = _apart(hidden, count, weight2.shape[0])
        if apart:
            t = None
            M = lay.conv(r, weight2 * k2[:, None])  # k2 W2 r
            M.add_(lay.img(beta2 + k2 * shift2 + g)).sigmoid_()
        else:
            t = lay.conv(r, weight2)  # W2 r, (N, C, L)
            shift = lay.img(beta2 + k2 * shift2 + g)  # (out=: in t's layout, not shift's)
            M = torch.addcmul(shift, t, lay.chan(k2), out=torch.empty_like(t)).sigmoid_()

        # dM through Eq. (4) / (3), then the sigmoid: dz = dM M (1 - M)
        if spec.lerp:  # dout (X - Y), with X - Y = 2 X - S
            dz = torch.lerp(sv, xv, 2.0, out=torch.empty_like(M)).mul_(dv)
        else:  # dout X
            dz = torch.mul(dv, xv, out=torch.empty_like(M))
        torch.ops.aten.sigmoid_backward.grad_input(dz, M, grad_input=dz)
        # g: added at every position; its branch's backward gives dz_pool, the gradient of
        # GAP(S), which reaches every position of S divided by H W
        dg = lay.per_image(dz)  # (N, C)
        global_grads, dpool = _global_backward(dg, kept_global, ctx.params[8:], ctx.eps[2:])
        dpool = lay.img(dpool.div_(lay.positions))
        # the inputs' gradients through the product (and, for S = X, GAP's). A soft selection
        # as a function of X and S: out = (S - X) + M (2 X - S), so d/dX = dout (2 M - 1),
        # d/dS = dout (1 - M) (S's gradient reaches X and Y through S = X + Y)
        if spec.lerp:
            ds = torch.addcmul(dv, dv, M, value=-1, out=M)  # dout (1 - M)
            dx_map = torch.empty_like(x, memory_format=fmt)
            dx = torch.add(dv, ds, alpha=-2, out=lay.view_of(dx_map))  # dout (2 M - 1)
        else:
            dx, ds = torch.addcmul(dpool, M, dv, out=M), None  # dout M + dGAP
        del M
        eps1, eps2 = ctx.eps[:2]
        if apart:
            # B2 with batch statistics, du = k2 (dz - dbeta2 / NL - x_hat2 dgamma2 / NL), in
            # terms of dz and r_c = r - mean(r) (per channel, over images and positions): B2
            # removes b2 and W2 mean(r), so x_hat2 = W2 r_c / sigma2, and sum du = 0:
            #   du  = k2 dz - P (W2 r_c) - Q,  P = k2 dgamma2 / (sigma2 NL),  Q = k2 dbeta2 / NL
            #   dW2 = sum du r^T = sum du r_c^T = k2 G - P (W2 R),
            #         G = sum dz r_c^T,  R = sum r_c r_c^T
            #   dr  = W2^T du = (k2 W2)^T dz - (W2^T P W2) r_c - W2^T Q
            # with dgamma2 = sum dz x_hat2 = rowsum(W2 * G) / sigma2, and b2's gradient (sum du)
            # exactly 0. Centred, the sums do not cancel: with r itself, G's sum dz r^T and
            # mean(dz) sum r^T nearly cancel where r's mean is large against its spread (r >= 0
            # after the ReLU).
            r_c = r - lay.chan(r.mean(lay.red))
            grad_rows = lay.weight_grad(dz, r_c)  # G, (C, C/r)
            dr = lay.conv_t(dz, weight2 * k2[:, None])  # (k2 W2)^T dz, (N, C/r, L)
            del dz
            gram = lay.weight_grad(r_c, r_c)  # R, (C/r, C/r)
            dbeta2 = dg.sum(0)
            dgamma2 = invstd2 * (weight2 * grad_rows).sum(1)
            P = k2 * dgamma2 * invstd2 / count
            Q = k2 * dbeta2 / count
            dw2 = k2[:, None] * grad_rows - P[:, None] * (weight2 @ gram)
            db2 = None if b2 is None else torch.zeros_like(b2)  # sum du
            dr -= lay.conv_t(r_c, weight2.t() @ (P[:, None] * weight2))
            del r_c
            dr -= lay.chan(weight2.t() @ Q)
        else:
            # B2 with batch statistics: the layer's own backward kernel (what autograd runs
            # for it), given its input t (+ b2 in the mean) and batch statistics
            du, dgamma2, dbeta2 = batch_norm_backward(
                lay.dim1(dz), lay.dim1(t), gamma2, -shift2, invstd2, eps2
            )
            del dz, t
            du = lay.rows_of(du)
            db2 = None if b2 is None else du.sum(lay.red)
            dw2 = lay.weight_grad(du, r)  # (C, C/r)
            dr = lay.conv_t(du, weight2)  # (N, C/r, L)
            del du
        dr = torch.ops.aten.threshold_backward(dr, r, 0)  # delta
        dh, dgamma1, dbeta1 = batch_norm_backward(
            lay.dim1(dr), lay.dim1(h), gamma1, mean1, invstd1, eps1
        )
        dh = lay.rows_of(dh)
        db1 = None if b1 is None else dh.sum(lay.red)
        # PWConv1: its weight's gradient against the map the weights came from, and the
        # gradient into that map, PWConv1^T dh (+ dGAP)
        datt = None
        if not spec.lerp:  # the map is X
            dw1 = lay.weight_grad(dh, xv)
            lay.add_conv_t(dx, dh, weight1)
        elif att is None:  # the map is S
            dw1 = lay.weight_grad(dh, sv)
            lay.add_conv_t(ds, dh, weight1)
            ds = lay.to_map(ds, dpool)
        else:  # the map is X (+) Y, an input of its own
            dw1 = lay.weight_grad(dh, lay.view(att))
            ds = lay.to_map(ds)
            if lay.cnl:
                datt = lay.to_map(lay.conv_t(dh, weight1), dpool)
            else:
                datt = lay.unview(lay.conv_t(dh, weight1, dpool))
        local_grads = (dw1.view_as(w1), db1, dgamma1, dbeta1, dw2.view_as(w2), db2, dgamma2, dbeta2)
        return (
            None,
            dx_map if spec.lerp else lay.to_map(dx),
            None,  # Y: through S
            ds,
            datt,
            *local_grads,
            *global_grads,
        )
