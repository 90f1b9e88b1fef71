"""Tiny ``transformers`` models made from local configs (no download) for the Hugging Face round-trip tests.

``transformers`` is imported by the functions, not by this module, so that a test module can skip (with the reason)
where it is not installed: ``pytest.importorskip("transformers", reason=SKIP_REASON)``.
"""

from __future__ import annotations

from typing import Any

import torch

SKIP_REASON = "transformers is not installed (pip install -e '.[dev]' or '.[hf]')"
VOCAB = 97


def gpt2(seed: int = 0) -> Any:
    """A 2-layer GPT-2 with tied embeddings and no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def llama(seed: int = 0) -> Any:
    """A 2-layer Llama (untied embeddings, nn.Linear layers that tensor parallelism can split)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32, bos_token_id=0,
                         eos_token_id=0)
    return LlamaForCausalLM(config).eval()


class Wrapper(torch.nn.Module):
    """What a LightningModule looks like to the checkpoint: ``self.model`` is the transformers model, and a
    layer of its own (``probe``) that the export must leave out."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.model = gpt2(seed)
        self.probe = torch.nn.Linear(3, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, use_cache=False).logits


def tokens() -> torch.Tensor:
    """The fixed input the logits are compared on."""
    return (torch.arange(16).reshape(2, 8) * 7 + 3) % VOCAB


def train_step(module: torch.nn.Module, forward: Any = None) -> None:
    """One SGD step on a fixed batch (so the weights are no longer the initial ones)."""
    forward = forward or module
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    forward(tokens()).float().pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def logits(model: Any, ids: torch.Tensor | None = None) -> torch.Tensor:
    """``model``'s logits on the fixed input (a Wrapper or a transformers model), without gradients."""
    ids = tokens() if ids is None else ids
    with torch.no_grad():
        out = model(ids) if isinstance(model, Wrapper) or not hasattr(model, "config") else model(
            ids, use_cache=False).logits
    return out.full_tensor() if hasattr(out, "full_tensor") else out


def from_pretrained(path: Any) -> tuple[Any, dict[str, Any]]:
    """``AutoModelForCausalLM.from_pretrained(path)`` (float32, eval) and its loading report."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    return model.eval(), info


def clean_report(info: dict[str, Any]) -> dict[str, list[Any]]:
    """The loading report's problems (all empty for a complete, exact load)."""
    return {key: sorted(info.get(key) or []) for key in ("missing_keys", "unexpected_keys", "mismatched_keys",
                                                          "error_msgs")}


EMPTY_REPORT = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
