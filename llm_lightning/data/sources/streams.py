"""Compressed streams: gzip and zstd decompressed as they are read, and what a damaged one raises.

`_open_binary` gives a file's bytes (decompressed) and a count of the bytes read from disk, for
progress. A truncated or corrupt stream raises one of `_STREAM_ERRORS`; `_stream_problem` says
which in words.
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from llm_lightning.data.sources.bad_input import _one_line
from llm_lightning.data.sources.files import _COMPRESSIONS
from llm_lightning.errors import UserError

_ZSTD_INPUT = 1 << 16  # compressed bytes read from a .zst file at a time
_ZSTD_OUTPUT = 1 << 20  # about the most decompressed bytes made in one step (see _ZstdReader)
_ZSTD_BLIND = 1 << 11  # the most input fed in one step before any output shows the ratio


class _StreamError(Exception):
    """A compressed stream that is corrupt (or, `state`, cannot be read for another reason)."""

    def __init__(self, message: str, state: str = "corrupt"):
        super().__init__(message)
        self.state = state


class _TruncatedStream(EOFError):
    """A compressed stream that ends before its end marker (gzip raises EOFError for this)."""


# What reading a damaged compressed stream raises. gzip.BadGzipFile is an OSError: it must be
# caught before the "cannot be read" handler in _documents sees it.
_STREAM_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile, _StreamError)


def _stream_problem(compression: str, error: BaseException) -> str:
    kind = _COMPRESSIONS[compression]
    state = "truncated" if isinstance(error, EOFError) else getattr(error, "state", "corrupt")
    return f"{kind} stream is {state} ({_one_line(error)})"


class _CountingReader:
    """A file's `read`, counting the bytes it gave (the compressed bytes read so far)."""

    def __init__(self, file: BinaryIO):
        self._file, self.count = file, 0

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self.count += len(data)
        return data


class _ZstdReader(io.RawIOBase):
    """Zstandard frames decoded incrementally, raising on a stream that ends inside a frame.

    zstandard's own stream_reader ends quietly at a truncated frame. Its decompressobj tells
    (`eof` stays False), but returns all the output of the input it is given at once, so the
    input goes in slices sized from the last ratio seen, for about _ZSTD_OUTPUT bytes of output
    each; data far more compressible than what came before it can overshoot once.
    """

    def __init__(self, source: _CountingReader, zstd):
        super().__init__()
        self._source, self._zstd = source, zstd
        # Windows up to 128 MiB, as the zstd command line (a damaged header could ask for 2 GiB).
        self._decompressor = zstd.ZstdDecompressor()
        self._frame = None  # the decompressobj of the frame being read; None between frames
        self._input, self._input_at = b"", 0
        self._output, self._output_at = memoryview(b""), 0
        self._slice = 256  # input bytes for the next step; small until the ratio is known

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._output_at >= len(self._output):
            if not self._step():
                return 0
        n = min(len(buffer), len(self._output) - self._output_at)
        buffer[:n] = self._output[self._output_at : self._output_at + n]
        self._output_at += n
        return n

    def _step(self) -> bool:
        """Decode the next slice of input; False at the end of the stream."""
        if self._input_at >= len(self._input):
            self._input, self._input_at = self._source.read(_ZSTD_INPUT), 0
            if not self._input:
                if self._frame is not None:
                    raise _TruncatedStream("the data ends inside a zstd frame")
                return False
        piece = self._input[self._input_at : self._input_at + self._slice]
        self._input_at += len(piece)
        if self._frame is None:
            self._frame = self._decompressor.decompressobj()
        try:
            output = self._frame.decompress(piece)
        except self._zstd.ZstdError as error:
            if "too much memory" in str(error):  # made with zstd --long=31, say
                raise _StreamError(f"{error}; it needs a window over 128 MiB", "too big to decode") from None
            raise _StreamError(str(error)) from None
        used = len(piece)
        if self._frame.eof:  # the frame ended inside this slice; the rest starts the next frame
            rest = self._frame.unused_data
            used -= len(rest)
            self._frame = None
            if rest:
                self._input, self._input_at = rest + self._input[self._input_at :], 0
        if output and used > 0:
            self._slice = max(64, min(_ZSTD_INPUT, used * _ZSTD_OUTPUT // len(output)))
        elif not output:  # a block not complete yet; the ratio is still what it was
            self._slice = min(max(_ZSTD_BLIND, self._slice), self._slice * 2)
        self._output, self._output_at = memoryview(output), 0
        return True


class _OneReadAtATime(io.RawIOBase):
    """A buffered stream as a raw one that reads once per call.

    Buffering gzip again makes it decompress 64 kB at a time instead of 8 kB (faster), but a
    buffer filling itself from a buffered stream reads it again and again, and loses the data
    of the reads before one that raises (e.g. at a truncated end): reading once keeps it.
    """

    def __init__(self, stream: BinaryIO):
        super().__init__()
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self._stream.readinto1(buffer)  # type: ignore[attr-defined]

    def close(self) -> None:
        self._stream.close()
        super().close()


def _zstandard(path: str):
    try:
        import zstandard
    except ImportError:
        raise UserError(
            f"{path}: reading .zst files needs the zstandard package; pip install zstandard"
        ) from None
    return zstandard


@contextmanager
def _open_binary(path: str, compression: str | None) -> Iterator[tuple[BinaryIO, _CountingReader | None]]:
    """The file's (decompressed) bytes, and a count of the bytes read from disk (None if plain)."""
    with open(path, "rb") as file:
        if compression is None:
            yield file, None
            return
        counter = _CountingReader(file)
        if compression == ".gz":
            gzip_file = gzip.GzipFile(fileobj=counter, mode="rb")  # type: ignore[arg-type]
            stream: BinaryIO = io.BufferedReader(_OneReadAtATime(gzip_file), buffer_size=1 << 16)
        else:
            stream = io.BufferedReader(_ZstdReader(counter, _zstandard(path)), buffer_size=1 << 16)
        with stream:
            yield stream, counter
