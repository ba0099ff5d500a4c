"""A network too large for this machine's memory is refused before it is built: one paragraph naming the field
and the estimated size (counted on the meta device), exit code 2 from the CLI, nothing allocated."""
from __future__ import annotations

import re
import resource

import pytest
import yaml
from click.testing import CliRunner

from kdgraph.cli import main
from kdgraph.errors import ModelError
from kdgraph.models import build_model, check_fits_in_memory
from kdgraph.spec import ModelRef
from conftest import SPECS


def test_a_billion_classes_is_one_paragraph_and_exit_2(tmp_path):
    spec = yaml.safe_load((SPECS / "fashion_mnist" / "baseline.yaml").read_text())
    spec["student"]["kwargs"]["num_classes"] = 1_000_000_000
    path = tmp_path / "huge.yaml"
    path.write_text(yaml.safe_dump(spec))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = CliRunner().invoke(main, ["compile", str(path)])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and "allocate" not in r.output
    message = " ".join(r.output.split())
    assert "student.kwargs.num_classes = 1,000,000,000" in message
    # fc: 128 features x 1e9 classes + 1e9 biases, plus the ~0.7 M parameters of the rest; float32
    assert re.search(r"would have 129,000,[0-9]{3},[0-9]{3} parameters: 516\.0 GB for its parameters", message), message
    assert "of memory available, so it was not built" in message
    # refused on the meta device: the process did not grow by anything near the model's size
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 500_000  # KiB


def test_the_estimate_is_compared_with_the_memory_available():
    ref = ModelRef(model="torchvision:resnet18", kwargs={"num_classes": 5000})  # 13.7 M parameters, 55 MB
    check_fits_in_memory(ref, "teacher", available=10**9)
    with pytest.raises(ModelError, match=r"^teacher\.kwargs: .* 13,741,512 parameters: 55\.0 MB .* 1\.0 MB of memory "
                                         r"available, so it was not built\. .*teacher\.kwargs\.num_classes = 5,000"):
        check_fits_in_memory(ref, "teacher", available=10**6)
    assert sum(p.numel() for p in build_model(ref, "teacher").parameters()) == 13_741_512
