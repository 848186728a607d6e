"""``FitSettings``, the resolved options of a fit (``NMFResult.settings``): frozen, read as a mapping
exactly as by attribute, saved and loaded unchanged, and fingerprinted by content."""
from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

import jaxnmf
from jaxnmf import _checkpoint
from jaxnmf._settings import RawPenalties

N = 60
GROUPS = np.arange(N) % 3 + 10  # labels 10, 11, 12: the settings keep them apart from the indices 0, 1, 2


def blocks(seed: int = 0) -> dict:
    """A mean-centred block (both signs, fitted as signed) and a non-negative one, (rows, N)."""
    rng = np.random.default_rng(seed)
    F = rng.random((3, N))
    centred = rng.normal(size=(20, 3)) @ F + 0.05 * rng.normal(size=(20, N))
    return {"centred": centred - centred.mean(axis=1, keepdims=True),
            "layer": rng.random((15, 3)) @ F + 0.05 * rng.random((15, N))}


OPTIONS = dict(max_iter=60, tol=1e-6, dtype=np.float64, solver="hals", signed=["centred"], l2=[0.1, 0.2],
               l1=[0.0, 0.01], l2_F=0.01, group_F=0.01, example_groups=GROUPS, block_weights="frobenius")


@pytest.fixture(scope="module")
def result():
    return jaxnmf.fit(blocks(), 3, key=jax.random.key(0), **OPTIONS)


def assert_fields_equal(a, b):
    """Every field of two ``FitSettings`` (or ``RawPenalties``) equal: arrays in dtype and entries."""
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert type(x) is type(y), f.name
        if isinstance(x, RawPenalties):
            assert_fields_equal(x, y)
        elif isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and np.array_equal(x, y), f.name
        else:
            assert x == y, f.name


def test_the_settings_are_frozen(result):
    st = result.settings
    assert isinstance(st, jaxnmf.FitSettings)
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.solver = "mu"
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.raw_penalties.l2_F = 0.0
    with pytest.raises(TypeError):
        st["solver"] = "mu"
    arrays = [st.weights, st.l2, st.l1, st.example_groups, st.group_labels, st.raw_penalties.l2,
              st.raw_penalties.l1, st.raw_penalties.group_F]
    for a in arrays:
        assert isinstance(a, np.ndarray) and not a.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            a[0] = 1
    assert st.signed == (True, False) and isinstance(st.signed, tuple)


def test_mapping_access_equals_attribute_access(result):
    st = result.settings
    names = [f.name for f in dataclasses.fields(jaxnmf.FitSettings)]
    assert list(st) == list(st.keys()) == names and len(st) == len(names)
    for name in names:
        assert st[name] is getattr(st, name) and st.get(name) is getattr(st, name) and name in st
    as_dict = dict(st)
    assert list(as_dict) == names and all(as_dict[name] is getattr(st, name) for name in names)
    assert (lambda **kw: kw)(**st).keys() == set(names)
    raw = st.raw_penalties
    assert [raw[k] for k in raw] == [raw.l2, raw.l1, raw.l2_F, raw.l1_F, raw.group_F]
    assert st.example_groups.dtype == np.int32 and set(st.example_groups) == {0, 1, 2}
    assert list(st.group_labels) == [10, 11, 12] and st.interrupted_at is None and not st.streamed


def test_an_unknown_key_raises_a_key_error_naming_it(result):
    with pytest.raises(KeyError, match="'no_such_option' is not a field of FitSettings"):
        result.settings["no_such_option"]
    with pytest.raises(KeyError, match="'l3' is not a field of RawPenalties"):
        result.settings.raw_penalties["l3"]
    assert result.settings.get("no_such_option", "absent") == "absent" and "no_such_option" not in result.settings


def test_replace_gives_a_changed_copy(result):
    st = result.settings
    stopped = dataclasses.replace(st, interrupted_at=7)
    assert stopped.interrupted_at == 7 and st.interrupted_at is None
    assert stopped != st and dataclasses.replace(stopped, interrupted_at=None) == st
    assert not stopped.weights.flags.writeable


def test_a_save_load_round_trip_gives_equal_settings_and_transform(result, tmp_path):
    loaded = jaxnmf.load_fit(jaxnmf.save_fit(result, tmp_path / "fit.npz"))
    assert_fields_equal(loaded.settings, result.settings)
    assert loaded.settings == result.settings
    new = blocks(seed=3)
    groups = np.arange(N) % 4 + 10  # one group (13) the fit never saw
    np.testing.assert_array_equal(np.asarray(jaxnmf.transform(loaded, new, example_groups=groups)),
                                  np.asarray(jaxnmf.transform(result, new, example_groups=groups)))


def test_a_fit_saved_before_the_newer_fields_existed_still_loads(result, tmp_path):
    path = jaxnmf.save_fit(result, tmp_path / "fit.npz")
    with np.load(path) as archive:
        data = {name: archive[name] for name in archive.files}
    meta = json.loads(str(data["meta"]))
    for name in ("signed", "interrupted_at", "streamed", "tile_bytes"):
        meta["settings"].pop(name, None)
    data["meta"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "old.npz", **data)
    old = jaxnmf.load_fit(tmp_path / "old.npz").settings
    assert old.signed == () and old.interrupted_at is None and not old.streamed and old.tile_bytes is None
    assert old == dataclasses.replace(result.settings, signed=())


def test_the_fingerprint_is_a_function_of_the_settings(result):
    again = jaxnmf.fit(blocks(), 3, key=jax.random.key(0), **OPTIONS).settings
    st = result.settings
    assert again is not st and _checkpoint.fingerprint(settings=again) == _checkpoint.fingerprint(settings=st)
    raw = dataclasses.replace(st.raw_penalties, group_F=st.raw_penalties.group_F * 2)
    for changed in (dataclasses.replace(st, tol=1e-5), dataclasses.replace(st, weights=st.weights * 2),
                    dataclasses.replace(st, raw_penalties=raw), dataclasses.replace(st, signed=(False, False))):
        assert _checkpoint.fingerprint(settings=changed) != _checkpoint.fingerprint(settings=st)
