"""Model references: a registry name (fetched offline weights or a tiny random config), a local folder, or a hub id.

    minilm               MiniLM-L6 (all-MiniLM-L6-v2) from `fetch text`
    efficientnet-lite0   ImageNet EfficientNet-Lite0 from `fetch image`
    smollm2-135m         SmolLM2-135M-Instruct gguf (dequantised by transformers) from `fetch math`
    tiny-bert | tiny-t5 | tiny-clip | tiny-llama
                         random weights from a small config of the same architecture: tests and smoke runs,
                         no download (tiny text models use `HashTokenizer`)
    tiny-effnet          EfficientNet-Lite0 with random weights (no download)
    ./some/folder        a local HF model folder: config.json + *.safetensors (or a .bin, read weights_only)
    org/name             a hub id, when a hub is reachable (HF_HUB_OFFLINE unset)
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

TINY = ("tiny-bert", "tiny-t5", "tiny-clip", "tiny-llama", "tiny-effnet")
FETCHED = {"minilm": "text", "efficientnet-lite0": "image", "smollm2-135m": "math"}


@dataclass
class ModelRef:
    """A resolved model reference: `kind` is 'tiny', 'fetched', 'local' or 'hub'; `path` a folder/file or hub id."""

    name: str
    kind: str
    path: str


def resolve_model(ref: str) -> ModelRef:
    """Check that `ref` can be loaded, before anything trains; raises ValueError naming the fix."""
    from .. import fetch
    from ..paths import fetch_hint

    if not isinstance(ref, str) or not ref:
        raise ValueError(f"model must be a name, a folder or a hub id, got {ref!r}")
    if ref in TINY:
        return ModelRef(ref, "tiny", ref)
    if ref in FETCHED:
        found = {"minilm": fetch.minilm_dir, "efficientnet-lite0": fetch.effnet_file, "smollm2-135m": fetch.smollm2_file}[ref]()
        if found is None:
            raise ValueError(f"model {ref!r} is not fetched: {fetch_hint(FETCHED[ref])}")
        return ModelRef(ref, "fetched", str(found))
    p = Path(ref).expanduser()
    if p.exists() or ref.startswith((".", "/", "~")):
        if not p.is_dir():
            raise ValueError(f"model folder {ref!r} does not exist (or is not a folder)")
        if not (p / "config.json").exists():
            raise ValueError(f"model folder {ref!r} has no config.json: save it with save_pretrained()")
        weights = list(p.glob("*.safetensors")) + list(p.glob("pytorch_model*.bin"))
        if not weights:
            raise ValueError(f"model folder {ref!r} has no weights (*.safetensors or pytorch_model.bin): "
                             "save it with model.save_pretrained() first")
        return ModelRef(ref, "local", str(p.resolve()))
    if "/" in ref:
        return ModelRef(ref, "hub", ref)  # the builders turn a hub miss (offline, unknown id) into a clear error
    raise ValueError(f"unknown model {ref!r}: use one of {sorted(FETCHED) + list(TINY)}, a local folder, "
                     "or a hub id like org/name (needs a reachable hub or the local hub cache)")


def hub_error(ref: ModelRef, err: Exception) -> ValueError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    why = "HF_HUB_OFFLINE is set and it is not in the local hub cache" if offline else "the hub could not provide it"
    return ValueError(f"could not load model {ref.name!r} ({why}): {type(err).__name__}: {err}")


class HashTokenizer:
    """Words -> ids by CRC32 hash, for tiny random-weight text models (no vocabulary files needed).

    Callable like a HF tokenizer on a string or a list of strings: returns input_ids / attention_mask lists.
    """

    def __init__(self, vocab_size: int = 1000, pad_token_id: int = 0, eos_token_id: int = 1):
        self.vocab_size, self.pad_token_id, self.eos_token_id = vocab_size, pad_token_id, eos_token_id
        self.bos_token_id = eos_token_id
        self.padding_side = "right"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [2 + zlib.crc32(w.encode()) % (self.vocab_size - 2) for w in text.split()]
        return ids + ([self.eos_token_id] if add_special_tokens else [])

    def __call__(self, texts, truncation=True, max_length=None, **_):
        single = isinstance(texts, str)
        ids = [self.encode(t)[: max_length or None] for t in ([texts] if single else texts)]
        out = {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}
        return {k: v[0] for k, v in out.items()} if single else out

    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(f"w{int(i)}" for i in ids if not (skip_special_tokens and int(i) in (0, 1)))


def tiny_config(name: str, num_labels: int = 2):
    """Small configs of the paper's architectures (a few 100k parameters, random weights)."""
    import transformers as tf

    common = dict(vocab_size=1000, pad_token_id=0)
    if name == "tiny-bert":
        return tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             max_position_embeddings=128, num_labels=num_labels, **common)
    if name == "tiny-t5":
        return tf.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                           decoder_start_token_id=0, eos_token_id=1, num_labels=num_labels, **common)
    if name == "tiny-llama":
        # hidden 64: bitsandbytes' CPU backend packs 4-bit weights in blocks of 64 inputs (quant.type runs on CPU)
        return tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=1, **common)
    if name == "tiny-clip":
        return tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   image_size=32, patch_size=8)
    raise ValueError(f"no tiny config named {name!r}; choose from {TINY}")
