"""Files: what goes beside the graph, and moving the finished files into place (the .onnx last)."""

from __future__ import annotations

import filecmp
import os
import shutil
from pathlib import Path

from weightsmith.checkpoint import TensorSource, check_destination
from weightsmith.errors import DestinationError

EXTERNAL_DATA_BYTES = 2 * 10**9 - 2**26  # protobuf's 2 GiB limit, less headroom for the graph itself


def write_beside(ckpt: TensorSource, tokenizer, folder: Path) -> Path:
    """The tokenizer (if any) and config.json, staged in ``folder``."""
    folder.mkdir(parents=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    # the image or feature processor's settings and the generation defaults (decoder start token), where there are any
    for name in ("config.json", "generation_config.json", "preprocessor_config.json"):
        if (ckpt.root / name).is_file():
            shutil.copy2(ckpt.root / name, folder / name)
    return folder


def check_beside(folder: Path, beside: Path, force: bool) -> None:
    """Tokenizer/config files beside the .onnx may already be there from another export: equal content is fine."""
    if force:
        return
    for f in sorted(beside.iterdir()):
        target = folder / f.name
        if target.exists() and not (target.is_file() and filecmp.cmp(f, target, shallow=False)):
            raise DestinationError(f"{target}: already exists with other content (set `force` to replace it)")


def stage_graph(model_path: Path, staged: Path, big: bool, provenance: str) -> None:
    """The graph with the provenance record in its metadata (key ``weightsmith``), as safetensors outputs carry
    it; above ``EXTERNAL_DATA_BYTES`` its tensors go to one ``<name>.data`` file, whatever the exporter called it."""
    import onnx as onnx_lib

    staged.parent.mkdir(exist_ok=True)
    proto = onnx_lib.load(str(model_path), load_external_data=big)
    strip_node_metadata(proto)
    onnx_lib.helper.set_model_props(
        proto, {**{p.key: p.value for p in proto.metadata_props}, "weightsmith": provenance}
    )
    if big:
        onnx_lib.save_model(
            proto, str(staged), save_as_external_data=True, all_tensors_to_one_file=True, location=staged.name + ".data"
        )
    else:
        onnx_lib.save_model(proto, str(staged))


def strip_node_metadata(proto) -> None:
    """Remove the exporter's per-node debugging metadata (module scopes, the FX node, and the Python stack trace of
    the export, with the exporting machine's file paths): nothing a runtime reads, and about a third of a small
    graph's bytes. Subgraphs and local functions included."""
    graphs = [proto.graph, *proto.functions]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            del node.metadata_props[:]
            for attr in node.attribute:
                graphs.extend([attr.g, *attr.graphs] if attr.HasField("g") else attr.graphs)


def place(graphs: dict[Path, Path], beside: Path, out: Path, big: bool, force: bool) -> list[str]:
    """Move staged files into ``out.parent``: beside-files first, then each graph's data file, the graphs last (the
    presence of ``out`` means complete). ``graphs`` maps staged graph → destination."""
    for dest in graphs.values():
        check_destination(dest, force)  # again: something may have appeared while we worked
    written = []
    for f in sorted(beside.iterdir()):
        os.replace(f, out.parent / f.name)
        written.append(str(out.parent / f.name))
    for staged, dest in graphs.items():
        data, dest_data = staged.with_name(staged.name + ".data"), dest.with_name(dest.name + ".data")
        if big:
            os.replace(data, dest_data)
            written.append(str(dest_data))
        elif dest_data.exists():
            dest_data.unlink()  # a stale data file of an earlier (forced-over) export
    for staged, dest in sorted(graphs.items(), key=lambda kv: kv[1] == out):  # `out` itself last
        os.replace(staged, dest)
    return [str(d) for d in sorted(graphs.values(), key=lambda d: d != out)] + written


def onnx_size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def graph_facts(path: Path) -> dict:
    import onnx as onnx_lib

    proto = onnx_lib.load(str(path), load_external_data=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"opset": opset, "nodes": len(proto.graph.node)}
