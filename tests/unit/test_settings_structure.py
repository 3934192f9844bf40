"""Settings in one place, checked by machine: one module parses TOML, one writer makes it.

Why: settings text built by string formatting drifted from the models (a renamed key stayed
in a generator) and broke on paths with quotes; a second parser let the server accept a
``[model.ml]`` typo until a child process tripped over it.  These tests fail if anyone
goes back to either.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from securefl import config
from securefl.errors import ConfigError
from securefl.fedopt import ServerOptSettings
from securefl.ml.settings import MLSettings, ModelSpec

ROOT = Path(__file__).resolve().parents[2]
SCANNED = [ROOT / "securefl", ROOT / "bench", ROOT / "tests"]
THIS = Path(__file__).resolve()

#: Every key a securefl settings file may hold.
KEYS = sorted(
    set().union(*(m.model_fields for m in (
        config.ServerSettings, config.ClientSettings, config.Limits, config.RoundSettings,
        config.ModelSettings, MLSettings, ModelSpec, ServerOptSettings)))
)
_ASSIGNMENT = re.compile(r"(?m)^[ \t]*(" + "|".join(KEYS) + r")[ \t]*=[ \t]*\S")
_TABLE = re.compile(r"(?m)^[ \t]*\[(" + "|".join(KEYS) + r")(\.[\w.]+)?\][ \t]*$")


def _python_files() -> list[Path]:
    return [p for root in SCANNED for p in sorted(root.rglob("*.py")) if p.resolve() != THIS]


def _literal_texts(tree: ast.AST, skip: frozenset[int] | set[int] = frozenset()
                   ) -> list[tuple[int, str]]:
    """Every string literal, f-strings joined with a placeholder for their values."""
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "X" for v in node.values)
            found.append((node.lineno, text))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append((node.lineno, node.value))
    return found


def _hand_built_toml(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    # A docstring may show an example settings file: that is documentation, not a writer.
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef
                                | ast.ClassDef)
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    bad = []
    for lineno, text in _literal_texts(tree, skip=docstrings):
        if _ASSIGNMENT.search(text) or _TABLE.search(text):
            bad.append(f"{path.relative_to(ROOT)}:{lineno}: {text.strip()[:60]!r}")
    return bad


def test_no_settings_file_is_built_by_string_formatting():
    """Settings text is made by ``config.toml_text``/``write_toml`` only (tomli-w)."""
    bad = [hit for path in _python_files() for hit in _hand_built_toml(path)]
    assert not bad, "settings TOML built by hand (use securefl.config.write_toml):\n" + \
        "\n".join(bad)


def test_the_checker_sees_hand_built_toml():
    """The grep above is only worth something if it catches what it is meant to."""
    samples = ['f\'host = "{h}"\\nport = {p}\\n\'', "'[ml]\\nscans_dir = \"x\"\\n'",
               "'\\n[model.ml]\\nimage_size = 32\\n'", "text.replace('port = 9095', 'x')"]
    for sample in samples:
        tree = ast.parse(sample)
        texts = [t for _, t in _literal_texts(tree)]
        assert any(_ASSIGNMENT.search(t) or _TABLE.search(t) for t in texts), sample


def test_only_securefl_config_parses_toml():
    users = sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "securefl").rglob("*.py")
        if re.search(r"\btomllib\b|\btomli\b(?!_w)|\btoml\.loads?\b", p.read_text())
    )
    assert users == ["securefl/config.py"]


def test_model_ml_typo_is_refused_when_server_toml_is_loaded(tmp_path):
    """Before anything listens or spawns a child: the file and the key are named."""
    path = config.write_toml(tmp_path / "server.toml", {
        "cert": "s.pem", "key": "s.key", "ca": "ca.pem", "crl": "crl.pem",
        "model": {"ml": {"image_size": 32, "modle_kind": "small"}},
    })
    with pytest.raises(ConfigError) as info:
        config.load(path, config.ServerSettings)
    assert str(path) in info.value.message and "model.ml.modle_kind" in info.value.message
    config.write_toml(path, {"cert": "s.pem", "key": "s.key", "ca": "ca.pem", "crl": "crl.pem",
                             "model": {"ml": {"image_size": 32, "classes": ["a", "a"]}}})
    with pytest.raises(ConfigError, match=r"model\.ml\.classes"):
        config.load(path, config.ServerSettings)


def test_server_model_spec_is_typed_and_carries_the_classes(tmp_path):
    path = config.write_toml(tmp_path / "server.toml", {
        "cert": "s.pem", "key": "s.key", "ca": "ca.pem", "crl": "crl.pem",
        "model": {"seed": 3, "ml": {"image_size": 32, "classes": ["b", "a"]}},
    })
    model = config.load(path, config.ServerSettings).model
    assert isinstance(model.ml, ModelSpec) and model.classes == ("b", "a")
    assert model.ml_spec() == {"image_size": 32, "channels": 1, "model_kind": "small",
                               "classes": ["b", "a"], "seed": 3}


def test_hospital_ml_table_is_typed_with_paths_from_the_file(tmp_path):
    path = config.write_toml(tmp_path / "kit" / "hospital.toml", {
        "cert": "h.pem", "key": "h.key", "ca": "ca.pem", "state_dir": "state",
        "ml": {"scans_dir": "scans", "model_dir": "model",
               "class_folders": {"glioma": "glioma_tumor"}},
    })
    settings = config.load(path, config.ClientSettings)
    assert isinstance(settings.ml, MLSettings)
    assert settings.ml.scans_dir == tmp_path / "kit" / "scans"
    assert settings.ml.folders == ("glioma_tumor", "meningioma", "notumor", "pituitary")
    assert config.load_ml_settings(path) == settings.ml


def test_hospital_ml_typos_are_refused_naming_file_and_key(tmp_path):
    path = config.write_toml(tmp_path / "hospital.toml", {
        "cert": "h.pem", "key": "h.key", "ca": "ca.pem",
        "ml": {"scans_dir": "s", "model_dir": "m", "epocs": 2},
    })
    with pytest.raises(ConfigError) as info:
        config.load(path, config.ClientSettings)
    assert str(path) in info.value.message and "ml.epocs" in info.value.message
    config.write_toml(path, {"ml": {"scans_dir": "s", "model_dir": "m",
                                    "class_folders": {"gliomaa": "glioma_tumor"}}})
    with pytest.raises(ConfigError, match="gliomaa"):
        config.load_ml_settings(path)


@pytest.mark.parametrize(("data", "new"), [
    ({"data_dir": "state"}, "renamed state_dir"),
    ({"ml": {"data_dir": "scans", "model_dir": "m"}}, "renamed scans_dir"),
])
def test_old_key_names_are_refused_naming_the_new_key(tmp_path, data, new):
    path = config.write_toml(tmp_path / "hospital.toml", data)
    with pytest.raises(ConfigError, match=new):
        config.load(path, config.ClientSettings)
    with pytest.raises(ConfigError, match=new):
        config.load_ml_settings(path)


def test_written_settings_read_back_and_keep_their_comment(tmp_path):
    data = {"host": 'we"ird\\host', "port": 1, "ml": {"scans_dir": tmp_path / "a b"}}
    path = config.write_toml(tmp_path / "x.toml", data, "line one\nline two")
    text = path.read_text()
    assert text.startswith("# line one\n# line two\n")
    assert config.read_toml(path) == {"host": 'we"ird\\host', "port": 1,
                                      "ml": {"scans_dir": str(tmp_path / "a b")}}


def test_the_old_neighbours_setting_is_refused_naming_its_replacement(tmp_path):
    path = config.write_toml(tmp_path / "server.toml", {"round": {"neighbours": 8}})
    with pytest.raises(ConfigError, match=r"\[round\] neighbours was renamed sparse, set to "
                       "true"):
        config.load(path, config.ServerSettings)


@pytest.mark.parametrize(("model", "table"), [
    (config.ServerSettings, "round"),
    (config.ClientSettings, "policy"),
])
def test_secagg_plus_fractions_beyond_the_analysis_are_refused_at_load(tmp_path, model,
                                                                         table):
    """corrupt + 2 x dropout > 0.9 has no safe SecAgg+ graph: said when the file is read,
    not when the first sparse round arrives."""
    base = {"cert": "h.pem", "key": "h.key", "ca": "ca.pem", "crl": "crl.pem"}
    path = config.write_toml(tmp_path / "x.toml", {
        **base, table: {"corrupt_fraction": 0.3, "dropout_fraction": 0.4}})
    with pytest.raises(ConfigError, match=rf"{table}.corrupt_fraction \+ 2 x {table}"
                       r"\.dropout_fraction is 1\.1.*lower one of them"):
        config.load(path, model)
    config.write_toml(path, {**base, table: {"corrupt_fraction": 0.1,
                                             "dropout_fraction": 0.4}})
    loaded = config.load(path, model)
    assert getattr(loaded, table).dropout_fraction == 0.4
