"""Bad input, as a new user types it, through the installed `caitsearch` console script.

Every case runs in a fresh process inside a scratch world of files (configs, checkpoints, profiles,
runs, image folders, good and broken) and must end with exit code 2 (130 for Ctrl-C), exactly one
line on stderr that names the offending value or file, no traceback anywhere, and every file and
folder of the world exactly as it was: a refused command writes nothing, creates nothing, and
loses nothing. Cases that refuse before torch loads are fast; those that need torch, a profile or
a real run are marked slow.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest

from caitsearch.errors import CaitsearchError
from conftest import TINY

SCRIPT = Path(sys.executable).with_name("caitsearch")
CLI = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "caitsearch"]
MODEL = "deit_fmnist_patch4_32"  # the embedded default: 6 blocks, 2 heads of 64, MLP 512, 32x32 pixels


# ----- the world: files a case reads, built on first use ------------------------------------------


def dense_config(model: str = MODEL, depth: int = 6, size: int = 32, head: int = 64, mlp: int = 512) -> dict:
    return {"model": model, "img_size": [size, size],
            "blocks": [{"merge_axis": "none", "merge_count": 0, "keep_qk": head, "keep_v": head, "keep_mlp": mlp}] * depth}


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` pixels (a decompression bomb, as far as a reader sees)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def image_folder(root: Path, classes=("a", "b"), per_class: int = 6) -> Path:
    from PIL import Image

    for split, n in (("train", per_class), ("val", 2)):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("L", (12, 12), color=40 * c + i).save(root / split / name / f"{i}.png")
    return root


class World:
    """Named files for the cases (`{name}` in their arguments), each made on first use in `root`."""

    def __init__(self, root: Path, request) -> None:
        self.root, self.request, self.made = root, request, {}
        root.mkdir()
        (root / "cwd").mkdir()  # where commands run, so default outputs would land in the world too

    def __getitem__(self, name: str) -> str:
        if name not in self.made:
            self.made[name] = getattr(self, f"make_{name}")(self.root / name)
        return str(self.made[name])

    # plain files and folders
    def make_w(self, path):
        return self.root

    def make_file(self, path):
        path.write_text("a file the user keeps\n")
        return path

    def make_dir(self, path):
        path.mkdir()
        (path / "notes.txt").write_text("someone else's folder\n")
        return path

    def make_new(self, path):  # an output path that does not exist yet
        return path

    # configs
    def make_cfg(self, path):
        path.write_text(json.dumps(dense_config()))
        return path

    def make_cfg_tiny(self, path):
        path.write_text(json.dumps(dense_config("deit_tiny_patch16_224", depth=12, size=224, mlp=768)))
        return path

    def make_cfg_badsize(self, path):
        path.write_text(json.dumps({**dense_config(), "img_size": ["a", 32]}))
        return path

    def make_cfg_deep(self, path):
        path.write_text("[" * 100_000 + "]" * 100_000)
        return path

    def make_cfg_utf16(self, path):
        path.write_bytes(json.dumps(dense_config()).encode("utf-16"))
        return path

    def make_cfg_binary(self, path):
        path.write_bytes(bytes(range(256)) * 8)
        return path

    # checkpoints
    def make_empty_pth(self, path):
        path.write_bytes(b"")
        return path

    def make_evil_pth(self, path):  # a pickle that would run a command if it were unpickled
        path.write_bytes(b"\x80\x04cos\nsystem\n(S'touch pwned'\ntR.")
        return path

    def make_numbers_pth(self, path):
        import torch

        torch.save({"head.weight": 1, "blocks": [1, 2]}, path)
        return path

    def make_train_evil(self, path):
        path.mkdir()
        self.make_evil_pth(path / "state.pt")
        return path

    def make_train_truncated(self, path):
        import torch

        path.mkdir()
        torch.save({"model": {"w": torch.zeros(4096)}, "step": 3}, path / "state.pt")
        data = (path / "state.pt").read_bytes()
        (path / "state.pt").write_bytes(data[: len(data) // 2])
        return path

    # image folders
    def make_data(self, path):
        return image_folder(path)

    def make_data_one_class(self, path):
        return image_folder(path, classes=("only",))

    def make_data_not_image(self, path):
        image_folder(path)
        (path / "train" / "b" / "zz-notes.png").write_text("not a picture")
        return path

    def make_data_cut_jpeg(self, path):
        from PIL import Image

        image_folder(path)
        Image.new("RGB", (64, 64), color=(200, 10, 10)).save(path / "train" / "a" / "cut.jpg", quality=90)
        data = (path / "train" / "a" / "cut.jpg").read_bytes()
        (path / "train" / "a" / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
        return path

    def make_data_bomb(self, path):
        image_folder(path)
        (path / "val" / "a" / "huge.png").write_bytes(png_claiming(30000, 30000))
        return path

    # latency profiles
    def make_profile(self, path):
        shutil.copytree(self.request.getfixturevalue("quick_profile"), path)
        return path

    def _profile_edited(self, path, edit: Callable[[dict], None]):
        self.make_profile(path)
        manifest = json.loads((path / "manifest.json").read_text())
        edit(manifest)
        (path / "manifest.json").write_text(json.dumps(manifest))
        return path

    def make_profile_foreign(self, path):
        return self._profile_edited(path, lambda m: m["fingerprint"].update(cpu="a CPU from another machine"))

    def make_profile_no_spec(self, path):
        return self._profile_edited(path, lambda m: m.pop("spec"))

    def make_profile_no_backend(self, path):
        return self._profile_edited(path, lambda m: m.pop("backend"))

    def make_profile_no_column(self, path):
        import pandas as pd

        self.make_profile(path)
        pd.read_parquet(path / "table.parquet").drop(columns=["median_ms"]).to_parquet(path / "table.parquet")
        digest = hashlib.sha256((path / "table.parquet").read_bytes()).hexdigest()
        manifest = json.loads((path / "manifest.json").read_text())
        (path / "manifest.json").write_text(json.dumps({**manifest, "table_sha256": digest}))
        return path

    # search runs
    def make_run(self, path):
        shutil.copytree(self.request.getfixturevalue("search_run"), path)
        return path

    def make_run_bad_summary(self, path):
        self.make_run(path)
        summary = json.loads((path / "summary.json").read_text())
        summary["candidates"][0]["accuracy"] = "high"
        (path / "summary.json").write_text(json.dumps(summary))
        return path

    def make_run_cut_trials(self, path):
        self.make_run(path)
        data = (path / "trials.parquet").read_bytes()
        (path / "trials.parquet").write_bytes(data[: len(data) // 2])
        return path

    def make_run_stub(self, path):  # what a rejected search used to leave behind
        path.mkdir()
        shutil.copy(Path(self.request.getfixturevalue("search_run")) / "manifest.json", path / "manifest.json")
        return path

    def make_cand(self, path):
        run = Path(self["run"])
        return sorted((run / "candidates").iterdir())[0]

    def make_cfg_wrong_for_cand(self, path):
        config = json.loads((Path(self["cand"]) / "config.json").read_text())
        block = config["blocks"][0]
        block["keep_mlp"] = 512 if block["keep_mlp"] != 512 else 256
        path.write_text(json.dumps(config))
        return path

    def make_keep_onnx(self, path):
        path.write_bytes(b"an export the user checked and keeps")
        return path


def snapshot(root: Path) -> dict[str, str]:
    """Every file's SHA-256 and every folder under `root`, by relative path."""
    found = {}
    for p in sorted(root.rglob("*")):
        found[str(p.relative_to(root))] = "folder" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return found


