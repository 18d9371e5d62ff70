"""Decoder diagnostics kept off the user's terminal, and nothing else.

libjpeg prints "Corrupt JPEG data: …" warnings and nvImageCodec (inside DALI) prints coloured
``[ERROR] [libjpeg_turbo_decoder] …`` lines straight to file descriptor 2, from C code on decoder
threads that run ahead of the batch being consumed. Python cannot intercept those writes, and
redirecting fd 2 only around a call would miss the threads' later output, so while a loader runs
fd 2 feeds a pipe, and a thread forwards every line to the real stderr except decoder diagnostics.
The row's fate is recorded in the store instead: a file the decoders refuse is an invalid row with
a reason, a file they decode with a warning is a valid row (see ``containers``).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import re
import sys
import threading

# nvImageCodec's logger: an optionally coloured severity, then the module in brackets
_NVIMGCODEC = rb"(?:\x1b\[[0-9;]*m)?\[(?:FATAL|ERROR|WARNING|INFO|DEBUG|TRACE)\] ?(?:\x1b\[0m)?\[[A-Za-z0-9_]+\]"
# libjpeg(-turbo) messages a decoder can print about its input (jerror.h: every JWRN_*, the JERR_*
# that data can cause), by the text before their first parameter; and libpng's own prefix
_LIBJPEG = (
    rb"Corrupt JPEG data",
    rb"Premature end of (?:JPEG|input) file",
    rb"Invalid SOS parameters for sequential JPEG",
    rb"Warning: unknown JFIF revision number",
    rb"Warning: thumbnail image size does not match",
    rb"Inconsistent progression sequence",
    rb"Unknown Adobe color transform code",
    rb"Application transferred too (?:few|many) scanlines",
    rb"Invalid component ID",
    rb"DCT coefficient",
    rb"Bogus (?:Huffman table definition|JPEG colorspace|marker length|sampling factors|DAC|DHT|DQT)",
    rb"Sampling factors too large",
    rb"Unsupported JPEG data precision",
    rb"Invalid progressive/lossless parameters",
    rb"Too many color components",
    rb"Unsupported color conversion request",
    rb"Empty JPEG image",
    rb"Didn't expect more than one scan",
    rb"Huffman code size table overflow",
    rb"Missing Huffman code table entry",
    rb"Maximum supported image dimension",
    rb"Empty input file",
    rb"Arithmetic table 0x[0-9a-f]+ was not defined",
    rb"Huffman table 0x[0-9a-f]+ was not defined",
    rb"Quantization table 0x[0-9a-f]+ was not defined",
    rb"JPEG datastream contains no image",
    rb"Not a JPEG file: starts with",
    rb"Insufficient memory \(case",
    rb"Invalid JPEG file structure",
    rb"Unsupported JPEG process",
    rb"Unsupported marker type",
    rb"Image too wide for this implementation",
    rb"Invalid restart interval",
    rb"Fractional sampling not implemented",
    rb"Requested features are incompatible",
    rb"libpng (?:warning|error): ",
)
# OpenCV's logger (nvImageCodec decodes PNG, TIFF, … with OpenCV): "[ WARN:0@0.037] global grfmt_png.cpp:779 …"
_OPENCV = rb"\[ ?(?:FATAL|ERROR|WARN|INFO|DEBUG|VERBOSE):\d+@[\d.]+\] "
NOISE = re.compile(rb"^(?:" + _NVIMGCODEC + rb"|" + _OPENCV + rb"|" + b"|".join(_LIBJPEG) + rb")")
# how a diagnostic line can begin (derived from the patterns, so the two cannot drift apart): a
# partial line that starts so waits for its end
_MAY_BE_NOISE = re.compile(rb"^(?:\x1b|\[|[" + re.escape(bytes(sorted({m[0] for m in _LIBJPEG}))) + rb"])")


def is_decoder_noise(line: bytes) -> bool:
    return NOISE.match(line) is not None


class DecoderNoiseFilter:
    """Context manager: while active, decoder diagnostics written to fd 2 are dropped, the rest forwarded.

    Nesting is allowed (the inner one is a no-op). Forwarding is line by line and immediate, except
    that a partial line that may begin a diagnostic waits for its end (or for ``__exit__``).
    """

    _active = 0
    _lock = threading.Lock()

    def __enter__(self) -> DecoderNoiseFilter:
        with DecoderNoiseFilter._lock:
            DecoderNoiseFilter._active += 1
            self.owner = DecoderNoiseFilter._active == 1
        if not self.owner:
            return self
        try:
            sys.stderr.flush()
            self.real = os.dup(2)
        except (OSError, ValueError, AttributeError):  # no usable stderr (closed by a daemon): nothing to protect
            self.owner = False
            return self
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self.read_end = read_end
        self.thread = threading.Thread(target=self._forward, name="featstore-stderr", daemon=True)
        self.thread.start()
        self.faulthandler = faulthandler.is_enabled()
        if self.faulthandler:  # a crash report must not go into a pipe nobody reads any more
            faulthandler.enable(file=self.real)
        return self

    def __exit__(self, *exc) -> None:
        with DecoderNoiseFilter._lock:
            DecoderNoiseFilter._active -= 1
        if not self.owner:
            return
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(self.real, 2)  # closes the pipe's last write end: the forwarder reads EOF
        self.thread.join()
        os.close(self.read_end)
        if self.faulthandler:
            faulthandler.enable(file=2)
        os.close(self.real)

    def _forward(self) -> None:
        pending = b""
        while True:
            chunk = os.read(self.read_end, 65536)
            if not chunk:
                break
            pending += chunk
            # split after every \n or \r (progress bars redraw with \r), keep the terminators
            pieces = re.split(rb"(?<=[\r\n])", pending)
            pending = pieces.pop()
            out = [p for p in pieces if p and not is_decoder_noise(p.lstrip(b"\r"))]
            if pending and not _MAY_BE_NOISE.match(pending):
                out.append(pending)
                pending = b""
            if out:
                _write_all(self.real, b"".join(out))
        if pending and not is_decoder_noise(pending):
            _write_all(self.real, pending)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]
