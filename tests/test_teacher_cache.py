"""The teacher feature cache: entries equal the live forward, are shared, and never break a run."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_training import _teacher_file, det, distill_job

from fgd_core.data import CocoDetection, build_train_loader
from fgd_core.detectors import build_detector_from_config, prepare
from fgd_core.distill import Distiller
from fgd_core.teacher_cache import TeacherFeatureCache, entry_ids, own_frame
from fgd_core.training import FGDConfig
from fgd_core.training.jobs import Callbacks, open_teacher_cache, run_job


def _distiller(seed: int = 0) -> Distiller:
    torch.manual_seed(seed)
    teacher = build_detector_from_config(det(backbone="resnet34", fpn=32))
    student = build_detector_from_config(det(fpn=16))
    return Distiller(student, teacher, FGDConfig(temp=2.0))


def _first_batch(tiny_shapes, batch_size=4):
    data = CocoDetection(tiny_shapes.train_images, tiny_shapes.train_ann, train=True, seed=3)
    loader = build_train_loader(data, batch_size=batch_size, seed=3)
    return next(iter(loader))


def _live(distiller, images, targets):
    cache, distiller.teacher_cache = distiller.teacher_cache, None
    try:
        return distiller.features(images, targets).teacher
    finally:
        distiller.teacher_cache = cache


def _assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].shape == b[name].shape, name
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_the_dataset_says_which_items_are_flipped(tiny_shapes):
    data = CocoDetection(tiny_shapes.train_images, tiny_shapes.train_ann, train=True, seed=3)
    flags = [data[i][1]["hflip"] for i in range(len(data))]
    assert flags == [data.is_flipped(i) for i in range(len(data))]
    assert True in flags and False in flags  # 16 fair coins
    assert entry_ids([data[0][1]], [(64, 64)]) == [(data.image_ids[0], flags[0], (64, 64))]
    assert entry_ids([{"image_id": 1}], [(64, 64)]) is None  # no flag: no cache


def test_cached_features_are_the_live_ones_and_are_read_back(tiny_shapes, tmp_path):
    distiller = _distiller()
    distiller.train()
    images, targets = _first_batch(tiny_shapes)
    live = _live(distiller, images, targets)
    distiller.teacher_cache = TeacherFeatureCache(tmp_path / "c", [32] * 5)
    cold = distiller.features(images, targets).teacher
    _assert_same(cold, live)
    assert dataclasses.astuple(distiller.teacher_cache.stats) == (0, 4, 0)
    written = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert written == sorted(f"{t['image_id']}-{int(t['hflip'])}-64x64.npy" for t in targets)

    # Another process's distiller (same teacher weights) reads them: no teacher forward at all.
    other = _distiller()
    other.train()
    other.teacher_cache = TeacherFeatureCache(tmp_path / "c", [32] * 5)
    calls = []
    other.teacher.backbone.register_forward_hook(lambda *a: calls.append(1))
    warm = other.features(images, targets).teacher
    assert calls == []
    assert dataclasses.astuple(other.teacher_cache.stats) == (4, 0, 0)
    _assert_same(warm, live)

    # Mixed: two images cached, two new ones computed in a sub-batch.
    more_images, more_targets = _first_batch(tiny_shapes, batch_size=8)
    cached = {(t["image_id"], t["hflip"]) for t in targets}
    assert len({(t["image_id"], t["hflip"]) for t in more_targets} & cached) < 8
    mixed = other.features(more_images, more_targets).teacher
    _assert_same(mixed, _live(other, more_images, more_targets))


def test_an_unreadable_entry_is_recomputed(tiny_shapes, tmp_path):
    distiller = _distiller()
    images, targets = _first_batch(tiny_shapes)
    live = _live(distiller, images, targets)
    cache = distiller.teacher_cache = TeacherFeatureCache(tmp_path, [32] * 5)
    distiller.features(images, targets)
    broken = cache.path((targets[0]["image_id"], targets[0]["hflip"], (64, 64)))
    broken.write_bytes(b"not an array")
    short = cache.path((targets[1]["image_id"], targets[1]["hflip"], (64, 64)))
    import numpy as np

    np.save(short, np.zeros(7, np.float32))
    again = distiller.features(images, targets).teacher
    _assert_same(again, live)
    assert cache.stats.misses == 4 + 2
    assert np.load(broken).size == np.load(short).size > 7  # rewritten whole


def test_each_resized_size_of_an_image_is_an_entry_of_its_own(tiny_shapes, tmp_path):
    # Multi-scale training resizes an image differently from batch to batch.
    distiller = _distiller()
    images, targets = _first_batch(tiny_shapes)
    cache = distiller.teacher_cache = TeacherFeatureCache(tmp_path, [32] * 5)
    for size in (64, 32, 64, 32):
        for model in (distiller.student, distiller.teacher):
            model.transform.min_size, model.transform.max_size = (size,), size
        features = distiller.features(images, targets).teacher
        assert features["P3"].shape[-2:] == (size // 8, size // 8)
        _assert_same(features, _live(distiller, images, targets))
    assert dataclasses.astuple(cache.stats) == (8, 8, 0)
    assert len(list(tmp_path.glob("*-32x32.npy"))) == len(list(tmp_path.glob("*-64x64.npy"))) == 4


def test_a_batch_padded_beyond_an_image_is_computed_live(tmp_path):
    distiller = _distiller()
    cache = distiller.teacher_cache = TeacherFeatureCache(tmp_path, [32] * 5)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g), torch.rand(3, 64, 32, generator=g)]
    targets = [
        {
            "boxes": torch.tensor([[2.0, 2.0, 20.0, 20.0]]),
            "labels": torch.tensor([1]),
            "image_id": i,
            "hflip": False,
        }
        for i in range(2)
    ]
    prepared = prepare(distiller.student, images, targets)
    assert own_frame(prepared.image_list.image_sizes[1], 32) == (64, 32)
    assert tuple(prepared.image_list.tensors.shape[-2:]) == (64, 64)
    teacher = distiller.features(images, targets).teacher
    _assert_same(teacher, _live(distiller, images, targets))
    assert dataclasses.astuple(cache.stats) == (0, 0, 1)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_a_cache_that_cannot_be_written_warns_once_and_the_run_goes_on(tiny_shapes, tmp_path):
    distiller = _distiller()
    images, targets = _first_batch(tiny_shapes)
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    distiller.teacher_cache = TeacherFeatureCache(blocker / "c", [32] * 5)
    with pytest.warns(RuntimeWarning, match="cannot write the teacher feature cache"):
        features = distiller.features(images, targets).teacher
    _assert_same(features, _live(distiller, images, targets))
    assert distiller.teacher_cache.writable is False


def test_a_job_with_the_cache_trains_as_without_it_and_a_rerun_reads_every_entry(
    tiny_data, tmp_path, monkeypatch
):
    monkeypatch.setenv("FGD_TEACHER_CACHE_DIR", str(tmp_path / "cache"))
    job = distill_job(
        tiny_data,
        _teacher_file(tiny_data, tmp_path),
        fgd=FGDConfig(temp=2.0),
        evaluate_teacher=False,
    )
    plain = run_job(job)
    cached_job = dataclasses.replace(job, fgd=dataclasses.replace(job.fgd, teacher_cache=True))
    rates: dict[int, list[float]] = {}
    results = []
    for run in range(2):
        metrics: list[float] = rates.setdefault(run, [])
        cb = Callbacks(on_metrics=lambda s, m, out=metrics: out.append(m["teacher_cache_hit_rate"]))
        results.append(run_job(cached_job, callbacks=cb))
    assert rates[0] == [0.0] * 4  # 16 images, one epoch: every entry new
    assert rates[1] == [1.0] * 4
    (folder,) = (tmp_path / "cache").iterdir()
    assert len(list(folder.glob("*.npy"))) == 16
    for result in results:
        for k, v in plain.model_state.items():
            torch.testing.assert_close(result.model_state[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_the_cache_folder_follows_the_teacher_weights(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("FGD_TEACHER_CACHE_DIR", str(tmp_path / "cache"))
    first = _teacher_file(tiny_data, tmp_path)
    second = tmp_path / "other.pt"
    state = torch.load(first, weights_only=True)
    state = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, second)
    folders = []
    for path in (first, first, second):
        job = distill_job(tiny_data, path, fgd=FGDConfig(teacher_cache=True))
        distiller = Distiller(
            build_detector_from_config(job.model), build_detector_from_config(job.teacher), job.fgd
        )
        folders.append(open_teacher_cache(job, distiller).directory)
    assert folders[0] == folders[1] != folders[2]
    assert folders[0].parent == tmp_path / "cache"
