"""Security: what the package loads, executes and imports on behalf of files it is given.

- Checkpoints are read only via safetensors or ``torch.load(weights_only=True)``: a static
  check over the package source (AST, so strings and ``model.eval()`` do not count) finds no
  unrestricted unpickling, no ``eval``/``exec``/``compile``, no unsafe YAML, no
  ``trust_remote_code=True``. The checker itself is tested on bad snippets.
- A pickle carrying a payload is refused by every loader that can meet one (converter, own
  checkpoint format, gRefCOCO) and the payload never runs.
- A model directory is data: a ``tokenizer_config.json`` with ``auto_map`` plus a ``.py``
  file, or a model name that is also an importable module, never executes code.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

PACKAGE = Path(__file__).resolve().parent.parent / "gsva_ros"

# Dotted call names that deserialize or execute arbitrary data.
FORBIDDEN_CALLS = {
    "eval", "exec", "compile", "__import__",
    "pickle.load", "pickle.loads", "pickle.Unpickler",
    "_pickle.load", "_pickle.loads", "cPickle.load", "cPickle.loads",
    "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads",
    "joblib.load", "marshal.load", "marshal.loads", "shelve.open",
    "yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all",
    "runpy.run_path", "runpy.run_module",
}
# Data-driven imports that are reviewed: (file, function) → why it is acceptable.
REVIEWED_DYNAMIC_IMPORTS = {
    ("gsva_ros/cli/main.py", "build_parser"): "module names come from the COMMANDS table",
    ("gsva_ros/bag/io.py", "message_class"):
        "bag message type 'pkg/msg/Name' → import of the installed interface module pkg.msg",
}


class _Scanner(ast.NodeVisitor):
    """Find unsafe calls in one module (aliases such as ``import pickle as p`` resolved)."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.aliases: dict[str, str] = {}
        self.problems: list[str] = []
        self._functions: list[ast.AST] = []

    # ---------------------------------------------------------------- names
    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self.aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(
                ".")[0]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for a in node.names:
            self.aliases[a.asname or a.name] = f"{node.module}.{a.name}"

    def _dotted(self, func: ast.AST) -> str | None:
        parts = []
        while isinstance(func, ast.Attribute):
            parts.append(func.attr)
            func = func.value
        if not isinstance(func, ast.Name):
            return None
        parts.append(self.aliases.get(func.id, func.id))
        return ".".join(reversed(parts))

    # ---------------------------------------------------------------- scopes
    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._functions.append(node)
        self.generic_visit(node)
        self._functions.pop()

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def _where(self, node: ast.AST) -> str:
        func = self._functions[-1].name if self._functions else "<module>"
        return f"{self.filename}:{node.lineno} in {func}"

    def _dict_literal_of(self, name: str) -> ast.Dict | None:
        """The dict literal assigned to ``name`` in the enclosing function (``**kwargs``)."""
        scope = self._functions[-1] if self._functions else None
        for node in ast.walk(scope) if scope is not None else ():
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and any(
                isinstance(t, ast.Name) and t.id == name for t in node.targets
            ):
                return node.value
        return None

    def _weights_only_true(self, call: ast.Call) -> bool:
        for kw in call.keywords:
            if kw.arg == "weights_only":
                return isinstance(kw.value, ast.Constant) and kw.value.value is True
            if kw.arg is None and isinstance(kw.value, ast.Name):
                d = self._dict_literal_of(kw.value.id)
                if d is not None:
                    for k, v in zip(d.keys, d.values, strict=True):
                        if isinstance(k, ast.Constant) and k.value == "weights_only":
                            return isinstance(v, ast.Constant) and v.value is True
        return False

    # ---------------------------------------------------------------- calls
    def visit_Call(self, node: ast.Call) -> None:
        name = self._dotted(node.func)
        if name == "torch.load" and not self._weights_only_true(node):
            self.problems.append(f"{self._where(node)}: torch.load without weights_only=True")
        if name in FORBIDDEN_CALLS:
            self.problems.append(f"{self._where(node)}: {name}()")
        for kw in node.keywords:
            unsafe = {"trust_remote_code": True, "allow_pickle": True, "shell": True}
            if kw.arg in unsafe and isinstance(kw.value, ast.Constant) and kw.value.value is True:
                self.problems.append(f"{self._where(node)}: {kw.arg}=True")
        if name in ("importlib.import_module", "importlib.__import__") and not (
            node.args and isinstance(node.args[0], ast.Constant)
        ):
            func = self._functions[-1].name if self._functions else "<module>"
            if (self.filename, func) not in REVIEWED_DYNAMIC_IMPORTS:
                self.problems.append(f"{self._where(node)}: unreviewed data-driven import")
        self.generic_visit(node)


