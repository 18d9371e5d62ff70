"""torchvision.io loader: batched JPEG decode with nvJPEG on CUDA (``decode_jpeg(device="cuda")``),
resize/crop/normalize as tensor ops on the same device. The GPU fallback where DALI is absent.

Without CUDA it runs the same code on CPU (libjpeg-turbo decode), which is how its preprocessing is
tested against the reference loader. When the batched decode fails, each JPEG is retried alone, so a
bad file does not change how its batch neighbours are decoded. Files the JPEG decoder cannot take
(PNG, CMYK, broken files) are decoded with PIL; those that fail become placeholders with a reason.
Decoded JPEGs are turned upright by their EXIF orientation here (``orientation``), because
``decode_jpeg`` ignores it on CUDA; PIL's decodes are turned in ``decode``.
JPEGs whose header is over PIL's decompression-bomb limit are refused when read (``read_encoded``),
so that no multi-gigabyte buffer is allocated on the GPU for them.

CUDA decode runs with a side stream current: torchvision allocates the outputs on the current
stream, but nvJPEG's hardware engine writes them without waiting for that stream's queued work, so
on the main stream it could be handed (and overwrite) memory that queued kernels still read
(pytorch/vision#9606, seen on H100). So the decoded images are kept referenced until the
resize/normalize kernels that read them have finished (an event the producer waits for), and only
then go back to the side stream's pool.

Reading, decoding and preprocessing run on a producer thread, ``depth`` batches ahead of the main
thread, which only launches the model: ``decode_jpeg`` releases the GIL while it decodes (measured
with ``benchmarks/gil_release.py``: benchmarks/RESULTS.md, issue 22). On CUDA the producer works on
its own stream; each finished batch carries one event the main stream waits for and one
``record_stream`` (not one per image).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F

from ..augment import ViewPlan
from ..errors import UsageError
from ..orientation import exif_orientation, orient
from ..preprocess import Preprocess, center_crop_offset, resized_size
from .batch import Batch, normalize_on_device
from .containers import image_format
from .decode import decode_failure, decode_rgb
from .quiet import DecoderNoiseFilter
from .verdicts import Verdicts, read_verified


class NvjpegLoader:
    name = "nvjpeg"

    def __init__(self, preprocess: Preprocess, device: torch.device, workers: int, read=read_verified):
        self.read = read  # (path, verdict) → (bytes or None, reason): files, or tar members (members.read_member_verified)
        self.pre = preprocess
        self.device = device
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="featstore-read")
        self.decode_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.prep_stream = torch.cuda.Stream(device) if device.type == "cuda" else None  # the producer's resize/normalize
        self.depth = 2  # finished batches waiting for the main thread

    def resize_crop(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) → uint8 (N, 3, S, S): shorter side to ``resize`` (antialiased), center crop.

        Sizes and offsets follow torchvision's Resize/CenterCrop, so crops land where the reference's do.
        """
        pre = self.pre
        h, w = images.shape[-2:]
        size = resized_size(h, w, pre.resize)
        mode = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest"}[pre.interpolation]
        x = images.float()
        if size != (h, w):
            x = F.interpolate(x, size=size, mode=mode, antialias=mode != "nearest", align_corners=False if mode != "nearest" else None)
        top = center_crop_offset(size[0], pre.image_size)
        left = center_crop_offset(size[1], pre.image_size)
        x = x[..., top : top + pre.image_size, left : left + pre.image_size]
        return x.round_().clamp_(0, 255).to(torch.uint8)

    def crops(self, decoded: list[torch.Tensor | None], by_size: bool | None = None) -> torch.Tensor:
        """Resize and crop a batch; ``None`` becomes a zero placeholder.

        ``by_size`` (default: on CUDA) makes one call per distinct image size (datasets often have a
        handful) rather than a handful of kernel launches per image; on CPU image by image is the
        faster (a batch of float images falls out of the caches; benchmarks/RESULTS.md).
        """
        size = self.pre.image_size
        by_size = self.device.type == "cuda" if by_size is None else by_size
        groups: dict[object, list[int]] = {}
        for i, image in enumerate(decoded):
            if image is not None:
                groups.setdefault(tuple(image.shape) if by_size else i, []).append(i)
        present = cast(list[torch.Tensor], decoded)  # read only at the rows in groups, none of them None
        if len(groups) == 1 and len(next(iter(groups.values()))) == len(decoded):
            return self.resize_crop(torch.stack(present))
        placeholder = torch.zeros(3, size, size, dtype=torch.uint8, device=self.device)
        out: list[torch.Tensor] = [placeholder] * len(decoded)
        for rows in groups.values():
            batch = present[rows[0]][None] if len(rows) == 1 else torch.stack([present[i] for i in rows])
            for i, crop in zip(rows, self.resize_crop(batch)):
                out[i] = crop
        return torch.stack(out)

    def _decode_jpegs(self, data: list[torch.Tensor]) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        if self.decode_stream is None:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        current = torch.cuda.current_stream(self.device)  # the producer's stream
        with torch.cuda.stream(self.decode_stream):
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        current.wait_stream(self.decode_stream)
        return decoded  # kept referenced by the producer until its work on them is done (no record_stream per image)

    def _decode(self, blobs: list[tuple[bytes | None, str]]) -> tuple[list[torch.Tensor | None], dict[int, str]]:
        images: list[torch.Tensor | None] = [None] * len(blobs)
        errors: dict[int, str] = {}
        jpeg = [i for i, (b, _) in enumerate(blobs) if b is not None and image_format(b) == "jpeg"]
        if jpeg:
            data = [torch.frombuffer(bytearray(cast(bytes, blobs[i][0])), dtype=torch.uint8) for i in jpeg]  # jpeg: rows with bytes
            try:
                for i, img in zip(jpeg, self._decode_jpegs(data)):
                    images[i] = orient(img, exif_orientation(cast(bytes, blobs[i][0])))
            except RuntimeError:  # one bad JPEG fails the batch: retry each alone, PIL for the ones that fail
                for i, one in zip(jpeg, data):
                    with contextlib.suppress(RuntimeError):
                        images[i] = orient(self._decode_jpegs([one])[0], exif_orientation(cast(bytes, blobs[i][0])))
        for i, (blob, reason) in enumerate(blobs):
            if images[i] is not None:
                continue
            if blob is None:
                errors[i] = reason
                continue
            try:  # CMYK/progressive oddities, PNG and friends, or a broken file: PIL decides
                images[i] = torch.from_numpy(np.asarray(decode_rgb(blob)).copy()).permute(2, 0, 1).to(self.device)
            except Exception as e:
                errors[i] = decode_failure(e, blob)
        return images, errors

    def batches(
        self, paths: list[str], plan: list[np.ndarray], verdicts: Verdicts | None = None, augment: ViewPlan | None = None
    ) -> Generator[Batch, None, None]:  # closed early by extraction
        if augment is not None:
            raise UsageError("--loader nvjpeg cannot crop augmented views", "use --loader torch or --loader dali with --augment")
        if not plan:
            return
        with DecoderNoiseFilter():  # libjpeg warns on stderr about data it decodes anyway
            yield from self._batches(paths, plan, verdicts)

    def _batches(self, paths: list[str], plan: list[np.ndarray], verdicts: Verdicts | None) -> Iterator[Batch]:
        """The main thread only takes finished batches; reading, decoding and preprocessing run ahead on
        a producer thread (torchvision's decode releases the GIL: benchmarks/gil_release.py)."""
        ready: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        producer = threading.Thread(target=self._produce, args=(paths, plan, verdicts, ready, stop), name="featstore-nvjpeg", daemon=True)
        producer.start()
        main = torch.cuda.current_stream(self.device) if self.prep_stream is not None else None
        try:
            for rows in plan:
                item = ready.get()
                if isinstance(item, BaseException):
                    raise item
                images, local_errors, done = item
                if main is not None:
                    main.wait_event(done)
                    images.record_stream(main)  # one per batch: its memory is reused only after main's work on it
                yield Batch(rows, images, {int(rows[i]): reason for i, reason in local_errors.items()})
        finally:
            stop.set()
            with contextlib.suppress(queue.Empty):
                while True:  # unblock a producer waiting to put
                    ready.get_nowait()
            producer.join()

    def _produce(self, paths: list[str], plan: list[np.ndarray], verdicts: Verdicts | None, ready: queue.Queue, stop: threading.Event):
        def read(rows: np.ndarray):
            return self.pool.submit(lambda: [self.read(paths[r], verdicts[r] if verdicts is not None else None) for r in rows.tolist()])

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            with torch.cuda.stream(self.prep_stream) if self.prep_stream is not None else contextlib.nullcontext():
                # read ahead: file reads of the next two batches overlap decode of this one
                reads = {k: read(plan[k]) for k in range(min(2, len(plan)))}
                for k in range(len(plan)):
                    if k + 2 < len(plan):
                        reads[k + 2] = read(plan[k + 2])
                    blobs = reads.pop(k).result()
                    decoded, local_errors = self._decode(blobs)
                    images = normalize_on_device(self.crops(decoded), self.pre, self.device, channels_last_input=False)
                    done = None
                    if self.prep_stream is not None:
                        done = torch.cuda.Event()
                        done.record(self.prep_stream)
                        # the decoded images go back to the decode stream's pool only once the crops have read
                        # them (nvJPEG's hardware engine writes without waiting for queued work; see above)
                        done.synchronize()
                    del decoded
                    if not put((images, local_errors, done)):
                        return
        except BaseException as e:  # raised in the consumer
            put(e)
