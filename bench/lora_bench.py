"""LoRA fold: weightsmith (streamed, no model) vs PEFT's full-model path, on ≥1 GB bases built at run time.

Two bf16 Llama-shaped bases (GQA, hidden 2048; 9 and 21 layers ≈ 1.1 and 2.2 GB) with a rank-16 adapter on every
linear. PEFT: from_pretrained → PeftModel.from_pretrained → merge_and_unload → save_pretrained. weightsmith: the CLI
`weightsmith lora merge`. Each run is one fresh process (wall time, CPU time and its own peak RSS); medians of three.
Targets: ≥3× faster, ≤0.5× peak RSS, and our peak RSS flat when the model doubles.

``--types``: the same 1.1 GB base with an AdaLoRA, IA³, LoHa, LoKr, VeRA, OFT and BOFT adapter on every linear (made by
PEFT on a one-layer model of the same widths, its tensors repeated for every layer), folded by both tools.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PY, WORK, Run, measure, median_run, table, write_section

H, FFN, HEADS, KV, V, R = 2048, 5632, 16, 4, 32000, 16

BUILD = """
import json, sys, torch
from pathlib import Path
from weightsmith.checkpoint import CheckpointWriter, provenance_step
h, i, L, heads, kv, V, r = {h}, {i}, {L}, {heads}, {kv}, {V}, {r}
hd = h // heads
config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=h, intermediate_size=i,
              num_hidden_layers=L, num_attention_heads=heads, num_key_value_heads=kv, vocab_size=V,
              max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False, dtype="bfloat16")
g = torch.Generator().manual_seed(0)
def rnd(*shape, scale=0.02, dtype=torch.bfloat16):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)
linears = [("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (kv * hd, h)), ("self_attn.v_proj", (kv * hd, h)),
           ("self_attn.o_proj", (h, h)), ("mlp.gate_proj", (i, h)), ("mlp.up_proj", (i, h)),
           ("mlp.down_proj", (h, i))]
base, adapter = Path(sys.argv[1]), Path(sys.argv[2])
with CheckpointWriter(base, steps=[provenance_step("bench-build", {{}}, [])], config=config) as w:
    w.write("model.embed_tokens.weight", rnd(V, h))
    for l in range(L):
        for n, shape in linears:
            w.write(f"model.layers.{{l}}.{{n}}.weight", rnd(*shape))
        w.write(f"model.layers.{{l}}.input_layernorm.weight", torch.ones(h, dtype=torch.bfloat16))
        w.write(f"model.layers.{{l}}.post_attention_layernorm.weight", torch.ones(h, dtype=torch.bfloat16))
    w.write("model.norm.weight", torch.ones(h, dtype=torch.bfloat16))
    w.write("lm_head.weight", rnd(V, h))
with CheckpointWriter(adapter, steps=[provenance_step("bench-build", {{}}, [])], prefix="adapter_model",
                      index_name=None, shard_size=2**62) as w:
    for l in range(L):
        for n, (out, fan_in) in linears:
            key = f"base_model.model.model.layers.{{l}}.{{n}}"
            w.write(key + ".lora_A.weight", rnd(r, fan_in, scale=0.01, dtype=torch.float32))
            w.write(key + ".lora_B.weight", rnd(out, r, scale=0.01, dtype=torch.float32))
    w.add_file("adapter_config.json", json.dumps(dict(
        peft_type="LORA", task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, lora_dropout=0.0, bias="none",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        base_model_name_or_path=str(base), inference_mode=True, fan_in_fan_out=False, init_lora_weights=True)))
"""

PEFT = """
import sys, torch, transformers, peft
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model = peft.PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3])
"""

CHECK = """
import sys, torch, weightsmith as ws
ours, theirs = ws.open(sys.argv[1]), ws.open(sys.argv[2])
worst = max(int((ours[n].view(torch.int16).int() - theirs[n].view(torch.int16).int()).abs().max()) for n in theirs)
print(worst)
"""


TYPED = """
import json, sys, tempfile, torch, transformers, peft
from pathlib import Path
from safetensors.torch import load_file, save_file
peft_type, out, layers = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
h, i, heads, kv = {h}, {i}, {heads}, {kv}
config = transformers.LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=1, num_attention_heads=heads,
                                  num_key_value_heads=kv, vocab_size=128, tie_word_embeddings=False)
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(config)
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
cfg = dict(
    ADALORA=lambda: peft.AdaLoraConfig(init_r=16, target_r=8, lora_alpha=32, total_step=10, target_modules=targets),
    IA3=lambda: peft.IA3Config(target_modules=targets, feedforward_modules=["down_proj"]),
    LOHA=lambda: peft.LoHaConfig(r=8, alpha=16, target_modules=targets),
    LOKR=lambda: peft.LoKrConfig(r=8, alpha=16, target_modules=targets),
    VERA=lambda: peft.VeraConfig(r=16, target_modules=targets),
    OFT=lambda: peft.OFTConfig(r=0, oft_block_size=32, target_modules=targets),
    BOFT=lambda: peft.BOFTConfig(boft_block_size=32, target_modules=targets),
)[peft_type]()
pm = peft.get_peft_model(model, cfg)
g = torch.Generator().manual_seed(1)
with torch.no_grad():
    for p in pm.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
