"""NVIDIA DALI loader: decode, resize, crop and normalize in a DALI pipeline.

With CUDA the decoder runs on device "mixed" (nvJPEG, hardware decoder where present) and every
later operator on the GPU; without CUDA the whole pipeline runs on CPU threads (``device_id=None``).

Files are fed through ``fn.external_source`` rather than ``fn.readers.file`` so that every batch is
exactly a planned batch (batches never span store units, the last one is not padded, and rows map
to outputs one to one), which is what makes resumed extraction bitwise identical. A batch that DALI
fails to decode is bisected with small pipelines to find the offending file(s); their rows become
placeholders with a reason, and the rest of the batch is decoded as usual.

Only bytes DALI can parse reach it. DALI 2.4's decoder parses the headers of a batch of more than
4 x (threads + 1) samples in parallel blocks on its thread pool; when nvImageCodec refuses one
sample's header (status #4, e.g. a 13-byte text file named .JPEG) inside a worker's block, the
failure races with the other blocks and the process dies with SIGSEGV in
``ImageDecoder<CPUBackend>`` (reproduced: 64 real photos + 1 text file, 2 threads, ~4 runs in 5;
12 samples or fewer parse serially and fail cleanly, which is why small batches hid it). A crash
cannot be caught or bisected, so every file is checked before it is fed: JPEG and PNG must have an
intact container (``containers``) and must parse with nvImageCodec's own parser (the one DALI's
decoder calls, a few microseconds); other formats (BMP, TIFF, WebP, GIF, …) are decoded with PIL
and fed as lossless PNG, so DALI's resize still applies to them. What fails is an invalid row with
a reason; decode errors after parsing are ordinary exceptions, handled by the bisection.
"""

from __future__ import annotations

import io
import os
from collections.abc import Generator, Iterator
from functools import lru_cache
from typing import Any, cast

import numpy as np
import torch

from ..preprocess import Preprocess
from .batch import Batch
from .containers import image_format
from .decode import decode_failure, decode_rgb, read_encoded
from .quiet import DecoderNoiseFilter

_INTERP = {"bicubic": "INTERP_CUBIC", "bilinear": "INTERP_LINEAR", "nearest": "INTERP_NN"}


