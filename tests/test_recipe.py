"""Recipes: a chain of steps gives what the commands give one by one; bad recipes are refused before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

import weightsmith as ws
from weightsmith.cli import main


@pytest.fixture(scope="module")
def parts(tiny_model, tmp_path_factory):
    """A tiny Llama base, a second fine-tune of it, and a PEFT LoRA adapter with non-zero B."""
    import peft
    from conftest import build_model

    root = tmp_path_factory.mktemp("recipe")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], init_lora_weights=False)
    peft.get_peft_model(build_model("llama"), cfg).save_pretrained(root / "adapter")
    return {"base": tiny_model("llama"), "other": tiny_model("llama", seed=1), "adapter": root / "adapter"}


def _steps(parts, *, export: bool) -> list:
    steps = [
        {"lora_merge": {"adapters": [f"{parts['adapter']}@0.8"]}},
        {
            "merge": {
                "merge_method": "linear",
                "models": [
                    {"model": "@previous", "parameters": {"weight": 0.6}},
                    {"model": str(parts["other"]), "parameters": {"weight": 0.4}},
                ],
            }
        },
        {"prune": {"sparsity": 0.5}},
        {"quantize": {"scheme": "int8"}},
    ]
    if export:
        steps.append({"export": {"task": "causal-lm"}})
    return steps


def _write_recipe(path, parts, out, steps) -> str:
    path.write_text(yaml.safe_dump({"input": str(parts["base"]), "output": str(out), "steps": steps}))
    return str(path)


def _one_by_one(parts, tmp_path):
    a, b, c, d = (tmp_path / n for n in ("folded", "merged", "pruned", "quantized"))
    ws.lora.merge(parts["base"], [(parts["adapter"], 0.8)], a)
    ws.merge.run(
        {
            "merge_method": "linear",
            "models": [
                {"model": str(a), "parameters": {"weight": 0.6}},
                {"model": str(parts["other"]), "parameters": {"weight": 0.4}},
            ],
        },
        b,
    )
    ws.prune(b, c, sparsity=0.5)
    ws.quantize(c, d, scheme="int8")
    return d


def test_recipe_equals_the_commands_one_by_one(parts, tmp_path):
    expected = ws.open(_one_by_one(parts, tmp_path / "manual"))
    recipe = _write_recipe(tmp_path / "r.yaml", parts, tmp_path / "out", _steps(parts, export=False))
    report = ws.run(recipe)
    modes = [report.details["plan"][f"step {i}"]["mode"] for i in range(4)]
    assert modes == ["streams tensor by tensor", "streams tensor by tensor", "lazy view", "streams tensor by tensor"]
    got = ws.open(tmp_path / "out")
    assert list(got) == list(expected)
    for name in got:
        assert got[name].dtype == expected[name].dtype
        assert torch.equal(got[name], expected[name]), name
    assert got.config["quantization_config"] == expected.config["quantization_config"]
    steps = [s["operation"] for s in json.loads(got.metadata["weightsmith"])["steps"]]
    assert steps == ["lora merge", "merge", "prune", "quantize"]
    assert report.summary["steps"] == ["lora_merge", "merge", "prune", "quantize"]
    assert not [p for p in tmp_path.iterdir() if "weightsmith-recipe" in p.name]  # work directory removed


def test_recipe_with_export_matches_exporting_the_manual_result(parts, tmp_path):
    import onnxruntime as ort

    manual = _one_by_one(parts, tmp_path / "manual")
    ws.export.onnx(manual, tmp_path / "manual-onnx" / "model.onnx", task="causal-lm")
    recipe = _write_recipe(tmp_path / "r.yaml", parts, tmp_path / "out", _steps(parts, export=True))
    ws.run(recipe)
    ids = np.array([[5, 9, 17, 33, 2, 70, 11]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    outs = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        for p in (tmp_path / "out" / "model.onnx", tmp_path / "manual-onnx" / "model.onnx")
    ]
    np.testing.assert_array_equal(outs[0], outs[1])
    import onnx

    props = {p.key: p.value for p in onnx.load(str(tmp_path / "out" / "model.onnx")).metadata_props}
    steps = [s["operation"] for s in json.loads(props["weightsmith"])["steps"]]
    assert steps == ["lora merge", "merge", "prune", "quantize", "export onnx"]


def test_a_fold_streams_into_the_next_step(parts, tmp_path):
    recipe = {
        "input": str(parts["base"]),
        "output": str(tmp_path / "out"),
        "steps": [{"lora_merge": {"adapters": [str(parts["adapter"])]}}, {"convert": {"dtype": "bf16"}}],
    }
    report = ws.run(recipe)
    assert report.details["plan"]["step 0"]["mode"] == "lazy view"
    assert report.details["step 0 lora_merge"] == {"streamed": "lazy view, nothing written"}
    ws.lora.merge(parts["base"], [parts["adapter"]], tmp_path / "manual", dtype="bf16")
    got, expected = ws.open(tmp_path / "out"), ws.open(tmp_path / "manual")
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    steps = json.loads(got.metadata["weightsmith"])["steps"]
    assert [s["operation"] for s in steps] == ["lora merge", "convert"]
    assert steps[1]["inputs"][0]["via"] == ["lora merge"]


def test_dry_run_plans_and_writes_nothing(parts, tmp_path, capsys):
    recipe = _write_recipe(tmp_path / "r.yaml", parts, tmp_path / "out", _steps(parts, export=True))
    capsys.readouterr()
    assert main(["run", recipe, "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    plan = report["details"]["plan"]
    assert [plan[f"step {i}"]["kind"] for i in range(5)] == ["lora_merge", "merge", "prune", "quantize", "export"]
    assert plan["step 4"]["mode"] == "builds the model" and plan["step 2"]["mode"] != "builds the model"
    assert plan["step 4"]["output"] == str(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


BAD = [
    ({"steps": [{"sharpen": {}}]}, "recipe step 0: unknown step 'sharpen'"),
    ({"steps": [{"prune": {"sparsity": "half"}}]}, "recipe step 0 (prune): parameter 'sparsity' must be float"),
    ({"steps": [{"convert": {}}, {"quantize": {"scheme": 8}}]}, "recipe step 1 (quantize): parameter 'scheme'"),
    ({"steps": [{"prune": {"sparsity": 0.5, "colour": "red"}}]}, "unknown parameter 'colour'"),
    ({"steps": [{"prune": {"sparsity": 0.5, "out": "x"}}]}, "'out' is set by the recipe"),
    ({"steps": []}, "'steps' must be a non-empty list"),
    ({"steps": [{"export": {"format": "tflite", "task": "causal-lm"}}]}, "format 'tflite'"),
    ({"steps": [{"lora_merge": {"adapters": [{"weight": 1}]}}]}, "recipe step 0 (lora_merge): adapters"),
    ({"steps": [{"prune": {"sparsity": 1.5}}]}, "recipe step 0 (prune): sparsity"),
    # the other steps against the types of their function's parameters
    ({"steps": [{"convert": {"dtype": 3}}]}, "recipe step 0 (convert): parameter 'dtype' must be a string or null"),
    ({"steps": [{"lora_merge": {"adapters": ["a"], "requantize": "yes"}}]}, "'requantize' must be a boolean"),
    ({"steps": [{"merge": {"merge_method": "linear", "workers": 1.5}}]}, "'workers' must be an integer, got float"),
    (
        {"steps": [{"export_gguf": {"type": ["q8_0"]}}]},
        "recipe step 0 (export_gguf): parameter 'type' must be a string",
    ),
    # steps whose verb takes a config value are checked by building it
    ({"steps": [{"quantize": {"scheme": "nf4", "group_size": 7}}]}, "recipe step 0 (quantize): nf4: group_size 7"),
    ({"steps": [{"quantize": {"scheme": "int8", "bits": 3}}]}, "recipe step 0 (quantize)"),
    (
        {"steps": [{"distill": {"data": "d.txt", "stepz": 3}}]},
        "recipe step 0 (distill): distill: unknown option(s) stepz",
    ),
    ({"steps": [{"export": {"task": "causal-lm", "opset": 3}}]}, "recipe step 0 (export): opset 3"),
    ({"steps": [{"export": {"tsk": "causal-lm"}}]}, "recipe step 0 (export): unknown ONNX export option(s) tsk"),
]


@pytest.mark.parametrize("recipe, message", BAD)
def test_bad_recipes_are_refused_with_the_step_named(parts, tmp_path, capsys, recipe, message):
    raw = {"input": str(parts["base"]), "output": str(tmp_path / "out"), **recipe}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    code = main(["run", str(tmp_path / "r.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_a_failing_late_step_leaves_nothing(parts, tmp_path, capsys):
    steps = [
        {"lora_merge": {"adapters": [str(parts["adapter"])]}},
        {"prune": {"sparsity": 0.5}},
        {"export": {"task": "masked-lm"}},
    ]  # a Llama has no masked-LM head: refused after two steps ran
    recipe = _write_recipe(tmp_path / "r.yaml", parts, tmp_path / "out", steps)
    capsys.readouterr()
    code = main(["run", recipe])
    err = capsys.readouterr().err
    assert code == 2 and "recipe step 2 (export)" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_existing_output_needs_force(parts, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    recipe = _write_recipe(tmp_path / "r.yaml", parts, tmp_path / "out", [{"convert": {}}])
    capsys.readouterr()
    assert main(["run", recipe]) == 2 and "--force" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep").exists()
    assert main(["run", recipe, "--force"]) == 0
    assert not (tmp_path / "out" / "keep").exists()
