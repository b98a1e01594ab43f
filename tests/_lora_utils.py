"""Helpers for the LoRA tests: adapters made by PEFT itself, and PEFT's own merge as the oracle."""

from __future__ import annotations

from pathlib import Path

import torch

AUTO = {
    "llama": "AutoModelForCausalLM",
    "llama_tied": "AutoModelForCausalLM",
    "qwen2": "AutoModelForCausalLM",
    "mistral": "AutoModelForCausalLM",
    "gpt2": "AutoModelForCausalLM",
    "bert": "AutoModel",
    "bert_cls": "AutoModelForSequenceClassification",
}


def load(kind: str, path, dtype=None):
    import transformers as tf

    kwargs = {"dtype": dtype} if dtype is not None else {}
    return getattr(tf, AUTO[kind]).from_pretrained(path, **kwargs).eval()


def perturb_trainable(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Make every trainable tensor (B factors, magnitudes, biases, modules_to_save copies) clearly non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * scale)


def make_adapter(
    model: torch.nn.Module,
    out: Path,
    seed: int = 1,
    safe_serialization: bool = True,
    scale: float = 0.05,
    autocast_adapter_dtype: bool = True,
    **lora,
) -> Path:
    """A PEFT LoRA adapter on ``model`` (random non-zero factors, perturbed), saved to ``out``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora.setdefault("init_lora_weights", False)
    peft_model = get_peft_model(model, LoraConfig(**lora), autocast_adapter_dtype=autocast_adapter_dtype)
    perturb_trainable(peft_model, seed, scale)
    peft_model.save_pretrained(out, safe_serialization=safe_serialization)
    return Path(out)


def peft_merged(kind: str, base_dir, adapter_dirs, dtype=None) -> dict[str, torch.Tensor]:
    """PEFT's own fold: from_pretrained → PeftModel.from_pretrained → merge_and_unload → state_dict."""
    from peft import PeftModel

    model = load(kind, base_dir, dtype)
    adapter_dirs = [adapter_dirs] if isinstance(adapter_dirs, (str, Path)) else adapter_dirs
    peft_model = PeftModel.from_pretrained(model, adapter_dirs[0], adapter_name="a0")
    for i, extra in enumerate(adapter_dirs[1:], 1):
        peft_model.load_adapter(extra, adapter_name=f"a{i}")
    if len(adapter_dirs) > 1:
        peft_model.base_model.set_adapter([f"a{i}" for i in range(len(adapter_dirs))])
    merged = peft_model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def peft_logits(kind: str, base_dir, adapter_dir, inputs) -> torch.Tensor:
    """Outputs of the unmerged PEFT model (the adapter applied on the fly)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load(kind, base_dir), adapter_dir).eval()
    with torch.no_grad():
        return _out(model(**inputs))


def model_logits(kind: str, model_dir, inputs) -> torch.Tensor:
    with torch.no_grad():
        return _out(load(kind, model_dir)(**inputs))


def _out(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


def ids(vocab: int = 128, batch: int = 2, length: int = 12, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab, (batch, length), generator=gen)}


def max_abs(ours: dict, theirs: dict, names=None) -> tuple[float, str]:
    """max |Δ| over the tensors both hold (in fp32) and the worst name."""
    worst, where = 0.0, ""
    for name in names or ours:
        d = float((ours[name].float() - theirs[name].float()).abs().max())
        if d >= worst:
            worst, where = d, name
    return worst, where
