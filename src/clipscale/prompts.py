"""Class names and prompt templates for zero-shot classification, by built-in name.

`imagenet` / `openai` / `simple` are open_clip's lists (imported only when asked for: open_clip
loads torch); `digits` are the demo's handwritten-digit classes and its evaluation templates,
which the demo never trains on.
"""

from __future__ import annotations

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_TEMPLATES = [
    "a photo of the number {}.",
    "a picture of a {}.",
    "this is the digit {}.",
    "an image showing {}.",
]


def builtin_classes(name: str) -> list[str] | None:
    """The class names called `name` (imagenet | digits), or None for any other name."""
    if name == "imagenet":
        from open_clip import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES)
    if name == "digits":
        return list(DIGIT_WORDS)
    return None


def builtin_templates(name: str) -> list | None:
    """The prompt templates called `name` (openai | simple | digits), or None for any other name."""
    if name == "openai":
        from open_clip import OPENAI_IMAGENET_TEMPLATES

        return list(OPENAI_IMAGENET_TEMPLATES)
    if name == "simple":
        from open_clip import SIMPLE_IMAGENET_TEMPLATES

        return list(SIMPLE_IMAGENET_TEMPLATES)
    if name == "digits":
        return list(DIGIT_TEMPLATES)
    return None
