"""Zero-shot classification and retrieval: the metrics, the data sources, and `clipscale eval`."""

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipscale.config import EvalConfig, ModelConfig
from clipscale.evaluate import EvalDataError, Evaluator, retrieval_recall, shard_set, topk_accuracy
from clipscale.metrics import read_jsonl
from clipscale.model import create_model
from clipscale.shards.writer import write_shards
from clipscale.train import train

from helpers import COLORS, cli_here, jpeg, run_cli, tiny_config

NAMES = list(COLORS)


def color_folder(root, per_class=3):
    """root/<colour>/*.png, flat colour images: the ImageNet-val layout."""
    for name, rgb in COLORS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), rgb).save(root / name / f"{i}.png")
    return root


class OracleModel(torch.nn.Module):
    """Image features: the prototype of the colour in the picture; text features: the prototype
    of the colour the text names. Perfect by construction."""

    def __init__(self):
        super().__init__()
        self.protos = torch.nn.Parameter(
            F.normalize(torch.randn(len(NAMES), 16, generator=torch.Generator().manual_seed(0)), dim=-1)
        )

    @staticmethod
    def transform(img):
        rgb = torch.tensor(img.getpixel((4, 4)), dtype=torch.float32)
        return rgb

    @staticmethod
    def tokenizer(texts):
        return torch.tensor([next(i for i, n in enumerate(NAMES) if re.search(rf"\b{n}\b", t)) for t in texts])

    def encode_image(self, rgb, normalize=True):
        palette = torch.tensor(list(COLORS.values()), dtype=torch.float32)
        return self.protos[torch.cdist(rgb, palette).argmin(dim=1)]

    def encode_text(self, ids, normalize=True):
        return self.protos[ids]


def test_a_perfect_model_scores_100_percent_on_an_image_folder(tmp_path):
    model = OracleModel()
    ev = Evaluator(
        EvalConfig(zeroshot=str(color_folder(tmp_path / "val")), batch_size=5),
        model.transform,
        model.tokenizer,
        torch.device("cpu"),
    )
    assert ev.classnames == sorted(NAMES)  # folder names; sorted order = label order
    out = ev.run(model)
    assert out["eval/zeroshot_top1"] == 1.0 and out["eval/zeroshot_top5"] == 1.0
    assert out["eval/zeroshot_images"] == 3 * len(NAMES)


def digit_test_shards(tmp_path):
    from clipscale.demo.data import load_digits_split, test_samples

    _, test = load_digits_split()
    write_shards(test_samples(test, 32, 0), tmp_path, "digits-test", 1000)
    return str(tmp_path / "digits-test-000000.tar")


def test_a_random_model_is_near_chance_on_labelled_shards(tmp_path):
    shards = digit_test_shards(tmp_path)
    torch.manual_seed(0)
    bundle = create_model(ModelConfig(name="clip-tiny"))
    ev = Evaluator(
        EvalConfig(
            zeroshot=shards, zeroshot_classes="digits", zeroshot_templates="digits", retrieval=shards, batch_size=128
        ),
        bundle.val_transform,
        bundle.tokenizer,
        torch.device("cpu"),
    )
    out = ev.run(bundle.model)
    n = out["eval/zeroshot_images"]
    assert n == 359
    assert 0.0 <= out["eval/zeroshot_top1"] <= 0.25  # 10 classes: chance is 0.10
    assert 0.25 <= out["eval/zeroshot_top5"] <= 0.75  # chance is 0.50
    assert out["eval/i2t_r1"] < 0.05 and out["eval/t2i_r10"] < 0.2  # chance R@1 = 1/359


def test_retrieval_recall_on_a_hand_made_case():
    # 3 images, 4 captions: image 0 has captions 0 and 1, image 1 has caption 2, image 2 has caption 3
    images = torch.eye(3)
    texts = torch.tensor(
        [
            [0.0, 1.0, 0.0],  # caption of image 0, but closest to image 1
            [1.0, 0.0, 0.0],  # caption of image 0, closest to image 0
            [0.0, 0.6, 0.8],  # caption of image 1, closest to image 2
            [0.0, 0.0, 1.0],
        ]
    )  # caption of image 2
    owner = torch.tensor([0, 0, 1, 2])
    r = retrieval_recall(images, texts, owner, ks=(1, 2))
    # i2t: image 0 -> best text is 1 (its own): hit@1; image 1 -> texts 0 (1.0), 2 (0.6): own at rank 2;
    #      image 2 -> texts 3 (1.0), 2 (0.8): own at rank 1
    assert r["i2t_r1"] == pytest.approx(2 / 3) and r["i2t_r2"] == 1.0
    # t2i: text 0 -> image 1 first (miss@1), image 0 not in top 2 (0 ties with 2: stable order puts
    #      image 0 second); text 1 -> image 0 hit; text 2 -> image 2 first, image 1 second; text 3 -> hit
    assert r["t2i_r1"] == pytest.approx(2 / 4) and r["t2i_r2"] == 1.0


