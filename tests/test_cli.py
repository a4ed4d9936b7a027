"""The `rvc-serve` commands that need no Ray: demo assets and the voice registry."""
import json

import pytest

from deployments.cli import main as cli_main
from deployments.settings import hash_key
from pipeline.hubert import load_hubert
from pipeline.index import load_index
from pipeline.synthesizer import load_voice


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo")
    assert cli_main(["demo-assets", str(path), "--seed", "3"]) == 0
    return path


def test_demo_assets_are_real_formats(demo_dir, capsys):
    voice = load_voice(demo_dir / "voices" / "demo" / "model.pth")
    assert (voice.version, voice.sample_rate, voice.f0) == ("v2", 40000, True)
    assert "DEMO" in voice.info
    index = load_index(demo_dir / "voices" / "demo" / "added.index")
    assert index.dim == 768 and index.vectors.shape[0] > 500
    load_hubert(demo_dir / "hubert_base.pt")


def test_models_add_validates_and_registers(demo_dir, tmp_path, capsys):
    pth, index = demo_dir / "voices" / "demo" / "model.pth", demo_dir / "voices" / "demo" / "added.index"
    data = tmp_path / "data"
    assert cli_main(["models", "add", "alice", "--pth", str(pth), "--index", str(index),
                     "--data-dir", str(data)]) == 0
    assert "registered alice: v2, 40000 Hz, f0, with index" in capsys.readouterr().out
    meta = json.loads((data / "voices" / "alice" / "meta.json").read_text())
    assert meta  # the registry's own record
    assert cli_main(["models", "add", "alice", "--pth", str(pth), "--data-dir", str(data)]) == 2
    assert cli_main(["models", "add", "../evil", "--pth", str(pth), "--data-dir", str(data)]) == 2
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    assert cli_main(["models", "add", "bob", "--pth", str(bad), "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert "bad.pth" in err
    assert not (data / "voices" / "bob").exists()


def test_models_add_with_an_owner_never_shows_the_key(demo_dir, tmp_path, capsys, monkeypatch):
    pth, data = demo_dir / "voices" / "demo" / "model.pth", tmp_path / "data"
    key = "owner-secret-key-0123456789"
    key_file = tmp_path / "owner.key"
    key_file.write_text(f"# the owner\n{key}\n")

    def owner(model_id: str) -> str | None:
        return json.loads((data / "voices" / model_id / "meta.json").read_text()).get("owner")

    assert cli_main(["models", "add", "mine", "--pth", str(pth), "--owner-key-file", str(key_file),
                     "--data-dir", str(data)]) == 0
    monkeypatch.setenv("OWNER_KEY", key)
    assert cli_main(["models", "add", "mine-too", "--pth", str(pth), "--owner-key-env", "OWNER_KEY",
                     "--data-dir", str(data)]) == 0
    assert cli_main(["models", "add", "shared", "--pth", str(pth), "--public", "--data-dir", str(data)]) == 0
    assert owner("mine") == owner("mine-too") == hash_key(key) and owner("shared") is None
    out = capsys.readouterr()
    assert f"owned by tenant {hash_key(key)[:12]}" in out.out and "public" in out.out
    assert key not in out.out + out.err

    two_keys = tmp_path / "two.key"
    two_keys.write_text("k1\nk2\n")
    for args in (["--owner-key-file", str(two_keys)], ["--owner-key-file", str(tmp_path / "absent")],
                 ["--owner-key-env", "NO_SUCH_VARIABLE_SET"]):
        assert cli_main(["models", "add", "refused", "--pth", str(pth), *args, "--data-dir", str(data)]) == 2
    assert "exactly one API key" in capsys.readouterr().err
    assert not (data / "voices" / "refused").exists()
    with pytest.raises(SystemExit):  # one visibility only
        cli_main(["models", "add", "x", "--pth", str(pth), "--public", "--owner-key-file", str(key_file)])
