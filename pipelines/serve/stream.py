"""The streaming variant: generate.run writes a fragmented MP4 (moov first, a fragment per second, flushed as it is
muxed) and the bytes are sent as they land in its partial file, so a browser `<video>` or ffplay starts playing
while the rest is rendered. Errors found before the first byte (bad inputs: they are checked first) are still a
JSON 4xx; a failure later can only cut the stream short."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path

from pipelines import generate
from pipelines.serve.engine import Engine

POLL_S = 0.05  # how often the growing file is read
READ_BYTES = 1 << 16


class Stream:
    """One streamed generation: start() runs it in a thread; first() waits for the first bytes (or the error);
    chunks() yields the bytes as the file grows, then cleans up."""

    def __init__(self, engine: Engine, uploads: dict):
        self.folder = Path(tempfile.mkdtemp(prefix="edtalk-serve-"))
        try:
            self.req, self.names = engine.request(self.folder, **uploads)
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        self.req.fragmented = True
        self.engine = engine
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.file = None

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True, name="edtalk-stream").start()

    def _run(self) -> None:
        try:
            self.engine.run(self.req, self.names)
        except BaseException as exc:  # handed to the request's coroutine
            self.error = exc
        finally:
            self.done.set()

    async def first(self) -> bytes:
        """The first bytes of the video; raises the run's error if it failed before writing any."""
        partial = generate.partial_path(Path(self.req.output))
        while True:
            if self.file is None and partial.exists():
                self.file = open(partial, "rb")  # noqa: SIM115 -- kept open across the rename to out.mp4
            data = self.file.read(READ_BYTES) if self.file is not None else b""
            if data:
                return data
            if self.done.is_set():
                if self.error is not None:
                    self.close()
                    raise self.error
                if self.file is None:  # finished between two polls: the complete file took its name
                    self.file = open(self.req.output, "rb")  # noqa: SIM115
                    continue
                return b""
            await asyncio.sleep(POLL_S)

    async def chunks(self, first: bytes) -> AsyncIterator[bytes]:
        try:
            yield first
            while True:
                data = self.file.read(READ_BYTES)
                if data:
                    yield data
                elif self.done.is_set():
                    rest = self.file.read()
                    if rest:
                        yield rest
                    if self.error is not None:  # cut the response: the client must not take it as complete
                        raise RuntimeError(f"generation failed mid-stream: {self.error}") from self.error
                    return
                else:
                    await asyncio.sleep(POLL_S)
        finally:
            self.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        shutil.rmtree(self.folder, ignore_errors=True)