class DaliLoader:
    name = "dali"
    # share of JPEG decoding given to the hardware decoder (A100/H100) when on CUDA, the rest to
    # CUDA-core nvJPEG; benchmarks/bench_extract.py --dali-tune measures the choices
    hw_decoder_load = 0.65
    # chroma upsampled as libjpeg-turbo does (DALI on CPU, PIL), so features do not depend on where
    # an image was decoded; --dali-tune also measures its cost
    jpeg_fancy_upsampling = True

    def __init__(self, preprocess: Preprocess, device: torch.device, workers: int):
        self.pre = preprocess
        self.device = device
        self.threads = max(1, workers)
        self.on_gpu = device.type == "cuda"
        self.prefetch = 2

    # ------------------------------------------------------------------ pipeline

    def _pipeline(self, source, batch_size: int, small: bool = False):
        """``small``: one thread and no preallocation (same decoders), for the short-lived pipelines of a bisection."""
        from nvidia.dali import fn, pipeline_def, types

        pre = self.pre
        on_gpu = self.on_gpu
        # device and host memory sized up front for a stream of full batches
        preallocate: dict[str, Any] = (
            {}
            if small
            else dict(
                device_memory_padding=64 << 20,
                host_memory_padding=8 << 20,
                preallocate_width_hint=1024,
                preallocate_height_hint=1024,
            )
        )

        @pipeline_def(
            batch_size=batch_size,
            num_threads=1 if small else self.threads,
            device_id=(self.device.index or 0) if on_gpu else None,
            prefetch_queue_depth=self.prefetch,
            exec_dynamic=True,  # an operator error fails one iteration, not the pipeline
        )
        def pipe():
            encoded = fn.external_source(source=source, batch=True, dtype=types.UINT8, ndim=1, no_copy=False)
            if on_gpu:
                # the same decoders as the main pipeline, so a bisected image decodes as it would have
                images = fn.decoders.image(
                    encoded,
                    device="mixed",
                    output_type=types.RGB,
                    hw_decoder_load=self.hw_decoder_load,
                    jpeg_fancy_upsampling=self.jpeg_fancy_upsampling,
                    **preallocate,
                )
            else:
                images = fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
            images = fn.resize(images, resize_shorter=pre.resize, interp_type=getattr(types, _INTERP[pre.interpolation]), antialias=True)
            return fn.crop_mirror_normalize(
                images,
                crop=(pre.image_size, pre.image_size),
                crop_pos_x=0.5,
                crop_pos_y=0.5,
                mean=[m * 255.0 for m in pre.mean],
                std=[s * 255.0 for s in pre.std],
                dtype=types.FLOAT16 if on_gpu else types.FLOAT,
                output_layout="HWC",  # NHWC storage = a channels_last NCHW tensor, no copy
            )

        p = pipe()
        p.build()
        return p

    def _to_torch(self, tensor_list) -> torch.Tensor:
        """DALI batch (B, S, S, 3) → torch (B, 3, S, S) channels_last view on the target device.

        One device-to-device copy into torch-owned memory (~77 MB for 256 fp16 224² images, tens of
        microseconds at HBM bandwidth) on torch's stream, so the tensor's lifetime does not depend
        on when DALI recycles its output buffers; no layout change.
        """
        from nvidia.dali.plugin.pytorch import feed_ndarray

        shape = (len(tensor_list), self.pre.image_size, self.pre.image_size, 3)
        dtype = torch.float16 if self.on_gpu else torch.float32
        out = torch.empty(shape, dtype=dtype, device=self.device)
        if self.on_gpu:
            feed_ndarray(tensor_list.as_tensor(), out, cuda_stream=torch.cuda.current_stream(self.device))
        else:
            out.copy_(torch.from_numpy(tensor_list.as_array()))
        return out.permute(0, 3, 1, 2)

    def _placeholder(self, n: int) -> torch.Tensor:
        size = self.pre.image_size
        dtype = torch.float16 if self.on_gpu else torch.float32
        return torch.zeros(n, size, size, 3, dtype=dtype, device=self.device).permute(0, 3, 1, 2)

    # ------------------------------------------------------------------ iteration

    def batches(self, paths: list[str], plan: list[np.ndarray]) -> Generator[Batch, None, None]:  # closed early by extraction
        if not plan:
            return
        with DecoderNoiseFilter():  # libjpeg/nvImageCodec print warnings from DALI's threads
            yield from self._batches(paths, plan)

    def _batches(self, paths: list[str], plan: list[np.ndarray]) -> Iterator[Batch]:
        # per batch index, popped when consumed so memory stays bounded on long runs
        read_errors: dict[int, dict[int, str]] = {}
        fed: dict[int, tuple[list[int], list[np.ndarray]]] = {}  # rows and bytes, kept for a bisection

        def source():
            # runs ahead of the consumer by the prefetch depth; files that cannot be fed (missing,
            # empty, broken, not parseable) are left out of the batch and reported with it
            for i, rows in enumerate(plan):
                data, errors, ok_rows = [], {}, []
                for r in rows.tolist():
                    blob, reason = dali_input(paths[r])
                    if blob is None:
                        errors[r] = reason
                    else:
                        data.append(np.frombuffer(blob, dtype=np.uint8))
                        ok_rows.append(r)
                read_errors[i] = errors
                fed[i] = (ok_rows, data)
                # DALI needs a non-empty batch; the tiny JPEG's output is discarded
                yield data or [_tiny_jpeg()]

        pipe = self._pipeline(source(), max(len(p) for p in plan))
        try:
            for i, rows in enumerate(plan):
                decoded: torch.Tensor | None
                bad: dict[int, str] | None
                try:
                    (out,) = pipe.run()
                    decoded, bad = self._to_torch(out), {}
                except Exception:  # a file DALI cannot decode: find it, keep the rest of the batch
                    decoded, bad = None, None
                ok_rows, data = fed.pop(i)  # filled by source() before run() returned or raised
                if bad is None:  # the bytes already read are decoded again, not the files
                    decoded_parts, bad = self._bisect(data, ok_rows)
                    ok_rows = [r for r in ok_rows if r not in bad]
                    decoded = torch.cat(decoded_parts) if decoded_parts else None
                errors = {**read_errors.pop(i), **bad}
                yield Batch(rows, self._assemble(rows, ok_rows, decoded), errors)
        finally:
            del pipe

    def _assemble(self, rows: np.ndarray, ok_rows: list[int], decoded: torch.Tensor | None) -> torch.Tensor:
        if len(ok_rows) == len(rows):
            return cast(torch.Tensor, decoded)  # every row decoded: decoded holds them all
        images = self._placeholder(len(rows))
        if ok_rows:
            where = {r: i for i, r in enumerate(rows.tolist())}
            index = torch.as_tensor([where[r] for r in ok_rows], device=self.device)
            images[index] = cast(torch.Tensor, decoded)[: len(ok_rows)].to(images.dtype)  # the decoded rows, ok_rows of them
        return images

    def _bisect(self, data: list[np.ndarray], rows: list[int]) -> tuple[list[torch.Tensor], dict[int, str]]:
        """Decode the encoded images ``data`` in ever smaller pipelines; return the decoded good ones (in order) and the bad rows."""
        if not data:
            return [], {}
        try:
            pipe = self._pipeline(iter([data]), len(data), small=True)
            (out,) = pipe.run()
            result = self._to_torch(out)
            del pipe
            return [result], {}
        except Exception as e:
            if len(data) == 1:
                return [], {rows[0]: "DALI could not decode: " + _first_line(e)}
        mid = len(data) // 2
        left, bad_left = self._bisect(data[:mid], rows[:mid])
        right, bad_right = self._bisect(data[mid:], rows[mid:])
        return left + right, {**bad_left, **bad_right}


