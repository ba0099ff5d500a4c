"""The built-in distillation methods, one file each, named here (:func:`builtin_methods`).

Each method file registers its losses, adapters, transforms and data wrappers in :mod:`kdgraph.registry`
when it is imported; :mod:`kdgraph.methods.base` holds the small base classes, :mod:`kdgraph.methods.args`
the argument models. A new method is a new file *and* a line in :func:`builtin_methods` (a test checks that
every file is listed and that the registry holds exactly what the listed files register).
"""
from __future__ import annotations

from types import ModuleType

__all__ = ["builtin_methods"]


def builtin_methods() -> dict[str, ModuleType]:
    """Import every built-in method (each registers its classes) and return them by file name.

    Imported on the first registry lookup, not with ``import kdgraph``.
    """
    from . import at, ce, crd, ctkd, dist, dkd, ft, kd, kdsvd, kr, l2, mlkd, nkd, nst, ofd, pad, regression, sskd, ttm, wttm

    return {
        "ce": ce,  # cross_entropy: the hard-label term
        "kd": kd,  # kd: Hinton et al., soft targets at a temperature
        "at": at,  # at: attention transfer (Zagoruyko & Komodakis)
        "l2": l2,  # mse: feature regression (FitNets-style, with an adapter; reduction mean or sum)
        "regression": regression,  # regression_mse: the task loss of a one-output regression head (STS-B)
        "ft": ft,  # ft: factor transfer (paraphraser / translator)
        "kr": kr,  # abf + hcl: knowledge review
        "crd": crd,  # crd: contrastive representation distillation (memory bank, data wrapper)
        "dist": dist,  # dist: DIST, inter- and intra-class correlation
        "pad": pad,  # pad_l2: prime-aware adaptive distillation (variance head)
        "sskd": sskd,  # sskd_*: self-supervised KD (rotations transform, heads, four terms)
        "dkd": dkd,  # dkd: decoupled KD (target / non-target terms)
        "nkd": nkd,  # nkd: normalized KD (target term + normalized non-target term)
        "ttm": ttm,  # ttm: transformed teacher matching (power-transformed teacher)
        "wttm": wttm,  # wttm: TTM weighted per sample by the teacher's U_gamma
        "nst": nst,  # nst: neuron selectivity transfer (MMD, polynomial kernel)
        "kdsvd": kdsvd,  # kdsvd: singular-vector relations of consecutive maps
        "ctkd": ctkd,  # ctkd: curriculum temperature (learnable T behind gradient reversal) for kd / dkd
        "mlkd": mlkd,  # mlkd + mlkd_views: multi-level logit distillation on a weak and a strong view
        "ofd": ofd,  # ofd + ofd_connector: overhaul of feature distillation (pre-ReLU, BN margins)
    }
