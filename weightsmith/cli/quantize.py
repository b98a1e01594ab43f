"""quantize, dequantize."""

from __future__ import annotations

from weightsmith.cli.common import MMAP_THRESHOLD, SMALL_MMAP_THRESHOLD, add_command, add_output_options


def register(sub) -> None:
    p = add_command(
        sub,
        "quantize",
        help="quantize Linear weights to int8, int4 or FP8 (compressed-tensors) or NF4 (bitsandbytes)",
        description="Quantize the 2-D Linear weights of a checkpoint in one streamed pass. The output loads with "
        "transformers' from_pretrained (int8, int4 and FP8 need compressed-tensors installed, NF4 bitsandbytes). "
        "Embeddings, norms, biases and output heads stay float.",
        examples=[
            "weightsmith quantize ./llama -o ./llama-int8 --scheme int8",
            "weightsmith quantize ./llama -o ./llama-w8a16 --scheme int8 --weight-only --group-size 128",
            "weightsmith quantize ./llama -o ./llama-w4a16 --scheme int4 --group-size 128",
            "weightsmith quantize ./llama -o ./llama-gptq --scheme int4 --gptq --calibration c.txt --samples 16",
            "weightsmith quantize ./llama -o ./llama-fp8 --scheme fp8",
            "weightsmith quantize ./llama -o ./llama-nf4 --scheme nf4 --double-quant --compute-dtype bf16",
            "weightsmith quantize ./bert -o ./bert-int8 --ignore bert.pooler,classifier --json",
        ],
    )
    p.add_argument("src", help="model directory or weight file")
    add_output_options(p, dtype=False)
    p.add_argument(
        "--scheme",
        default="int8",
        help="int8 (W8A8 dynamic, default), int4 (W4A16, round-to-nearest), fp8 (e4m3 W8A8 dynamic) or nf4",
    )
    p.add_argument(
        "--ignore",
        help="comma-separated module patterns to keep float (a name, a suffix or a regex; "
        "default: lm_head,score,classifier,qa_outputs)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        help="int8: one scale per group of N input columns (default: per output channel); int4: the same "
        "(default 128; 0 = per channel); nf4: block size (default 64)",
    )
    p.add_argument("--weight-only", action="store_true", help="int8: W8A16 (activations stay float)")
    p.add_argument("--asymmetric", action="store_true", help="int4: a zero point per group (default symmetric)")
    p.add_argument("--double-quant", action="store_true", help="nf4: quantize the block absmax too (QLoRA)")
    p.add_argument("--compute-dtype", help="nf4: dtype Linear4bit computes in at run time (default float32)")
    _gptq_options(p)
    p.set_defaults(handler=_quantize, mmap_threshold=_mmap_threshold)

    p = add_command(
        sub,
        "dequantize",
        help="turn an int8 or NF4 checkpoint back into float",
        examples=[
            "weightsmith dequantize ./llama-nf4 -o ./llama-float",
            "weightsmith dequantize ./llama-int8 -o ./llama-bf16 --dtype bf16",
        ],
    )
    p.add_argument("src", help="quantized model directory")
    add_output_options(p)
    p.set_defaults(handler=_dequantize)


def _gptq_options(p) -> None:
    """GPTQ's flags, one per field of the library's GPTQ config (tests/test_quantize_gptq.py checks the match)."""
    g = p.add_argument_group("int4 GPTQ (calibrated rounding, one layer at a time)")
    g.add_argument("--gptq", action="store_true", help="int4: GPTQ instead of round-to-nearest (needs --calibration)")
    g.add_argument("--calibration", help="GPTQ: text file, one sample per line, tokenised with the model's tokenizer")
    g.add_argument("--damp", type=float, help="GPTQ: diagonal damping as a fraction of mean(diag H) (default 0.01)")
    g.add_argument("--act-order", action="store_true", help="GPTQ: visit columns by decreasing activation energy")
    g.add_argument("--block-size", type=int, help="GPTQ: columns per lazy batch update (default 128)")
    g.add_argument("--samples", type=int, help="GPTQ: calibration lines used (default 128)")
    g.add_argument("--seq-len", type=int, help="GPTQ: tokens per calibration line at most (default 512)")
    g.add_argument("--device", default="cpu", help="GPTQ: where the Hessians and solves run: cpu, cuda or cuda:N")


def _mmap_threshold(args) -> int:
    """GPTQ's activations and solves fragment the heap (see ``weightsmith.cli._return_freed_tensors``); the
    data-free schemes work in slices small enough to reuse it."""
    return SMALL_MMAP_THRESHOLD if args.gptq else MMAP_THRESHOLD


def _quantize(args):
    from weightsmith.compress.quantize import quantize

    ignore = None if args.ignore is None else [s.strip() for s in args.ignore.split(",") if s.strip()]
    return quantize(
        args.src,
        args.out,
        scheme=args.scheme,
        ignore=ignore,
        shard_size=args.shard_size,
        force=args.force,
        group_size=args.group_size,
        weight_only=args.weight_only,
        asymmetric=args.asymmetric,
        double_quant=args.double_quant,
        compute_dtype=args.compute_dtype,
        device=args.device,
        gptq=args.gptq,
        calibration=args.calibration,
        damp=args.damp,
        act_order=args.act_order,
        block_size=args.block_size,
        samples=args.samples,
        seq_len=args.seq_len,
    )


def _dequantize(args):
    from weightsmith.compress.quantize import dequantize

    return dequantize(args.src, args.out, dtype=args.dtype, shard_size=args.shard_size, force=args.force)
