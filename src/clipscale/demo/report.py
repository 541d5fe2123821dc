"""What the demo leaves to look at: loss.png, samples.png and report.md in the run directory."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..data.jpeg import decode_image  # noqa: E402
from ..evaluate import Encoder, shard_set  # noqa: E402


def plot_curves(records: list[dict], path: Path) -> None:
    """Training loss over steps, and zero-shot top-1 / image→text R@1 at each evaluation."""
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/zeroshot_top1" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", lw=1.2, label="training loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("contrastive loss", color="tab:blue")
    ax.grid(alpha=0.3)
    acc = ax.twinx()
    steps = [r["step"] for r in evals]
    acc.plot(
        steps,
        [100 * r["eval/zeroshot_top1"] for r in evals],
        "o-",
        color="tab:red",
        label="zero-shot top-1 (held-out digits)",
    )
    if evals and "eval/i2t_r1" in evals[0]:
        acc.plot(
            steps,
            [100 * r["eval/i2t_r1"] for r in evals],
            "s--",
            color="tab:green",
            ms=4,
            label="image→text R@1 (held-out)",
        )
    acc.axhline(10, color="gray", ls=":", lw=1)
    acc.set_ylim(0, 100)
    acc.set_ylabel("accuracy / recall (%)", color="tab:red")
    lines = ax.get_legend_handles_labels()[0] + acc.get_legend_handles_labels()[0]
    acc.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize=8)
    ax.set_title("clipscale demo: CLIP on handwritten digits (chance = 10%)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_predictions(
    bundle, test_pattern: str, classnames: list[str], templates: list, path: Path, n: int = 24
) -> float:
    """A grid of held-out test images with the caption the model picks for each; the accuracy of
    the grid (green: right, red: wrong)."""
    ev = shard_set(test_pattern, (0, 1), "label")
    enc = Encoder(bundle.model, bundle.val_transform, bundle.tokenizer, torch.device("cpu"), batch_size=n)
    bundle.model.eval()
    with torch.no_grad():
        classifier = enc.classifier(classnames, templates)
        images = torch.stack([bundle.val_transform(decode_image(src)) for src in ev.sources[:n]])
        preds = (enc._encode_images(images) @ classifier).argmax(dim=1).tolist()
    labels = ev.labels[:n]
    cols = 6
    fig, axes = plt.subplots(
        (n + cols - 1) // cols, cols, figsize=(cols * 1.9, ((n + cols - 1) // cols) * 2.1), dpi=110
    )
    for ax, src, pred, label in zip(axes.flat, ev.sources[:n], preds, labels):
        ax.imshow(decode_image(src))
        caption = (
            templates[0].format(classnames[pred]) if isinstance(templates[0], str) else templates[0](classnames[pred])
        )
        ax.set_title(caption, fontsize=7, color="green" if pred == label else "red")
        ax.axis("off")
    for ax in list(axes.flat)[len(preds) :]:
        ax.axis("off")
    fig.suptitle("held-out digits and the caption the model chose (green: right, red: wrong)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return sum(p == t for p, t in zip(preds, labels)) / max(1, len(preds))


def write_report(path: Path, info: dict, final: dict, records: list[dict]) -> None:
    evals = [r for r in records if "eval/zeroshot_top1" in r]
    chance_r1 = 1 / max(1, final.get("eval/retrieval_images", 1))
    lines = [
        "# clipscale demo report",
        "",
        f"Trained `{info['model']}` from scratch with {info['nproc']} process(es) (torchrun, gloo, CPU) for "
        f"{info['steps']} steps, global batch {info['global_batch']}, on {info['train_samples']} "
        f"augmented image-caption pairs of scikit-learn's handwritten digits; evaluated on "
        f"{info['test_samples']} held-out scans (no test scan was trained on, in any augmentation).",
        "",
        f"Time: {info['seconds'] / 60:.1f} min in all ({info['train_seconds'] / 60:.1f} min training).",
        "",
        "## Final metrics (held-out digits)",
        "",
        "| metric | value | chance |",
        "| --- | --- | --- |",
        f"| zero-shot top-1 (templates never trained on) | {100 * final['eval/zeroshot_top1']:.1f}% | 10% |",
        f"| zero-shot top-5 | {100 * final['eval/zeroshot_top5']:.1f}% | 50% |",
        f"| image→text R@1 | {100 * final['eval/i2t_r1']:.1f}% | {100 * chance_r1:.2f}% |",
        f"| image→text R@5 | {100 * final['eval/i2t_r5']:.1f}% | {500 * chance_r1:.2f}% |",
        f"| text→image R@1 | {100 * final['eval/t2i_r1']:.1f}% | {100 * chance_r1:.2f}% |",
        f"| training loss | {info['first_loss']:.3f} (step {info['first_step']}) → {info['last_loss']:.3f} | |",
        "",
        "Retrieval counts only the image's own caption as a match; captions name the digit, not the",
        "scan, so several images fit one caption equally well and R@1 is bounded well below 100%.",
        "",
        "## Over training",
        "",
        "| step | zero-shot top-1 | top-5 | i2t R@1 | t2i R@1 |",
        "| --- | --- | --- | --- | --- |",
        *[
            f"| {r['step']} | {100 * r['eval/zeroshot_top1']:.1f}% | {100 * r['eval/zeroshot_top5']:.1f}% | "
            f"{100 * r.get('eval/i2t_r1', 0):.1f}% | {100 * r.get('eval/t2i_r1', 0):.1f}% |"
            for r in evals
        ],
        "",
        "![loss and accuracy](loss.png)",
        "",
        f"![predictions](samples.png) (accuracy on these {info['grid']} images: {100 * info['grid_accuracy']:.0f}%)",
        "",
        f"Zero-shot templates: {', '.join(repr(t) for t in info['templates'])}.",
        "",
        f"Run directory: `{info['run_dir']}` (config.yaml, metrics.jsonl, checkpoints/latest).",
        "",
    ]
    path.write_text("\n".join(lines))
