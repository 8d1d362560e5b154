"""Settings of one studio process, filled from the CLI (`studio serve --help`)."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PORT = 8000


def default_data_dir() -> Path:
    return Path(os.environ.get("STUDIO_DATA_DIR", "studio-data"))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Settings:
    data_dir: Path = field(default_factory=default_data_dir)
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    model: Path | None = None  # a local Hugging Face folder instead of the packaged model
    model_name: str | None = None  # version name for --model / --backend-url
    backend_url: str | None = None  # an external OpenAI-compatible server instead of our vLLM
    vllm_port: int | None = None
    vllm_startup_timeout: float = 600.0
    lora: bool = True  # runtime LoRA in vLLM: needed to hot-load trained adapters
    # Measure the server's throughput against requests in flight at start (once per model and
    # server; the curve is kept in the data folder) and sample at its knee.
    probe: bool = True
    max_runs: int = 1  # training runs at once (each takes the CPU it can get)
    ui: bool = True

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.model is not None:
            self.model = Path(self.model)
        if self.max_runs < 1:
            raise ValueError(f"--max-runs {self.max_runs}: at least one training run must be able to run")
        if self.model is not None and self.backend_url:
            raise ValueError(
                "--model and --backend-url both given: --model starts our own vLLM on a local "
                "folder, --backend-url uses a server that already runs; pass one of them"
            )

    @property
    def db_path(self) -> Path:
        return self.data_dir / "studio.duckdb"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"
