"""Zero-shot classification and image-text retrieval, during training and for any checkpoint.

Zero-shot: class names + prompt templates → open_clip's `build_zero_shot_classifier` (mean of
the normalised template embeddings per class) → top-1/top-5 over an image-folder tree
(`root/<class>/*.jpg`, ImageNet-val layout) or labelled shards (`cls`). Retrieval: image→text
and text→image Recall@1/5/10 over held-out shards; all captions of an image count as matches
(several captions come from a `captions` list in the .json, or from samples whose image bytes
are identical).

Every rank encodes an equal, strided share of the images and of the captions (padded to the
same number of batches, because ZeRO-3 forwards are collective), the features are gathered and
every rank computes the same numbers. The model runs in eval mode under no_grad, and the RNG
states are put back afterwards, so evaluating never changes training (resume stays exact).

Images that cannot be decoded are found when the sets are loaded (each rank decodes its share
once), agreed on by every rank and left out (`eval/*_skipped`): one bad file must not make one
rank fail hours into training while the others wait for it in a collective. An image that goes
bad later (a file changed on disk) is encoded as a blank image and counted (`eval/decode_errors`).
DataLoader workers ignore the preemption signals, like the training data's.

    prompts.py   class names and templates (built-in or files)
    sets.py      the evaluation sets, each rank's share, undecodable images left out
    encode.py    features of a whole set on every rank
    scores.py    top-k accuracy, Recall@k
    __init__.py  the Evaluator (and clipscale.checkpoint.weights loads a model from any checkpoint)
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator, Sequence

import torch

from ..config import EvalConfig
from ..job.distributed import all_gather_object, rank, world_size
from .encode import Encoder, eval_mode, preserved_rng
from .errors import EvalDataError
from .prompts import load_classes_and_templates
from .scores import RECALL_AT, retrieval_recall, topk_accuracy
from .sets import EvalSet, leave_out_undecodable, load_eval_set, shard_set

log = logging.getLogger(__name__)

__all__ = [
    "RECALL_AT",
    "EvalDataError",
    "EvalSet",
    "Encoder",
    "Evaluator",
    "iter_eval_rows",
    "load_classes_and_templates",
    "retrieval_recall",
    "shard_set",
    "topk_accuracy",
]


class Evaluator:
    """Loads the evaluation sets once; `run(model)` returns {"eval/...": value}."""

    def __init__(
        self,
        spec: EvalConfig,
        transform: Callable,
        tokenizer: Callable,
        device: torch.device,
        signals: Sequence[str] = (),
    ):
        """Collective: loads every rank's share of the sets and leaves out the images that do not decode.
        `signals`: the preemption signals the DataLoader workers must ignore."""
        self.spec, self.transform, self.tokenizer, self.device = spec, transform, tokenizer, device
        self.signals = tuple(signals)
        share = (rank(), world_size())
        self.zeroshot_set = self.retrieval_set = None
        if spec.zeroshot:
            self.zeroshot_set = load_eval_set(spec.zeroshot, "label", share)
            leave_out_undecodable(self.zeroshot_set, transform, "eval.zeroshot", spec.workers, self.signals)
            self.classnames, self.templates = load_classes_and_templates(
                spec.zeroshot_classes, spec.zeroshot_templates, self.zeroshot_set.folder_names
            )
            bad = [label for label in self.zeroshot_set.labels if not 0 <= label < len(self.classnames)]
            if bad:
                raise EvalDataError(
                    f"eval.zeroshot: label {bad[0]} is outside the {len(self.classnames)} "
                    f"class names of {spec.zeroshot_classes or 'the class folders'}"
                )
        if spec.retrieval:
            self.retrieval_set = load_eval_set(spec.retrieval, "captions", share)
            leave_out_undecodable(self.retrieval_set, transform, "eval.retrieval", spec.workers, self.signals)

    last_step = -1  # the training step evaluated last (the trainer sets it)

    def due(self, step: int) -> bool:
        """An evaluation after this training step (every eval.every_n_steps; 0: only at the end)."""
        return bool(self.spec.every_n_steps) and step % self.spec.every_n_steps == 0

    def due_at_end(self, step: int, preempted: bool) -> bool:
        """The evaluation after the last step (eval.at_end), unless this step was just evaluated or the
        run was preempted (its requeued job evaluates at its end)."""
        return self.spec.at_end and not preempted and self.last_step != step

    def run(self, model: torch.nn.Module, autocast: Callable = contextlib.nullcontext) -> dict[str, float]:
        enc = Encoder(
            model,
            self.transform,
            self.tokenizer,
            self.device,
            self.spec.batch_size,
            self.spec.workers,
            autocast,
            self.signals,
        )
        out: dict[str, float] = {}
        with preserved_rng(), eval_mode(model):
            if self.zeroshot_set is not None:
                ev = self.zeroshot_set
                classifier = enc.classifier(self.classnames, self.templates)
                acc = topk_accuracy(enc.images(ev) @ classifier, torch.tensor(ev.labels), (1, 5))
                out.update(
                    {
                        "eval/zeroshot_top1": acc[1],
                        "eval/zeroshot_top5": acc[5],
                        "eval/zeroshot_images": ev.size,
                        "eval/zeroshot_skipped": ev.skipped,
                    }
                )
            if self.retrieval_set is not None:
                ev = self.retrieval_set
                texts = [c for caps in ev.captions for c in caps]
                owner = torch.tensor([i for i, caps in enumerate(ev.captions) for _ in caps])
                recall = retrieval_recall(enc.images(ev), enc.texts(texts), owner)
                out.update({f"eval/{k}": v for k, v in recall.items()})
                out.update(
                    {
                        "eval/retrieval_images": ev.size,
                        "eval/retrieval_texts": len(texts),
                        "eval/retrieval_skipped": ev.skipped,
                    }
                )
        decode_errors = sum(all_gather_object(enc.decode_errors))
        if decode_errors:
            log.warning("evaluation: %d image(s) no longer decode; they were encoded as blank images", decode_errors)
            out["eval/decode_errors"] = decode_errors
        return out


def iter_eval_rows(results: dict) -> Iterator[tuple[str, str]]:
    """(name, formatted value) rows for a printed table."""
    for key, value in results.items():
        name = key.removeprefix("eval/")
        yield name, (f"{100 * value:.2f}%" if isinstance(value, float) else str(value))