tmp = Path(tempfile.mkdtemp())
pm.save_pretrained(tmp)
one = load_file(tmp / "adapter_model.safetensors")
full = {{}}
for k, v in one.items():
    if ".layers.0." in k:
        for l in range(layers):
            full[k.replace(".layers.0.", f".layers.{{l}}.")] = v.clone()
    else:
        full[k] = v
out.mkdir(parents=True, exist_ok=True)
save_file(full, out / "adapter_model.safetensors")
(out / "adapter_config.json").write_text((tmp / "adapter_config.json").read_text())
"""


REPEATS = 3  # runs per tool and adapter; the tables show medians


def fold_pair(base: Path, adapter: Path, out_ws: Path, out_peft: Path) -> tuple[Run, Run]:
    """Medians of REPEATS folds by each tool (each output removed before the next run): on a shared 2-core machine
    one run can be off by a fifth. CPU time (user + sys) is reported beside wall time: waiting for a CPU is not
    counted in it."""
    ours = [PY, "-m", "weightsmith.cli", "lora", "merge", str(base), str(adapter), "-o", str(out_ws)]
    peft = [PY, "-c", PEFT, str(base), str(adapter), str(out_peft)]
    return (
        median_run(ours, REPEATS, prepare=lambda: shutil.rmtree(out_ws, ignore_errors=True)),
        median_run(peft, REPEATS, prepare=lambda: shutil.rmtree(out_peft, ignore_errors=True)),
    )


# the figures of one fold, weightsmith against PEFT (the LoRA table's and the adapter types' columns)
COLUMNS = [
    "weightsmith wall s",
    "PEFT wall s",
    "wall speed-up",
    "weightsmith CPU s",
    "PEFT CPU s",
    "CPU ratio",
    "weightsmith RSS MB",
    "PEFT RSS MB",
    "RSS ratio",
    "max ulp vs PEFT",
]


def main() -> None:
    WORK.mkdir(exist_ok=True)
    rows, ours_rss = [], []
    for layers in (9, 21):
        base, adapter = WORK / f"lora_base_{layers}L", WORK / f"lora_adapter_{layers}L"
        if not (base / "config.json").exists():
            shutil.rmtree(base, ignore_errors=True)
            shutil.rmtree(adapter, ignore_errors=True)
            build = BUILD.format(h=H, i=FFN, L=layers, heads=HEADS, kv=KV, V=V, r=R)
            measure([PY, "-c", build, str(base), str(adapter)])
        size_gb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9
        out_ws, out_peft = WORK / "lora_out_ws", WORK / "lora_out_peft"
        for out in (out_ws, out_peft):
            shutil.rmtree(out, ignore_errors=True)
        ws_run, peft_run = fold_pair(base, adapter, out_ws, out_peft)
        ws_cpu, peft_cpu = ws_run.cpu_seconds, peft_run.cpu_seconds
        ulps = subprocess.run(
            [PY, "-c", CHECK, str(out_ws), str(out_peft)], capture_output=True, text=True, check=True
        ).stdout.strip()
        for out in (out_ws, out_peft):
            shutil.rmtree(out, ignore_errors=True)
        ours_rss.append(ws_run.peak_rss_mb)
        rows.append(
            [
                f"{size_gb:.2f} GB ({layers} layers)",
                round(ws_run.seconds, 1),
                round(peft_run.seconds, 1),
                f"{peft_run.seconds / ws_run.seconds:.1f}×",
                round(ws_cpu, 1),
                round(peft_cpu, 1),
                f"{peft_cpu / ws_cpu:.1f}×",
                round(ws_run.peak_rss_mb),
                round(peft_run.peak_rss_mb),
                f"{ws_run.peak_rss_mb / peft_run.peak_rss_mb:.2f}×",
                ulps,
            ]
        )
    load = os.getloadavg()[1]
    md = (
        "## LoRA fold (`bench/lora_bench.py`)\n\n"
        "bf16 Llama-shaped bases (hidden 2048, GQA 16/4 heads, vocab 32000) built at run time, rank-16 fp32 "
        "adapter on all 7 linears of every layer. weightsmith = `weightsmith lora merge` CLI; PEFT = "
        "`from_pretrained` → `PeftModel.from_pretrained` → `merge_and_unload` → `save_pretrained`. Medians of three "
        "runs each (peak RSS: the largest), fresh process, start-up included, 2 shared CPU cores.\n\n"
        + table(["base", *COLUMNS], rows)
        + f"\n\nLoad average during the run: {load:.1f} on 2 cores (other jobs share the machine), so wall times "
        f"include waiting for a CPU; CPU time (user + sys) is the work each tool did."
        f" weightsmith peak RSS {ours_rss[0]:.0f} → {ours_rss[1]:.0f} MB when the model doubles "
        f"({ours_rss[1] / ours_rss[0]:.2f}×): it holds a few tensors, never the model."
    )
    write_section("lora", md)


ALL_TYPES = ("ADALORA", "IA3", "LOHA", "LOKR", "VERA", "OFT", "BOFT")


def main_types(types: tuple[str, ...] = ALL_TYPES, layers: int = 9) -> None:
    """Each foldable PEFT type on the 1.1 GB base: fold speed, CPU time and peak RSS against PEFT, max ulp."""
    WORK.mkdir(exist_ok=True)
    base = WORK / f"lora_base_{layers}L"
    if not (base / "config.json").exists():
        shutil.rmtree(base, ignore_errors=True)
        build = BUILD.format(h=H, i=FFN, L=layers, heads=HEADS, kv=KV, V=V, r=R)
        measure([PY, "-c", build, str(base), str(WORK / f"lora_adapter_{layers}L")])
    rows = []
    for peft_type in ("LORA", *types):  # plain LoRA first: the reference cost of a fold on this base, same run
        adapter = WORK / (f"lora_adapter_{layers}L" if peft_type == "LORA" else f"lora_{peft_type.lower()}_{layers}L")
        if peft_type != "LORA" and not (adapter / "adapter_config.json").exists():
            typed = TYPED.format(h=H, i=FFN, heads=HEADS, kv=KV)
            subprocess.run([PY, "-c", typed, peft_type, str(adapter), str(layers)], check=True, capture_output=True)
        out_ws, out_peft = WORK / "lora_out_ws", WORK / "lora_out_peft"
        for out in (out_ws, out_peft):
            shutil.rmtree(out, ignore_errors=True)
        ws_run, peft_run = fold_pair(base, adapter, out_ws, out_peft)
        ws_cpu, peft_cpu = ws_run.cpu_seconds, peft_run.cpu_seconds
        ulps = subprocess.run(
            [PY, "-c", CHECK, str(out_ws), str(out_peft)], capture_output=True, text=True, check=True
        ).stdout.strip()
        for out in (out_ws, out_peft):
            shutil.rmtree(out, ignore_errors=True)
        rows.append(
            [
                peft_type,
                round(ws_run.seconds, 1),
                round(peft_run.seconds, 1),
                f"{peft_run.seconds / ws_run.seconds:.1f}×",
                round(ws_cpu, 1),
                round(peft_cpu, 1),
                f"{peft_cpu / ws_cpu:.1f}×",
                round(ws_run.peak_rss_mb),
                round(peft_run.peak_rss_mb),
                f"{ws_run.peak_rss_mb / peft_run.peak_rss_mb:.2f}×",
                ulps,
            ]
        )
        print(rows[-1], flush=True)
    load = os.getloadavg()[1]
    size_gb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9
    md = (
        "## PEFT adapter types (`bench/lora_bench.py --types`)\n\n"
        f"The {size_gb:.2f} GB bf16 Llama-shaped base above ({layers} layers); each type on all 7 linears of every "
        "layer (AdaLoRA init_r 16, LoHa/LoKr r 8, VeRA r 16, OFT block 32, IA³ with down_proj as feed-forward). "
        "Same protocol as the LoRA table: medians of three runs each, fresh process, start-up included; the first "
        "row is the plain rank-16 LoRA adapter of that table, folded in the same run for reference.\n\n"
        + table(["type", *COLUMNS], rows)
        + f"\n\nLoad average during the run: {load:.1f} on 2 cores (shared machine)."
    )
    write_section("lora-types", md)


if __name__ == "__main__":
    if "--types" in sys.argv[1:]:  # --types [ADALORA,IA3,…]
        rest = sys.argv[sys.argv.index("--types") + 1 :]
        main_types(tuple(rest[0].upper().split(",")) if rest else ALL_TYPES)
    else:  # both tables: the LoRA fold on two bases, then the other adapter types
        main()
        main_types()