def environment(cache: Path) -> dict:
    """The user's environment, with caches in the test's folder and a hub that cannot be reached
    (a closed local port), so --pretrained meets "no network" whether or not there is one."""
    return {**os.environ, "XDG_CACHE_HOME": str(cache), "HF_HOME": str(cache / "hf"),
            "HF_ENDPOINT": "http://127.0.0.1:9", "COLUMNS": "100"}


def cli(args: list[str], cwd: Path, cache: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=cwd, env=environment(cache), capture_output=True, text=True,
                          timeout=timeout)


def assert_refused(proc: subprocess.CompletedProcess, fragment: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(lines) == 1, proc.stderr[-3000:]
    assert fragment in lines[0], (fragment, lines[0])


# ----- the cases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]  # `{name}`: a file of the world
    fragment: str  # in the one stderr line: the offending value or file
    item: int  # the item of the issue it covers (0: beyond the list)
    slow: bool = False  # loads torch, a profile or a real run


def case(id: str, args: str | list[str], fragment: str, item: int, slow: bool = False) -> Case:
    return Case(id, tuple(args.split() if isinstance(args, str) else args), fragment, item, slow)


SEARCH = ["search", "--budget", "0.5", "--profile", "{profile}", "--trials", "2", *TINY]
TRAIN = ["train", "--epochs", "1", "--train-limit", "64", "--test-limit", "32", "--calib-size", "16",
         "--proxy-size", "16", "--val-size", "16", "--threads", "1"]

CASES = [
    # 1. usage errors: typer's own click, exit 2 in one line with a --help hint
    case("bare-command", [], "no command given", 1),
    case("batch-size-0", "bench -b 0", "'0'", 1),
    case("unknown-option", "inspect --bogus", "--bogus", 1),
    case("missing-argument", "report", "run_dir", 1),
    case("unknown-command", "frobnicate", "frobnicate", 1),
    case("profile-batch-0", "profile --batch-size 0", "'0'", 1),
    case("trials-0", "search --budget 0.5 --trials 0", "--trials", 1),
    case("train-without-out", "train", "--out", 1),
    case("img-size-one-value", "inspect --img-size 32", "--img-size", 1),
    case("format-without-value", "export --format", "--format", 1),
    case("validate-without-profile", "profile validate", "PROFILE", 1),
    case("threads-not-a-number", "bench --threads abc", "'abc'", 1),
    case("compare-nothing", "compare", "run_dirs", 1),
    case("budget-not-a-number", "search --budget abc", "'abc'", 1),
    case("epochs-0", "train --out {new} --epochs 0", "'0'", 1),
    case("lr-not-a-number", "train --out {new} --lr fast", "'fast'", 1),
    case("num-classes-0", "inspect --num-classes 0", "'0'", 10),
    case("foreign-flag-unknown-to-inspect", "inspect --allow-foreign-profile", "--allow-foreign-profile", 1),
    # 3. user text shown literally, never read as markup
    case("markup-in-config-path", ["inspect", "--config", "{w}/cfg/[/red].json"], "cfg/[/red].json", 3),
    case("markup-in-model-name", ["inspect", "--model", "[bold]x[/bold]"], "'[bold]x[/bold]'", 3, slow=True),
    case("img-size-wrong-type", "inspect --config {cfg_badsize}", "['a', 32]", 3, slow=True),
    # 4. outputs checked before the work
    case("train-out-is-a-file", "train --out {file}", "{file} is a file", 4),
    case("train-out-unwritable", "train --out /dev/null/run", "/dev/null/run", 4),
    case("profile-out-is-a-file", "profile --out {file}", "{file} is a file", 4),
    case("validate-out-is-a-file", "profile validate {dir} --out {file}", "{file} is a file", 4),
    case("report-out-is-a-file", "report {dir} --out {file}", "{file} is a file", 4),
    case("compare-out-unwritable", "compare {dir} --out /dev/null/cmp", "/dev/null/cmp", 4),
    case("export-out-is-a-folder", "export --config {cfg} --out {dir}", "{dir} is a folder", 4),
    case("export-out-unwritable", "export --config {cfg} --out /dev/null/m.onnx", "/dev/null/m.onnx", 4),
    case("bench-profile-missing", "bench --profile {new}", "profile {new} is not a folder", 4),
    case("search-profile-missing", "search --budget 0.5 --profile {new}", "profile {new} is not a folder", 4),
    case("search-out-is-a-file", "search --budget 0.5 --out {file}", "{file} is a file", 4, slow=True),
    case("search-out-unwritable", "search --budget 0.5 --out /dev/null/run", "/dev/null/run", 4, slow=True),
    case("export-candidate-out-is-a-folder", "export {cand} --out {dir}", "{dir} is a folder", 4, slow=True),
    # 5. a refused re-run changes nothing in the run folder
    case("rerun-other-budget", [*SEARCH, "--out", "{run}"], "budget", 5, slow=True),
    case("rerun-bad-checkpoint", [*SEARCH, "--budget", "0.9", "--out", "{run}", "--checkpoint", "{empty_pth}"],
         "{empty_pth}", 5, slow=True),
    case("rerun-bad-data", [*SEARCH, "--budget", "0.9", "--out", "{run}", "--data", "{data_not_image}"],
         "zz-notes.png", 5, slow=True),
    case("search-into-foreign-folder", [*SEARCH, "--out", "{dir}"], "{dir} holds files but no search run", 5, slow=True),
    case("search-storage-not-a-database", [*SEARCH, "--out", "{new}", "--storage", "sqlite:///{file}"], "storage", 5,
         slow=True),
    # 6. exports: bad tolerances refused, a failed check never replaces a good file
    case("tolerance-negative", "export --config {cfg} --tolerance -1 --out {keep_onnx}", "'-1'", 6),
    case("tolerance-nan", "export --config {cfg} --tolerance nan --out {keep_onnx}", "'nan'", 6),
    case("tolerance-inf", "export {cand} --tolerance inf --out {keep_onnx}", "inf", 6, slow=True),
    case("export-check-fails", "export {cand} --tolerance 1e-30 --out {keep_onnx}", "{keep_onnx} was not written", 6,
         slow=True),
    # 7. what used to be internal errors
    case("config-100k-deep", "inspect --config {cfg_deep}", "{cfg_deep} is nested too deeply", 7, slow=True),
    case("config-utf16", "inspect --config {cfg_utf16}", "{cfg_utf16} is not UTF-8", 7, slow=True),
    case("config-binary", "inspect --config {cfg_binary}", "{cfg_binary} is not UTF-8", 7, slow=True),
    case("checkpoint-empty", "bench --checkpoint {empty_pth}", "{empty_pth}", 7, slow=True),
    case("checkpoint-not-tensors", "bench --checkpoint {numbers_pth}", "not a state dict of tensors", 7, slow=True),
    case("checkpoint-runs-code", "bench --checkpoint {evil_pth}", "not a plain weights file", 7, slow=True),
    case("profile-without-spec", [*SEARCH, "--out", "{new}", "--profile", "{profile_no_spec}"], "spec", 7, slow=True),
    case("profile-without-backend", "profile validate {profile_no_backend}", "backend", 7, slow=True),
    case("profile-without-column", [*SEARCH, "--out", "{new}", "--profile", "{profile_no_column}"], "median_ms", 7,
         slow=True),
    case("summary-wrong-type", "report {run_bad_summary} --out {new}", "accuracy", 7, slow=True),
    case("trials-truncated", "report {run_cut_trials} --out {new}", "trials.parquet", 7, slow=True),
    case("compare-truncated-trials", "compare {run} {run_cut_trials} --out {new}", "trials.parquet", 7, slow=True),
    case("png-claims-30000x30000", [*TRAIN, "--out", "{new}", "--data", "{data_bomb}"], "huge.png", 7, slow=True),
    case("lr-nan", [*TRAIN, "--out", "{new}", "--lr", "nan"], "nan", 7, slow=True),
    # 8. no network for --pretrained: a quick single line (the hub is a closed local port here, the cache empty)
    case("pretrained-offline", [*TRAIN, "--out", "{new}", "--model", "deit_tiny_patch16_224", "--pretrained"],
         "--checkpoint FILE works offline", 8, slow=True),
    # 9. what used to exit 0
    case("img-size-0", "inspect --img-size 0 0", "'0'", 9),
    case("img-size-not-patch-multiple", "inspect --img-size 33 32", "33 32", 9, slow=True),
    case("budget-inf", [*SEARCH, "--budget", "inf", "--out", "{new}"], "inf", 9, slow=True),
    case("lr-0", [*TRAIN, "--out", "{new}", "--lr", "0"], "lr must be a positive", 9, slow=True),
    case("data-one-class", [*TRAIN, "--out", "{new}", "--data", "{data_one_class}"], "{data_one_class}", 9, slow=True),
    case("compare-run-twice", "compare {run} {run} --out {new}", "{run} is given twice", 9, slow=True),
    case("train-strategy-alone", [*TRAIN, "--out", "{new}", "--strategy", "atme"], "--strategy atme needs --budget", 9,
         slow=True),
    case("bench-strategy-alone", "bench --strategy tome", "--strategy tome needs --budget", 9, slow=True),
    # bench --profile alone is fine: it times on that profile's runtime (issue 12); train would ignore it
    case("train-profile-alone", [*TRAIN, "--out", "{new}", "--profile", "{profile}"], "--profile", 9, slow=True),
    # 10. messages that say what is wrong and what to do
    case("foreign-profile", "bench --strategy cait --budget 0.6 --profile {profile_foreign}", "--allow-foreign-profile", 10,
         slow=True),
    case("train-state-truncated", [*TRAIN, "--out", "{train_truncated}"], "delete {train_truncated}/state.pt", 10,
         slow=True),
    case("train-state-runs-code", [*TRAIN, "--out", "{train_evil}"], "delete {train_evil}/state.pt", 10, slow=True),
    case("compressed-checkpoint-wrong-config",
         ["export", "--config", "{cfg_wrong_for_cand}", "--checkpoint", "{cand}/model.safetensors", "--out", "{new}"],
         "mis-shaped", 10, slow=True),
    case("config-is-a-folder", "inspect --config {dir}", "{dir} is a folder", 10),
    case("checkpoint-is-a-folder", "bench --checkpoint {dir}", "{dir} is a folder", 10),
    case("run-is-a-file", "report {file}", "{file} is a file", 10),
    case("candidate-is-a-file", "export {file}", "{file} is a file", 10),
    case("not-a-candidate", "export {dir}", "{dir} is not a candidate folder", 10),
    case("config-of-another-model", [*TRAIN, "--out", "{new}", "--model", MODEL, "--config", "{cfg_tiny}"],
         "deit_tiny_patch16_224", 10, slow=True),
    # 11. bad data found up front, no stub run folders
    case("data-not-an-image", [*TRAIN, "--out", "{new}", "--data", "{data_not_image}", "-b", "4"], "zz-notes.png", 11,
         slow=True),
    case("data-truncated-jpeg", [*TRAIN, "--out", "{new}", "--data", "{data_cut_jpeg}"], "cut.jpg", 11, slow=True),
    case("search-budget-below-space", [*SEARCH, "--budget", "0.01", "--out", "{new}"], "0.01x", 11, slow=True),
    case("report-on-stub", "report {run_stub} --out {new}", "{run_stub} has no trials", 11, slow=True),
    # beyond the list: more of what a new user tries
    case("report-missing-run", "report {w}/nope", "{w}/nope does not exist", 0),
    case("export-format-unknown", "export --config {cfg} --format pdf --out {new}", "'pdf'", 0, slow=True),
    case("export-dtype-unknown", "export --config {cfg} --dtype bf16 --out {new}", "'bf16'", 0, slow=True),
    case("report-format-unknown", "report {run} --format pdf --out {new}", "'pdf'", 0, slow=True),
    case("sampler-unknown", [*SEARCH, "--out", "{new}", "--sampler", "bayes"], "'bayes'", 0, slow=True),
    case("strategy-unknown", [*SEARCH, "--out", "{new}", "--strategy", "prune-all"], "'prune-all'", 0, slow=True),
    case("device-cuda-without-gpu", "bench --device cuda", "--device cuda", 0, slow=True),
    case("backend-cuda-without-gpu", "profile --backend cuda --out {new}", "backend cuda", 0, slow=True),
    case("not-a-vit", "inspect --model resnet18", "ResNet", 0, slow=True),
    case("data-missing", [*TRAIN, "--out", "{new}", "--data", "{w}/no-such-data"], "{w}/no-such-data", 0, slow=True),
    case("validate-seed-0", "profile validate {dir} --seed 0", "'0'", 0),
    case("search-no-budget", "search --out {new}", "--budget", 0, slow=True),
    case("search-two-budgets", "search --budget 0.5 --budget-ms 3 --out {new}", "--budget-ms", 0, slow=True),
]


def _params():
    return [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else []) for c in CASES]


