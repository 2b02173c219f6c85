"""The on-demand C++ build path fails with messages that say what to do."""
import pytest

from matta.ops import csrc


def test_missing_source_is_named():
    with pytest.raises(csrc.ExtensionBuildError, match="no_such_file.cpp does not exist"):
        csrc.load_extension("nothing", ("no_such_file.cpp",))


def test_missing_toolchain_is_named(monkeypatch, tmp_path):
    (tmp_path / "op.cpp").write_text("// empty\n")
    monkeypatch.setattr(csrc, "source_dir", lambda: str(tmp_path))
    monkeypatch.setattr(csrc.shutil, "which", lambda tool: None if tool == "ninja" else "/usr/bin/" + tool)
    csrc.load_extension.cache_clear()
    with pytest.raises(csrc.ExtensionBuildError, match="needs ninja on PATH.*pip install ninja"):
        csrc.load_extension("missing_tool_probe", ("op.cpp",))
    assert csrc.missing_toolchain(cuda=True) == ["ninja"]


def test_source_dir_exists():
    assert csrc.source_dir().endswith("csrc")
