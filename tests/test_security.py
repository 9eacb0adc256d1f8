"""Security rules: no file format that runs code on load, API keys from places `ps` does not show and
checked in constant time, and a server that says so when it listens beyond this machine without a key."""

import ast
import hmac
import types
from pathlib import Path

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

import ember.serve.app as app_module
from ember.cli import main
from ember.errors import EmberError
from ember.serve.auth import ENV_KEY, exposure_warning, is_loopback, resolve_api_key

EMBER = Path(__file__).resolve().parent.parent / "ember"

# Modules whose loading runs code from the file: pickle and everything built on it.
PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}


def unsafe_loading(source: str) -> list[str]:
    """Each place in `source` that imports a pickling module, calls torch.load without weights_only=True,
    passes trust_remote_code=True, or loads numpy arrays or pandas frames with pickling allowed."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] in PICKLING_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLING_MODULES:
            found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "load" for a in node.names):
            found.append(f"line {node.lineno}: from torch import load (its calls escape the weights_only check)")
        elif isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            true_kw = {k.arg for k in node.keywords if isinstance(k.value, ast.Constant) and k.value.value is True}
            if func == "torch.load" and "weights_only" not in true_kw:
                found.append(f"line {node.lineno}: torch.load without weights_only=True")
            if "trust_remote_code" in true_kw:
                found.append(f"line {node.lineno}: trust_remote_code=True")
            if "allow_pickle" in true_kw:
                found.append(f"line {node.lineno}: allow_pickle=True")
            if func.endswith("read_pickle") or func in ("yaml.load", "yaml.unsafe_load"):
                found.append(f"line {node.lineno}: {func}")
        elif isinstance(node, ast.Dict):  # **{"trust_remote_code": True}
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and k.value == "trust_remote_code" and \
                        isinstance(v, ast.Constant) and v.value is True:
                    found.append(f"line {node.lineno}: trust_remote_code=True")
    return found


@pytest.mark.parametrize("snippet", [
    "import pickle", "import pickle as p", "from pickle import loads", "import cloudpickle", "import joblib.numpy_pickle",
    "torch.load(f)", "torch.load(f, weights_only=False)", "torch.load(f, map_location='cpu')",
    "from torch import load", "AutoModel.from_pretrained(p, trust_remote_code=True)",
    "f(**{'trust_remote_code': True})", "np.load(f, allow_pickle=True)", "pd.read_pickle(f)", "yaml.load(s)",
])
def test_the_scanner_catches_each_way_of_loading_code(snippet):
    assert unsafe_loading(snippet), snippet


def test_the_scanner_passes_safe_loading():
    assert unsafe_loading("torch.load(f, map_location='cpu', weights_only=True)\nnp.load(f)\n"
                          "yaml.safe_load(s)\nfrom_pretrained(p, trust_remote_code=False)\n# import pickle\n") == []


def test_no_ember_module_loads_files_that_can_run_code():
    files = sorted(EMBER.rglob("*.py"))
    assert len(files) > 50  # the whole package, not an empty folder
    problems = [f"{f.relative_to(EMBER.parent)} {p}" for f in files for p in unsafe_loading(f.read_text())]
    assert problems == []


# --- API keys ---------------------------------------------------------------------------------------
def test_key_sources_and_their_order(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    env = {ENV_KEY: "from-env"}
    assert resolve_api_key(None, None, environ={}) is None
    assert resolve_api_key(None, None, environ=env) == "from-env"
    assert resolve_api_key("from-flag", None, environ=env) == "from-flag"
    assert resolve_api_key(None, key_file, environ=env) == "from-file"  # the trailing newline is not the key
    with pytest.raises(EmberError, match="not both"):
        resolve_api_key("a", key_file, environ={})
    with pytest.raises(EmberError, match="does not exist"):
        resolve_api_key(None, tmp_path / "missing", environ={})
    key_file.write_text("  \n")
    with pytest.raises(EmberError, match="empty"):
        resolve_api_key(None, key_file, environ={})
    with pytest.raises(EmberError, match=f"{ENV_KEY} is empty"):
        resolve_api_key(None, None, environ={ENV_KEY: ""})


def fake_serving(monkeypatch) -> dict:
    """`ember serve` up to the point where it would load a model and listen: what it was given."""
    seen = {}

    class FakeLLM:
        def __init__(self, model, **kwargs):
            self.pool_size = types.SimpleNamespace(describe=lambda: "pool")
            self.max_model_len = 16

    monkeypatch.setattr("ember.engine.LLM", FakeLLM)
    monkeypatch.setattr(app_module, "create_app", lambda llm, name, api_key, *a: seen.update(api_key=api_key))
    monkeypatch.setattr(app_module.uvicorn, "run", lambda app, host, **kw: seen.update(host=host))
    return seen


def test_serve_takes_its_key_from_the_environment_or_a_file(monkeypatch, tmp_path, capsys):
    seen = fake_serving(monkeypatch)
    monkeypatch.setenv(ENV_KEY, "secret-env")
    assert main(["serve", "--model", str(tmp_path), "--embedding-model", "none"]) == 0
    assert seen == {"api_key": "secret-env", "host": "127.0.0.1"}  # loopback unless told otherwise
    (tmp_path / "key.txt").write_text("secret-file\n")
    assert main(["serve", "--model", str(tmp_path), "--api-key-file", str(tmp_path / "key.txt")]) == 0
    assert seen["api_key"] == "secret-file"
    assert main(["serve", "--model", str(tmp_path), "--api-key", "a", "--api-key-file", str(tmp_path / "key.txt")]) == 1
    assert "not both" in capsys.readouterr().err


def test_serve_warns_when_it_listens_beyond_this_machine_without_a_key(monkeypatch, tmp_path, capsys):
    fake_serving(monkeypatch)
    monkeypatch.delenv(ENV_KEY, raising=False)
    assert main(["serve", "--model", str(tmp_path), "--host", "0.0.0.0"]) == 0
    assert "without an API key" in capsys.readouterr().err
    for host, key in (("127.0.0.1", None), ("0.0.0.0", "k")):
        assert main(["serve", "--model", str(tmp_path), "--host", host] + (["--api-key", key] if key else [])) == 0
        assert "without an API key" not in capsys.readouterr().err
    assert is_loopback("localhost") and is_loopback("::1") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("example.com")
    assert exposure_warning("192.168.1.5", None) is not None and exposure_warning("192.168.1.5", "k") is None


def test_the_server_checks_keys_with_compare_digest(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    app = FastAPI()
    app.state.server = types.SimpleNamespace(api_key="s3cret")

    @app.get("/probe", dependencies=[Depends(app_module.require_key)])
    def probe():
        return {"ok": True}

    @app.exception_handler(app_module.APIError)
    async def refused(request, e):
        from fastapi.responses import JSONResponse
        return JSONResponse(e.body(), status_code=e.status)

    client = TestClient(app)
    assert client.get("/probe", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/probe", headers={"Authorization": "Bearer s3creX"}).status_code == 401
    assert client.get("/probe").status_code == 401
    assert [b for _, b in calls] == [b"Bearer s3cret", b"Bearer s3cret"]  # both headers went through it
