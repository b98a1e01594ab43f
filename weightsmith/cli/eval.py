"""weightsmith eval: perplexity, embedding cosine, image accuracy, seq2seq and speech agreement, logits |Δ| and KL."""

from __future__ import annotations

from weightsmith.cli.common import add_command, add_report_option


def register(sub) -> None:
    p = add_command(
        sub,
        "eval",
        help="perplexity, embedding cosine, image accuracy, seq2seq and speech agreement, logits |Δ| and KL",
        examples=[
            "weightsmith eval ./llama-pruned --data held_out.txt",
            "weightsmith eval ./minilm-int8 --ref ./minilm --data sentences.txt --json",
            "weightsmith eval ./onnx/model.onnx --ref ./minilm --data sentences.txt",
            "weightsmith eval ./minilm-int8 --ref ./minilm --data sentences.txt --report eval.html",
            "weightsmith eval ./whisper-int8 --ref ./whisper --data clips/ --json",
        ],
    )
    p.add_argument("model", help="model directory or .onnx file")
    p.add_argument(
        "--data",
        required=True,
        help="text file, one sample per line; for an image classifier a class_name/*.png folder; for a seq2seq "
        "model source texts (.jsonl: 'text', optional 'target'); for a speech model (Whisper) a folder of PCM 16-bit "
        ".wav files, or a .jsonl naming them ('audio', optional 'target' transcript)",
    )
    p.add_argument("--ref", help="reference checkpoint to compare against")
    p.add_argument("--max-length", type=int, default=128, help="tokens per sample (default 128)")
    add_report_option(p)
    p.set_defaults(handler=_eval)


def _eval(args):
    from weightsmith.evaluation import evaluate

    return evaluate(args.model, args.data, ref=args.ref, max_length=args.max_length)
