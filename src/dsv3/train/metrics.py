"""Training metrics: expert-load MaxVio, ``RUN_DIR/metrics.jsonl``, TensorBoard scalars and a progress bar.

``metrics.jsonl`` holds one JSON object per line, one line per logged step (the
training loop writes at least the fields of :data:`STEP_FIELDS`, plus
``val_loss`` when it evaluates and ``expert_load`` -- a list over MoE layers of
per-expert token counts -- every few steps). JSON has no NaN or infinity: a
non-finite number is written as ``null`` and its key is listed in the line's
``"nonfinite"`` object with ``"nan"``, ``"inf"`` or ``"-inf"``, e.g.::

    {"step": 7, "loss": null, "lr": 0.0002, "nonfinite": {"loss": "nan"}}

:func:`read_metrics` turns those back into floats. TensorBoard (a test extra) is imported only when asked for.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import torch
from tqdm.auto import tqdm

from dsv3.errors import DataError, RunDirError
from dsv3.utils.io import atomic_write_text

__all__ = [
    "maxvio",
    "MetricsLogger",
    "read_metrics",
    "ProgressBar",
    "METRICS_FILE",
    "STEP_FIELDS",
    "tensorboard_tag",
    "device_peak_flops",
    "peak_memory",
    "GROUPS",
]

METRICS_FILE = "metrics.jsonl"

# Fields every training step's line carries (``val_loss`` and ``expert_load`` come when measured).
STEP_FIELDS = ("step", "loss", "lm_loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "tokens_per_s", "maxvio")

# TensorBoard tags group the flat metrics.jsonl names as torchtitan does (loss/..., throughput/..., memory/...).
# metrics.jsonl keeps the flat names that scripts read.
GROUPS = {
    "loss": "loss/total",
    "lm_loss": "loss/lm",
    "mtp_loss": "loss/mtp",
    "balance_loss": "loss/balance",
    "val_loss": "loss/val_lm",
    "grad_norm": "optim/grad_norm",
    "lr": "optim/lr",
    "batch_size": "optim/batch_size",
    "tokens_per_s": "throughput/tokens_per_s",
    "mfu": "throughput/mfu",
    "tflops": "throughput/tflops",
    "step_time": "throughput/step_time",
    "tokens": "progress/tokens_seen",
    "loss_tokens": "progress/loss_tokens",
    "peak_memory_gib": "memory/peak_gib",
    "peak_reserved_gib": "memory/peak_reserved_gib",
    "maxvio": "moe/maxvio",
}


def tensorboard_tag(key: str) -> str:
    """The grouped TensorBoard tag of a metrics.jsonl key (unknown keys go under ``other/``)."""
    return GROUPS.get(key, key if "/" in key else f"other/{key}")


# Dense peak FLOP/s of known accelerators (vendor data sheets, SXM parts, no sparsity), by dtype.
_CUDA_PEAK_TFLOPS = {
    "H200": {"bfloat16": 989.4, "float32": 66.9},
    "H100": {"bfloat16": 989.4, "float32": 66.9},
    "H800": {"bfloat16": 989.4, "float32": 66.9},
    "A100": {"bfloat16": 312.0, "float32": 19.5},
    "A800": {"bfloat16": 312.0, "float32": 19.5},
    "L40S": {"bfloat16": 362.1, "float32": 91.6},
}


def device_peak_flops(device: Any, dtype: Any, override_tflops: float | None = None) -> tuple[float, str]:
    """The device's peak FLOP/s for ``dtype`` GEMMs, and where the number comes from.

    An explicit ``override_tflops`` wins; CUDA devices are looked up by name (data-sheet dense
    peaks); a CPU (or an unknown GPU) gets the measured rate of a 1024^3 matmul in ``dtype``
    (the fastest of 10), so MFU on a CPU is utilisation of what its matmul kernel reaches. On a
    machine other processes keep busy the estimate is low and MFU reads high: share the machine or
    pass ``override_tflops``.
    """
    if override_tflops:
        return override_tflops * 1e12, "given"
    device = torch.device(device)
    name = str(dtype).replace("torch.", "")
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        for key, peaks in _CUDA_PEAK_TFLOPS.items():
            if key in gpu and name in peaks:
                return peaks[name] * 1e12, f"{key} data sheet"
    n = 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(12):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - t)
    # The fastest of 10: a peak is what the kernel reaches unhindered (a busy machine only slows some runs).
    return 2 * n**3 / min(times), "measured 1024^3 matmul (best of 10)"


def peak_memory(device: Any) -> dict[str, float]:
    """Peak memory so far in GiB: CUDA max allocated and reserved, or the host's peak RSS on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return {
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return {"peak_memory_gib": int(line.split()[1]) * 1024 / 2**30}
    except OSError:
        pass

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"peak_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30}