def test_topk_accuracy():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    acc = topk_accuracy(logits, torch.tensor([1, 1, 0]), (1, 2))
    assert acc[1] == pytest.approx(1 / 3) and acc[2] == pytest.approx(2 / 3)


def test_identical_images_are_one_image_with_several_captions(tmp_path):
    img = jpeg(Image.new("RGB", (8, 8), (200, 10, 10)))
    other = jpeg(Image.new("RGB", (8, 8), (10, 10, 200)))
    samples = [
        {"__key__": "a", "jpg": img, "txt": "a red square"},
        {"__key__": "b", "jpg": other, "txt": "a blue square"},
        {"__key__": "c", "jpg": img, "txt": "something red"},
        {"__key__": "d", "jpg": other, "json": json.dumps({"captions": ["blue", "a blue thing"]})},
        {"__key__": "e", "txt": "no image"},
    ]
    write_shards(samples, tmp_path, "ret", 10)
    ev = shard_set(str(tmp_path / "ret-000000.tar"), (0, 1), "captions")
    assert ev.size == 2 and ev.skipped == 1
    assert ev.captions == [["a red square", "something red"], ["a blue square", "blue", "a blue thing"]]


def test_bad_class_files_and_sets_are_one_line_errors(tmp_path):
    model = OracleModel()
    (tmp_path / "classes.yaml").write_text("{classnames: 3}")
    folder = str(color_folder(tmp_path / "val", per_class=1))
    with pytest.raises(EvalDataError, match="must hold a list of class names"):
        Evaluator(
            EvalConfig(zeroshot=folder, zeroshot_classes=str(tmp_path / "classes.yaml")),
            model.transform,
            model.tokenizer,
            torch.device("cpu"),
        )
    with pytest.raises(EvalDataError, match="neither a built-in name nor a file"):
        Evaluator(
            EvalConfig(zeroshot=folder, zeroshot_templates="opnai"),
            model.transform,
            model.tokenizer,
            torch.device("cpu"),
        )
    (tmp_path / "two.txt").write_text("red\ngreen\n")
    with pytest.raises(EvalDataError, match="outside the 2 class names"):
        Evaluator(
            EvalConfig(zeroshot=folder, zeroshot_classes=str(tmp_path / "two.txt")),
            model.transform,
            model.tokenizer,
            torch.device("cpu"),
        )
    with pytest.raises(EvalDataError, match="evaluation shard not found"):
        Evaluator(
            EvalConfig(retrieval=str(tmp_path / "nope-{000000..000001}.tar")),
            model.transform,
            model.tokenizer,
            torch.device("cpu"),
        )


@pytest.fixture(scope="module")
def labelled_shards(tmp_path_factory):
    return digit_test_shards(tmp_path_factory.mktemp("digits_test"))


def test_evaluation_during_training_leaves_training_untouched(tmp_path, toy_shards, labelled_shards):
    """The same run with and without evaluation every 3 steps: identical losses, bitwise."""
    plain = train(tiny_config(tmp_path / "plain", toy_shards, data__workers=1))
    evald = train(
        tiny_config(
            tmp_path / "eval",
            toy_shards,
            data__workers=1,
            eval__every_n_steps=3,
            eval__zeroshot=labelled_shards,
            eval__zeroshot_classes="digits",
            eval__retrieval=labelled_shards,
            eval__batch_size=200,
        )
    )
    losses = lambda d: [r["loss"] for r in read_jsonl(d / "metrics.jsonl") if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "plain") == losses(tmp_path / "eval") and plain["loss"] == evald["loss"]
    evals = [r for r in read_jsonl(tmp_path / "eval" / "metrics.jsonl") if "eval/zeroshot_top1" in r]
    assert [r["step"] for r in evals] == [3, 6, 9, 10]  # every 3 steps and at the end
    for r in evals:
        for key in ("eval/zeroshot_top1", "eval/zeroshot_top5", "eval/i2t_r1", "eval/t2i_r1"):
            assert 0.0 <= r[key] <= 1.0


