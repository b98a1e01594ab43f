"""The one place that builds transformers models, tokenizers, image processors, audio feature extractors and
onnxruntime sessions, and reads the data files the model-building verbs (eval, distill, calibrated prune) take
(audio files: ``weightsmith.audio``).

transformers, torch and onnxruntime are imported inside the functions: importing this module stays torch-free.

>>> texts = read_texts("held_out.txt")                                   # doctest: +SKIP
>>> model = load_model("pruned-llama")                                   # doctest: +SKIP
>>> images, labels, classes = read_image_folder("digits/")               # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightsmith.errors import CheckpointError, ConfigError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
)
IMAGE_SUFFIXES = (".png", ".npy")


# -- text ---------------------------------------------------------------------------------------------------------


def read_texts(path: str | os.PathLike, *, what: str = "text file") -> list[str]:
    """Documents of a UTF-8 file: the ``text`` field of each line of a ``.jsonl`` file, else each non-empty line.

    Refuses a missing or empty file, or a bad JSON line, with one line naming the file (and the line).
    """
    return [record["text"] for record in read_records(path, what=what)]


def read_records(
    path: str | os.PathLike, *, what: str = "text file", fields: tuple[str, ...] = (), key: str = "text"
) -> list[dict]:
    """Records of a data file: ``{"text": line}`` per non-empty line of a text file, or the JSON objects of a
    ``.jsonl`` file, each with a non-empty string ``key`` field (``text``; speech data: ``audio``) and a string value
    for each of ``fields``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: {what} not found")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read {what} as UTF-8 text ({exc})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if p.suffix != ".jsonl":
            records.append({"text": line.strip()})
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise ConfigError(f"{p}: line {number} is not valid JSON") from None
        for name in (key, *fields):
            if not isinstance(record, dict) or not isinstance(record.get(name), str):
                raise ConfigError(f"{p}: line {number} has no string field {name!r}")
        if record[key].strip():
            records.append(record)
    if not records:
        raise ConfigError(f"{p}: {what} is empty")
    return records


# -- models -------------------------------------------------------------------------------------------------------


def architecture(config: dict | None) -> str:
    """The checkpoint's ``architectures[0]`` ("" when config.json names none)."""
    return ((config or {}).get("architectures") or [""])[0] or ""


def is_causal_lm(config: dict | None) -> bool:
    """True when the checkpoint's architecture is a language-model head that predicts the next token."""
    archs = " ".join((config or {}).get("architectures") or [])
    return "CausalLM" in archs or "LMHeadModel" in archs


def read_config(model_dir: str | os.PathLike) -> dict:
    """config.json of a model directory; refuses a directory without one."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no config.json: cannot tell what kind of model this is")
    return json.loads(path.read_text())


def model_class(config: dict | None, where: str | os.PathLike):
    """The transformers class named by ``architectures[0]``; refuses a config without one or an unknown name."""
    import transformers

    arch = architecture(config)
    if not arch:
        raise CheckpointError(f"{where}: config.json names no architecture; this needs a model class")
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise CheckpointError(f"{where}: architecture {arch!r} is not in this transformers version")
    return cls


def load_model(model_dir: str | os.PathLike, *, dtype: Any = "float32"):
    """The transformers model a checkpoint directory describes (its ``architectures[0]`` class), in eval mode.

    Loading by the exact class keeps parameter names equal to the checkpoint's tensor names.
    """
    import torch
    import transformers

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json: a transformers model directory is needed here")
    transformers.utils.logging.disable_progress_bar()  # weightsmith reports for itself; stderr stays quiet
    config = transformers.AutoConfig.from_pretrained(path)
    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModelForCausalLM if is_causal_lm(config.to_dict()) else transformers.AutoModel
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return cls.from_pretrained(path, dtype=dtype).eval()


def ort_session(path: str | os.PathLike, *, threads: int | None = 1):
    """An onnxruntime CPU session for an ONNX file (``threads`` intra-op threads: 1 keeps runs comparable; None:
    onnxruntime's default, every core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its notes on unused initializers are not the user's concern
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# -- tokenizers ---------------------------------------------------------------------------------------------------


def has_tokenizer(model_dir: str | os.PathLike) -> bool:
    path = Path(model_dir)
    return any((path / f).is_file() for f in TOKENIZER_FILES)


def require_tokenizer(model_dir: str | os.PathLike) -> None:
    """Refuse, with one line and without importing anything, a directory without tokenizer files."""
    if not has_tokenizer(model_dir):
        raise CheckpointError(
            f"{Path(model_dir)}: no tokenizer files (tokenizer.json, vocab.txt…): text cannot be encoded"
        )


def load_tokenizer(model_dir: str | os.PathLike, *, pad_with_eos: bool = False, need_mask: bool = False):
    """The tokenizer saved beside a checkpoint; refuses with one line when there is none or it cannot load.

    ``pad_with_eos``: a tokenizer without a pad token pads with EOS (causal LMs often ship without one; padded
    positions are masked out). ``need_mask``: refuse a tokenizer without a mask token (masked-LM training).
    """
    import transformers

    path = Path(model_dir)
    require_tokenizer(path)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot load its tokenizer ({str(exc).splitlines()[0][:160]})") from None
    if pad_with_eos and tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if need_mask and tok.mask_token_id is None:
        raise CheckpointError(f"{path}: the tokenizer has no mask token, which masked-LM distillation needs")
    return tok


def encode(tokenizer, texts: list[str], max_length: int) -> list[Any]:
    """One ``input_ids`` [1, T] tensor per text (special tokens included, truncated, never padded)."""
    out = []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
        if ids.shape[1] > 0:
            out.append(ids)
    return out


def greedy_outputs(model, tokenizer, sources: list[str], *, max_length: int, batch_size: int = 8) -> list[list[int]]:
    """An encoder-decoder's greedy output ids for each source text, up to and including EOS (no decoder start)."""
    import torch

    eos = model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos]) - {None}
    start_id = model.config.decoder_start_token_id
    out: list[list[int]] = []
    with torch.no_grad():
        for first in range(0, len(sources), batch_size):
            enc = tokenizer(
                sources[first : first + batch_size],
                truncation=True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            )
            generated = model.generate(**enc, max_new_tokens=max_length, do_sample=False, num_beams=1)
            for row in generated.tolist():
                row = row[1:] if row and row[0] == start_id else row  # (decoder start, y₁, …, EOS, pad, …)
                end = next((i for i, t in enumerate(row) if t in stops), len(row) - 1)
                out.append(row[: end + 1])
    return out


