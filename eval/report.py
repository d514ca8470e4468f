"""What a benchmark run leaves behind: scores.json, report.md (with the paper's family averages) and, for
grounding, boxes.png / boxes.html (images with true and predicted boxes)."""
import base64
import json
import os

from granvit.eval import metrics as M
from granvit.eval.benchmarks import FAMILIES, iter_samples


def family_averages(scores: dict) -> dict:
    """The paper's three averages: the mean headline score of the benchmarks of each family that were run."""
    out = {}
    for fam in FAMILIES:
        mains = [s["main"] for s in scores.values() if s["family"] == fam and s["in_average"]]
        out[fam] = {"average": sum(mains) / len(mains), "benchmarks": len(mains)} if mains else None
    return out


def update_scores(output: str, name: str, result: dict):
    path = os.path.join(output, "scores.json")
    scores = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            scores = json.load(f)["benchmarks"]
    scores[name] = result
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"benchmarks": scores, "family_averages": family_averages(scores)}, f, indent=2)
    with open(os.path.join(output, "report.md"), "w", encoding="utf-8") as f:
        f.write(render_report(scores))


META_KEYS = ("benchmark", "family", "metric", "hub_id", "split", "data", "in_average")


def render_report(scores: dict) -> str:
    lines = ["# GranViT evaluation", ""]
    for name, s in scores.items():
        # hub_id None: a local Gran set (`--benchmark gran`), which has no Hub distribution.
        source = f"{s['hub_id'] or 'local Gran set'} `{s['split']}`"
        source += f", local file `{s['data']}`" if s["data"] else ""
        lines += [f"## {name}", "", f"{source} ({s['family']}, metric `{s['metric']}`)", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                  for k, v in s.items() if k not in META_KEYS]
        lines.append("")
    lines += ["## Family averages (mean headline score, as in the paper; CIDEr is left out)", "",
              "| family | average | benchmarks |", "|---|---|---|"]
    for fam, v in family_averages(scores).items():
        lines.append(f"| {fam} | {v['average']:.4f} | {v['benchmarks']} |" if v else f"| {fam} | - | 0 |")
    return "\n".join(lines) + "\n"


def draw_boxes(records, rows, bench, base_dir, out_dir, n: int = 16):
    """boxes.png (a grid: true box green, predicted red) and boxes.html (the grid + a table) for grounding."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    wanted = {r["id"]: r for r in records[:n]}
    images = {}
    for s in iter_samples(bench, rows, base_dir):
        if s["id"] in wanted:
            images[s["id"]] = s["image"]
        if len(images) == len(wanted):
            break
    cols = 4
    rows_n = max(1, -(-len(wanted) // cols))
    fig, axes = plt.subplots(rows_n, cols, figsize=(3 * cols, 3 * rows_n), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    table = []
    for ax, (rid, rec) in zip(axes.flat, wanted.items()):
        ax.imshow(images[rid])
        (x1, y1, x2, y2) = rec["target"]["box"]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="lime", lw=2))
        iou = 0.0
        if M.valid_box(rec["box"]):
            px1, py1, px2, py2 = rec["box"]
            ax.add_patch(Rectangle((px1, py1), px2 - px1, py2 - py1, fill=False, color="red", lw=2, ls="--"))
            iou = M.box_iou(rec["box"], rec["target"]["box"])
        ax.set_title(f"{rec['target']['expression'][:30]}\nIoU {iou:.2f}", fontsize=8)
        table.append(f"<tr><td>{rid}</td><td>{_html(rec['target']['expression'])}</td><td>{rec['box']}</td>"
                     f"<td>{[round(v, 1) for v in rec['target']['box']]}</td><td>{iou:.3f}</td></tr>")
    fig.tight_layout()
    png = os.path.join(out_dir, "boxes.png")
    fig.savefig(png, dpi=80)
    plt.close(fig)
    with open(png, "rb") as f:
        b64 = base64.b64encode(f.read()).decode()
    with open(os.path.join(out_dir, "boxes.html"), "w", encoding="utf-8") as f:
        f.write(f"<html><body><h1>{bench.name}: true (green) vs predicted (red dashed)</h1>"
                f"<img src='data:image/png;base64,{b64}'><table border=1><tr><th>id</th><th>expression</th>"
                f"<th>predicted</th><th>true</th><th>IoU</th></tr>{''.join(table)}</table></body></html>")


def _html(text: str) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
