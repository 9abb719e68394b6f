"""Packaging rules users rely on: installing an extra never pins what a user's stack may need newer, and the
package never asks pip to replace an installed torch."""

import pathlib
import re
import tomllib

PYPROJECT = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"


def _project():
    return tomllib.loads(PYPROJECT.read_text())["project"]


def test_user_facing_extras_take_ranges_not_exact_pins():
    extras = _project()["optional-dependencies"]
    for name in ("trl", "verl", "liger"):
        for req in extras[name]:
            assert "==" not in req, f"[{name}] pins {req!r}: `pip install rlvr-kernels[{name}]` with a newer peer fails"
            assert re.search(r">=", req), f"[{name}] {req!r} should state the lowest tested version"


def test_torch_requirement_has_no_upper_bound_and_admits_the_tested_build():
    (torch_req,) = [r for r in _project()["dependencies"] if r.startswith("torch")]
    assert "<" not in torch_req and "==" not in torch_req
    low = tuple(int(p) for p in re.search(r">=\s*([\d.]+)", torch_req).group(1).split("."))
    assert low <= (2, 13, 0)


def test_exact_pins_only_in_test_and_bench():
    extras = _project()["optional-dependencies"]
    for name, reqs in extras.items():
        if name in ("test", "bench"):
            continue
        assert not any("==" in r for r in reqs), name
