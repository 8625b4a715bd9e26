"""What every benchmark script shares: the machine line, the RESULTS.md section writer, and the
box diagnostic of the quality scripts."""
from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

HERE = Path(__file__).resolve().parent


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    mem = ""
    try:
        kb = int(next(line for line in open("/proc/meminfo") if line.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}, {platform.system()}"


def today() -> str:
    return datetime.date.today().isoformat()


def write_section(heading: str, section: str, path: Path = HERE / "RESULTS.md") -> None:
    """Replace one `## ` section of RESULTS.md in its place (a new one goes last), keeping the others.
    A section is `heading`'s when its first line is the heading, or the heading then " (...)": so
    "## Quality" is not "## Quality on independently drawn clips"."""
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    parts = text.split("\n## ")
    head, rest = parts[0], ["## " + p for p in parts[1:]]

    def mine(p: str) -> bool:
        return p.split("\n", 1)[0].split(" (", 1)[0].rstrip() == heading

    at = next((i for i, p in enumerate(rest) if mine(p)), len(rest))
    rest = rest[:at] + [section] + [p for p in rest[at:] if not mine(p)]
    path.write_text(head.rstrip() + "\n\n" + "\n".join(p.rstrip() + "\n" for p in rest))


# A box with IoU below this is a miss (on another object or background), in every box diagnostic.
MISS_IOU = 0.1


def true_span_boxes(model, prep: dict, boxes, row: dict) -> list[tuple[int, list[float], float]]:
    """(frame, the model's box in pixels, its IoU with the truth) on each sampled frame inside the
    true span of a clip (`row`, its manifest line): the boxes alone, whatever span was chosen."""
    from stgcli.metrics import box_iou

    px = model.processor.boxes_to_pixels(boxes, row["width"], row["height"])
    return [(int(f), px[i], float(box_iou(px[i], row["boxes"][str(int(f))])))
            for i, f in enumerate(prep["sampled"].indices) if str(int(f)) in row["boxes"]]


def true_span_box_ious(model, prep: dict, boxes, row: dict) -> list[float]:
    """The IoUs of true_span_boxes."""
    return [iou for _, _, iou in true_span_boxes(model, prep, boxes, row)]
