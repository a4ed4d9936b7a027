"""What bench/gpu_carry.py decides to carry to the GPU image (computed from this venv's metadata)."""
import pytest
from packaging.requirements import Requirement

from bench.gpu_carry import NOT_CARRIED, closure, image_packages, marker_environment, runtime_roots

PY312 = marker_environment("3.12.3")


def test_extras_are_followed_only_where_asked():
    plain = closure([Requirement("ray")], PY312, skip=set())
    serve = closure([Requirement("ray[serve]")], PY312, skip=set())
    assert "ray" in plain and "fastapi" not in plain and "starlette" not in plain
    assert {"fastapi", "starlette", "uvicorn", "pydantic"} <= serve.keys()
    assert {"httptools", "websockets", "watchfiles"} <= serve.keys()  # ray[serve] asks uvicorn[standard]
    assert serve["ray"] == plain["ray"]


def test_skipped_distributions_and_what_only_they_need_are_left_out():
    serve = closure([Requirement("ray[serve]")], PY312, skip=set())
    without = closure([Requirement("ray[serve]")], PY312, skip={"virtualenv", "pydantic"})
    assert {"virtualenv", "distlib", "pydantic"} <= serve.keys()
    assert not {"virtualenv", "distlib", "pydantic", "pydantic-core"} & without.keys()


def test_markers_are_evaluated_for_the_target_python():
    # aiohttp needs async-timeout below 3.11 (not installed in this venv) and typing_extensions below 3.13
    assert "typing-extensions" in closure([Requirement("aiohttp")], PY312, skip=set())
    py313 = marker_environment("3.13.0")
    assert "typing-extensions" not in closure([Requirement("aiohttp")], py313, skip=set())
    py310 = marker_environment("3.10.0")
    with pytest.raises(SystemExit, match="async-timeout"):
        closure([Requirement("aiohttp")], py310, skip=set())


def test_runtime_closure_carries_the_services_stack_and_not_what_the_image_runs_instead():
    roots = runtime_roots()
    assert any(r.name == "ray" and r.extras == {"serve"} for r in roots)
    versions = closure(roots, PY312, skip=NOT_CARRIED)
    assert not NOT_CARRIED & versions.keys()
    assert {"soundfile", "soxr", "faiss-cpu", "starlette", "python-multipart", "ray", "librosa"} <= versions.keys()
    assert "resampy" in versions  # torchcrepe's own requirement, though torchcrepe is copied


def test_image_package_list_is_read_from_the_device_notes(tmp_path):
    notes = tmp_path / "KINDS.md"
    notes.write_text("intro\nthe image holds these. Packages: absl-py, Jinja2, typing_extensions, torch.\nmore\n")
    assert image_packages(notes) == {"absl-py", "jinja2", "typing-extensions", "torch"}
