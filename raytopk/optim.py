r"""SGD for gradients that already carry their momentum (DGC's momentum correction).

With momentum correction (``TopKState(momentum=m)``) each worker's hook keeps
the velocity ``u = m * u + g`` of its own gradient and sparsifies ``u``, so what
DDP hands the optimizer already has the momentum in it. Plain
``torch.optim.SGD(momentum=0, weight_decay=wd)`` would then add the weight
decay ``wd * p`` without momentum, while dense momentum SGD puts it through the
momentum buffer with the gradient: the decay would act about ``1 / (1 - m)``
times weaker (10x at 0.9). :class:`MomentumCorrectedSGD` gives the decay term
the momentum the gradient got in the hook, on a buffer of its own:

.. math::

    w_t = m\,w_{t-1} + \lambda p_t, \qquad p_{t+1} = p_t - \eta\,(\text{grad}_t + w_t)

Momentum SGD is linear in its inputs: with the hook's velocity ``u`` as the
gradient, ``u_t + w_t`` is dense momentum SGD's buffer
``b_t = m\,b_{t-1} + g_t + \lambda p_t`` exactly, split into the hook's part
and this one (the hook then sparsifies its part, and clears the velocity of
entries it sent). It is the split of Deep Gradient Compression's own
``DGCSGD`` (Lin et al., 2018): the weight decay stays local and dense, as
every worker computes the same ``\lambda p`` and nothing needs to cross the
network for it.
"""

import torch


class MomentumCorrectedSGD(torch.optim.Optimizer):
    """SGD whose gradients arrive with momentum applied; weight decay gets the same momentum here.

    Args:
        params: the parameters (or parameter groups) to optimize.
        lr: learning rate.
        momentum: the hook's momentum (``TopKState(momentum=...)``), in (0, 1).
        weight_decay: L2 penalty, as ``torch.optim.SGD``'s ``weight_decay``.
    """

    def __init__(self, params, lr: float, momentum: float, weight_decay: float = 0.0):
        if not lr >= 0:
            raise ValueError(f"lr: got {lr!r}; allowed: a number >= 0")
        if not 0 < momentum < 1:
            raise ValueError(f"momentum: got {momentum!r}; allowed: a number in (0, 1), the hook's momentum")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay: got {weight_decay!r}; allowed: a number >= 0")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            momentum, weight_decay = group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if weight_decay:
                    state = self.state[p]
                    if "decay_buffer" not in state:
                        state["decay_buffer"] = torch.zeros_like(p)
                    decay = state["decay_buffer"].mul_(momentum).add_(p, alpha=weight_decay)
                    update = update.add(decay)
                p.add_(update, alpha=-group["lr"])
        return loss


def check_optimizer(momentum: float, optimizer: torch.optim.Optimizer) -> None:
    """Raise ``ValueError`` if ``optimizer`` would apply momentum correction's ``momentum`` wrongly (0: no check).

    The momentum is already in the gradients that arrive, so the optimizer
    must not apply it again, and weight decay must get it on its own:
    :class:`MomentumCorrectedSGD` with the same momentum, or
    ``torch.optim.SGD`` with neither momentum nor weight decay.
    """
    if not momentum:
        return
    groups = optimizer.param_groups
    if isinstance(optimizer, MomentumCorrectedSGD) and all(g["momentum"] == momentum for g in groups):
        return
    if type(optimizer) is torch.optim.SGD and not any(g["momentum"] or g["weight_decay"] for g in groups):
        return
    got = ", ".join(f"{key} {groups[0].get(key)!r}" for key in ("momentum", "weight_decay"))
    raise ValueError(
        f"momentum correction (momentum={momentum}) needs raytopk.MomentumCorrectedSGD with "
        f"momentum={momentum} (weight decay allowed), or torch.optim.SGD with momentum=0 and weight_decay=0; "
        f"got {type(optimizer).__name__} with {got}"
    )
