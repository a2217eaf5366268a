"""Complex synapses (Benna & Fusi 2016) as PyTorch optimizers.

Each parameter is the first of a chain of n "beakers" u_1..u_n (u_1 is the visible weight,
u_2..u_n hidden, u_{n+1} = 0 a leak). With x = (beta/alpha)^(1/(2n-2)), capacities
C_k = x^(k-1) and couplings g_{k,k+1} = x^(1-k)/alpha, one step is, in this order
(Gauss-Seidel: u_{k-1} already updated, u_{k+1} not yet)::

    u_1 <- u_1 + (eta/C_1) (-d + g_12 (u_2 - u_1))
    u_k <- u_k + (eta/C_k) [g_{k-1,k} (u_{k-1} - u_k) + g_{k,k+1} (u_{k+1} - u_k)],  k = 2..n

where d is the gradient (SGD, eta = lr) or Adam's m_t / (sqrt(v_t) + eps) (eta = lr *
sqrt(1 - b2^t) / (1 - b1^t)). n = 0 is the plain optimizer, n = 1 adds an L2 decay eta/beta.
Memories then decay roughly as a power law between the time scales alpha and beta.

Time scales. The source's README gives alpha and beta in iterations, but its code multiplies
the couplings by eta too, so beaker k really relaxes on C_k / (eta g_{k,k+1}) iterations: with
Adam at lr 1e-3 and alpha 500 that is 500,000 iterations, far beyond a 2,500-iteration
experiment. ``timescales="lr-scaled"`` reproduces the source's code (its published numbers);
``timescales="iterations"`` (default) implements the documented intent: the coupling terms
are not scaled by eta, so the chain's time scales are alpha .. beta iterations.

All updates are ``torch._foreach`` ops over every parameter at once; each beaker update is two
fused lerps (6 memory passes) instead of the 8 of ``mul/add/add``.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterable

import torch
from torch.optim import Optimizer

from .config import check_choice, check_float, check_int


def chain_constants(n_beakers: int, alpha: float, beta: float) -> tuple[list[float], list[float]]:
    """Capacities ``C[k-1] = C_k`` and couplings ``g[k-1] = g_{k,k+1}`` for k = 1..n."""
    if n_beakers == 0:
        return [], []
    if n_beakers == 1:
        return [1.0], [1.0 / beta]  # one beaker: decay at the longest time scale
    x = (beta / alpha) ** (1.0 / (2 * n_beakers - 2))
    caps = [x ** (k - 1) for k in range(1, n_beakers + 1)]
    coup = [(1.0 / alpha) * x ** (1 - k) for k in range(1, n_beakers + 1)]
    return caps, coup


TIMESCALES = ("iterations", "lr-scaled")


def _check(n_beakers: int, alpha: float, beta: float, lr: float, init: str, timescales: str) -> None:
    check_choice("timescales", timescales, TIMESCALES)
    check_int("n_beakers", n_beakers, 0)
    check_float("lr", lr, 0, low_open=True)
    check_float("alpha", alpha, 0, low_open=True)
    check_float("beta", beta, 0, low_open=True)
    if alpha > beta:
        raise ValueError(f"parameter 'alpha' = {alpha!r} is not allowed: must be <= beta ({beta!r})")
    check_choice("init", init, ("same", "zero"))
    if timescales == "iterations" and n_beakers > 0:
        caps, g = chain_constants(n_beakers, alpha, beta)
        worst = max(g[k] / caps[k] + (g[k - 1] / caps[k] if k else 0.0) for k in range(n_beakers))
        if worst >= 1:
            raise ValueError(
                f"parameter 'alpha' = {alpha!r} is not allowed: with timescales='iterations' a beaker would "
                f"move {worst:.2f} of the way per step (must be < 1); use alpha >= 2 or timescales='lr-scaled'"
            )


class _ComplexSynapseBase(Optimizer):
    """Shared beaker chain; subclasses supply the proposed change d and the step size."""

    def __init__(self, params: Iterable, defaults: dict, n_beakers: int, alpha: float, beta: float, timescales: str):
        super().__init__(params, defaults)
        self.n_beakers, self.alpha, self.beta = n_beakers, float(alpha), float(beta)
        self.timescales = timescales
        self.capacities, self.couplings = chain_constants(n_beakers, alpha, beta)

    def _beakers(self, group: dict, params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Hidden beakers u_2..u_n of each parameter, created on first use."""
        out = []
        for p in params:
            state = self.state[p]
            if "beakers" not in state:
                make = (lambda t: t.detach().clone()) if group["init"] == "same" else torch.zeros_like
                state["beakers"] = [make(p) for _ in range(self.n_beakers - 1)]
            out.append(state["beakers"])
        return out

    @torch.no_grad()
    def _chain(self, group: dict, params: list[torch.Tensor], step: float, propose) -> None:
        """Apply the Gauss-Seidel chain; ``propose(params, scale)`` adds ``scale * (-d)``."""
        n = self.n_beakers
        if n == 0:
            propose(params, step)
            return
        caps, g = self.capacities, self.couplings
        flow = step if self.timescales == "lr-scaled" else 1.0  # step size of the coupling terms
        if n == 1:  # u_2 is the leak: u_1 <- u_1 (1 - flow g_12) - eta d
            torch._foreach_mul_(params, 1.0 - flow / caps[0] * g[0])
            propose(params, step / caps[0])
            return
        beakers = self._beakers(group, params)
        levels = [params] + [[b[i] for b in beakers] for i in range(n - 1)]  # levels[k-1] = u_k
        # u_1 <- u_1 + s_1 g_12 (u_2 - u_1) - s_1 d   (u_2 old)
        torch._foreach_lerp_(params, levels[1], flow / caps[0] * g[0])
        propose(params, step / caps[0])
        for k in range(2, n + 1):
            s = flow / caps[k - 1]
            w_in, w_out = s * g[k - 2], s * g[k - 1]
            u = levels[k - 1]
            # u_k <- (1 - w_in - w_out) u_k + w_in u_{k-1} + w_out u_{k+1}, as two lerps
            torch._foreach_lerp_(u, levels[k - 2], w_in / (1.0 - w_out))
            if k < n:
                torch._foreach_lerp_(u, levels[k], w_out)
            else:  # u_{n+1} = 0: the leak
                torch._foreach_mul_(u, 1.0 - w_out)

    def hidden_levels(self, p: torch.Tensor) -> list[torch.Tensor]:
        """u_2..u_n of parameter ``p`` (empty before the first step or for n < 2)."""
        return list(self.state.get(p, {}).get("beakers", []))


