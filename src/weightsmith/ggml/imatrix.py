"""Importance matrices (imatrix) for the K-quants, as llama.cpp computes, stores and reads them.

``llama-imatrix`` runs calibration text through the model and accumulates, for every weight
matrix it multiplies, the sum of the squared input activations per input column
(``in_sum2``) and the number of tokens (``counts``); ``llama-quantize --imatrix`` divides the
two and passes the per-column mean of ``x²`` to the K-quant search as ``quant_weights``.

:func:`collect_imatrix` computes the same statistic with weightsmith's layer-streamed
calibration engine (one decoder layer in memory), keyed by GGUF tensor name.
:func:`save_imatrix` writes llama.cpp's GGUF imatrix format (``general.type = imatrix``,
``<name>.in_sum2`` / ``<name>.counts`` tensors, ``imatrix.datasets/chunk_count/chunk_size``),
which ``llama-quantize --imatrix FILE`` reads; :func:`load_imatrix` reads it (and the legacy
``.dat`` format) back into the values ``llama-quantize`` would use.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from weightsmith.core.calibration import LayerStreamer
from weightsmith.core.calibration_data import (
    load_calibration_text,
    load_tokenizer,
    require_calibration_tokens,
)
from weightsmith.core.device import select_device
from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.io.paths import check_file_output
from weightsmith.io.placement import move_into_place, temp_path
from weightsmith.io.reader import open_checkpoint

# Linear names inside a decoder layer -> GGUF tensor names (llama.cpp's convert_hf_to_gguf)
GGUF_LINEARS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.qkv_proj": "attn_qkv",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate_up_proj": "ffn_up",
}


@dataclass
class Imatrix:
    """Per GGUF weight name: ``sums`` (float32, per input column) and ``count`` (tokens)."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False  # read from a legacy .dat file (sums there are mean * ncall)

    def importance(self) -> dict[str, np.ndarray]:
        """What ``llama-quantize`` passes to the quantizer: ``sums / count`` in float32
        (``1`` for an entry that saw no token)."""
        out = {}
        for name, s in self.sums.items():
            c = np.float32(self.counts.get(name, 0))
            if c > 0:
                out[name] = s / c
            else:
                out[name] = s.copy() if self.legacy else np.ones_like(s)
        return out


def gguf_linear_name(layer: int, linear: str) -> str | None:
    """``blk.N.<gguf name>.weight`` for a decoder-layer Linear, ``None`` when unknown."""
    short = GGUF_LINEARS.get(linear)
    return None if short is None else f"blk.{layer}.{short}.weight"


