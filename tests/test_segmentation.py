"""The segmentation task (issue 14): mask data (Fashion-MNIST and a user folder, checked up front),
the task model built on a (compressed) backbone, its losses and mIoU, the pixel proxy, timing with
the decoder, and `train` / `search --task segmentation` end to end on tiny settings."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import TINY, assert_one_line_error, run_cli
from PIL import Image

from caitsearch import CompressionConfig
from caitsearch.data import FASHION_MNIST_STATS, load_dataset, make_frame, random_shift_flip, random_shift_flip_pair
from caitsearch.errors import CaitsearchError
from caitsearch.models import DEFAULT_MODEL, ModelSpec, create_model, default_checkpoint
from caitsearch.search.proxy import PixelProxy, make_proxy
from caitsearch.segment import FASHION_MNIST_FILL, SegmentationModel, miou, segmentation_split
from caitsearch.tasks import CLASSIFICATION, SEGMENTATION, get_task
from caitsearch.tasks.masks import check_mask_folder, load_mask_dataset
from caitsearch.tasks.segmentation import is_segmentation_state, timm_backbone
from caitsearch.training import Recipe, evaluate
from caitsearch.training.loop import load_batch

torch.set_num_threads(1)


def spec_of(**kw) -> ModelSpec:
    return ModelSpec.from_model(create_model(DEFAULT_MODEL, **kw))


def write_mask_folder(root, n=(12, 6), size=(20, 24), classes: int = 3, names: bool = True):
    """A tiny segmentation folder: grey images whose bright left half is class 1, bright bottom
    right quarter class 2, the rest background (0); masks are mode-L PNGs named like the images."""
    rng = np.random.default_rng(0)
    h, w = size
    for split, count in zip(("train", "val"), n):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(count):
            mask = np.zeros((h, w), np.uint8)
            mask[:, : w // 2] = 1
            mask[h // 2:, w // 2 + w // 4:] = classes - 1
            pixels = (mask * 90 + rng.integers(0, 20, (h, w))).astype(np.uint8)
            Image.fromarray(np.stack([pixels] * 3, -1)).save(root / split / "images" / f"im{i}.png")
            Image.fromarray(mask, mode="L").save(root / split / "masks" / f"im{i}.png")
    if names:
        (root / "classes.txt").write_text("\n".join(["background", "left", "corner"][:classes]) + "\n")
    return root


def tiny_teacher(spec: ModelSpec, classes: int = 11) -> SegmentationModel:
    torch.manual_seed(0)
    return SEGMENTATION.wrap(create_model(DEFAULT_MODEL), classes)


# ---------------------------------------------------------------- data


def test_a_mask_folder_loads_framed_to_the_model_with_its_classes(tmp_path):
    root = write_mask_folder(tmp_path / "seg")
    spec = spec_of()
    splits = load_mask_dataset(root, spec, calib_size=2, proxy_size=2, val_size=2)
    assert splits.num_classes == 3 and splits.classes == ("background", "left", "corner")
    assert (len(splits.train), len(splits.calib), len(splits.proxy), len(splits.val), len(splits.test)) == (6, 2, 2, 2, 6)
    image, labels = splits.test[0]
    assert image.shape == (1, 32, 32) and labels.shape == (32, 32) and labels.dtype == torch.int64
    # nearest-neighbour resize 20x24 -> 32x32 keeps the layout: left half class 1, bottom-right corner class 2
    assert (labels[:, :14] == 1).all() and (labels[:16, 17:] == 0).all() and (labels[-4:, -4:] == 2).all()
    x, y = load_batch(splits.train, torch.arange(4))
    assert x.shape == (4, 1, 32, 32) and y.shape == (4, 32, 32)
    # without classes.txt the class count is the largest index found plus one
    plain = load_mask_dataset(write_mask_folder(tmp_path / "plain", classes=2, names=False), spec,
                              calib_size=1, proxy_size=1, val_size=1)
    assert plain.num_classes == 2


def test_training_augmentation_moves_image_and_mask_alike(tmp_path):
    labels = torch.arange(1, 16 * 16 + 1).view(16, 16)
    image = labels[None].float()
    moved = 0
    for seed in range(8):
        torch.manual_seed(seed)
        x, y = random_shift_flip_pair(image, labels)
        assert torch.equal(x[0].long(), y)  # the same shift and flip (the border is 0 in both)
        torch.manual_seed(seed)
        assert torch.equal(random_shift_flip(image), x)  # the draws of the image-only augmentation
        moved += not torch.equal(y, labels)
    assert moved
    # the training split augments, the held-out splits do not
    splits = load_mask_dataset(write_mask_folder(tmp_path / "seg"), spec_of(), calib_size=1, proxy_size=1, val_size=1)
    assert splits.train.augment and not splits.val.augment and not splits.test.augment


def test_unlabelled_pixels_255_are_out_of_the_classes_the_losses_and_miou(tmp_path):
    from caitsearch.segment import IGNORE_INDEX, confusion_matrix
    from caitsearch.tasks.segmentation import labelled_cross_entropy

    root = write_mask_folder(tmp_path / "seg", classes=3, names=False)
    for mask_path in (root / "train" / "masks").iterdir():  # an unlabelled band across every training mask
        mask = np.array(Image.open(mask_path))
        mask[:3] = IGNORE_INDEX
        Image.fromarray(mask, mode="L").save(mask_path)
    splits = load_mask_dataset(root, spec_of(), calib_size=1, proxy_size=1, val_size=1)
    assert splits.num_classes == 3  # 255 is no class: the largest labelled index is 2
    _, labels = splits.val[0]  # held out of training: no shift, the band resized to the frame
    assert (labels[:4] == IGNORE_INDEX).all() and (labels[6:] != IGNORE_INDEX).all()
    torch.manual_seed(0)
    shifted = [splits.train[0][1] for _ in range(12)]
    borders = torch.cat([y[:, 0] for y in shifted] + [y[:, -1] for y in shifted])
    assert (borders == IGNORE_INDEX).any() and not (borders == 0).all()  # a shift's border is unlabelled, not background

    logits, y = torch.randn(2, 3, 4, 4, requires_grad=True), torch.randint(0, 3, (2, 4, 4))
    y[:, 0] = IGNORE_INDEX
    keep = y != IGNORE_INDEX
    flat = logits.permute(0, 2, 3, 1)[keep]
    assert labelled_cross_entropy(logits, y).item() == pytest.approx(
        torch.nn.functional.cross_entropy(flat, y[keep]).item(), rel=1e-6)
    nothing = labelled_cross_entropy(logits, torch.full_like(y, IGNORE_INDEX))
    assert nothing.item() == 0.0 and nothing.requires_grad  # a batch without labels trains nothing, never NaN
    recipe = Recipe(temperature=2.0, distill_weight=0.7)
    assert torch.isfinite(SEGMENTATION.distill_loss(logits, torch.randn(2, 3, 4, 4), torch.full_like(y, IGNORE_INDEX), recipe))
    assert torch.equal(confusion_matrix(logits.argmax(1), y, 3), confusion_matrix(logits.argmax(1)[keep], y[keep], 3))
    assert int(confusion_matrix(logits.argmax(1), y, 3).sum()) == int(keep.sum())

    from caitsearch.report.plots import masks_figure

    truth = torch.randint(0, 3, (2, 8, 8))
    truth[:, 0] = IGNORE_INDEX
    fig = masks_figure(torch.rand(2, 1, 8, 8), truth, torch.randint(0, 3, (2, 8, 8)), torch.randint(0, 3, (2, 8, 8)),
                       ["dense", "cait"])
    shown_truth = [ax.images[0] for ax in fig.axes[2:4]]
    assert all(im.norm.vmax == 19 and int(im.get_array().mask.sum()) == 8 for im in shown_truth)  # blank, not class 255


@pytest.mark.parametrize("breakage, fragment", [
    ("missing_mask", "has no mask"),
    ("extra_mask", "has no image"),
    ("size", "is 10x10 but its image"),
    ("range", "out of range"),
    ("rgb", "single-channel"),
    ("layout", "needs train/images/ and train/masks/"),
])
def test_a_broken_mask_folder_is_refused_in_one_sentence(tmp_path, breakage, fragment):
    root = write_mask_folder(tmp_path / "seg")
    masks = root / "train" / "masks"
    if breakage == "missing_mask":
        (masks / "im3.png").unlink()
    elif breakage == "extra_mask":
        Image.fromarray(np.zeros((20, 24), np.uint8)).save(masks / "stray.png")
    elif breakage == "size":
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(masks / "im2.png")
    elif breakage == "range":
        Image.fromarray(np.full((20, 24), 3, np.uint8)).save(root / "val" / "masks" / "im1.png")
    elif breakage == "rgb":
        Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(masks / "im0.png")
    else:
        (root / "train" / "masks").rename(root / "train" / "labels")
    with pytest.raises(CaitsearchError, match=fragment) as err:
        check_mask_folder(root)
    assert "\n" not in str(err.value)


def test_fashion_mnist_masks_are_the_segment_labels_of_the_classification_splits(fashion_mnist):
    spec = spec_of()
    seg = load_mask_dataset(fashion_mnist, spec, calib_size=64, proxy_size=64, val_size=64, train_limit=64, test_limit=32)
    cls = load_dataset(fashion_mnist, spec, calib_size=64, proxy_size=64, val_size=64, train_limit=64, test_limit=32)
    assert seg.num_classes == 11 and seg.classes[0] == "background"
    assert torch.equal(seg.val.indices, cls.val.indices) and torch.equal(seg.test.indices, cls.test.indices)
    images, labels = segmentation_split("test", spec)
    for i in range(4):
        x, y = seg.test[i]
        j = int(seg.test.indices[i])
        assert torch.equal(x, images[j]) and torch.equal(y, labels[j])
    frame = make_frame(spec, *FASHION_MNIST_STATS, fill=FASHION_MNIST_FILL)
    assert frame is not None


# ---------------------------------------------------------------- model, losses, metric


def test_tasks_are_named_and_a_bad_name_is_one_sentence():
    assert get_task(None) is CLASSIFICATION and get_task("segmentation") is SEGMENTATION
    with pytest.raises(CaitsearchError, match="--task must be one of"):
        get_task("detection")


def test_a_dense_student_is_the_teacher_and_materialising_keeps_outputs():
    spec = spec_of()
    teacher = tiny_teacher(spec)
    x = torch.randn(3, 1, 32, 32)
    same = SEGMENTATION.student(teacher, CompressionConfig.dense(spec)).eval()
    with torch.no_grad():
        assert torch.allclose(same(x), teacher(x), atol=1e-5)
        config = CompressionConfig.uniform(spec, keep_rate=0.75, merge_every=2, merge_start=1)
        masked = SEGMENTATION.student(teacher, config, x).eval()
        small = SEGMENTATION.materialize(masked)
        out = small(x)
        assert out.shape == (3, 11, 32, 32)
        assert torch.allclose(out, masked(x), atol=1e-4)
    assert SEGMENTATION.backbone(masked) is masked.backbone
    # the state dict round trip: timm weights under backbone.vit., decoder under head.
    state = teacher.state_dict()
    assert is_segmentation_state(state) and not is_segmentation_state(create_model(DEFAULT_MODEL).state_dict())
    again = SEGMENTATION.from_state(DEFAULT_MODEL, None, state)
    with torch.no_grad():
        assert torch.equal(again(x), teacher(x))
    vit = timm_backbone(teacher.backbone)
    assert set(vit.state_dict()) == {k[len("backbone.vit."):] for k in state if k.startswith("backbone.vit.")}
    loaded = SEGMENTATION.load_candidate(teacher, config, small.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


def test_cell_positions_name_each_patch_line_by_its_cells_size_and_offset():
    from caitsearch.compress.atme import TokenGrid, cell_slots

    grid = TokenGrid(1, 3, 2, row_height=torch.tensor([[2.0, 1.0, 3.0], [1.0, 4.0, 1.0]]),
                     col_width=torch.ones(2, 2))
    rows, cols = grid.cell_positions(6, 2)
    # (size, offset) -> size(size-1)/2 + offset: (2,0)=1 (2,1)=2 (1,0)=0 (3,0)=3 (3,1)=4 (3,2)=5
    assert rows.tolist() == [[1, 2, 0, 3, 4, 5], [0, 6, 7, 8, 9, 0]]
    assert cols.tolist() == [[0, 0], [0, 0]]
    assert int(rows.max()) < cell_slots(6) and TokenGrid(1, 6, 2).cell_positions(6, 2) is None


def _merging_student(spec, axis: str):
    teacher = tiny_teacher(spec)
    blocks = list(CompressionConfig.dense(spec).blocks)
    blocks[2] = dataclasses.replace(blocks[2], merge_axis=axis, merge_count=3)
    config = CompressionConfig(model=spec.name, img_size=spec.img_size, blocks=blocks)
    return teacher, SEGMENTATION.student(teacher, config).eval()


def test_a_grid_cell_tells_its_patches_apart_only_where_atme_merged():
    spec = spec_of()
    x = torch.randn(2, 1, 32, 32)
    teacher, atme = _merging_student(spec, "cols")
    _, tome = _merging_student(spec, "tokens")
    with torch.no_grad():
        # zero at the start: a student begins as the plain repeated map
        assert torch.equal(atme(x), atme.head(atme.backbone.feature_map(x)))
        before = {name: m(x) for name, m in (("atme", atme), ("tome", tome), ("dense", teacher))}
        for name in ("cell_rows", "cell_cols", "cell_row_gains", "cell_col_gains"):
            for m in (atme, tome, teacher):
                getattr(m.head, name).normal_()
            assert not torch.allclose(atme(x), before["atme"]), name
            assert torch.equal(tome(x), before["tome"]) and torch.equal(teacher(x), before["dense"])
            for m in (atme, tome, teacher):
                getattr(m.head, name).zero_()
    # and the fine-tune reaches them: an ATME student's loss has a gradient on the column cells
    atme.train()
    atme.head.cell_cols.data.normal_()
    atme(x).square().mean().backward()
    for grad in (atme.head.cell_cols.grad, atme.head.cell_col_gains.grad):
        assert grad is not None and grad[1:].abs().sum() > 0


def test_the_stem_skip_starts_silent_then_reaches_every_map_and_learns_from_zero():
    spec = spec_of()
    x = torch.randn(2, 1, 32, 32)
    teacher, atme = _merging_student(spec, "cols")
    _, tome = _merging_student(spec, "tokens")
    models = {"dense": teacher, "atme": atme, "tome": tome}
    with torch.no_grad():
        for name, m in models.items():  # zero at the start: the head computes what it did without the skip
            assert torch.equal(m(x), m.head(*m.backbone.feature_cells(x))), name
        # the stem's map is the patch tokens before any block, on the grid, whatever merges later
        stem = teacher.backbone.embed(x)[:, spec.num_prefix_tokens:]
        for m in models.values():
            assert torch.allclose(m.backbone.feature_levels(x)[2].flatten(2).transpose(1, 2), stem)
        before = {name: m(x) for name, m in models.items()}
        for name, m in models.items():
            m.head.stem.weight.normal_()
            assert not torch.allclose(m(x), before[name]), name
            m.head.stem.weight.zero_()
    # the zero start still trains: the loss has a gradient on the skip's weights
    atme.train()
    atme(x).square().mean().backward()
    assert atme.head.stem.weight.grad is not None and atme.head.stem.weight.grad.abs().sum() > 0


def test_a_decoder_saved_without_cell_embeddings_loads_them_at_zero_and_a_wrong_shape_is_refused():
    spec = spec_of()
    teacher = tiny_teacher(spec)
    # a decoder from before the cell embeddings and the stem skip
    state = {k: v for k, v in teacher.state_dict().items() if "cell_" not in k and ".stem." not in k}
    loaded = SEGMENTATION.from_state(DEFAULT_MODEL, None, state)
    assert not loaded.head.cell_rows.any() and not loaded.head.cell_col_gains.any()
    assert not loaded.head.stem.weight.any() and not loaded.head.stem.bias.any()
    assert loaded.head.cell_cols.shape == teacher.head.cell_cols.shape
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), teacher(x))
    with pytest.raises(CaitsearchError, match="does not fit the segmentation model"):
        SEGMENTATION.from_state(DEFAULT_MODEL, None, {**state, "head.cell_rows": torch.zeros(3, 128)})


def test_pixel_distillation_is_kl_over_the_class_dim_plus_cross_entropy():
    recipe = Recipe(temperature=2.0, distill_weight=0.7)
    logits = torch.randn(2, 5, 4, 4)
    y = torch.randint(0, 5, (2, 4, 4))
    ce = torch.nn.functional.cross_entropy(logits, y)
    assert SEGMENTATION.distill_loss(logits, logits, y, recipe).item() == pytest.approx(0.3 * ce.item(), rel=1e-5)
    # equal to the classification loss on pixels taken as samples
    target = torch.randn(2, 5, 4, 4)
    flat = lambda z: z.permute(0, 2, 3, 1).reshape(-1, 5)  # noqa: E731
    expected = CLASSIFICATION.distill_loss(flat(logits), flat(target), y.reshape(-1), recipe)
    assert SEGMENTATION.distill_loss(logits, target, y, recipe).item() == pytest.approx(expected.item(), rel=1e-6)


def test_evaluate_scores_miou_for_segmentation_and_accuracy_as_before():
    spec = spec_of()
    model = tiny_teacher(spec, classes=3)
    images = torch.randn(10, 1, 32, 32)
    labels = torch.randint(0, 3, (10, 32, 32))
    dataset = list(zip(images, labels))
    assert evaluate(model, dataset, batch_size=4, task=SEGMENTATION) == pytest.approx(
        miou(model, images, labels, num_classes=3), abs=1e-12)
    # classification: the exact formula evaluate used before tasks existed
    classifier = create_model(DEFAULT_MODEL)
    ys = torch.randint(0, 10, (10,))
    cls_set = [(x, int(y)) for x, y in zip(images, ys)]
    with torch.no_grad():
        pred = classifier(images).argmax(-1)
    before = float(torch.tensor((pred == ys).sum().item(), dtype=torch.float64) / 10)
    assert evaluate(classifier, cls_set, batch_size=4) == before


def test_the_pixel_proxy_scores_dense_as_perfect_and_a_compressed_config_below():
    spec = spec_of()
    teacher = tiny_teacher(spec, classes=3)
    images = torch.randn(8, 1, 32, 32)
    with torch.no_grad():
        labels = teacher(images).argmax(1)
    proxy = PixelProxy(SEGMENTATION, teacher, images, labels, images[:4])
    dense = proxy.score(CompressionConfig.dense(spec))
    assert dense.kl == pytest.approx(0.0, abs=1e-6) and dense.agreement == 1.0 and dense.miou == 1.0
    small = proxy.score(CompressionConfig.uniform(spec, keep_rate=0.5, merge_every=1, merge_start=1))
    assert small.kl > 0 and small.agreement < 1.0 and small.miou < 1.0
    assert proxy.floor.kl > 0 and proxy.floor.miou == 0 and set(small.as_dict()) == {"kl", "agreement", "miou"}


def test_remeasurement_times_backbone_unmerge_and_decoder(monkeypatch):
    from caitsearch.profile.runtime import Runtime
    from caitsearch.search.remeasure import remeasure
    from caitsearch.search.request import Budget

    spec = spec_of()
    teacher = tiny_teacher(spec, classes=3)
    config = CompressionConfig.uniform(spec, keep_rate=0.75, merge_every=2, merge_start=1)
    timed = {}

    def fake_time_models(self, models, spec, **kw):
        from caitsearch.measure import Timing

        timed.update(models)
        return {name: Timing([1.0, 1.0, 1.0]) for name in models}, {}

    monkeypatch.setattr(Runtime, "time_models", fake_time_models)

    class Trial:
        number, value = 3, 0.1
        user_attrs = {"config": config.to_dict(), "predicted_ms": 1.0, "agreement": 1.0}

    remeasure(teacher, [Trial()], spec, Budget(1.0, 1.0), Runtime(threads=1), torch.randn(4, 1, 32, 32),
              task=SEGMENTATION)
    assert timed["dense"] is teacher
    candidate = timed["trial3"]
    assert isinstance(candidate, SegmentationModel) and candidate.backbone.config == config
    with torch.no_grad():
        assert candidate(torch.randn(2, 1, 32, 32)).shape == (2, 3, 32, 32)  # a per-pixel map: unmerged + decoded


def test_make_proxy_picks_the_task_screen(tmp_path):
    spec = spec_of()
    splits = load_mask_dataset(write_mask_folder(tmp_path / "seg"), spec, calib_size=2, proxy_size=2, val_size=2)
    proxy = make_proxy(SEGMENTATION, tiny_teacher(spec, classes=3), splits)
    assert isinstance(proxy, PixelProxy) and proxy.size == 2 and proxy.labels.shape == (2, 32, 32)


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_train_segmentation_on_a_user_folder_then_retrain_a_config(tmp_path):
    root = write_mask_folder(tmp_path / "seg", n=(24, 8))
    dense_dir, small_dir = tmp_path / "dense", tmp_path / "small"
    common = ["--task", "segmentation", "--data", root, "--calib-size", "4", "--proxy-size", "4", "--val-size", "4",
              "--threads", "1", "--batch-size", "8", "--json"]
    proc = run_cli("train", *common, "--epochs", "2", "--out", dense_dir)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)
    assert metrics["task"] == "segmentation" and metrics["metric"] == "miou" and 0 <= metrics["miou"] <= 1
    assert metrics["miou"] == metrics["accuracy"] and metrics["test_images"] == 8
    config = tmp_path / "cfg.json"
    CompressionConfig.uniform(spec_of(), keep_rate=0.75, merge_every=2, merge_start=1).save(config)
    proc = run_cli("train", *common, "--epochs", "1", "--config", config, "--checkpoint", dense_dir / "model.safetensors",
                   "--out", small_dir)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["metric"] == "miou" and (small_dir / "config.json").is_file()
    # a retraining without a segmentation teacher, and a broken folder, are one-line errors
    assert_one_line_error(run_cli("train", *common, "--config", config, "--out", tmp_path / "x"), "needs the dense segmentation")
    (root / "val" / "masks" / "im0.png").unlink()
    assert_one_line_error(run_cli("train", *common, "--out", tmp_path / "y"), "has no mask")


@pytest.mark.slow
def test_search_segmentation_end_to_end_on_tiny_settings(tmp_path, quick_profile, fashion_mnist):
    dense_dir = tmp_path / "dense"
    proc = run_cli("train", "--task", "segmentation", "--epochs", "1", "--train-limit", "256", "--test-limit", "64",
                   "--calib-size", "64", "--proxy-size", "64", "--val-size", "64", "--threads", "1", "--out", dense_dir)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "run"
    proc = run_cli("search", "--task", "segmentation", "--budget", "0.7", "--profile", quick_profile, "--trials", "10",
                   "--checkpoint", dense_dir / "model.safetensors", *TINY, "--out", out, "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["task"] == "segmentation" and summary["metric"] == "miou"
    assert summary["candidates"] and summary["candidates"][0]["retrained"]
    assert all(0 <= c["val_accuracy"] <= 1 for c in summary["candidates"])
    trials = json.loads((out / "remeasured.json").read_text())["candidates"]
    assert trials and all("kl" in t["proxy"] for t in trials)
    metrics = json.loads((out / "candidates" / f"trial-{summary['candidates'][0]['trial']}" / "metrics.json").read_text())
    assert metrics["metric"] == "miou"


def test_committed_segmentation_weights_if_present_fit_the_default_model():
    path = SEGMENTATION.default_checkpoint(DEFAULT_MODEL)
    if path is None:
        pytest.skip("no committed segmentation weights")
    from caitsearch.models import load_state

    model = SEGMENTATION.from_state(DEFAULT_MODEL, None, load_state(path))
    assert model.num_classes == 11 and default_checkpoint(DEFAULT_MODEL) is not None
