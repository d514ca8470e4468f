"""Pictures of a training run: the loss and validation curves, and predicted vs true boxes on held-out images."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curve(curve: dict, path: Path) -> None:
    """Training loss per phase (left) and held-out validation scores along the run (right)."""
    plt = _pyplot()
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for phase in dict.fromkeys(e["phase"] for e in curve["loss"]):
        points = [e for e in curve["loss"] if e["phase"] == phase]
        # stage 1's loss includes lambda * distillation: plot its caption part, comparable with the other phases
        ax_loss.plot([e["step"] for e in points], [e.get("caption_loss", e["loss"]) for e in points], label=phase)
    ax_loss.set(xlabel="optimizer step", ylabel="LM loss (stage 1: caption part)", yscale="log", title="training loss")
    if curve["loss"]:
        ax_loss.legend()
    if curve["val"]:
        steps = [e["step"] for e in curve["val"]]
        ax_val.plot(steps, [e["grounding_acc50"] for e in curve["val"]], "o-", label="grounding ACC@0.5")
        ax_val.plot(steps, [e["caption_exact"] for e in curve["val"]], "s-", label="caption exact match")
        for e in curve["val"]:
            if e["phase"] != "start":
                ax_val.axvline(e["step"], color="0.9", zorder=0)
        ax_val.legend()
    ax_val.set(xlabel="optimizer step", ylabel="validation score", ylim=(0, 1), title="held-out validation")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_boxes(model, processor, rows, path: Path, n: int = 16) -> None:
    """A grid of held-out queries: the caption, the true box (green) and the box `model.ground` returns (red)."""
    from matplotlib.patches import Rectangle

    from ..eval.benchmarks import to_pil
    from ..eval.metrics import box_iou, valid_box

    plt = _pyplot()
    samples = []
    for row in rows:
        image = to_pil(row["image"])
        for region in row["regions"]:
            samples.append((image, region["caption"], [float(v) for v in region["bbox"]]))
        if len(samples) >= n:
            break
    samples = samples[:n]
    cols = 4
    fig, axes = plt.subplots(-(-len(samples) // cols), cols, figsize=(3 * cols, 3.2 * -(-len(samples) // cols)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, caption, box) in zip(axes.flat, samples):
        [found] = model.ground(processor, image, [caption])
        ax.imshow(image)
        x1, y1, x2, y2 = box
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="lime", lw=2))
        iou = 0.0
        if found and valid_box(found[0]):
            px1, py1, px2, py2 = found[0]
            ax.add_patch(Rectangle((px1, py1), px2 - px1, py2 - py1, fill=False, color="red", lw=2, ls="--"))
            iou = box_iou(found[0], box)
        ax.set_title(f"{caption}\nIoU {iou:.2f}", fontsize=9)
    fig.suptitle("held-out test: true box (green) vs model.ground (red, dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
