"""The lora CLI: each refusal is one line, exit 2 and nothing at the destination; the verbs work end to end."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from _lora_utils import make_adapter
from conftest import build_model
from safetensors.torch import load_file, save_file

import weightsmith as ws
from weightsmith.cli import main
from weightsmith.units import parse_weighted

warnings.filterwarnings("ignore", module="peft")


def refused(capsys, out: Path, *argv, match: str) -> None:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("weightsmith: error: "), err
    assert match in err[0], err[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".weightsmith-" in p.name]


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory) -> Path:
    return make_adapter(
        build_model("llama"), tmp_path_factory.mktemp("ad") / "a", r=4, target_modules=["q_proj", "v_proj"]
    )


def _edit_adapter(src: Path, dst: Path, *, config: dict | None = None, tensors=None) -> Path:
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    if tensors:
        sd = load_file(dst / "adapter_model.safetensors")
        tensors(sd)
        save_file(sd, dst / "adapter_model.safetensors")
    return dst


def test_missing_targets_named(capsys, tiny_model, llama_adapter, tmp_path):
    refused(
        capsys,
        tmp_path / "o",
        "lora",
        "merge",
        tiny_model("gpt2"),
        llama_adapter,
        "-o",
        tmp_path / "o",
        match="target(s) missing from the base",
    )
    capsys.readouterr()
    main(["lora", "merge", str(tiny_model("gpt2")), str(llama_adapter), "-o", str(tmp_path / "o")])
    assert "model.layers.0.self_attn.q_proj.weight" in capsys.readouterr().err


def test_shapes_that_do_not_fit(capsys, tiny_model, llama_adapter, tmp_path):
    def widen(sd):
        key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
        sd[key] = torch.zeros(4, 80)

    bad = _edit_adapter(llama_adapter, tmp_path / "bad", tensors=widen)
    refused(
        capsys,
        tmp_path / "o",
        "lora",
        "merge",
        tiny_model("llama"),
        bad,
        "-o",
        tmp_path / "o",
        match="model.layers.1.self_attn.v_proj.weight",
    )


def test_prompt_tuning_adapter_refused(capsys, tiny_model, tmp_path):
    from peft import PromptTuningConfig, get_peft_model

    get_peft_model(
        build_model("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    ).save_pretrained(tmp_path / "prompt")
    refused(
        capsys,
        tmp_path / "o",
        "lora",
        "merge",
        tiny_model("llama"),
        tmp_path / "prompt",
        "-o",
        tmp_path / "o",
        match="peft_type 'PROMPT_TUNING' cannot be folded",
    )


@pytest.mark.parametrize(
    "config, match",
    [
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
        ({"init_lora_weights": "olora"}, "init_lora_weights='olora'"),
        ({"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}}, "init_lora_weights='loftq'"),
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
    ],
)
def test_unconverted_or_unfoldable_config_refused(capsys, tiny_model, llama_adapter, tmp_path, config, match):
    bad = _edit_adapter(llama_adapter, tmp_path / "bad", config=config)
    refused(capsys, tmp_path / "o", "lora", "merge", tiny_model("llama"), bad, "-o", tmp_path / "o", match=match)


def test_nan_in_adapter_refused(capsys, tiny_model, llama_adapter, tmp_path):
    def poison(sd):
        sd["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"][3, 1] = float("nan")

    bad = _edit_adapter(llama_adapter, tmp_path / "bad", tensors=poison)
    refused(
        capsys,
        tmp_path / "o",
        "lora",
        "merge",
        tiny_model("llama"),
        bad,
        "-o",
        tmp_path / "o",
        match="'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight' contains NaN or Inf",
    )


def test_inf_in_result_refused(capsys, tiny_model, llama_adapter, tmp_path):
    def blow_up(sd):  # finite factors whose product overflows float32
        sd["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].fill_(1e30)
        sd["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"].fill_(1e30)

    bad = _edit_adapter(llama_adapter, tmp_path / "bad", tensors=blow_up)
    refused(
        capsys,
        tmp_path / "o",
        "lora",
        "merge",
        tiny_model("llama"),
        bad,
        "-o",
        tmp_path / "o",
        match="into tensor 'model.layers.1.self_attn.v_proj.weight' gives NaN or Inf",
    )


def test_weight_not_a_number_refused(capsys, tiny_model, llama_adapter, tmp_path):
    refused(
        capsys,
        tmp_path / "o",
        "lora",
        "merge",
        tiny_model("llama"),
        f"{llama_adapter}@nan",
        "-o",
        tmp_path / "o",
        match="is not finite",
    )
    base = dict(ws.open(tiny_model("llama")))
    base["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(64, 64, dtype=torch.int8)
    save_file(base, tmp_path / "int8.safetensors")
    refused(
        capsys,
        tmp_path / "o",
        "lora",
        "merge",
        tmp_path / "int8.safetensors",
        llama_adapter,
        "-o",
        tmp_path / "o",
        match="not a floating-point weight",
    )


def test_unmerge_refuses_dora_and_replacements(capsys, tiny_model, tmp_path):
    dora = make_adapter(build_model("llama"), tmp_path / "dora", r=2, target_modules=["q_proj"], use_dora=True)
    ws.lora.merge(tiny_model("llama"), [dora], tmp_path / "m")
    refused(
        capsys,
        tmp_path / "o",
        "lora",
        "unmerge",
        tmp_path / "m",
        dora,
        "-o",
        tmp_path / "o",
        match="DoRA cannot be unmerged",
    )
    mts = make_adapter(
        build_model("llama"), tmp_path / "mts", r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]
    )
    refused(
        capsys,
        tmp_path / "o",
        "lora",
        "unmerge",
        tiny_model("llama"),
        mts,
        "-o",
        tmp_path / "o",
        match="'lm_head.weight'",
    )


def test_existing_destination_and_adapter_as_base_refused(capsys, tiny_model, llama_adapter, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")
    code = main(["lora", "merge", str(tiny_model("llama")), str(llama_adapter), "-o", str(tmp_path / "o")])
    assert code == 2 and (tmp_path / "o" / "keep.txt").read_text() == "x"
    refused(
        capsys,
        tmp_path / "p",
        "lora",
        "merge",
        llama_adapter,
        llama_adapter,
        "-o",
        tmp_path / "p",
        match="is a PEFT adapter; the first input must be the base model",
    )


def test_extract_refusals(capsys, tiny_model, tmp_path):
    refused(
        capsys,
        tmp_path / "o",
        "lora",
        "extract",
        tiny_model("llama"),
        tiny_model("llama"),
        "-o",
        tmp_path / "o",
        "--rank",
        4,
        match="nothing to extract",
    )
    refused(
        capsys,
        tmp_path / "o",
        "lora",
        "extract",
        tiny_model("llama"),
        tiny_model("gpt2"),
        "-o",
        tmp_path / "o",
        "--rank",
        4,
        match="tensor names differ",
    )
    refused(
        capsys,
        tmp_path / "o",
        "lora",
        "extract",
        tiny_model("llama"),
        tiny_model("llama", seed=1),
        "-o",
        tmp_path / "o",
        "--energy",
        1.5,
        match="energy must be in (0, 1]",
    )


def test_cli_round_trip_with_json(capsys, tiny_model, llama_adapter, tmp_path):
    capsys.readouterr()
    assert (
        main(
            [
                "lora",
                "merge",
                str(tiny_model("llama")),
                f"{llama_adapter}@0.5",
                "-o",
                str(tmp_path / "m"),
                "--dtype",
                "bf16",
                "--shard-size",
                "100KB",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["summary"]["lora"] == 4 and report["summary"]["shards"] > 1
    assert {i.dtype for i in ws.open(tmp_path / "m").infos() if i.dtype.is_floating_point} == {torch.bfloat16}
    assert (
        main(
            [
                "lora",
                "extract",
                str(tiny_model("llama")),
                str(tiny_model("llama", seed=1)),
                "-o",
                str(tmp_path / "x"),
                "--rank",
                "2",
            ]
        )
        == 0
    )
    assert (tmp_path / "x" / "adapter_config.json").is_file()
    assert (tmp_path / "x" / "adapter_model.safetensors").is_file()


def test_parse_weighted():
    assert parse_weighted("a/b@0.25") == ("a/b", 0.25)
    assert parse_weighted("team@org/adapter") == ("team@org/adapter", 1.0)
    assert parse_weighted("x@-1") == ("x", -1.0)