def imatrix_chunks(
    tokenizer, text: str, *, samples: int, seq_len: int, source: str = "(given)"
) -> torch.Tensor:
    """The token windows llama-imatrix evaluates: the text tokenized once (with BOS first when
    the tokenizer adds one), cut into ``samples`` chunks of ``seq_len``, each chunk's first
    token set to BOS; text too short for them is a ConfigError (unlike llama-imatrix, which
    runs fewer chunks)."""
    if samples < 1 or seq_len < 16:
        raise ConfigError(f"need samples >= 1 and seq_len >= 16 (got {samples}, {seq_len})")
    ids = tokenizer(text[: samples * seq_len * 16], add_special_tokens=False, verbose=False)
    ids = list(ids["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("a")["input_ids"][:1] != [bos]:
        bos = None  # this tokenizer adds no BOS (llama.cpp's add_bos_token is false then)
    if bos is not None:
        ids = [bos, *ids]
    require_calibration_tokens(source, len(ids), samples, seq_len)
    chunks = torch.tensor(ids[: samples * seq_len], dtype=torch.long).view(samples, seq_len)
    if bos is not None:
        chunks[:, 0] = bos
    return chunks


def collect_imatrix(
    model_dir: str | Path,
    calib_file: str | Path | None,
    *,
    samples: int = 128,
    seq_len: int = 512,
    batch_size: int = 8,
    device: str = "cpu",
    progress: bool = False,
) -> Imatrix:
    """Sum of squared inputs per column (and tokens) of every decoder-layer Linear of the
    checkpoint at ``model_dir``, over up to ``samples`` chunks of ``seq_len`` tokens of
    ``calib_file`` (``None``: the built-in mix) cut as llama-imatrix cuts them
    (:func:`imatrix_chunks`), streamed one decoder layer at a time."""
    device = str(select_device(device))  # auto -> cuda/cpu; an absent device is refused
    text = load_calibration_text(calib_file)
    with open_checkpoint(model_dir) as ckpt:
        tok = load_tokenizer(ckpt.root)
        ids = imatrix_chunks(tok, text.text, samples=samples, seq_len=seq_len, source=text.source)
        streamer = LayerStreamer(ckpt, ids, batch_size=batch_size, device=device, progress=progress)
        im = Imatrix(
            datasets=[str(text.source)], chunk_count=int(ids.shape[0]), chunk_size=int(ids.shape[1])
        )
        for layer in streamer.layers():
            stats = streamer.run_layer(layer, lambda cl: cl.collect(cl.linear_names, "imatrix"))
            for linear, stat in stats.items():
                name = gguf_linear_name(layer, linear)
                if name is None:
                    raise ConfigError(f"layer {layer}: no GGUF name known for Linear {linear!r}")
                im.sums[name] = stat.sum.numpy().astype(np.float32)
                im.counts[name] = int(stat.n)
    return im


def save_imatrix(path: str | Path, im: Imatrix, *, force: bool = False) -> Path:
    """Write ``im`` in llama.cpp's GGUF imatrix format (what ``llama-imatrix`` writes and
    ``llama-quantize --imatrix`` reads); atomic, refuses an existing file without ``force``."""
    import gguf

    out = Path(path)
    check_file_output(out, [], force)
    if not im.sums:
        raise ConfigError("the importance matrix is empty: nothing to save")
    tmp = temp_path(out)
    w = gguf.GGUFWriter(str(tmp), "imatrix")
    w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix writes no architecture
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", list(im.datasets) or ["weightsmith"])
    w.add_uint32("imatrix.chunk_count", im.chunk_count)
    w.add_uint32("imatrix.chunk_size", im.chunk_size)
    for name in sorted(im.sums):
        s = np.asarray(im.sums[name], np.float32).reshape(1, -1)
        if not np.isfinite(s).all():
            raise ConfigError(f"{name}: the importance matrix has non-finite values")
        w.add_tensor(f"{name}.in_sum2", s)
        w.add_tensor(f"{name}.counts", np.array([[im.counts.get(name, 0)]], np.float32))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        move_into_place(tmp, out, force)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def load_imatrix(path: str | Path) -> Imatrix:
    """Read a GGUF imatrix file (or llama.cpp's legacy ``.dat``) as ``llama-quantize`` does."""
    import gguf

    path = Path(path)
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the imatrix file ({e.strerror})") from None
    if magic != b"GGUF":
        return _load_legacy(path)
    reader = gguf.GGUFReader(str(path))
    im = Imatrix()
    fields = reader.fields
    if "imatrix.datasets" in fields:
        im.datasets = [str(v) for v in fields["imatrix.datasets"].contents()]
    if "imatrix.chunk_count" in fields:
        im.chunk_count = int(fields["imatrix.chunk_count"].contents())
    if "imatrix.chunk_size" in fields:
        im.chunk_size = int(fields["imatrix.chunk_size"].contents())
    tensors = {t.name: np.array(t.data, np.float32) for t in reader.tensors}
    for tname, data in tensors.items():
        if tname.endswith(".in_sum2"):
            name = tname[: -len(".in_sum2")]
            counts = tensors.get(name + ".counts")
            if counts is None:
                raise CheckpointError(f"{path}: {name} has sums but no counts")
            if counts.size != 1:
                raise ConfigError(f"{path}: {name} is a per-expert (3-D) entry, not supported yet")
            im.sums[name] = data.reshape(-1)
            im.counts[name] = int(np.round(counts.reshape(-1)[0]))
    return im


def _load_legacy(path: Path) -> Imatrix:
    """Legacy ``.dat``: entries of (name, ncall, values = mean * ncall)."""
    data = path.read_bytes()
    im, pos = Imatrix(legacy=True), 4
    try:
        (n,) = struct.unpack_from("<i", data, 0)
        for _ in range(n):
            (ln,) = struct.unpack_from("<i", data, pos)
            name = data[pos + 4 : pos + 4 + ln].decode()
            ncall, nval = struct.unpack_from("<ii", data, pos + 4 + ln)
            pos += 12 + ln
            im.sums[name] = np.frombuffer(data, np.float32, nval, pos).copy()
            im.counts[name] = ncall
            pos += 4 * nval
    except (struct.error, ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not a GGUF or legacy imatrix file") from None
    if n < 1:
        raise CheckpointError(f"{path}: the imatrix file has no entries")
    return im
