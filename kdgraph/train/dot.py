"""DOT: the distillation-oriented trainer, an SGD with one momentum for the task gradient and one for the
distillation gradient (``optimizer: {type: sgd_dot, momentum: 0.9, delta: 0.075}``).

B. Zhao, Q. Cui, R. Song, J. Liang, "DOT: A Distillation-Oriented Trainer", ICCV 2023,
https://arxiv.org/abs/2307.08436 (code: megvii-research/mdistiller ``mdistiller/engine/dot.py``)

Each step backpropagates the distillation terms and the task terms separately (the fused graph knows which is
which: a loss class with ``task_term = True``, e.g. ``cross_entropy``, is a task term; :meth:`Distiller.task_terms`).
With ``m_task = momentum - delta`` and ``m_kd = momentum + delta``, per parameter (weight decay joins the task
gradient, or, from its second step on, the distillation gradient of a parameter that has no task gradient)::

    v_task <- m_task * v_task + g_task        (m_avg = (m_task + m_kd) / 2 for a parameter without a kd gradient)
    v_kd   <- m_kd   * v_kd   + g_kd          (m_avg for a parameter without a task gradient)
    p      <- p - lr * (v_task + v_kd)        (each buffer starts as its first gradient)

as the authors' implementation does (checked against it in tests/test_dot.py). One parameter group; no fp16 grad
scaler; single process (the two backward passes per step are not DDP-synchronised here).
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from ..errors import TrainingError

__all__ = ["DOT"]


class DOT(torch.optim.Optimizer):
    """SGD with separate momenta for the distillation and the task gradients (:meth:`step_terms`)."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float, momentum: float = 0.9, delta: float = 0.075,
                 weight_decay: float = 0.0):
        if not 0 <= delta <= momentum or momentum + delta > 1:
            raise ValueError(f"DOT needs 0 <= delta <= momentum and momentum + delta <= 1, got {momentum}, {delta}")
        super().__init__(params, dict(lr=lr, m_task=momentum - delta, m_kd=momentum + delta,
                                      weight_decay=weight_decay))
        if len(self.param_groups) != 1:
            raise ValueError("DOT takes one parameter group")

    def step_terms(self, terms: Mapping[str, torch.Tensor], task_terms: Iterable[str]) -> None:
        """Backpropagate the distillation terms, then the task terms, and update with both momenta."""
        task = [v for k, v in terms.items() if k in set(task_terms)]
        distill = [v for k, v in terms.items() if k not in set(task_terms)]
        if not task or not distill:
            raise TrainingError(f"optimizer sgd_dot needs task terms and distillation terms; this stage's terms "
                                f"{sorted(terms)} have task terms {sorted(set(task_terms) & set(terms))}")
        params = self.param_groups[0]["params"]
        self.zero_grad(set_to_none=True)
        sum(distill).backward(retain_graph=True)
        kd_grads = {p: p.grad for p in params if p.grad is not None}
        self.zero_grad(set_to_none=True)
        sum(task).backward()
        self._kd_grads = kd_grads
        self.step()  # through step(), so learning-rate schedulers see it

    def step(self, closure=None):  # noqa: D102
        kd_grads, self._kd_grads = getattr(self, "_kd_grads", None), None
        if kd_grads is None:
            raise TrainingError("optimizer sgd_dot steps through step_terms(terms, task_terms), not step() alone")
        self._update(kd_grads)

    @torch.no_grad()
    def _update(self, kd_grads: dict[nn.Parameter, torch.Tensor]) -> None:
        group = self.param_groups[0]
        lr, wd, m_task, m_kd = group["lr"], group["weight_decay"], group["m_task"], group["m_kd"]
        m_avg = (m_task + m_kd) / 2.0
        for p in group["params"]:
            g_task, g_kd = p.grad, kd_grads.get(p)
            state = self.state[p]
            if g_task is not None:
                d = g_task.add(p, alpha=wd) if wd else g_task
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d.clone()
                else:
                    buf.mul_(m_task if g_kd is not None else m_avg).add_(d)
                p.add_(buf, alpha=-lr)
            if g_kd is not None:
                buf = state.get("momentum_kd_buffer")
                if buf is None:  # as the authors' code: the first kd buffer is the bare gradient
                    buf = state["momentum_kd_buffer"] = g_kd.clone()
                elif g_task is not None:
                    buf.mul_(m_kd).add_(g_kd)
                else:
                    buf.mul_(m_avg).add_(g_kd.add(p, alpha=wd) if wd else g_kd)
                p.add_(buf, alpha=-lr)
