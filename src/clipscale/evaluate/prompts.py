"""Class names and prompt templates for zero-shot classification: built-in names, or files.

`imagenet` / `openai` / `simple` are open_clip's lists (imported only when asked for: open_clip
loads torch); `digits` are the demo's handwritten-digit classes and its evaluation templates,
which the demo never trains on.
"""

from __future__ import annotations

from pathlib import Path

from .errors import EvalDataError

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


def _read_list_file(path: str, what: str) -> object:
    p = Path(path)
    if not p.is_file():
        raise EvalDataError(f"{what}: {path} is neither a built-in name nor a file")
    text = p.read_text(encoding="utf-8")
    if p.suffix in (".yaml", ".yml", ".json"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exn:
            raise EvalDataError(f"{what}: {path} is not valid YAML/JSON ({str(exn).splitlines()[0]})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_classes_and_templates(
    classes: str | None, templates: str | None, folder_names: list[str] | None = None
) -> tuple[list[str], list]:
    """Class names and templates from built-in names (imagenet, digits | openai, simple, digits)
    or files (.txt: one per line; .yaml/.json: a list, or {classnames: [...], templates: [...]}).
    Without `classes`, an image-folder tree's folder names are the class names."""
    file_templates = None
    if classes is None:
        if folder_names is None:
            raise EvalDataError("eval.zeroshot_classes is needed for labelled shards (a file or 'imagenet')")
        names = [n.replace("_", " ") for n in folder_names]
    else:
        names = builtin_classes(classes)
        if names is None:
            data = _read_list_file(classes, "eval.zeroshot_classes")
            if isinstance(data, dict):
                file_templates = data.get("templates")
                data = data.get("classnames", data.get("classes"))
            if not isinstance(data, list) or not data or not all(isinstance(c, str) for c in data):
                raise EvalDataError(f"eval.zeroshot_classes: {classes} must hold a list of class names")
            names = data
    if templates is None:
        chosen = file_templates or builtin_templates("openai")
    else:
        chosen = builtin_templates(templates)
        if chosen is None:
            data = _read_list_file(templates, "eval.zeroshot_templates")
            if isinstance(data, dict):
                data = data.get("templates")
            if not isinstance(data, list) or not data or not all(isinstance(t, str) and "{}" in t for t in data):
                raise EvalDataError(f"eval.zeroshot_templates: {templates} must hold a list of templates with '{{}}'")
            chosen = data
    return names, chosen