class ComplexSynapseSGD(_ComplexSynapseBase):
    """Complex synapses on plain gradients.

    Defaults: the source's lr 0.1 and n 6; its alpha 1, beta 1024 were lr-scaled, i.e. real
    time scales of 10 and 10240 iterations, which are the defaults here.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.1,
        n_beakers: int = 6,
        alpha: float = 10.0,
        beta: float = 10240.0,
        init: str = "same",
        timescales: str = "iterations",
    ):
        _check(n_beakers, alpha, beta, lr, init, timescales)
        super().__init__(params, dict(lr=lr, init=init), n_beakers, alpha, beta, timescales)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]

            def propose(ps, scale, grads=grads):
                torch._foreach_add_(ps, grads, alpha=-scale)

            self._chain(group, params, group["lr"], propose)
        return loss


class ComplexSynapseAdam(_ComplexSynapseBase):
    """Complex synapses on Adam's proposed change.

    Defaults: lr 1e-3 and the source's experiment settings n 5, alpha 500, beta 2500.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        n_beakers: int = 5,
        alpha: float = 500.0,
        beta: float = 2500.0,
        init: str = "same",
        timescales: str = "iterations",
    ):
        _check(n_beakers, alpha, beta, lr, init, timescales)
        check_float("betas[0]", betas[0], 0, 1, high_open=True)
        check_float("betas[1]", betas[1], 0, 1, high_open=True)
        check_float("eps", eps, 0)
        super().__init__(
            params, dict(lr=lr, betas=tuple(betas), eps=eps, init=init), n_beakers, alpha, beta, timescales
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            b1, b2 = group["betas"]
            grads = [p.grad for p in params]
            for p in params:
                st = self.state[p]
                if "exp_avg" not in st:
                    st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
            steps = [self.state[p]["step"] for p in params]
            torch._foreach_add_(steps, 1.0)
            group["t"] = t = group.get("t", 0) + 1  # the same count as `steps`, without a device sync
            m = [self.state[p]["exp_avg"] for p in params]
            v = [self.state[p]["exp_avg_sq"] for p in params]
            step = group["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t)
            if _fused_ok(params):
                propose = functools.partial(
                    _fused_propose, grads=grads, m=m, v=v, steps=steps, betas=(b1, b2), eps=group["eps"], t=t
                )
            else:
                torch._foreach_lerp_(m, grads, 1 - b1)
                torch._foreach_mul_(v, b2)
                torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
                denom = torch._foreach_sqrt(v)
                torch._foreach_add_(denom, group["eps"])
                propose = functools.partial(_foreach_propose, m=m, denom=denom)
            self._chain(group, params, step, propose)
        return loss


def _fused_propose(ps, scale, *, grads, m, v, steps, betas, eps, t) -> None:
    """u_1 -= scale * m / (sqrt(v) + eps) with m, v updated: torch's fused Adam kernel, one pass.

    torch divides by sqrt(v / bc2) + eps; passing eps / sqrt(bc2) and lr = scale * bc1 / sqrt(bc2)
    gives exactly the source's formula.
    """
    b1, b2 = betas
    root_bc2 = math.sqrt(1 - b2**t)
    torch._fused_adam_(
        ps,
        grads,
        m,
        v,
        [],
        steps,
        lr=scale * (1 - b1**t) / root_bc2,
        beta1=b1,
        beta2=b2,
        weight_decay=0.0,
        eps=eps / root_bc2,
        amsgrad=False,
        maximize=False,
    )


def _foreach_propose(ps, scale, *, m, denom) -> None:
    torch._foreach_addcdiv_(ps, m, denom, value=-scale)


def _fused_ok(params: list[torch.Tensor]) -> bool:
    """torch's fused Adam kernel exists (CPU since torch 2.4) and takes these tensors."""
    if not hasattr(torch, "_fused_adam_") or os.environ.get("CLX_NO_FUSED") == "1":
        return False
    dev = params[0].device
    return dev.type in ("cpu", "cuda") and all(
        p.device == dev and p.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16) for p in params
    )
