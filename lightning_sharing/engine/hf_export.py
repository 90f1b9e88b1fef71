"""What an export writes for ``transformers``: the output names of a component's tensors and ``config.json``.

``output_names`` maps the saved tensors (and their ties) to the names written. Without a prefix and without a
``transformers`` record it is the identity, ties listed under the index's ``metadata.tied`` (the export of any
model, as always). With a prefix (detected at save, or given), only the tensors under it are written, with the
prefix taken off. With the manifest's ``hf_model`` record, each tie is written the way ``transformers`` expects:
the tensor under the key it keeps, the key it derives from it (``lm_head.weight`` from ``transformer.wte.weight``)
left out, and no ``tied`` metadata, so ``from_pretrained`` ties them again and reports no missing key.

Example:
    >>> names = output_names(["model.transformer.wte.weight"], {"model.lm_head.weight": "model.transformer.wte.weight"},
    ...                      "model.", {"lm_head.weight": "transformer.wte.weight"}, hf=True)
    >>> names.pairs, names.ties
    ([('transformer.wte.weight', 'model.transformer.wte.weight')], {})
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from lightning_sharing.checkpoint.hf_record import HFModelRecord
from lightning_sharing.errors import ComponentDeclarationError

__all__ = ["CONFIG_NAME", "GENERATION_CONFIG_NAME", "OutputNames", "config_files", "derived_keys", "output_names"]

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"


@dataclass
class OutputNames:
    """``pairs``: (output name, saved tensor name) in write order; ``ties``: alias -> output name (``metadata.tied``,
    exports without a ``transformers`` record only); ``dropped``: saved names outside the prefix."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    ties: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)


def output_names(stored: Sequence[str], ties: Mapping[str, str], prefix: str, derived: Mapping[str, str],
                 hf: bool) -> OutputNames:
    """Output names for the saved tensors ``stored`` (write order) and ``ties`` (alias -> stored name).

    ``derived`` maps each key ``transformers`` derives (without the prefix) to the key it keeps; ``hf``: write for
    ``transformers`` (ties as it expects them, see the module docstring). Raises ``ComponentDeclarationError`` when
    no tensor is under ``prefix``.
    """
    if not prefix and not hf:
        return OutputNames([(name, name) for name in stored], dict(ties))
    aliases: dict[str, list[str]] = {}
    for alias, name in sorted(ties.items()):
        aliases.setdefault(name, []).append(alias)
    result = OutputNames()
    for name in stored:
        inside = [n[len(prefix):] for n in (name, *aliases.get(name, [])) if n.startswith(prefix)]
        result.dropped.extend(n for n in (name, *aliases.get(name, [])) if not n.startswith(prefix))
        if not inside:
            continue
        if not hf:
            result.pairs.append((inside[0], name))
            result.ties.update(dict.fromkeys(inside[1:], inside[0]))
            continue
        kept = [n for n in inside if n not in derived] or inside[:1]
        # The key transformers keeps first (the embedding a head is tied to), then any other non-derived name.
        kept.sort(key=lambda n: n not in derived.values())
        result.pairs.extend((n, name) for n in kept)
    if not result.pairs:
        raise ComponentDeclarationError(
            f"no tensor of the component is under the prefix {prefix!r} (its tensors are named like "
            f"{list(stored)[:3]}); pass the prefix of the model's keys with --prefix (prefix=...), or --prefix '' "
            "to keep the names as saved"
        )
    if result.dropped:
        log.info("export: %d tensors outside the prefix %r are not written (%s...)", len(result.dropped), prefix,
                 result.dropped[:4])
    return result


def derived_keys(record: HFModelRecord | None, prefix: str) -> dict[str, str]:
    """The record's ties (derived key -> kept key, relative to the model) as output names under ``prefix``.

    The record's keys sit under ``record.prefix`` in the component; ties outside ``prefix`` are dropped.
    """
    if record is None:
        return {}
    result = {}
    for derived, kept in record.tied.items():
        full_derived, full_kept = record.prefix + derived, record.prefix + kept
        if full_derived.startswith(prefix) and full_kept.startswith(prefix):
            result[full_derived[len(prefix):]] = full_kept[len(prefix):]
    return result


def config_files(record: HFModelRecord, dtype: torch.dtype | None) -> dict[str, bytes]:
    """``config.json`` (and ``generation_config.json``) of ``record``, as ``save_pretrained`` writes them.

    ``dtype`` is the exported floating-point dtype (what ``from_pretrained(..., dtype="auto")`` loads).
    """
    config = dict(record.config)
    config["architectures"] = [record.class_name]
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        config["dtype"] = name
        if "torch_dtype" in config:  # transformers 4 spelling
            config["torch_dtype"] = name
    files = {CONFIG_NAME: _json_bytes(config)}
    if record.generation_config is not None:
        files[GENERATION_CONFIG_NAME] = _json_bytes(record.generation_config)
    return files


def _json_bytes(value: object) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")
