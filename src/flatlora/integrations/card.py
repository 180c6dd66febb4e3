"""The Flat-LoRA settings that travel with a saved adapter: `flatlora_config.json` and a model-card line.

    write_adapter_card("out/adapter", flat.config)     # after model.save_pretrained("out/adapter")
    read_adapter_card("out/adapter")                    # -> FlatLoRAConfig the adapter was trained with

A pushed adapter then says how it was trained: the JSON holds every FlatLoRAConfig field (total_steps and
seed as the run resolved them), and README.md (the model card PEFT writes) gets a "Flat-LoRA" section that
names the paper and the settings. Imports neither torch nor any framework: runners, callbacks and scripts
call it after their own save.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..config import FlatLoRAConfig

CONFIG_FILE = "flatlora_config.json"
CARD_FILE = "README.md"
PAPER_URL = "https://arxiv.org/abs/2409.14396"
_BEGIN, _END = "<!-- flatlora:begin -->", "<!-- flatlora:end -->"
# The settings that decide the noise a model saw, in the order the card names them.
_CARD_FIELDS = ("sigma", "schedule", "total_steps", "noise", "mode", "seed", "target", "per_rank_noise", "generator")


def write_adapter_card(folder: str | os.PathLike, config: FlatLoRAConfig | dict[str, Any], *,
                       extra: dict[str, Any] | None = None, card: bool = True) -> str:
    """Write `flatlora_config.json` into `folder` and add (or refresh) the Flat-LoRA section of its README.md.

    Args:
        folder: the saved adapter's folder (where `adapter_config.json` is); created if missing.
        config: the run's FlatLoRAConfig (or its `to_dict()`), ideally the engine's, whose total_steps and
            seed are the resolved ones.
        extra: JSON-serialisable facts to record next to the config (e.g. {"last_step": 999}).
        card: also write the model-card section; README.md is created when the folder has none.

    Returns:
        The path of the JSON file.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> path = write_adapter_card(folder, FlatLoRAConfig(sigma=0.05, total_steps=100))
        >>> read_adapter_card(folder).sigma
        0.05
    """
    cfg = config if isinstance(config, FlatLoRAConfig) else FlatLoRAConfig(**config)
    from .. import __version__

    os.makedirs(folder, exist_ok=True)
    payload = {"method": "flat-lora", "paper": PAPER_URL, "flatlora_version": __version__, "config": cfg.to_dict()}
    if extra:
        payload.update(extra)
    path = os.path.join(folder, CONFIG_FILE)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    if card:
        _write_card_section(os.path.join(folder, CARD_FILE), cfg, __version__)
    return path


def read_adapter_card(folder: str | os.PathLike) -> FlatLoRAConfig:
    """The FlatLoRAConfig saved by `write_adapter_card` in `folder`."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: this adapter was not saved with Flat-LoRA settings")
    with open(path) as f:
        payload = json.load(f)
    if not isinstance(payload, dict) or not isinstance(payload.get("config"), dict):
        raise ValueError(f"{path} is not a Flat-LoRA settings file (expected a JSON object with a 'config' object)")
    return FlatLoRAConfig.from_dict(payload["config"])


def card_section(config: FlatLoRAConfig, version: str) -> str:
    """The model-card text: one line saying how the adapter was trained, between markers so it can be refreshed."""
    c = config.to_dict()
    settings = ", ".join(f"{k}={c[k]}" for k in _CARD_FIELDS)
    return (f"{_BEGIN}\n## Flat-LoRA\n\n"
            f"Trained with [Flat-LoRA]({PAPER_URL}) (flatlora {version}): LoRA on the expected loss under "
            f"filter-wise weight noise; {settings}. All settings: `{CONFIG_FILE}`.\n{_END}\n")


def _write_card_section(path: str, config: FlatLoRAConfig, version: str) -> None:
    section = card_section(config, version)
    text = ""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    start, end = text.find(_BEGIN), text.find(_END)
    if start != -1 and end > start:  # refresh the section a previous save wrote
        text = text[:start] + section + text[end + len(_END):].lstrip("\n")
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section
    text = _add_tag(text, "flat-lora")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _add_tag(text: str, tag: str) -> str:
    """Add `tag` to the card's YAML `tags:` list (the Hub's filter) when the card has the block-list form
    PEFT and huggingface_hub write; any other front matter is left alone."""
    if not text.startswith("---\n"):
        return text
    close = text.find("\n---", 4)
    if close == -1:
        return text
    head, rest = text[:close], text[close:]
    lines = head.split("\n")
    if "tags:" not in lines:
        return text
    i = lines.index("tags:") + 1
    items = []
    while i < len(lines) and lines[i].startswith("- "):
        items.append(lines[i][2:].strip())
        i += 1
    if tag in items:
        return text
    lines.insert(i, f"- {tag}")
    return "\n".join(lines) + rest
