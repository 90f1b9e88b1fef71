"""The manifest's record of a component that wraps a ``transformers`` model: what an export needs to write a
directory ``from_pretrained`` loads.

Recorded at save time (``engine.hf_model.describe_hf_model``) as the optional ``hf_model`` field of a component's
manifest entry, and absent for every other component (older checkpoints have none)::

    "hf_model": {"class": "GPT2LMHeadModel", "module": "transformers.models.gpt2.modeling_gpt2",
                 "prefix": "model.", "config": {... config.to_dict(), "architectures": ["GPT2LMHeadModel"]},
                 "generation_config": {...}, "tied": {"lm_head.weight": "transformer.wte.weight"},
                 "transformers_version": "5.25.0"}

``prefix`` is where the model's keys sit in the component's state dict (``"model."`` for ``self.model`` in a
LightningModule, ``""`` for the model itself); ``tied`` maps each key ``transformers`` derives from another (and
does not expect in the files) to the key it keeps, for ties that held in the saved model. ``generation_config`` is
absent for a model that cannot generate. Parsing is strict: a malformed record raises ``ManifestError``.

Example:
    >>> record = HFModelRecord.from_json({"class": "GPT2LMHeadModel", "module": "transformers.models.gpt2",
    ...     "prefix": "model.", "config": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "tied": {}})
    >>> record.prefix, record.to_json()["class"]
    ('model.', 'GPT2LMHeadModel')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lightning_sharing.errors import ManifestError

__all__ = ["HFModelRecord"]

_MAX_KEY = 4096


@dataclass(frozen=True)
class HFModelRecord:
    """A ``transformers`` model inside a component (see the module docstring for the JSON form)."""

    class_name: str
    module: str
    prefix: str
    config: dict[str, Any]
    generation_config: dict[str, Any] | None = None
    tied: dict[str, str] = field(default_factory=dict)
    transformers_version: str = ""

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"class": self.class_name, "module": self.module, "prefix": self.prefix,
                                "config": self.config}
        if self.generation_config is not None:
            data["generation_config"] = self.generation_config
        data["tied"] = dict(sorted(self.tied.items()))
        if self.transformers_version:
            data["transformers_version"] = self.transformers_version
        return data

    @classmethod
    def from_json(cls, data: Any, where: str = "hf_model") -> HFModelRecord:
        """Parse and validate a record; ``ManifestError`` names ``where`` and what is wrong."""
        _expect(isinstance(data, dict), where, f"is a {type(data).__name__}, not an object")
        unknown = sorted(set(data) - {"class", "module", "prefix", "config", "generation_config", "tied",
                                      "transformers_version"})
        _expect(not unknown, where, f"has unknown fields {unknown}")
        name, module, prefix = data.get("class"), data.get("module"), data.get("prefix")
        _expect(isinstance(name, str) and name.isidentifier(), where, f"class {name!r} is not a class name")
        _expect(isinstance(module, str) and bool(module) and all(p.isidentifier() for p in module.split(".")),
                where, f"module {module!r} is not a dotted module name")
        _expect(isinstance(prefix, str) and len(prefix) <= _MAX_KEY, where, f"prefix {prefix!r} is not a string")
        config = data.get("config")
        _expect(isinstance(config, dict), where, "config is not an object")
        architectures = config.get("architectures")
        _expect(isinstance(architectures, list) and all(isinstance(a, str) for a in architectures), where,
                f"config.architectures {architectures!r} is not a list of class names")
        generation = data.get("generation_config")
        _expect(generation is None or isinstance(generation, dict), where, "generation_config is not an object")
        tied = data.get("tied", {})
        _expect(isinstance(tied, dict) and all(isinstance(k, str) and isinstance(v, str) and k and v and k != v
                                               and len(k) <= _MAX_KEY and len(v) <= _MAX_KEY
                                               for k, v in tied.items()),
                where, f"tied {tied!r} is not an object of derived key -> kept key")
        version = data.get("transformers_version", "")
        _expect(isinstance(version, str), where, f"transformers_version {version!r} is not a string")
        return cls(name, module, prefix, config, generation, dict(tied), version)


def _expect(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise ManifestError(f"invalid manifest: {where} {message}")