@dataclass
class Run:
    """One case run in its own world: the command's result, the world before and after, the time."""

    case: Case
    world: Path
    args: list[str]
    fragment: str
    before: dict
    proc: Optional[subprocess.CompletedProcess] = None
    after: Optional[dict] = None
    seconds: float = 0.0


def prepared(c: Case, folder: Path, request) -> Run:
    world = World(folder / "w", request)
    args = [a.format_map(world) for a in c.args]
    return Run(c, world.root, args, c.fragment.format_map(world), snapshot(world.root))


def execute(run: Run) -> Run:
    started = time.monotonic()
    run.proc = cli(run.args, cwd=run.world / "cwd", cache=run.world.parent / "cache")
    run.seconds = time.monotonic() - started
    run.after = snapshot(run.world)
    return run


@pytest.fixture(scope="module")
def slow_runs(request, tmp_path_factory) -> dict[str, Run | Exception]:
    """The selected slow cases, two at a time: each is a fresh process that spends seconds of one
    core loading torch, and the cases share nothing (every one has its own world)."""
    wanted = [item.callspec.params["c"] for item in request.session.items
              if getattr(item, "originalname", "") == "test_bad_input_is_refused_in_one_line_and_changes_nothing"
              and item.callspec.params["c"].slow]
    runs: dict[str, Run | Exception] = {}
    for c in wanted:
        try:
            runs[c.id] = prepared(c, tmp_path_factory.mktemp(c.id), request)
        except Exception as e:  # reported by the case's own test
            runs[c.id] = e
    with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        ready = [r for r in runs.values() if isinstance(r, Run)]
        list(pool.map(execute, ready))
    return runs


