"""The model card (``README.md``) a saved NOLA or NoRA adapter carries: what the adapter is and how to use it.

peft's ``PeftModel.save_pretrained`` writes a card from peft's blank template before the weights, then calls the
adapter config's ``save_pretrained`` last. The configs here (``LowRankConfig.save_pretrained``) write the card then,
from the config and the weights file just written, so a plain ``model.save_pretrained(dir)`` (and
:func:`peft_nola.save_pretrained_atomic`, Trainer checkpoints, ``push_to_hub``) gives a card that names the method,
the paper, this package and the adapter's size, without patching peft.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME

from .quantization import HEADER_SUFFIX

PACKAGE = "peft-nola"
INSTALL_LINE = "pip install peft-nola"
EXPORT_COMMAND = "python -m peft_nola.export ADAPTER_DIR OUT_DIR"
# A card section between these markers is ours: rewritten on every save, the rest of a user's card is kept.
BEGIN, END = "<!-- peft-nola card: begin -->", "<!-- peft-nola card: end -->"
# The marker lines only count on a line of their own (a user's text may quote them inline).
_SECTION = re.compile(
    rf"^{re.escape(BEGIN)}[ \t]*$(?:(?!^{re.escape(BEGIN)}).)*?^{re.escape(END)}[ \t]*$", re.S | re.M)

METHODS = {
    "NOLA": dict(
        tag="nola",
        paper='Koohpayegani et al., "NOLA: Compressing LoRA using Linear Combination of Random Basis", ICLR 2024',
        url="https://arxiv.org/abs/2310.02556",
        what="each adapted layer's update is `ΔW = (nola_alpha / r) · B · A` with `A = Σ αᵢAᵢ`, `B = Σ βⱼBⱼ`: "
        "linear combinations of frozen pseudo-random basis matrices regenerated from `basis_seed`. The file holds "
        "only the coefficients α and β (`k + l` numbers per adapted layer); the basis is never stored.",
        fields=[("rank `r`", "r"), ("`num_basis_A` (k)", "num_basis_A"), ("`num_basis_B` (l)", "num_basis_B"),
                ("`nola_alpha` (c)", "nola_alpha"), ("seed (`basis_seed`)", "basis_seed"),
                ("`basis_mode`", "basis_mode"), ("`coefficient_bits`", "coefficient_bits")],
    ),
    "NORA": dict(
        tag="nora",
        paper='Lin et al., "NoRA: Nested Low-Rank Adaptation for Efficient Fine-Tuning Large Models", 2024',
        url="https://arxiv.org/abs/2408.10280",
        what="each adapted layer's update is `ΔW = (nora_alpha / inner_r) · U_r (A B − C₀) V_rᵀ`: frozen outer "
        "factors from the SVD of the base weight (recomputed from the base model on load unless "
        "`store_outer_factors`) around a small trainable inner LoRA `A B`.",
        fields=[("outer rank `r`", "r"), ("inner rank `inner_r`", "inner_r"), ("`nora_alpha`", "nora_alpha"),
                ("`store_outer_factors`", "store_outer_factors"), ("`svd_method`", "svd_method"),
                ("seed (`svd_seed`)", "svd_seed")],
        note="Not to be confused with peft's own `LoraConfig(init_lora_weights=\"nora\")` (peft 0.22): "
        "*Normalized* Low-Rank Adaptation, an initialization of a plain LoRA adapter (unit-norm columns of A, "
        "B = 0), a different method that loads with peft alone.",
    ),
}


def looks_like_local_path(name: str | None) -> bool:
    """A model name that is a filesystem path rather than a hub id (``org/name``): absolute, relative or ``~``."""
    if not name:
        return False
    return name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or bool(re.match(r"^[A-Za-z]:[\\/]", name))


def is_hub_id(name: str | None) -> bool:
    """Whether ``name`` is a valid Hugging Face hub repository id (``name`` or ``org/name``): only such a name is
    written into the card's heading, code and metadata; anything else (a local folder, a string with markup or
    quotes) is not repeated there."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or looks_like_local_path(name) or len(name) > 96:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


_MARKDOWN_ESCAPES = str.maketrans({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", "\\": "\\\\", "|": "\\|", "`": "\\`", "*": "\\*", "_": "\\_",
    "[": "\\[", "]": "\\]", "#": "\\#",
})


def markdown_cell(value) -> str:
    """``value`` as the text of one Markdown table cell: on one line, with the characters that would end the cell,
    start markup or HTML (a comment that hides the rest of the card, our section's markers) escaped."""
    return " ".join(str(value).split()).translate(_MARKDOWN_ESCAPES)


def stored_parameters(weights_file: str | os.PathLike) -> tuple[int, int | None]:
    """``(number of stored parameters, bits per coefficient or None for float)`` of an adapter weights file, read
    from the safetensors header (packed coefficients count by the shape their quantization header records)."""
    from safetensors import safe_open

    total, bits = 0, None
    with safe_open(str(weights_file), framework="pt") as f:
        keys = set(f.keys())
        for key in keys:
            if key.endswith(HEADER_SUFFIX):
                header = f.get_tensor(key).reshape(-1).tolist()
                bits = int(header[1])
                numel = 1
                for size in header[4:]:
                    numel *= int(size)
                total += numel
            elif key + HEADER_SUFFIX not in keys:
                numel = 1
                for size in f.get_slice(key).get_shape():
                    numel *= size
                total += numel
    return total, bits


