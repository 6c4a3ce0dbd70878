"""The app in-process for the annotation-integration tests: the briefly trained test_tiny
(`tiny_trained.py`) behind `build_app`, served by uvicorn in a thread on 127.0.0.1."""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time

import numpy as np
from PIL import Image

import tiny_trained


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trained_model(cache_dir: str):
    """(model, checkpoint path) of the briefly trained test_tiny."""
    from skipclick_jax.checkpoint import load

    path = tiny_trained.trained_checkpoint(cache_dir)
    return load(path)[0], path


def sample_image(seed: int = 0, height: int = 96, width: int = 128) -> np.ndarray:
    """uint8 [H, W, 3]: a bright disc and a dark square on a noisy background."""
    rng = np.random.default_rng(seed)
    image = rng.integers(60, 120, (height, width, 3)).astype(np.uint8)
    rr, cc = np.mgrid[:height, :width]
    image[(rr - height // 2) ** 2 + (cc - width // 3) ** 2 < (height // 4) ** 2] = (230, 200, 40)
    image[height // 6: height // 3, 2 * width // 3: 5 * width // 6] = (20, 40, 160)
    return image


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@contextlib.contextmanager
def serve(app, start_timeout_s: float = 30.0):
    """Runs `app` with uvicorn on a free 127.0.0.1 port in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port}")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