def load_feature_extractor(model_dir: str | os.PathLike):
    """The audio feature extractor of a checkpoint's preprocessor_config.json (Whisper's log-mel spectrogram);
    refuses a directory without one."""
    import transformers

    path = Path(model_dir) / "preprocessor_config.json"
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no preprocessor_config.json: audio cannot be prepared for this model")
    try:
        return transformers.AutoFeatureExtractor.from_pretrained(path.parent)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable feature extractor ({exc})") from None


# -- images -------------------------------------------------------------------------------------------------------


def read_image_folder(path: str | os.PathLike, *, what: str = "image folder") -> tuple[list[Any], list[int], list[str]]:
    """Images of a folder laid out as torchvision's ImageFolder: ``root/class_name/*.png`` (or ``*.npy``).

    Returns (images as uint8 numpy arrays (H, W, C), class indices, class names in sorted order): the class index
    of ``root/c/x.png`` is the position of ``c`` among the sorted class folders, as ImageFolder numbers them.
    """
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"{root}: {what} not found (a folder of class_name/*.png)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    images, labels = [], []
    for index, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                images.append(read_image(f))
                labels.append(index)
    if not images:
        raise ConfigError(f"{root}: {what} holds no class_name/*.png images")
    return images, labels, classes


def read_image(path: str | os.PathLike):
    """An image file as a uint8 (H, W, C) numpy array: PNG (8-bit grey, grey+alpha, RGB, RGBA; alpha dropped) or a
    ``.npy`` array of shape (H, W) or (H, W, C). Read with numpy and zlib (the project does not depend on PIL)."""
    import numpy as np

    p = Path(path)
    if p.suffix.lower() == ".npy":
        array = np.load(p, allow_pickle=False)
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3:
            raise ConfigError(f"{p}: image array of shape {array.shape}; expected (H, W) or (H, W, C)")
        return array
    return _read_png(p)


def _read_png(path: Path):
    """Decode a non-interlaced 8-bit PNG (PNG specification, ISO/IEC 15948: chunks, zlib stream, filters 0–4)."""
    import numpy as np

    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ConfigError(f"{path}: not a PNG file")
    pos, idat, header = 8, [], None
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        pos += 12 + length
    if header is None:
        raise ConfigError(f"{path}: PNG without an IHDR chunk")
    width, height, depth, color, _, _, interlace = header
    channels = {0: 1, 4: 2, 2: 3, 6: 4}.get(color)
    if depth != 8 or channels is None or interlace:
        raise ConfigError(f"{path}: PNG of bit depth {depth}, colour type {color}: only 8-bit grey/RGB(A) is read")
    try:
        raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8)
    except zlib.error as exc:
        raise ConfigError(f"{path}: corrupt PNG data ({exc})") from None
    stride = width * channels
    if raw.size != height * (stride + 1):
        raise ConfigError(f"{path}: PNG data of {raw.size} bytes for a {width}x{height} image")
    rows = raw.reshape(height, stride + 1)
    out = np.zeros((height, stride), dtype=np.int32)
    for y in range(height):
        out[y] = _unfilter(
            rows[y, 0], rows[y, 1:].astype(np.int32), out[y - 1] if y else np.zeros(stride, np.int32), channels
        )
    image = out.astype(np.uint8).reshape(height, width, channels)
    return image[:, :, :1] if channels == 2 else image[:, :, :3]