def scan(source: str, filename: str = "<snippet>") -> list[str]:
    scanner = _Scanner(filename)
    scanner.visit(ast.parse(source, filename))
    return scanner.problems


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


# ===================================================================== static checks
def test_package_source_has_no_unsafe_deserialization_or_code_execution():
    files = package_files()
    assert len(files) > 20, "the package was not found"
    problems = []
    for path in files:
        rel = path.relative_to(PACKAGE.parent).as_posix()
        problems += scan(path.read_text(encoding="utf-8"), rel)
    assert not problems, "\n".join(problems)


def test_every_torch_load_in_the_package_is_restricted_to_tensors():
    """Belt and braces for the AST check: every textual torch.load( sits in a call the scanner
    accepted, so a call the scanner cannot see (e.g. via getattr) would show up here."""
    calls = 0
    for path in package_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and (
                node.func.attr == "load" and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                calls += 1
        text = path.read_text(encoding="utf-8")
        assert "getattr(torch" not in text, f"{path}: dynamic torch attribute access"
    assert calls >= 2  # converter and training resume: the scanner really saw them


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load('x.pt')",
        "import torch\ntorch.load('x.pt', weights_only=False)",
        "import torch as T\nT.load('x.pt', map_location='cpu')",
        "from torch import load\nload('x.pt')",
        "def f(p):\n    import torch\n    kw = {'weights_only': False}\n    torch.load(p, **kw)",
        "import pickle\npickle.loads(b'')",
        "import pickle as p\np.load(open('f', 'rb'))",
        "from pickle import load\nload(open('f', 'rb'))",
        "import yaml\nyaml.load(open('f'))",
        "import numpy as np\nnp.load('a.npy', allow_pickle=True)",
        "eval(text)",
        "exec(code)",
        "compile(src, 'f', 'exec')",
        "import joblib\njoblib.load('m.pkl')",
        "from transformers import AutoTokenizer\n"
        "AutoTokenizer.from_pretrained(d, trust_remote_code=True)",
        "import importlib\ndef load(name):\n    return importlib.import_module(name)",
    ],
)
def test_the_scanner_flags_unsafe_code(snippet):
    assert scan(snippet), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load('x.pt', map_location='cpu', weights_only=True)",
        "def f(p):\n    import torch\n    kw = {'map_location': 'cpu', 'weights_only': True}\n"
        "    return torch.load(p, **kw)",
        "model.eval()",
        "msg = 'never call pickle.load(f) or eval(x)'",
        "import yaml\nyaml.safe_load(open('f'))",
        "import pickle\nexcept_type = pickle.UnpicklingError",
    ],
)
def test_the_scanner_accepts_safe_code(snippet):
    assert not scan(snippet), snippet


# ===================================================================== pickles with a payload
class Payload:
    """Unpickling this runs ``os.system("touch MARKER")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.fixture
def evil_pickle(tmp_path) -> tuple[Path, Path]:
    """(a torch.save file whose unpickling would create the marker, the marker path)."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "x": Payload(marker)}, path)
    return path, marker


def test_the_payload_is_live(evil_pickle):
    """Guards the tests below: an unrestricted load of the file really runs the payload."""
    path, marker = evil_pickle
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_torch_load_as_used_by_the_package_refuses_the_payload(evil_pickle):
    """The exact call of training resume (``train_state.pt``) and of the converter."""
    import pickle

    path, marker = evil_pickle
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, map_location="cpu", weights_only=True)
    assert not marker.exists()


@pytest.mark.parametrize("layout", ["file", "hf-folder", "sharded-index"])
def test_converter_refuses_a_pickle_payload_in_every_weight_layout(evil_pickle, tmp_path, layout):
    from gsva_ros.model.convert import ConversionError, _open_weights

    path, marker = evil_pickle
    if layout == "file":
        target = path
    else:
        target = tmp_path / "llava"
        target.mkdir()
        if layout == "hf-folder":
            shutil.copy(path, target / "pytorch_model.bin")
        else:
            shutil.copy(path, target / "pytorch_model-00001-of-00001.bin")
            (target / "pytorch_model.bin.index.json").write_text(json.dumps(
                {"weight_map": {"weight": "pytorch_model-00001-of-00001.bin"}}))
    with ExitStack() as stack, pytest.raises(ConversionError, match="refusing to unpickle"):
        _open_weights(target, stack)
    assert not marker.exists()