@pytest.mark.parametrize("c", _params())
def test_bad_input_is_refused_in_one_line_and_changes_nothing(c: Case, tmp_path, request):
    if "without-gpu" in c.id and shutil.which("nvidia-smi"):
        pytest.skip("this machine has a GPU")
    run = request.getfixturevalue("slow_runs")[c.id] if c.slow else execute(prepared(c, tmp_path, request))
    if isinstance(run, Exception):
        raise run
    assert_refused(run.proc, run.fragment)
    assert run.after == run.before, "a refused command changed, created or removed files"
    if not c.slow:  # refused before torch loads
        assert run.seconds < 3, f"took {run.seconds:.1f} s"
    if c.id == "checkpoint-runs-code":
        assert not (run.world / "cwd" / "pwned").exists()


def test_the_table_covers_every_item_and_command():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)
    assert {c.item for c in CASES} >= set(range(1, 12)) - {2}  # item 2 (Ctrl-C): test_ctrl_c_* below
    commands = {c.args[0] for c in CASES if c.args} | {" ".join(c.args[:2]) for c in CASES if c.args[:2] == ("profile", "validate")}
    assert commands >= {"inspect", "bench", "export", "profile", "profile validate", "search", "train", "report", "compare"}


@pytest.mark.slow
def test_markup_in_paths_is_written_and_shown_literally(tmp_path, request):
    world = World(tmp_path / "w", request)
    out = world.root / "rep" / "[bold]a[/]b"
    proc = cli(["report", world["run"], "--format", "md", "--out", str(out)], cwd=world.root / "cwd",
               cache=tmp_path / "cache")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"wrote {out / 'report.md'}" in proc.stdout and (out / "report.md").is_file()