def _unfilter(kind: int, line, prior, bpp: int):
    """Undo one scanline's PNG filter: 0 none, 1 sub, 2 up, 3 average, 4 Paeth (left a, up b, up-left c)."""
    import numpy as np

    if kind == 0:
        return line
    if kind == 2:
        return (line + prior) & 0xFF
    out = np.zeros_like(line)
    for i in range(line.size):
        a = out[i - bpp] if i >= bpp else 0
        b = prior[i]
        c = prior[i - bpp] if i >= bpp else 0
        if kind == 1:
            pred = a
        elif kind == 3:
            pred = (a + b) // 2
        else:
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
        out[i] = (line[i] + pred) & 0xFF
    return out


def write_png(path: str | os.PathLike, image) -> None:
    """Write a uint8 (H, W) or (H, W, C≤4) numpy array as an unfiltered 8-bit PNG (the readers' counterpart)."""
    import numpy as np

    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    height, width, channels = array.shape
    color = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\x00" + array[y].tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
    Path(path).write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bicubic"}  # PIL codes


@dataclass(frozen=True, kw_only=True)
class ImageProcessing:
    """The preprocessing a checkpoint's preprocessor_config.json declares, as transformers' ViT-style image
    processors apply it: convert to RGB, resize (``size``: height × width, or the shortest edge), centre crop,
    rescale (× ``rescale_factor``, 1/255), normalise ((x − mean) / std).

    transformers' own image processors need PIL or torchvision, which this project does not depend on; resizing
    here is torch's antialiased interpolation of the uint8 image, rounded back to uint8 as PIL does (equal to PIL
    when no resize is needed, within a grey level or so otherwise).
    """

    height: int | None = None
    width: int | None = None
    shortest_edge: int | None = None
    resample: str = "bilinear"
    crop: tuple[int, int] | None = None
    rescale: float | None = 1 / 255
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @classmethod
    def from_config(cls, config: dict) -> ImageProcessing:
        size = config.get("size") if config.get("do_resize", True) else None
        if isinstance(size, int):
            size = {"height": size, "width": size}
        size = size or {}
        crop = config.get("crop_size") if config.get("do_center_crop") else None
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        normalise = config.get("do_normalize", True) and config.get("image_mean") is not None
        return cls(
            height=size.get("height"),
            width=size.get("width"),
            shortest_edge=size.get("shortest_edge"),
            resample=RESAMPLE.get(int(config.get("resample", 2)), "bilinear"),
            crop=(crop["height"], crop["width"]) if crop else None,
            rescale=float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else None,
            mean=tuple(config["image_mean"]) if normalise else None,
            std=tuple(config["image_std"]) if normalise else None,
        )

    def __call__(self, images: list[Any]):
        """(N, C, H, W) float32 pixel values of uint8 (H, W, C) images."""
        import torch

        return torch.stack([self._one(im) for im in images])

    def _one(self, image):
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(image).permute(2, 0, 1).float()  # (C, H, W)
        channels = len(self.mean) if self.mean else 3
        if x.shape[0] == 1 and channels > 1:  # grey → RGB, as convert("RGB") does
            x = x.expand(channels, -1, -1)
        size = self._size(x.shape[1], x.shape[2])
        if size != (x.shape[1], x.shape[2]):
            smooth = self.resample != "nearest"
            x = F.interpolate(
                x[None], size=size, mode=self.resample, antialias=smooth, align_corners=False if smooth else None
            )[0]
            x = x.round().clamp(0, 255)  # PIL resizes uint8 images into uint8
        if self.crop is not None:
            top, left = (x.shape[1] - self.crop[0]) // 2, (x.shape[2] - self.crop[1]) // 2
            x = x[:, max(top, 0) : max(top, 0) + self.crop[0], max(left, 0) : max(left, 0) + self.crop[1]]
        if self.rescale is not None:
            x = x * self.rescale
        if self.mean is not None and self.std is not None:
            x = (x - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None]
        return x.float()

    def _size(self, height: int, width: int) -> tuple[int, int]:
        if self.height and self.width:
            return self.height, self.width
        if self.shortest_edge:
            scale = self.shortest_edge / min(height, width)
            return round(height * scale), round(width * scale)
        return height, width


def load_image_processor(model_dir: str | os.PathLike) -> ImageProcessing:
    """The image preprocessing of a checkpoint's preprocessor_config.json; refuses a directory without one."""
    path = Path(model_dir) / "preprocessor_config.json"
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no preprocessor_config.json: images cannot be prepared for this model")
    try:
        return ImageProcessing.from_config(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable image preprocessing ({exc})") from None


def pixel_values(processor: ImageProcessing, images: list[Any]):
    """(N, C, H, W) float32 pixel values of uint8 (H, W, C) images."""
    return processor(images)
