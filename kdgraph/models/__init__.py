"""Where networks come from: a spec's model reference -> ``nn.Module``, and its weights.

:mod:`~kdgraph.models.build` (torchvision, timm, hf, the zoo, registered models, and with consent
``package.module:factory``), :mod:`~kdgraph.models.zoo` (small ResNets for small images; specs name them
``kdgraph.zoo:NAME``), :mod:`~kdgraph.models.timm_support` and :mod:`~kdgraph.models.hf_support`,
:mod:`~kdgraph.models.weights` (files, ``cache:NAME``, torchvision enums) over :mod:`~kdgraph.models.weightio`
(verified reading and writing), and :mod:`~kdgraph.models.trust` (consent to import code a spec names).
Below the capture: nothing here knows how a network is traced.
"""
from .build import REGISTERED_MODELS, build_model, check_fits_in_memory, register_model
from .weights import load_weights

__all__ = ["build_model", "check_fits_in_memory", "register_model", "REGISTERED_MODELS", "load_weights"]
