"""WTTM: weighted transformed teacher matching (TTM with each sample weighted by the teacher's U_gamma).

K. Zheng, E.-H. Yang, "Knowledge Distillation Based on Transformed Teacher Matching", ICLR 2024,
https://arxiv.org/abs/2402.11148 (code: zkxufo/TTM, ``distiller_zoo/wttm.py``)

A sample whose teacher prediction is smooth (large ``U_gamma(p_t) = sum_k p_t,k^gamma``) counts more::

    L_WTTM = 1/B sum_i U_gamma(p_t,i) * KL( p_t,i^gamma / U_gamma(p_t,i)  ||  softmax(z_s,i) )

Spec (the ImageNet gamma and weight of the published 72.19 are not in the paper or repository; see
specs/wttm_resnet18.yaml)::

    - {name: ce, type: cross_entropy, weight: 1.0}
    - {name: wttm, type: wttm, weight: 1.0, args: {gamma: 0.2}}
"""
from __future__ import annotations

import torch

from .registry import register_loss
from .ttm import TTMLoss, transformed_kl


@register_loss("wttm")
class WTTMLoss(TTMLoss):
    """``mean_i U_gamma(p_t,i) * KL(p_t,i^gamma normalised || softmax(z_s,i))``: TTM weighted per sample."""

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        kl, norm = transformed_kl(student, teacher, self.gamma)
        return (norm * kl).mean()
