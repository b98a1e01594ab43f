"""Tiny random models of the conformance matrix's 20 architectures, built with transformers.

Every model: hidden 64, 2 blocks, 4 heads, FFN 128 (every width a multiple of 4 for 2:4 and of 64 for NF4 blocks),
vocabulary 128; a few hundred KB each. ``build(arch)`` returns the model (eval mode, seed 0, norms perturbed so
that no weight is a constant); ``inputs(arch)`` a batch its forward takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The matrix's columns, in the order the support table shows them.
VERBS = (
    "convert",
    "lora merge",
    "merge linear",
    "merge ties",
    "quantize int8",
    "quantize nf4",
    "prune magnitude",
    "prune 2:4",
    "prune structured",
    "export onnx",
)
VOCAB = 128
H = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=64,
)
SEQ2SEQ = dict(
    vocab_size=VOCAB,
    d_model=64,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=128,
    decoder_ffn_dim=128,
)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=16)


@dataclass(frozen=True)
class Arch:
    name: str
    model_class: str  # the transformers class built, saved and loaded back
    kind: str  # "decoder" | "encoder" | "seq2seq" | "speech" | "vision" | "clip" | "vlm"
    onnx_task: str | None  # the natural export task, where weightsmith's export has one


ARCHS = {
    a.name: a
    for a in [
        Arch("llama", "LlamaForCausalLM", "decoder", "text-generation-with-past"),
        Arch("mistral", "MistralForCausalLM", "decoder", "causal-lm"),
        Arch("mixtral", "MixtralForCausalLM", "decoder", "causal-lm"),
        Arch("qwen2", "Qwen2ForCausalLM", "decoder", "causal-lm"),
        Arch("qwen3", "Qwen3ForCausalLM", "decoder", "causal-lm"),
        Arch("gemma2", "Gemma2ForCausalLM", "decoder", "causal-lm"),
        Arch("phi3", "Phi3ForCausalLM", "decoder", "causal-lm"),
        Arch("gpt2", "GPT2LMHeadModel", "decoder", "text-generation-with-past"),
        Arch("gpt_neox", "GPTNeoXForCausalLM", "decoder", "causal-lm"),
        Arch("opt", "OPTForCausalLM", "decoder", "causal-lm"),
        Arch("bert", "BertForMaskedLM", "encoder", "masked-lm"),
        Arch("roberta", "RobertaForMaskedLM", "encoder", "masked-lm"),
        Arch("distilbert", "DistilBertForMaskedLM", "encoder", "masked-lm"),
        Arch("t5", "T5ForConditionalGeneration", "seq2seq", "text2text-generation"),
        Arch("bart", "BartForConditionalGeneration", "seq2seq", "text2text-generation"),
        Arch("whisper", "WhisperForConditionalGeneration", "speech", "automatic-speech-recognition"),
        Arch("vit", "ViTForImageClassification", "vision", "image-classification"),
        Arch("clip", "CLIPModel", "clip", "zero-shot-image-classification"),
        Arch("llava", "LlavaForConditionalGeneration", "vlm", None),
        Arch("mamba", "MambaForCausalLM", "decoder", "causal-lm"),
    ]
}


def config(name: str):
    import transformers as tf

    kv = dict(num_key_value_heads=2)
    if name == "llama":
        return tf.LlamaConfig(**H, **kv, tie_word_embeddings=False)
    if name == "mistral":
        return tf.MistralConfig(**H, **kv, sliding_window=None)
    if name == "mixtral":  # MoE: 4 experts, 2 per token
        return tf.MixtralConfig(**H, **kv, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    if name == "qwen2":
        return tf.Qwen2Config(**H, **kv, tie_word_embeddings=False)
    if name == "qwen3":
        return tf.Qwen3Config(**H, **kv, head_dim=16, tie_word_embeddings=False)
    if name == "gemma2":  # lm_head tied to the embedding and absent from the file
        return tf.Gemma2Config(**H, **kv, head_dim=16)
    if name == "phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(**H, **kv, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if name == "gpt2":  # Conv1D weights stored [in, out]
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                             eos_token_id=0)  # fmt: skip
    if name == "gpt_neox":
        return tf.GPTNeoXConfig(**H, bos_token_id=0, eos_token_id=0)
    if name == "opt":
        return tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                            max_position_embeddings=64, word_embed_proj_dim=64, pad_token_id=1, bos_token_id=2,
                            eos_token_id=2)  # fmt: skip
    if name == "bert":
        return tf.BertConfig(**H)
    if name == "roberta":
        return tf.RobertaConfig(**{**H, "max_position_embeddings": 66}, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    if name == "distilbert":
        return tf.DistilBertConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                   max_position_embeddings=64, pad_token_id=0)  # fmt: skip
    if name == "t5":  # lm_head tied to `shared`; DenseReluDense.wo kept in float32 by transformers
        return tf.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                           decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)  # fmt: skip
    if name == "bart":
        return tf.BartConfig(**SEQ2SEQ, max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                             decoder_start_token_id=2, forced_eos_token_id=2)  # fmt: skip
    if name == "whisper":  # proj_out tied to the decoder's embed_tokens
        return tf.WhisperConfig(**SEQ2SEQ, num_mel_bins=16, max_source_positions=32, max_target_positions=32,
                                decoder_start_token_id=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                suppress_tokens=[], begin_suppress_tokens=[])  # fmt: skip
    if name == "vit":
        return tf.ViTConfig(**VISION, patch_size=4, num_labels=3)
    if name == "clip":
        text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=32, bos_token_id=0, eos_token_id=2,
                    pad_token_id=1)  # fmt: skip
        return tf.CLIPConfig(text_config=text, vision_config={**VISION, "patch_size": 4}, projection_dim=32)
    if name == "llava":
        text = dict(model_type="llama", **H, **kv, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        vision = dict(model_type="clip_vision_model", **VISION, patch_size=4, projection_dim=32)
        return tf.LlavaConfig(text_config=text, vision_config=vision, image_token_index=VOCAB - 1,
                              projector_hidden_act="gelu", vision_feature_layer=-1)  # fmt: skip
    if name == "mamba":
        return tf.MambaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, state_size=8, expand=2,
                              conv_kernel=4, bos_token_id=0, eos_token_id=0, pad_token_id=0)  # fmt: skip
    raise ValueError(name)


def model_class(name: str):
    import transformers as tf

    return getattr(tf, ARCHS[name].model_class)


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """A random-initialised model (eval mode) with non-trivial norm weights and biases."""
    import transformers as tf

    tf.logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = model_class(name)(config(name)).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # norms initialise to exactly 1/0: perturb them so tests see real values everywhere
        for _pname, p in model.named_parameters():
            if p.dim() == 1 and p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def inputs(name: str, batch: int = 2, length: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch the model's forward takes (token ids avoid the special ids 0-2 and llava's image token)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB - 1, (batch, length), generator=gen)
    kind = ARCHS[name].kind
    if kind in ("decoder", "encoder", "vlm"):
        return {"input_ids": ids}
    if kind == "seq2seq":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :4]}
    if kind == "speech":
        return {"input_features": torch.randn(batch, 16, 64, generator=gen), "decoder_input_ids": ids[:, :4]}
    pixels = torch.randn(batch, 3, 16, 16, generator=gen)
    if kind == "vision":
        return {"pixel_values": pixels}
    return {"input_ids": ids, "pixel_values": pixels}  # clip


def output(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The model's main output as one float tensor (logits, or CLIP's text and image embeddings)."""
    out = model(**batch)
    value = torch.cat([out.text_embeds, out.image_embeds]) if hasattr(out, "image_embeds") else out.logits
    return value.detach().float()


def linear_modules(model: torch.nn.Module) -> list[str]:
    """Leaf names of the Linear-like modules (nn.Linear, Conv1D) inside the blocks: attention and MLP projections
    (Mamba: in/x/dt/out projections), the targets of the matrix's LoRA adapters."""
    from transformers.pytorch_utils import Conv1D

    from weightsmith.architecture import layer_index

    leaves = {
        name.rsplit(".", 1)[-1]
        for name, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, Conv1D)) and layer_index(name + ".weight") is not None
    }
    return sorted(leaves)