# ----- Ctrl-C: exit 130, one line, finished work kept ----------------------------------------------


def interrupt(args: list[str], busy: Callable[[], bool], cwd: Path, cache: Path, settle: float = 1.0,
              timeout: float = 240) -> subprocess.CompletedProcess:
    """Start `caitsearch ARGS`, wait until `busy()` says the work is under way, then press Ctrl-C.
    The command gets Ctrl-C's default action back, as in a user's terminal: a test run started in
    the background (`pytest &`, nohup) would otherwise pass on an ignored SIGINT. It never outlives
    the test: a command still running when the test fails is killed, not left to slow the rest."""
    proc = subprocess.Popen([*CLI, *args], cwd=cwd, env=environment(cache), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + timeout
        while not busy() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(settle)
        assert proc.poll() is None, "the command finished before it could be interrupted: " + proc.stderr.read()[-2000:]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_interrupted(proc: subprocess.CompletedProcess, resumable: bool = True) -> None:
    """Exit 130 and one line for the interruption, the last on stderr (lines before it are what
    the command said while working, e.g. dense training's step count), and no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 130 and lines, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and lines[-1].startswith("interrupted"), lines
    assert sum("interrupted" in line for line in lines) == 1, lines
    assert ("run the same command again to resume" in lines[-1]) == resumable, lines


@pytest.mark.slow
def test_ctrl_c_during_profile(tmp_path):
    out = tmp_path / "prof"
    proc = interrupt(["profile", "--threads", "1", "--out", str(out)], lambda: (out / "table.parquet").exists(),
                     tmp_path, tmp_path / "cache")
    assert_interrupted(proc)
    manifest = json.loads((out / "manifest.json").read_text())  # what was measured is kept, whole
    assert manifest["complete"] is False and (out / "table.parquet").stat().st_size > 0


@pytest.mark.slow
def test_ctrl_c_during_train(tmp_path, fashion_mnist):
    out = tmp_path / "run"
    proc = interrupt([*TRAIN, "--epochs", "3", "--train-limit", "4096", "--batch-size", "32", "--save-every", "2",
                      "--out", str(out)], lambda: (out / "state.pt").exists(), tmp_path, tmp_path / "cache")
    assert_interrupted(proc)
    assert not (out / "metrics.json").exists()


@pytest.mark.slow
def test_ctrl_c_during_search(tmp_path, quick_profile):
    out = tmp_path / "run"
    proc = interrupt(["search", "--budget", "0.9", "--profile", str(quick_profile), "--trials", "200", *TINY,
                      "--out", str(out)], lambda: (out / "study.db").exists(), tmp_path, tmp_path / "cache", settle=3)
    assert_interrupted(proc)
    assert json.loads((out / "manifest.json").read_text())["request"]["budget"]["ratio"] == 0.9


@pytest.mark.slow
def test_ctrl_c_during_bench_does_not_promise_a_resume(tmp_path):
    proc = interrupt(["bench", "--repeats", "1000000", "--threads", "1"], lambda: True, tmp_path, tmp_path / "cache",
                     settle=8)
    assert_interrupted(proc, resumable=False)


# ----- the boundary itself, in process -----------------------------------------------------------


@pytest.mark.parametrize("raised, code, line", [
    (CaitsearchError("config [bold]x.json does not exist."), 2, "error: config [bold]x.json does not exist."),
    (KeyboardInterrupt(), 130, "interrupted."),
    (OSError(28, "No space left on device", "out/model.safetensors"), 2, "cannot use out/model.safetensors"),
    (ZeroDivisionError("division by zero"), 1, "internal error: ZeroDivisionError: division by zero"),
], ids=["bad-input", "ctrl-c", "disk-full", "bug"])
def test_error_boundary_maps_every_ending_to_one_line(raised, code, line, tmp_path, monkeypatch, capsys):
    import importlib

    import typer

    app_module = importlib.import_module("caitsearch.cli.app")  # the module (caitsearch.cli.app is also the Typer app's name)
    tiny = typer.Typer()

    @tiny.command()
    def boom() -> None:
        raise raised

    @tiny.command()
    def other() -> None:
        pass

    monkeypatch.setattr(app_module, "app", tiny)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("CAITSEARCH_DEBUG", raising=False)
    assert app_module.run(["boom"]) == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and line in lines[0], lines
    if code == 1:  # the traceback is in the file the line names
        logs = list((tmp_path / "cache" / "caitsearch").glob("caitsearch-error-*.log"))
        assert len(logs) == 1 and str(logs[0]) in lines[0] and "ZeroDivisionError" in logs[0].read_text()
    assert app_module.run(["boom", "--nope"]) == 2  # typer's bundled click: a usage error
    assert "No such option: --nope" in capsys.readouterr().err


@pytest.mark.parametrize("fails", [False, True], ids=["finished", "failed"])
def test_a_progress_bar_is_cleared_when_its_work_fails(fails):
    """On a terminal the bar stays when the work finishes and is erased when it ends in an error or
    Ctrl-C, so the error line that follows stands alone."""
    import io

    from rich.console import Console

    from caitsearch.console import Progress

    terminal = io.StringIO()
    with pytest.raises(CaitsearchError) if fails else contextlib.nullcontext():
        with Progress(True, console=Console(file=terminal, force_terminal=True, width=80)) as bar:
            bar.task("train", total=10).advance(3)
            if fails:
                raise CaitsearchError("training diverged")
    erased = terminal.getvalue().endswith("\x1b[2K")  # cursor up, line erased
    assert erased == fails
