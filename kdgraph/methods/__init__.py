"""The built-in distillation methods, one file each, named here (:func:`builtin_methods`).

Each method file registers its losses, adapters, transforms and data wrappers in
:mod:`kdgraph.methods.registry` when it is imported; :mod:`kdgraph.methods.base` holds the small base classes, :mod:`kdgraph.methods.args`
the argument models. A new method is a new file *and* a line in :func:`builtin_methods` (a test checks that
every file is listed and that the registry holds exactly what the listed files register).
"""
from __future__ import annotations

from types import ModuleType

from .registry import load_builtins_with

__all__ = ["builtin_methods"]


def builtin_methods() -> dict[str, ModuleType]:
    """Import every built-in method (each registers its classes) and return them by file name.

    Imported on the first registry lookup, not with ``import kdgraph`` (the registry imports no method: this
    package hands it this function below).
    """
    from . import at, ce, crd, dist, ft, kd, kr, l2, pad, regression, sskd
    from . import dist_plus, ickd, kd_logit_std, pkt, rkd, skd, spkd, srd
    from . import cckd, connector, dab, fsp, ktaad, vid
    from . import ctkd, dkd, kdsvd, mlkd, nkd, nst, ofd, ttm, wttm
    from . import token_kl
    from . import token_ce, token_jsd, token_rkl, token_skew_kl, token_tvd

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
        "kd_logit_std": kd_logit_std,  # kd_logit_std: KD on z-scored logits (KD w/ LS)
        "dist_plus": dist_plus,  # dist_plus: DIST + channel and spatial feature relations
        "skd": skd,  # skd_instance + skd_direction: streamlined KD (paper / authors' code)
        "srd": srd,  # srd + srd_projector adapter: simple recipe distillation
        "ickd": ickd,  # ickd + ickd_embed adapter: inter-channel correlation
        "pkt": pkt,  # pkt: probabilistic knowledge transfer
        "rkd": rkd,  # rkd: relational KD (distances and angles)
        "spkd": spkd,  # spkd: similarity-preserving KD
        "connector": connector,  # connector: the generic conv(+BN)(+ReLU) / linear adapter (FitNet, DAB, CCKD)
        "fsp": fsp,  # fsp: flow of solution procedure matrices (Yim et al.)
        "dab": dab,  # dab: distillation of activation boundaries (Heo et al.)
        "vid": vid,  # vid + vid_regressor: variational information distillation
        "cckd": cckd,  # cckd: correlation congruence
        "ktaad": ktaad,  # kta, affinity, regularization: knowledge adaptation for segmentation (He et al.)
        "dkd": dkd,  # dkd: decoupled KD (target / non-target terms)
        "nkd": nkd,  # nkd: normalized KD (target term + normalized non-target term)
        "ttm": ttm,  # ttm: transformed teacher matching (power-transformed teacher)
        "wttm": wttm,  # wttm: TTM weighted per sample by the teacher's U_gamma
        "nst": nst,  # nst: neuron selectivity transfer (MMD, polynomial kernel)
        "kdsvd": kdsvd,  # kdsvd: singular-vector relations of consecutive maps
        "ctkd": ctkd,  # ctkd: curriculum temperature (learnable T behind gradient reversal) for kd / dkd
        "mlkd": mlkd,  # mlkd + mlkd_views: multi-level logit distillation on a weak and a strong view
        "ofd": ofd,  # ofd + ofd_connector: overhaul of feature distillation (pre-ReLU, BN margins)
        "token_kl": token_kl,  # token_kl: forward KL per token of a causal LM (masked, globally normalised)
        "token_rkl": token_rkl,  # token_rkl: reverse KL per token (MiniLLM; GKD's beta = 1)
        "token_jsd": token_jsd,  # token_jsd: generalised JSD with beta (GKD, as TRL's generalized_jsd_loss)
        "token_tvd": token_tvd,  # token_tvd: total variation distance per token
        "token_skew_kl": token_skew_kl,  # token_skew_kl: DistiLLM's skew KL / skew reverse KL
        "token_ce": token_ce,  # token_ce: the causal LM's task term, next-token CE with the same mask / normaliser
    }


load_builtins_with(builtin_methods)
