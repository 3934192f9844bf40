"""A federation's model is fixed at version 0: a changed [model.ml] is refused, not served.

Before, the server built version 0 from [model.ml] once and never looked at the spec again:
changing the model kind or image size went on serving the old weights (and with the same
number of weights nothing would have noticed)."""

from __future__ import annotations

import pytest

from securefl import config
from securefl.errors import ConfigError
from securefl.ml.settings import ModelSpec
from securefl.server.app import Server
from securefl.server.initial import SPEC_FILE

from .conftest import Federation


def _settings(fed: Federation, **spec: object) -> config.ServerSettings:
    return fed.server_settings(model=config.ModelSettings(
        ml=ModelSpec(image_size=32, **spec)))


def test_a_changed_model_spec_or_an_old_store_is_refused_with_what_to_do(
        fed: Federation) -> None:
    Server(_settings(fed)).audit.close()  # builds version 0 ("small") and records its spec
    root = _settings(fed).store_dir
    assert (root / SPEC_FILE).is_file()
    Server(_settings(fed)).audit.close()  # the same spec starts again

    with pytest.raises(ConfigError, match=r"model_kind 'small' -> 'seed'.*start a new "
                                          r"federation: move .* away"):
        Server(_settings(fed, model_kind="seed"))
    with pytest.raises(ConfigError, match=r"seed 0 -> 3"):
        Server(_settings(fed, seed=3))

    (root / SPEC_FILE).unlink()  # a store made by securefl before the model was versioned
    with pytest.raises(ConfigError, match=r"made by an older securefl .* start a new "
                                          "federation"):
        Server(_settings(fed))
