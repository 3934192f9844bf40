"""Classes are part of the federation's model: every version carries the class names in
order, and a hospital whose ``[ml] classes`` are in another order is refused (naming both
lists) before it trains or sends — over real TLS, with real training.  Also: a hospital with
the older folder names maps them in ``[ml.class_folders]`` and takes part normally."""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from securefl import config
from securefl.client.hospital import Hospital
from securefl.client.session import AdminSession
from securefl.errors import DataError
from securefl.ml.settings import DEFAULT_CLASSES, MLSettings, ModelSpec
from securefl.server.store import MAGIC, ModelStore

from .conftest import Federation, running

SIZE = 32
SWAPPED = ("meningioma", "glioma", "notumor", "pituitary")
OLD_FOLDERS = {"glioma": "glioma_tumor", "meningioma": "meningioma_tumor",
               "notumor": "no_tumor", "pituitary": "pituitary_tumor"}


def _scans(root: Path, per_class: int = 3) -> Path:
    """A small scan folder with the older folder names (what many sites still have)."""
    rng = np.random.default_rng(1)
    for split in ("Training", "Testing"):
        for i, folder in enumerate(OLD_FOLDERS.values()):
            (root / split / folder).mkdir(parents=True)
            for k in range(per_class):
                px = rng.integers(0, 60, (SIZE, SIZE), dtype=np.uint8) + 40 * i
                Image.fromarray(px, "L").save(root / split / folder / f"{k}.png")
    return root


def _ml(tmp: Path, classes: tuple[str, ...] = DEFAULT_CLASSES) -> MLSettings:
    return MLSettings(scans_dir=tmp / "scans", model_dir=tmp / "model", image_size=SIZE,
                      model_kind="small", classes=classes, batch_size=8, augment=False,
                      min_validation_per_class=1,
                      class_folders=OLD_FOLDERS)


def _server(fed: Federation) -> config.ServerSettings:
    return fed.server_settings(model=config.ModelSettings(
        ml=ModelSpec(image_size=SIZE, model_kind="small")))


def test_other_class_order_is_refused_before_train_and_send(fed: Federation) -> None:
    tmp = fed.tmp
    _scans(tmp / "scans")

    async def scenario() -> None:
        async with running(_server(fed)) as srv:
            settings = fed.client_settings("a", srv.port, state_dir=tmp / "state")
            right = Hospital(settings, _ml(tmp))
            async with right.session() as session:
                model = await right.get(session)
            assert model.classes == DEFAULT_CLASSES
            assert json.loads((tmp / "state" / "global.json").read_text())["classes"] == \
                list(DEFAULT_CLASSES)
            # The mapped old folder names train with the federation's labels.
            result = await asyncio.to_thread(right.train)
            assert result.num_samples == 8  # one scan of each class held out
            update, samples, _ = await asyncio.to_thread(right.local_update)
            assert samples == 8 and np.any(update != 0)

            # The same kit with its classes in another order: refused, both lists named.
            wrong = Hospital(settings, _ml(tmp, SWAPPED))
            lists = (r"\[glioma, meningioma, notumor, pituitary\].*"
                     r"\[meningioma, glioma, notumor, pituitary\]")
            with pytest.raises(DataError, match=lists):
                await asyncio.to_thread(wrong.train)
            for action in (wrong.evaluate, wrong.local_update):
                with pytest.raises(DataError, match=lists):
                    await asyncio.to_thread(action)
            with pytest.raises(DataError, match=lists):
                await asyncio.to_thread(wrong.classify, next((tmp / "scans").rglob("*.png")))
            async with wrong.session() as session:
                with pytest.raises(DataError, match=lists):
                    await wrong.send(session)
            # Nothing went out and the trained model was left as it was.
            async with AdminSession(fed.client_settings("admin", srv.port)) as admin:
                assert await admin.count() == 0
            assert right.local_state().trained

    asyncio.run(scenario())


def test_a_protocol_3_client_is_told_the_servers_protocol(fed: Federation) -> None:
    """Bumping the protocol number keeps its clear error for an old hospital."""
    from .test_bad_input import Raw

    async def scenario() -> None:
        async with running(fed.server_settings()) as srv:
            raw = await Raw.open(fed, "a", srv.port)
            reply = await raw.request({"kind": "hello", "rid": 1, "protocol": 3})
            raw.close()
        assert reply["kind"] == "error" and reply["code"] == "unsupported-protocol"
        assert "this server speaks protocol 4, not 3" in reply["message"]

    asyncio.run(scenario())


def test_versions_record_the_classes_and_older_ones_take_the_configured(tmp_path) -> None:
    store = ModelStore(tmp_path, ("b", "a"))
    store.write(np.zeros(4, np.float32), contributors=0, total_samples=0)
    assert ModelStore(tmp_path).read(0)[0].classes == ("b", "a")  # recorded in the file
    # A version written before classes were recorded: its metadata has no such key.
    path = tmp_path / "v00000000.sflm"
    data = path.read_bytes()
    (n,) = struct.unpack_from(">I", data, len(MAGIC))
    meta = json.loads(data[len(MAGIC) + 4: len(MAGIC) + 4 + n])
    del meta["classes"]
    raw = json.dumps(meta).encode()
    path.write_bytes(MAGIC + struct.pack(">I", len(raw)) + raw + data[len(MAGIC) + 4 + n:])
    assert ModelStore(tmp_path, ("x", "y")).info(0).classes == ("x", "y")
    assert ModelStore(tmp_path, ("x", "y")).latest()[0].classes == ("x", "y")
