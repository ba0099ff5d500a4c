"""The built-in methods are named in one list (kdgraph.methods.builtin_methods), and the registry holds exactly
what those files register: a method file that is not listed, or a listed file that registers nothing, fails."""
from __future__ import annotations

import json
import subprocess
import sys

from kdgraph import methods
from kdgraph.methods.registry import ADAPTERS, DATA_WRAPPERS, LOSSES, TRANSFORMS
from conftest import ROOT

REGISTRIES = {"loss": LOSSES, "adapter": ADAPTERS, "transform": TRANSFORMS, "data wrapper": DATA_WRAPPERS}

# written out by hand: what the built-in method files register (an independent record of the list's effect)
EXPECTED = {
    "loss": {"cross_entropy", "kd", "at", "mse", "regression_mse", "ft", "hcl", "crd", "dist", "pad_l2", "aux_sskd",
             "sskd_kd", "sskd_ss", "sskd_tf",
             "kd_logit_std", "dist_plus", "skd_instance", "skd_direction", "srd", "ickd", "pkt", "rkd", "spkd"}
    | {"fsp", "dab", "vid", "cckd", "kta", "affinity", "regularization"}  # issue 21 (td_b)
    | {"dkd", "nkd", "ttm", "wttm", "nst", "kdsvd", "ofd", "mlkd"}  # issue 22
    | {"token_kl"}  # issue 25
    | {"token_rkl", "token_jsd", "token_tvd", "token_skew_kl", "token_ce"},  # issue 25 (lm_loss)
    "adapter": {"ft_encoder", "ft_decoder", "ft_translator", "abf", "crd_head", "pad_variance", "sskd_head",
                "srd_projector", "ickd_embed"}
    | {"connector", "vid_regressor"}  # issue 21 (td_b)
    | {"ofd_connector", "ctkd"},  # issue 22
    "transform": {"sskd_rotations", "mlkd_views"},
    "data wrapper": {"crd"},
}


def _builtin_entries() -> dict[str, dict[str, str]]:
    """kind -> {name: the kdgraph.methods module that registered it} (user registrations left out)."""
    for reg in REGISTRIES.values():
        reg.names()  # loads the built-in methods
    return {kind: {name: obj.__module__ for name, obj in reg._entries.items()
                   if obj.__module__.startswith("kdgraph.methods.")} for kind, reg in REGISTRIES.items()}


def test_every_method_file_is_listed():
    files = {p.stem for p in (ROOT / "kdgraph" / "methods").glob("*.py")} - {"__init__", "base", "args", "registry", "progress", "token_base", "token_sparse"}
    assert set(methods.builtin_methods()) == files


def test_registry_holds_what_the_listed_methods_register():
    listed = {m.__name__ for m in methods.builtin_methods().values()}
    entries = _builtin_entries()
    assert {kind: set(e) for kind, e in entries.items()} == EXPECTED
    registering = {module for e in entries.values() for module in e.values()}
    assert registering == listed  # every listed file registers something, nothing else under methods/ does


def test_methods_load_on_first_lookup_not_on_import():
    code = ("import json, sys, kdgraph; from kdgraph.methods.registry import LOSSES\n"
            "before = sorted(m for m in sys.modules if m.startswith('kdgraph.methods.'))\n"
            "LOSSES.get('kd')\n"
            "after = sorted(m for m in sys.modules if m.startswith('kdgraph.methods.'))\n"
            "print(json.dumps([before, after]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after = json.loads(out.stdout)
    assert before == ["kdgraph.methods.base", "kdgraph.methods.registry"]  # what kdgraph re-exports, no method
    assert set(after) == {f"kdgraph.methods.{n}" for n in [*methods.builtin_methods(), "base", "args", "registry", "token_base", "token_sparse"]}