_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _as_rows(load: Any) -> list[list[float]]:
    """A 1-D or 2-D tensor / array / nested list of loads as rows of floats."""
    if hasattr(load, "detach"):  # torch tensor
        load = load.detach().to("cpu").double().tolist()
    elif hasattr(load, "tolist"):  # numpy array
        load = load.tolist()
    if isinstance(load, (int, float)):
        raise ValueError("maxvio needs per-expert loads (a 1-D or 2-D array), got a scalar")
    rows = list(load)
    if not rows:
        return []
    if all(isinstance(x, (int, float)) for x in rows):
        return [[float(x) for x in rows]]
    out = []
    for row in rows:
        if isinstance(row, (int, float)) or any(not isinstance(x, (int, float)) for x in row):
            raise ValueError("maxvio needs a 1-D [experts] or 2-D [layers, experts] load")
        out.append([float(x) for x in row])
    return out


def maxvio(load: Any) -> float:
    """Maximal violation of expert load balance, worst layer (arXiv 2408.15664).

    Args:
        load: token counts per expert, ``[E]`` or ``[layers, E]`` (tensor, array or lists).

    Returns:
        ``max over layers of (max_i load_i - mean_i load_i) / mean_i load_i``;
        0 for perfectly balanced loads and for a layer with no load at all.
    """
    worst = 0.0
    for row in _as_rows(load):
        if not row:
            continue
        mean = sum(row) / len(row)
        if mean > 0:
            worst = max(worst, (max(row) - mean) / mean)
    return worst


def _jsonable(value: Any) -> Any:
    """Tensors and numpy values as plain Python (scalars via ``item``, arrays via ``tolist``)."""
    if hasattr(value, "detach"):
        value = value.detach().to("cpu")
        return value.item() if value.ndim == 0 else value.tolist()
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return value.tolist()
    return value