def dali_input(path: str) -> tuple[bytes | None, str]:
    """The bytes to feed DALI for ``path`` (see the module docstring), or None and why the row is invalid."""
    data, reason = read_encoded(path)
    if data is None:
        return None, reason
    if image_format(data) in ("jpeg", "png"):
        if not _nvimgcodec_parses(data):
            return None, f"{image_format(data).upper()} header that DALI's decoder cannot parse"
        return data, ""
    try:
        image = decode_rgb(data)
    except Exception as e:
        return None, decode_failure(e, data)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # lossless: DALI sees exactly PIL's pixels
    return buf.getvalue(), ""


def _nvimgcodec_parses(data: bytes) -> bool:
    """Whether nvImageCodec's parser (the one DALI's decoder uses) reads the header; True when it is not importable."""
    codec = _nvimgcodec()
    if codec is None:
        return True
    try:
        return codec.CodeStream(data).width > 0
    except Exception:
        return False


@lru_cache(maxsize=1)
def _nvimgcodec():
    # its Python binding logs refusals in colour on stderr unless told not to (read at import)
    os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")
    try:
        import nvidia.nvimgcodec as nvimgcodec
    except Exception:  # DALI without the binding: the container checks still apply
        return None
    return nvimgcodec


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and "Critical error" not in ln]
    text = next((ln for ln in lines if "rror" in ln or "decode" in ln.lower()), lines[0] if lines else type(e).__name__)
    return text[:300]


def _tiny_jpeg() -> np.ndarray:
    """A valid 1×1 JPEG, fed when every file of a batch is unreadable (DALI cannot run an empty batch)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="JPEG")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)
