"""export onnx, export safetensors, export gguf."""

from __future__ import annotations

import argparse
import dataclasses

from weightsmith.cli.common import add_command, add_output_options, add_report_option, declare_inputs

_ONNX_EXAMPLES = [
    "weightsmith export onnx ./all-MiniLM-L6-v2 -o ./onnx/model.onnx --task feature-extraction",
    "weightsmith export onnx ./all-MiniLM-L6-v2 -o ./onnx-int8/model.onnx --task feature-extraction --quantize int8",
    "weightsmith export onnx ./llama -o ./llama-onnx/model.onnx --task causal-lm --optimize --benchmark --json",
    "weightsmith export onnx ./llama -o ./llama-kv/model.onnx",
    "weightsmith export onnx ./t5 -o ./t5-onnx/model.onnx",
]
_GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")  # = export.to_gguf.TYPES
_GGUF_EXAMPLES = [
    "weightsmith export gguf ./llama -o ./llama-q8_0.gguf --type q8_0",
    "weightsmith export gguf ./qwen2 -o ./qwen2-f16.gguf",
]
_SAFETENSORS_EXAMPLES = [
    "weightsmith export safetensors ./run/checkpoint-500 -o ./clean",
    "weightsmith export safetensors ./pruned-bin -o ./pruned --dtype bf16 --single-file",
]


def register(sub) -> None:
    group = sub.add_parser(
        "export",
        help="export to ONNX (validated with onnxruntime), GGUF (llama.cpp) or clean safetensors",
        description="Export a checkpoint: an ONNX graph checked against PyTorch, a GGUF file for llama.cpp, "
        "or a safetensors directory without optimizer state and pruning leftovers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        + "\n".join(f"  {e}" for e in _ONNX_EXAMPLES[:1] + _GGUF_EXAMPLES[:1] + _SAFETENSORS_EXAMPLES[:1]),
    )
    export = group.add_subparsers(dest="export_command", metavar="FORMAT", required=True)

    p = add_command(
        export,
        "onnx",
        help="export to ONNX and validate it against PyTorch with onnxruntime",
        description="Build the transformers model once, export it with torch.onnx (dynamic batch and "
        "sequence), write the tokenizer beside the .onnx, and keep the file only if "
        "onnxruntime matches PyTorch within --atol at batch 1 and 8, sequence 8 and 128. "
        "Without --task, the task follows the checkpoint's architectures: a causal LM gets "
        "text-generation-with-past (KV cache in and out, optimum's names), checked by greedy decoding "
        "through onnxruntime against transformers' generate. T5, BART and Whisper get optimum's three graphs "
        "(encoder_model.onnx, decoder_model.onnx, decoder_with_past_model.onnx) in the folder of -o, held to "
        "generate the same way. CLIP (zero-shot: scores and both embeddings) and question answering (start and end "
        "logits) export every output of their heads. --benchmark also times it against PyTorch.",
        examples=_ONNX_EXAMPLES,
    )
    p.add_argument("src", help="model directory (config.json and weights)")
    p.add_argument("-o", "--out", required=True, help="the .onnx file to write (tokenizer and config go beside it)")
    _add_config_flags(p)
    p.add_argument("--force", action="store_true", help="replace existing output files")
    add_report_option(p)
    declare_inputs(p, "src")
    p.set_defaults(handler=_onnx)

    p = add_command(
        export,
        "gguf",
        help="export a Llama/Mistral/Qwen/Gemma/Phi-3 model to one GGUF file for llama.cpp",
        description="Write the model, its hyper-parameters and its tokenizer (vocabulary, merges or scores, "
        "special tokens, chat template) as llama.cpp expects them, through gguf-py's writer, one tensor at a "
        "time. --type is llama.cpp's --outtype: norms and biases stay f32.",
        examples=_GGUF_EXAMPLES,
    )
    p.add_argument("src", help="model directory (config.json, weights, tokenizer)")
    p.add_argument("-o", "--out", required=True, help="the .gguf file to write")
    p.add_argument("--type", default="f16", choices=_GGUF_TYPES, help="tensor type of 2-D weights (default f16)")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    add_report_option(p)
    declare_inputs(p, "src")
    p.set_defaults(handler=_gguf)

    p = add_command(
        export,
        "safetensors",
        help="convert to safetensors, dropping optimizer state and prune leftovers",
        description="Like convert, plus: optimizer/scheduler tensors are dropped, and torch pruning's "
        "<p>_orig/<p>_mask pairs are folded into <p> (or dropped when <p> is stored); every "
        "such tensor is listed in the report.",
        examples=_SAFETENSORS_EXAMPLES,
    )
    p.add_argument("src", help="model directory or weight file")
    add_output_options(p)
    p.add_argument("--single-file", action="store_true", help="one model.safetensors whatever its size")
    p.set_defaults(handler=_safetensors)


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per ``OnnxExport`` field: its help, default and choices (the task and scheme registries)."""
    from weightsmith.export.to_onnx.config import OnnxExport

    for field in dataclasses.fields(OnnxExport):
        flag, meta = "--" + field.name.replace("_", "-"), field.metadata
        required = field.default is dataclasses.MISSING
        default = None if required else field.default
        if field.type == "bool":
            p.add_argument(flag, action="store_true", help=meta["help"])
        elif "choices" in meta:
            p.add_argument(flag, required=required, choices=tuple(meta["choices"]), help=meta["help"])
        else:
            kind = float if field.type == "float" else int
            shown = f" (default {default:g})" if isinstance(default, float) else ""
            p.add_argument(flag, type=kind, default=default, help=meta["help"] + shown)


def _onnx(args):
    from weightsmith.export.to_onnx import OnnxExport, onnx

    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(OnnxExport)}
    return onnx(args.src, args.out, OnnxExport(**fields), force=args.force)


def _gguf(args):
    from weightsmith.export import gguf

    return gguf(args.src, args.out, type=args.type, force=args.force)


def _safetensors(args):
    from weightsmith.export import safetensors

    return safetensors(
        args.src, args.out, dtype=args.dtype, shard_size=args.shard_size, single_file=args.single_file, force=args.force
    )