def test_own_checkpoint_loader_refuses_a_pickle_named_safetensors(
    evil_pickle, tiny_model_dir, tmp_path
):
    from gsva_ros.model.checkpoint import CheckpointError, load_checkpoint

    path, marker = evil_pickle
    d = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    shutil.copy(path, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(d)
    assert not marker.exists()


@pytest.mark.parametrize("as_file", [False, True], ids=["folder", "p-file"])
def test_grefcoco_loader_refuses_the_pickled_refs(evil_pickle, tmp_path, as_file):
    from gsva_ros.data.grefcoco import GRefCOCOError, load_grefcoco

    path, marker = evil_pickle
    root = tmp_path / "grefcoco"
    root.mkdir()
    shutil.copy(path, root / "grefs(unc).p")
    (root / "instances.json").write_text('{"images": [], "annotations": []}')
    with pytest.raises(GRefCOCOError, match="pickle files are not loaded"):
        load_grefcoco(root / "grefs(unc).p" if as_file else root)
    assert not marker.exists()


# ===================================================================== model directories are data
def _remote_code_model(tiny_model_dir: Path, d: Path) -> Path:
    """A copy of the tiny model whose tokenizer asks for custom code that creates a marker."""
    shutil.copytree(tiny_model_dir, d)
    marker = d.parent / "remote_code_ran"
    (d / "tokenization_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('pwned')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    config = json.loads((d / "tokenizer_config.json").read_text())
    config.update(
        tokenizer_class="EvilTokenizer",
        trust_remote_code=True,
        auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer",
                                    "tokenization_evil.EvilTokenizer"]},
    )
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return marker


def test_tokenizer_custom_code_in_a_model_directory_is_not_run(tiny_model_dir, tmp_path):
    from gsva_ros.model.checkpoint import CheckpointError, load_checkpoint, load_tokenizer

    d = tmp_path / "model"
    marker = _remote_code_model(tiny_model_dir, d)
    with pytest.raises(CheckpointError, match="custom code"):
        load_tokenizer(d)
    with pytest.raises(CheckpointError):
        load_checkpoint(d)
    assert not marker.exists()
    assert "tokenization_evil" not in sys.modules


def test_tokenizer_custom_code_is_not_run_even_if_stdin_says_yes(tiny_model_dir, tmp_path):
    d = tmp_path / "model"
    marker = _remote_code_model(tiny_model_dir, d)
    code = ("import sys\nfrom gsva_ros.model.checkpoint import load_tokenizer\n"
            "try:\n    load_tokenizer(sys.argv[1])\nexcept Exception as exc:\n"
            "    print(type(exc).__name__, exc)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(d)], input="y\n", text=True,
                          capture_output=True, timeout=120)
    assert not marker.exists(), "the model directory's tokenization_evil.py was executed"
    assert "Do you wish to run the custom code" not in proc.stdout + proc.stderr


def test_load_tokenizer_passes_trust_remote_code_false(monkeypatch, tmp_path):
    from transformers import AutoTokenizer

    from gsva_ros.model.checkpoint import load_tokenizer

    seen = {}

    def fake_from_pretrained(*args, **kwargs):
        seen.update(kwargs)
        return "tokenizer"

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fake_from_pretrained)
    assert load_tokenizer(tmp_path) == "tokenizer"
    assert seen.get("trust_remote_code") is False


def test_model_config_cannot_request_custom_code(tiny_model_dir, tmp_path):
    from gsva_ros.model.checkpoint import CheckpointError, load_checkpoint

    d = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    config = json.loads((d / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unknown GSVA config fields: auto_map"):
        load_checkpoint(d)


def test_a_model_name_that_is_an_importable_module_is_never_imported(
    tmp_path, monkeypatch
):
    from gsva_ros.engine import GSVAEngine
    from gsva_ros.model.checkpoint import CheckpointError

    marker = tmp_path / "imported"
    (tmp_path / "evil_model_mod.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('pwned')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("GSVA_ROS_MODELS", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for model in ("evil_model_mod", "evil_model_mod.py", "./evil_model_mod.py"):
        with pytest.raises(CheckpointError):
            GSVAEngine(model, device="cpu")
    assert not marker.exists()
    assert "evil_model_mod" not in sys.modules