def card_text(config, weights_file: str | os.PathLike | None) -> str:
    """The card's body for ``config`` (a NolaConfig or NoraConfig) and its saved weights file, between markers."""
    import peft

    from . import __version__

    method = str(getattr(config.peft_type, "value", config.peft_type))
    info = METHODS[method]
    name = "NoRA" if method == "NORA" else "NOLA"
    base = config.base_model_name_or_path
    base_known = is_hub_id(base)
    rows = [(label, getattr(config, attr)) for label, attr in info["fields"] if hasattr(config, attr)]
    rows = [(label, "none (float32)" if label == "`coefficient_bits`" and value is None else value)
            for label, value in rows]
    targets = config.target_modules
    rows.append(("target modules", ", ".join(sorted(targets)) if isinstance(targets, (set, list)) else targets))
    if config.output_slices:
        rows.append(("`output_slices`", config.output_slices))
    if weights_file is not None and Path(weights_file).is_file():
        count, bits = stored_parameters(weights_file)
        rows.append(("trainable parameters (stored)", f"{count:,}" + (f", packed at {bits} bits" if bits else "")))
        rows.append((f"`{Path(weights_file).name}`", f"{Path(weights_file).stat().st_size:,} bytes"))
    table = "\n".join(["| | |", "|---|---|",
                       *(f"| {k} | {'-' if v is None else markdown_cell(v)} |" for k, v in rows)])
    base_line = f"`{base}`" if base_known else "the model it was trained on" + (
        f" (saved from a local folder, {markdown_cell(Path(str(base)).name)})" if looks_like_local_path(base) else "")
    base_code = base if base_known else "BASE_MODEL_ID_OR_FOLDER"
    return f"""{BEGIN}
# {name} adapter for {base if base_known else 'a causal or vision model'}

A **{name}** adapter ([{info['paper']}]({info['url']})) for {base_line}, saved by
**{PACKAGE} {__version__}**, a plugin that adds {name} to Hugging Face [PEFT](https://github.com/huggingface/peft):
{info['what']}
{chr(10) + info['note'] + chr(10) if 'note' in info else ''}
{table}

## Use

```bash
{INSTALL_LINE}   # peft-nola {__version__} or later; until it is on PyPI, `pip install -e .` in a clone of peft-nola
```

```python
import peft_nola                     # registers {name} with peft
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{base_code}")
model = PeftModel.from_pretrained(base, "ADAPTER_DIR")   # this folder; outputs as when it was saved
```

Loading checks the adapter against the base model (layer names and shapes{', the basis generator' if name == 'NOLA'
else ', the base weights'}) and refuses a mismatch rather than loading something else.

## As a plain LoRA adapter

```bash
{EXPORT_COMMAND}
```

writes the same update as a standard peft LoRA adapter (rank `r`), which loads with `peft` alone. It reads the base
model's config from `base_model_name_or_path`; offline, add `--base` with a local folder or `.gguf` file of the base.

### Framework versions

- {PACKAGE} {__version__}
- PEFT {peft.__version__}
{END}"""


def write_model_card(save_directory: str | os.PathLike, config) -> Path:
    """Write or update ``save_directory/README.md`` for ``config``: our section replaces peft's blank template (or
    our previous section; a user's own text is kept, with our section added), the tags gain ``peft-nola`` and the
    method, and a local folder is dropped from ``base_model`` and the tags (it means nothing on another machine)."""
    from huggingface_hub import ModelCard, ModelCardData

    path = Path(save_directory) / "README.md"
    if path.is_symlink():
        # Never read through (nor write through) a link: it may point at any file of the user's, whose text would
        # otherwise be copied into the card (and uploaded by push_to_hub). The card replaces the link.
        path.unlink()
    card = ModelCard.load(path) if path.is_file() else ModelCard.from_template(ModelCardData(library_name="peft"))
    weights = Path(save_directory) / SAFETENSORS_WEIGHTS_NAME
    section = card_text(config, weights if weights.is_file() else None)
    text = card.text
    ours = list(_SECTION.finditer(text))
    if ours:
        last = ours[-1]
        text = text[: last.start()] + section + text[last.end():]
    elif _is_blank_template(text):
        text = section + "\n"  # our section lists peft's version, the one line peft adds to its template
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    card.text = text.rstrip("\n") + "\n"  # one final newline (peft's update drops it): the same card every save
    method = str(getattr(config.peft_type, "value", config.peft_type))
    tags = [t for t in (card.data.tags or [])
            if not (t.startswith("base_model:adapter:") and not is_hub_id(t.split(":", 2)[2]))]
    card.data.tags = sorted(set(tags) | {"peft", PACKAGE, METHODS[method]["tag"]})
    base = config.base_model_name_or_path
    if not is_hub_id(card.data.get("base_model")):
        card.data.base_model = None
    if is_hub_id(base):
        card.data.base_model = base
    card.data.library_name = card.data.library_name or "peft"
    card.save(path)
    return path


def _is_blank_template(text: str) -> bool:
    """Whether ``text`` is huggingface_hub's default card template with nothing filled in (what peft starts a card
    from), apart from the lines peft adds. A card a user made from the same template and filled in is not blank:
    its text is kept."""
    from huggingface_hub import ModelCard, ModelCardData

    def normal(body: str) -> list[str]:
        return [line.rstrip() for line in body.splitlines()
                if line.strip() and not re.fullmatch(r"- PEFT \S+|### Framework versions", line.strip())]

    return normal(text) == normal(ModelCard.from_template(ModelCardData()).text)