def test_clipscale_eval_on_an_open_clip_format_checkpoint(tmp_path):
    torch.manual_seed(1)
    bundle = create_model(ModelConfig(name="clip-tiny"))
    torch.save(bundle.model.state_dict(), tmp_path / "open_clip.pt")  # a bare open_clip state_dict
    folder = color_folder(tmp_path / "val", per_class=2)
    out = run_cli(
        "eval",
        "--checkpoint",
        str(tmp_path / "open_clip.pt"),
        "--model",
        "clip-tiny",
        "--zeroshot",
        str(folder),
        "--templates",
        "simple",
        "--output",
        str(tmp_path / "r.json"),
        "--workers",
        "0",
    )
    assert "zeroshot_top1" in out.stdout and "%" in out.stdout
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["model"] == "clip-tiny" and 0.0 <= record["eval/zeroshot_top1"] <= 1.0
    assert record["eval/zeroshot_images"] == 2 * len(NAMES)
    # the same weights give the same numbers in-process
    direct = Evaluator(
        EvalConfig(zeroshot=str(folder), zeroshot_templates="simple"),
        bundle.val_transform,
        bundle.tokenizer,
        torch.device("cpu"),
    ).run(bundle.model)
    assert np.isclose(direct["eval/zeroshot_top1"], record["eval/zeroshot_top1"])
    wrong = cli_here(
        "eval",
        "--checkpoint",
        str(tmp_path / "open_clip.pt"),
        "--model",
        "clip-small",
        "--zeroshot",
        str(folder),
        check=False,
    )
    assert wrong.returncode == 2 and wrong.stderr.startswith("clipscale: error:") and "does not fit" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    nameless = cli_here("eval", "--checkpoint", str(tmp_path / "open_clip.pt"), "--zeroshot", str(folder), check=False)
    assert nameless.returncode == 2 and "--model" in nameless.stderr


# --------------------------------------------------------------------------- undecodable images (issue 20)


def _zeroshot_on_a_folder_with_a_corrupt_image(rank, world, root):
    model = OracleModel()
    ev = Evaluator(EvalConfig(zeroshot=root, batch_size=2), model.transform, model.tokenizer, torch.device("cpu"))
    return ev.run(model)


def test_a_corrupt_eval_image_is_left_out_on_every_rank_alike(tmp_path):
    """The bad file falls in one rank's share; both ranks agree to leave it out, none raises."""
    root = color_folder(tmp_path / "val")
    (root / "black" / "1.png").write_bytes(b"not a png at all")
    from distributed_helpers import run_distributed

    results = run_distributed(_zeroshot_on_a_folder_with_a_corrupt_image, 2, str(root))
    assert results[0] == results[1]
    out = results[0]
    assert out["eval/zeroshot_skipped"] == 1
    assert out["eval/zeroshot_images"] == 3 * len(NAMES) - 1
    assert out["eval/zeroshot_top1"] == 1.0
    assert "eval/decode_errors" not in out


def test_an_image_that_stops_decoding_after_start_up_is_counted_not_raised(tmp_path):
    root = color_folder(tmp_path / "val")
    model = OracleModel()
    ev = Evaluator(EvalConfig(zeroshot=str(root), batch_size=4), model.transform, model.tokenizer, torch.device("cpu"))
    (root / "red" / "2.png").write_bytes(b"\xff\xd8 truncated")  # the file changed under a running job
    out = ev.run(model)
    assert out["eval/decode_errors"] == 1
    assert out["eval/zeroshot_images"] == 3 * len(NAMES)  # still counted: encoded as a blank image


def slow_transform(img):
    """(module level: workers come from a fork server, so what they run is pickled)"""
    import time

    time.sleep(0.02)
    return OracleModel.transform(img)


def test_eval_workers_ignore_preemption_signals(tmp_path):
    """A SIGTERM meant for the trainer reaches the evaluation workers too (SLURM signals the whole
    step); they must not die of it, or the evaluation raises 'DataLoader worker killed'."""
    import signal
    import threading
    import time

    import psutil

    root = color_folder(tmp_path / "val", per_class=6)
    model = OracleModel()

    spec = EvalConfig(zeroshot=str(root), batch_size=4, workers=2)
    ev = Evaluator(spec, slow_transform, model.tokenizer, torch.device("cpu"), signals=("SIGTERM",))
    hit = []

    def signal_the_workers():
        deadline = time.monotonic() + 60
        while not hit and time.monotonic() < deadline:
            from multiprocessing import forkserver

            server = forkserver._forkserver._forkserver_pid  # (in pytest it may be another test's, unblocked)
            for child in psutil.Process().children(recursive=True):  # the fork server's workers
                if child.ppid() != server:
                    continue
                child.send_signal(signal.SIGTERM)
                hit.append(child.pid)
            time.sleep(0.01)

    thread = threading.Thread(target=signal_the_workers, daemon=True)
    thread.start()
    out = ev.run(model)
    thread.join(timeout=70)
    assert hit, "no evaluation worker was seen"
    assert out["eval/zeroshot_top1"] == 1.0
    assert out["eval/zeroshot_images"] == 6 * len(NAMES)
