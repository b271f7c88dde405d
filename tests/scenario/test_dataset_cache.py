"""The on-disk cache of generated datasets: written once, read back, keyed by every option."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import numpy as np
import pytest

from fedcl.config import load_config
from fedcl.scenario import datasets
from fedcl.scenario.datasets import CACHE_ENV, CACHE_OFF, cache_folder, load_dataset


@pytest.fixture
def generations(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How many times each generated dataset's generator ran (it still generates the data)."""
    calls: dict[str, int] = {}
    for name in ("gaussian", "mnist1d"):
        spec = datasets._SPECS[name]

        def counted(*args, _load=spec.load, _name=name):
            calls[_name] = calls.get(_name, 0) + 1
            return _load(*args)

        monkeypatch.setitem(datasets._SPECS, name, dataclasses.replace(spec, load=counted))
    return calls


def _same(a: datasets.ArrayDataset, b: datasets.ArrayDataset) -> bool:
    arrays = ("x_train", "y_train", "x_test", "y_test")
    return all(np.array_equal(getattr(a, k), getattr(b, k)) for k in arrays) and (
        a.num_classes,
        a.input_shape,
    ) == (b.num_classes, b.input_shape)


def test_second_load_reads_the_cache_instead_of_generating(tmp_path: Path, generations) -> None:
    first = load_dataset("gaussian", seed=3, dim=5, cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"
    second = load_dataset("gaussian", seed=3, dim=5, cache_dir=tmp_path)
    assert generations == {"gaussian": 1}
    assert _same(first, second)
    assert second.x_train.dtype == np.float32 and second.x_train.flags.c_contiguous


def test_mnist1d_is_cached_too(tmp_path: Path, generations) -> None:
    first = load_dataset("mnist1d", seed=1, num_samples=200, cache_dir=tmp_path)
    second = load_dataset("mnist1d", seed=1, num_samples=200, cache_dir=tmp_path)
    assert generations == {"mnist1d": 1}
    assert _same(first, second)


@pytest.mark.parametrize(
    "changed",
    [{"seed": 4}, {"dim": 6}, {"separation": 2.0}, {"max_train": 100}, {"test_per_class": 7}],
)
def test_changing_any_option_misses_the_cache(tmp_path: Path, generations, changed) -> None:
    base = {"seed": 3, "dim": 5}
    load_dataset("gaussian", cache_dir=tmp_path, **base)
    other = load_dataset("gaussian", cache_dir=tmp_path, **{**base, **changed})
    assert generations == {"gaussian": 2}
    assert len(list(tmp_path.iterdir())) == 2
    uncached = load_dataset("gaussian", cache_dir=CACHE_OFF, **{**base, **changed})
    assert _same(other, uncached)


def test_the_environment_chooses_the_folder_and_off_turns_the_cache_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, generations
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "from-env"))
    assert cache_folder() == tmp_path / "from-env"
    assert cache_folder(tmp_path / "given") == tmp_path / "given"  # the key wins over the env
    load_dataset("gaussian", seed=1)
    assert len(list((tmp_path / "from-env").iterdir())) == 1

    monkeypatch.setenv(CACHE_ENV, CACHE_OFF)
    assert cache_folder() is None
    load_dataset("gaussian", seed=2)
    load_dataset("gaussian", seed=2)
    assert generations == {"gaussian": 3}
    monkeypatch.delenv(CACHE_ENV)
    assert cache_folder() == Path.home() / ".cache" / "fedcl"


def test_the_config_key_defaults_to_the_environment_or_home_and_off_turns_it_off() -> None:
    assert load_config(None).dataset.cache_dir is None
    for value in ("off", "false", "'off'"):  # YAML reads a bare off as false
        cache_dir = load_config(None, [f"dataset.cache_dir={value}"]).dataset.cache_dir
        assert cache_folder(cache_dir) is None


def test_an_unreadable_cache_file_is_generated_again(tmp_path: Path, generations) -> None:
    first = load_dataset("gaussian", seed=3, cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()
    path.write_bytes(b"not a zip file")
    again = load_dataset("gaussian", seed=3, cache_dir=tmp_path)
    assert generations == {"gaussian": 2}
    assert _same(first, again)
    assert _same(again, load_dataset("gaussian", seed=3, cache_dir=tmp_path))  # rewritten
    assert generations == {"gaussian": 2}


def test_writes_leave_no_temporary_files_and_an_unwritable_folder_only_costs_the_cache(
    tmp_path: Path, generations
) -> None:
    load_dataset("gaussian", seed=3, cache_dir=tmp_path)
    assert [p.suffix for p in tmp_path.iterdir()] == [".npz"]
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    dataset = load_dataset("gaussian", seed=3, cache_dir=blocked / "cache")
    assert len(dataset.y_train) == 2000
    assert generations == {"gaussian": 2}


def test_digits_and_folder_datasets_are_not_cached(tmp_path: Path) -> None:
    cache, files = tmp_path / "cache", tmp_path / "mnist"
    _write_idx_mnist(files)
    load_dataset("digits", cache_dir=cache)
    mnist = load_dataset("mnist", root=files, cache_dir=cache)
    assert len(mnist.y_train) == 6
    assert not cache.exists()


def _write_idx_mnist(folder: Path) -> None:
    """Four tiny idx files (6 train and 2 test images)."""
    folder.mkdir()
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    names += ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    for name, shape in zip(names, [(6, 28, 28), (6,), (2, 28, 28), (2,)], strict=True):
        header = struct.pack(f">I{len(shape)}I", 0x0800 | len(shape), *shape)
        (folder / name).write_bytes(header + bytes(int(np.prod(shape))))