def _clean(value: Any) -> tuple[Any, str | None]:
    """(JSON-safe value, the first non-finite kind found or None)."""
    value = _jsonable(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return value, None
        return None, "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if value is None or isinstance(value, (bool, int, str)):
        return value, None
    if isinstance(value, Mapping):
        out, bad = {}, None
        for k, v in value.items():
            out[str(k)], b = _clean(v)
            bad = bad or b
        return out, bad
    if isinstance(value, Sequence):
        out_list, bad = [], None
        for v in value:
            c, b = _clean(v)
            out_list.append(c)
            bad = bad or b
        return out_list, bad
    raise TypeError(f"cannot log a value of type {type(value).__name__} in metrics.jsonl")


def _parse_lines(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Records and their raw lines; a torn last line (a crash mid-write) is dropped, other bad lines raise."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; move it away or point at the right run directory") from None
    lines = text.split("\n")
    torn_tail = not text.endswith("\n")  # the last element is "" when the file ends cleanly
    records, raw = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError
        except ValueError:
            if torn_tail and number == len(lines):
                break
            raise DataError(f"{path} line {number} is not a JSON object; fix or delete that line") from None
        records.append(record)
        raw.append(line)
    return records, raw


class MetricsLogger:
    """Appends one JSON line per :meth:`log` call to ``RUN_DIR/metrics.jsonl``; mirrors scalars to TensorBoard.

    Args:
        run_dir: the run directory (created if missing).
        tensorboard: also write TensorBoard event files under ``RUN_DIR/tensorboard``
            when the ``tensorboard`` package is installed (silently off otherwise).
        start_step: resuming after step N: lines with ``step > N`` (written after the
            checkpoint the run resumes from) are removed first, by an atomic rewrite,
            so steps are never duplicated; TensorBoard events past N are purged too.

    Every line is flushed as it is written. A torn last line left by a crash is
    dropped when the logger opens the file.
    """

    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool = True, start_step: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RunDirError(f"run directory {self.run_dir} is a file; pass a directory path")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        if start_step is not None and (
            isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0
        ):
            raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
        self.start_step = start_step
        if self.path.exists():
            self._repair(start_step)
        self._fh: IO[str] | None = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if start_step is None else start_step + 1
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge, flush_secs=30)

    def _repair(self, start_step: int | None) -> None:
        """Drop lines past ``start_step`` and a torn last line, rewriting the file atomically if needed."""
        original = self.path.read_bytes()
        records, raw = _parse_lines(self.path)
        keep = [
            line
            for record, line in zip(records, raw)
            if start_step is None or _step_of(record, self.path) <= start_step
        ]
        text = "".join(line + "\n" for line in keep)
        if text.encode("utf-8") != original:
            atomic_write_text(self.path, text)

    @property
    def tensorboard_enabled(self) -> bool:
        """Whether TensorBoard event files are being written."""
        return self._tb is not None

    def log(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Append ``record`` (must hold an int ``step``) as one JSON line; return what was written.

        Tensor and numpy values are converted to Python numbers/lists; non-finite
        floats become ``null`` with a ``"nonfinite"`` entry (see the module notes).
        """
        if self._fh is None:
            raise RuntimeError("this MetricsLogger is closed")
        step = record.get("step")
        step = _jsonable(step)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"a metrics record needs an int 'step' >= 0, got {record.get('step')!r}")
        line: dict[str, Any] = {}
        flags: dict[str, str] = {}
        for key, value in record.items():
            if key == "nonfinite":
                continue
            line[key], bad = _clean(value)
            if bad is not None:
                flags[key] = bad
        line["step"] = step
        if flags:
            line["nonfinite"] = flags
        self._fh.write(json.dumps(line, allow_nan=False, separators=(",", ":")) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for key, value in line.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(tensorboard_tag(key), value, global_step=step)
        return line

    def flush(self) -> None:
        """Flush the JSON file and TensorBoard (fsync the JSON file)."""
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close the files (idempotent)."""
        if self._fh is not None:
            self.flush()
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; call close()
        fh = getattr(self, "_fh", None)
        if fh is not None:
            fh.close()


def _step_of(record: Mapping[str, Any], path: Path) -> int:
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        raise DataError(f"{path} has a line without an integer 'step' ({json.dumps(record)[:60]}); fix or delete it")
    return step


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of ``RUN_DIR/metrics.jsonl`` in file order, non-finite values restored as floats.

    Raises:
        RunDirError: ``run_dir`` is not a directory or holds no metrics.jsonl.
        DataError: a line (other than a torn last one) is not a JSON object with an int ``step``.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist; pass the directory a training run wrote")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise RunDirError(f"{run_dir} has no {METRICS_FILE}; pass the directory a training run wrote")
    records, _ = _parse_lines(path)
    for record in records:
        _step_of(record, path)
        flags = record.get("nonfinite")
        if isinstance(flags, Mapping):
            for key, kind in flags.items():
                if record.get(key) is None and kind in _NONFINITE:
                    record[key] = _NONFINITE[kind]
    return records


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class ProgressBar:
    """The training loop's progress display: step/total, loss, tokens/s, lr and ETA.

    Args:
        total: the last step of the run.
        initial: steps already done (resuming).
        mode: ``"bar"`` (a tqdm bar), ``"lines"`` (a plain line every ``every``
            steps, readable in CI logs), ``"off"``, or ``"auto"``: a bar when
            ``stream`` is a terminal, lines otherwise.
        stream: where to write (default ``sys.stderr``).
        every: line interval of ``"lines"`` mode (default: about 20 lines a run).

    Call :meth:`update` after each step with the number of steps completed.
    """

    def __init__(
        self,
        total: int,
        *,
        initial: int = 0,
        mode: str = "auto",
        stream: IO[str] | None = None,
        every: int | None = None,
        desc: str = "train",
    ) -> None:
        if mode not in ("auto", "bar", "lines", "off"):
            raise ValueError(f"progress mode must be auto, bar, lines or off, got {mode!r}")
        self.total, self.initial = int(total), int(initial)
        self.stream = sys.stderr if stream is None else stream
        if mode == "auto":
            isatty = getattr(self.stream, "isatty", None)
            mode = "bar" if isatty is not None and isatty() else "lines"
        self.mode = mode
        self.every = max(1, every if every is not None else max(1, (self.total - self.initial) // 20))
        self._start = time.monotonic()
        self._bar = None
        if mode == "bar":
            self._bar = tqdm(
                total=self.total, initial=self.initial, desc=desc, unit="step", file=self.stream, dynamic_ncols=True
            )

    @staticmethod
    def _postfix(
        loss: float | None,
        tokens_per_s: float | None,
        lr: float | None,
        *,
        lm_loss: float | None = None,
        mfu: float | None = None,
        memory_gib: float | None = None,
    ) -> str:
        parts = []
        if loss is not None:
            # ``loss`` is the training objective (LM + lambda x MTP + balance); ``lm`` is the main LM loss alone,
            # the quantity ``val_loss`` measures.
            parts.append(f"loss {loss:.4f}" + (f" (lm {lm_loss:.4f})" if lm_loss is not None else ""))
        if tokens_per_s is not None:
            parts.append(f"tok/s {tokens_per_s:,.0f}")
        if mfu is not None:
            parts.append(f"mfu {100 * mfu:.1f}%")
        if memory_gib is not None:
            parts.append(f"mem {memory_gib:.2f} GiB")
        if lr is not None:
            parts.append(f"lr {lr:.2e}")
        return " | ".join(parts)

    def update(
        self,
        step: int,
        *,
        loss: float | None = None,
        tokens_per_s: float | None = None,
        lr: float | None = None,
        lm_loss: float | None = None,
        mfu: float | None = None,
        memory_gib: float | None = None,
    ) -> None:
        """Show that ``step`` steps are done, with the latest losses, throughput, MFU, peak memory and learning rate."""
        text = self._postfix(loss, tokens_per_s, lr, lm_loss=lm_loss, mfu=mfu, memory_gib=memory_gib)
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.update(step - self._bar.n)
        elif self.mode == "lines" and ((step - self.initial) % self.every == 0 or step >= self.total):
            done = step - self.initial
            elapsed = time.monotonic() - self._start
            eta = elapsed / done * (self.total - step) if done > 0 else math.nan
            line = f"step {step}/{self.total}" + (f" | {text}" if text else "") + f" | eta {_fmt_eta(eta)}"
            print(line, file=self.stream, flush=True)

    def write(self, message: str) -> None:
        """Print a message without breaking the bar."""
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        elif self.mode != "off":
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        """Close the bar (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
